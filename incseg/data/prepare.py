"""Check a dataset's layout and build what the protocol needs from official releases.

VOC: the protocol trains on ``train_aug`` (SBD train+val + VOC train, minus VOC val: 10,582
images) with SBD's masks converted to PNGs in ``SegmentationClassAug``. Given the SBD release
(``benchmark_RELEASE/dataset/{cls/*.mat,train.txt,val.txt}``) beside ``VOCdevkit`` (or at
``data.sbd_root``), ``prepare`` writes both, atomically. It never downloads anything
(``incseg.data.download`` does, then calls it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from incseg.errors import DataError
from incseg.io import atomic_dir, atomic_write_text

log = logging.getLogger(__name__)

VOC_TRAINVAL = "VOCtrainval_11-May-2012.tar (the PASCAL VOC 2012 development kit)"
SBD_RELEASE = "benchmark.tgz (the SBD release by Hariharan et al.)"


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC palette: class c's colour interleaves the bits of c over R, G and B."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def save_palette_png(mask: np.ndarray, path: Path) -> None:
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(voc_colormap().ravel().tolist())
    im.save(path, optimize=False)


def _ids(path: Path) -> list[str]:
    return [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]


def _find_sbd(root: Path, sbd_root: Path | None) -> Path | None:
    candidates = [sbd_root] if sbd_root else [root / "benchmark_RELEASE" / "dataset",
                                              root / "SBD" / "dataset", root / "SBD"]
    for c in candidates:
        if c is not None and (c / "cls").is_dir():
            return c
    if sbd_root:
        raise DataError(f"SBD folder {sbd_root}/cls is missing; point data.sbd_root at the "
                        f"'dataset' folder of {SBD_RELEASE}")
    return None


def read_sbd_mask(path: Path) -> np.ndarray:
    from scipy.io import loadmat

    try:
        gt = loadmat(str(path), squeeze_me=True, struct_as_record=False)["GTcls"]
        return np.asarray(gt.Segmentation, dtype=np.uint8)
    except Exception as err:  # scipy raises several types for a corrupt file
        raise DataError(
            f"SBD file {path} cannot be read ({err}); re-extract {SBD_RELEASE}"
        ) from None


def prepare_voc(root: Path, sbd_root: Path | None = None, progress: bool = True) -> dict:
    """Verify ``root/VOCdevkit/VOC2012`` and build train_aug from SBD when it is missing."""
    base = root / "VOCdevkit" / "VOC2012"
    seg = base / "ImageSets" / "Segmentation"
    for p in (base / "JPEGImages", base / "SegmentationClass", seg / "train.txt", seg / "val.txt"):
        if not p.exists():
            raise DataError(f"{p} is missing; extract {VOC_TRAINVAL} into {root}, or run "
                            f"`python -m incseg.data download dataset=voc data.root={root}`")
    voc_train, voc_val = _ids(seg / "train.txt"), _ids(seg / "val.txt")
    aug_dir, aug_list = base / "SegmentationClassAug", seg / "train_aug.txt"
    if aug_list.exists() and aug_dir.is_dir():
        ids = _ids(aug_list)
        missing = [i for i in ids if not (aug_dir / f"{i}.png").exists()]
        if missing:
            raise DataError(f"{len(missing)} masks listed in {aug_list} are missing from "
                            f"{aug_dir} (first: {missing[0]}.png); delete both and run prepare")
        return {"dataset": "voc", "train_aug": len(ids), "val": len(voc_val), "built": False}
    sbd = _find_sbd(root, sbd_root)
    if sbd is None:
        raise DataError(
            f"{aug_list} is missing and no SBD release was found; extract {SBD_RELEASE} into "
            f"{root} (so that {root}/benchmark_RELEASE/dataset/cls exists) and run prepare again, "
            f"or run `python -m incseg.data download dataset=voc data.root={root}`"
        )
    sbd_ids = []
    for name in ("train.txt", "val.txt"):
        if not (sbd / name).exists():
            raise DataError(f"SBD list {sbd / name} is missing; re-extract {SBD_RELEASE}")
        sbd_ids += _ids(sbd / name)
    val = set(voc_val)
    train_aug = sorted((set(sbd_ids) | set(voc_train)) - val)
    voc_train_set = set(voc_train)
    with atomic_dir(aug_dir) as tmp:
        for i in tqdm(train_aug, disable=not progress, desc="SegmentationClassAug"):
            if not (base / "JPEGImages" / f"{i}.jpg").exists():
                raise DataError(f"image {base / 'JPEGImages' / f'{i}.jpg'} is missing; "
                                f"re-extract {VOC_TRAINVAL}")
            if i in voc_train_set:
                # VOC's own (finer) annotation wins over SBD's where both exist.
                with Image.open(base / "SegmentationClass" / f"{i}.png") as im:
                    mask = np.asarray(im)
            else:
                mask = read_sbd_mask(sbd / "cls" / f"{i}.mat")
            save_palette_png(mask, tmp / f"{i}.png")
    atomic_write_text(aug_list, "".join(f"{i}\n" for i in train_aug))
    log.info("wrote %d masks to %s and %s", len(train_aug), aug_dir, aug_list)
    return {"dataset": "voc", "train_aug": len(train_aug), "val": len(voc_val), "built": True}


def prepare_ade(root: Path) -> dict:
    base = root / "ADEChallengeData2016"
    counts = {}
    for sub in ("training", "validation"):
        for kind in ("images", "annotations"):
            p = base / kind / sub
            if not p.is_dir():
                raise DataError(f"{p} is missing; extract ADEChallengeData2016.zip into {root}, "
                                f"or run `python -m incseg.data download dataset=ade "
                                f"data.root={root}`")
        counts[sub] = sum(1 for _ in (base / "images" / sub).glob("*.jpg"))
    return {"dataset": "ade", **counts, "built": False}

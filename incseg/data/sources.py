"""Where a dataset's images and masks live on disk, per split.

Three sources share one reader. ``voc`` and the built-in ``shapes`` use the PASCAL VOC layout
(``<root>/VOCdevkit/VOC2012/...``, torchvision's convention for ``root``); ``ade`` uses
``<root>/ADEChallengeData2016/{images,annotations}/{training,validation}``. A source only lists
(image, mask) pairs and checks that the files it names exist; reading and validating the masks
is ``incseg.data.index``'s job. A user's own dataset (``folder``) is in ``incseg.data.folder``.

The interface every source implements, and the validation policy ``data.val`` it applies
(``split``, ``holdout``, ``none``), are in ``incseg.data.base``.
"""

from __future__ import annotations

from pathlib import Path

from incseg.data.base import (
    HOLDOUT_FRACTION,
    SPLITS,
    VAL_MODES,
    Sample,
    Source,
    held_out,
)
from incseg.errors import DataError

__all__ = [
    "HOLDOUT_FRACTION", "SBD_HINT", "SOURCES", "SPLITS", "VAL_MODES", "ADESource", "Sample",
    "ShapesSource", "Source", "VOCLayout", "VOCSource", "held_out", "make_source", "read_list",
]

SBD_HINT = (
    "run `python -m incseg.data prepare dataset=voc data.root=DIR` with the SBD release "
    "(benchmark_RELEASE/dataset/cls/*.mat) under DIR to build it, or `python -m incseg.data "
    "download dataset=voc data.root=DIR` to fetch VOC 2012 and SBD and build it"
)


def read_list(list_file: Path, image_dir: Path, mask_dir: Path, base: Path) -> list[Sample]:
    """Read a split list: one image id per line (VOC) or ``/JPEGImages/x.jpg /Seg.../x.png``
    pairs (the train_aug.txt that MiB and DeepLab ship)."""
    samples = []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) == 1:
            sid = parts[0]
            samples.append(Sample(sid, image_dir / f"{sid}.jpg", mask_dir / f"{sid}.png"))
        elif len(parts) == 2:
            img, msk = (base / p.lstrip("/") for p in parts)
            samples.append(Sample(Path(img).stem, img, msk))
        else:
            raise DataError(
                f"{list_file}:{n}: expected an id or an 'image mask' pair, got {line!r}"
            )
    return samples


class VOCLayout(Source):
    """``<root>/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}``."""

    layout_hint = "VOCdevkit/VOC2012"

    @property
    def base(self) -> Path:
        return self.root / "VOCdevkit" / "VOC2012"

    def _list(self, name: str, mask_dir: str, fix: str) -> list[Sample]:
        base = self._require(self.base, "VOC folder", f"data.root must hold {self.layout_hint}")
        lst = self._require(base / "ImageSets" / "Segmentation" / f"{name}.txt", "list file", fix)
        return read_list(lst, base / "JPEGImages", base / mask_dir, base)


class VOCSource(VOCLayout):
    """PASCAL VOC 2012 with SBD (Hariharan et al., 2011): train = train_aug (10,582 images),
    test = VOC 2012 val (1,449). No validation list of its own: ``val`` is ``holdout`` or
    ``none`` (module docstring)."""

    name = "voc"
    num_classes = 21

    def listed(self, split: str) -> list[Sample]:
        if split == "test":
            return self._list("val", "SegmentationClass",
                              "it ships with the VOC 2012 trainval tar (VOCtrainval_11-May-2012)")
        if split == "train":
            return self._list("train_aug", "SegmentationClassAug", SBD_HINT)
        raise ValueError(f"voc has no own {split!r} list")


class ShapesSource(VOCLayout):
    """The built-in benchmark, written in the VOC layout with train/val/test lists."""

    name = "shapes"
    num_classes = 21
    own_val = True

    def listed(self, split: str) -> list[Sample]:
        return self._list(split, "SegmentationClass",
                          "the shapes cache entry is incomplete: delete it and run again")


class ADESource(Source):
    """ADE20K (SceneParsing): 150 classes + 0; train = training, test = validation. No
    validation list of its own: ``val`` is ``holdout`` or ``none`` (module docstring)."""

    name = "ade"
    num_classes = 151
    layout_hint = "ADEChallengeData2016"

    def listed(self, split: str) -> list[Sample]:
        if split not in ("train", "test"):
            raise ValueError(f"ade has no own {split!r} list")
        base = self._require(self.root / "ADEChallengeData2016", "ADE20K folder",
                             "data.root must hold ADEChallengeData2016 (ADEChallengeData2016.zip)")
        sub = "training" if split == "train" else "validation"
        img_dir = self._require(base / "images" / sub, "image folder", "unpack the full zip")
        ann_dir = self._require(base / "annotations" / sub, "annotation folder",
                                "unpack the full zip")
        return [Sample(p.stem, p, ann_dir / f"{p.stem}.png")
                for p in sorted(img_dir.glob("*.jpg"))]


SOURCES = {"voc": VOCSource, "shapes": ShapesSource, "ade": ADESource}


def make_source(name: str, root, val: str | None = None) -> Source:
    """The source of dataset ``name`` at ``root`` under the validation policy ``val``
    (``data.val``; None: the dataset's default, ``split`` where it ships a val list)."""
    if name == "folder":
        from incseg.data.folder import FolderSource  # a Source subclass in its own module

        return FolderSource(root, val)
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; choose one of: "
                        f"{', '.join(sorted([*SOURCES, 'folder']))}")
    return SOURCES[name](root, val)

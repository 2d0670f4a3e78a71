"""Where a dataset's images and masks live on disk, per split.

Three sources share one reader. ``voc`` and the built-in ``shapes`` use the PASCAL VOC layout
(``<root>/VOCdevkit/VOC2012/...``, torchvision's convention for ``root``); ``ade`` uses
``<root>/ADEChallengeData2016/{images,annotations}/{training,validation}``. A source only lists
(image, mask) pairs and checks that the files it names exist; reading and validating the masks
is ``incseg.data.index``'s job. A user's own dataset (``folder``) is in ``incseg.data.folder``.

Only ``shapes`` has a held-out ``val`` split. VOC and ADE20K publish two splits, and here
``val`` is every 20th image of one of them: of the *training* images for VOC (so they are
also trained on) and of the *validation* images for ADE20K (so they are also test images).
Neither is a held-out model-selection split; the source classes below say which.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from incseg.errors import DataError

SPLITS = ("train", "val", "test")

SBD_HINT = (
    "run `python -m incseg.data prepare dataset=voc data.root=DIR` with the SBD release "
    "(benchmark_RELEASE/dataset/cls/*.mat) under DIR to build it"
)


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    mask: Path


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


class Source(ABC):
    """A dataset on disk: ``samples(split)`` lists its (image, mask) pairs."""

    name: str
    num_classes: int
    #: class names in id order, for datasets that list them (``folder``); None: ids only
    class_names: tuple[str, ...] | None = None
    #: the advice of the scan's error for a mask value outside the classes
    mask_value_fix = "fix the mask or choose the right dataset"

    def __init__(self, root: str | os.PathLike | None):
        if root is None or str(root) in ("", "None", "null"):
            raise DataError(
                f"data.root is not set for dataset {self.name}; "
                f"pass data.root=DIR (the folder that holds {self.layout_hint})"
            )
        self.root = Path(os.path.expanduser(str(root)))
        if not self.root.is_dir():
            raise DataError(
                f"dataset root {self.root} does not exist; pass data.root=DIR "
                f"(the folder that holds {self.layout_hint})"
            )

    layout_hint = ""

    @abstractmethod
    def samples(self, split: str) -> list[Sample]:
        """The (image, mask) pairs of ``split`` (train, val or test), in a fixed order."""

    def has_split(self, split: str) -> bool:
        """False for a split this dataset does not have (``folder`` without ``val.txt``)."""
        return True

    def cache_identity(self) -> str:
        """What a cached model trained on this dataset is keyed by: its location, for the
        published datasets whose files never change."""
        return str(self.root)

    def class_info(self) -> dict:
        """What results and checkpoints record about the classes beside their ids:
        ``class_names`` and ``class_colors`` (RGB per id) where the dataset defines them."""
        return {}

    def _require(self, path: Path, what: str, fix: str) -> Path:
        if not path.exists():
            raise DataError(f"{what} {path} is missing; {fix}")
        return path

    def check_split(self, split: str) -> list[Sample]:
        """``samples(split)`` after checking that every file it names exists."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if not self.has_split(split):
            return []
        samples = self.samples(split)
        if not samples:
            raise DataError(f"the {split} split of {self.name} at {self.root} lists no images; "
                            "check its list file (or re-run python -m incseg.data prepare)")
        for s in samples:
            for path, what in ((s.image, "image"), (s.mask, "mask")):
                if not path.is_file():
                    raise DataError(f"{what} {path} (listed for split {split}) is missing; "
                                    f"restore it, or remove {s.id} from the {split} list")
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
    test = VOC 2012 val (1,449).

    ``val`` is every 20th image of train_aug. Those images are in ``train`` as well, so val
    scores are measured on training images: they never touch the test images, but they are
    not held out either.
    """

    name = "voc"
    num_classes = 21

    def samples(self, split: str) -> list[Sample]:
        if split == "test":
            return self._list("val", "SegmentationClass",
                              "it ships with the VOC 2012 trainval tar (VOCtrainval_11-May-2012)")
        train = self._list("train_aug", "SegmentationClassAug", SBD_HINT)
        if split == "val":
            return train[::20]  # training images, also in ``train`` (see the class docstring)
        return train


class ShapesSource(VOCLayout):
    """The built-in benchmark, written in the VOC layout with train/val/test lists."""

    name = "shapes"
    num_classes = 21

    def samples(self, split: str) -> list[Sample]:
        return self._list(split, "SegmentationClass",
                          "the shapes cache entry is incomplete: delete it and run again")


class ADESource(Source):
    """ADE20K (SceneParsing): 150 classes + 0; train = training, test = validation, and
    ``val`` = every 20th validation image (a subset of the test images)."""

    name = "ade"
    num_classes = 151
    layout_hint = "ADEChallengeData2016"

    def samples(self, split: str) -> list[Sample]:
        base = self._require(self.root / "ADEChallengeData2016", "ADE20K folder",
                             "data.root must hold ADEChallengeData2016 (ADEChallengeData2016.zip)")
        sub = "training" if split == "train" else "validation"
        img_dir = self._require(base / "images" / sub, "image folder", "unpack the full zip")
        ann_dir = self._require(base / "annotations" / sub, "annotation folder",
                                "unpack the full zip")
        samples = [Sample(p.stem, p, ann_dir / f"{p.stem}.png")
                   for p in sorted(img_dir.glob("*.jpg"))]
        # ``val`` and ``test`` both read the validation folder; val keeps 1 in 20 of it.
        return samples[::20] if split == "val" else samples


SOURCES = {"voc": VOCSource, "shapes": ShapesSource, "ade": ADESource}


def make_source(name: str, root) -> Source:
    if name == "folder":
        from incseg.data.folder import FolderSource  # a Source subclass in its own module

        return FolderSource(root)
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; choose one of: "
                        f"{', '.join(sorted([*SOURCES, 'folder']))}")
    return SOURCES[name](root)

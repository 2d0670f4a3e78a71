"""Where a dataset's images and masks live on disk, per split.

Three sources share one reader. ``voc`` and the built-in ``shapes`` use the PASCAL VOC layout
(``<root>/VOCdevkit/VOC2012/...``, torchvision's convention for ``root``); ``ade`` uses
``<root>/ADEChallengeData2016/{images,annotations}/{training,validation}``. A source only lists
(image, mask) pairs and checks that the files it names exist; reading and validating the masks
is ``incseg.data.index``'s job. A user's own dataset (``folder``) is in ``incseg.data.folder``.

A source lists the dataset's own lists (:meth:`Source.listed`: train, test and, where the
dataset ships one, val); :meth:`Source.samples` applies the validation policy ``val``
(``data.val``) on top, so that the validation images never overlap the training images and
never come from the test split:

- ``split``: the dataset's own validation list (``shapes``; VOC and ADE20K ship none);
- ``holdout``: a fixed 1 in 20 of the training list, chosen by a hash of each image's id
  (:func:`held_out`), removed from training;
- ``none``: no validation; training uses the whole list (the literature's setting on VOC and
  ADE20K: MiB and PLOP train on all of train_aug / training and validate on nothing).
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from incseg.errors import DataError

SPLITS = ("train", "val", "test")
#: ``data.val``: where the validation images come from (module docstring)
VAL_MODES = ("split", "holdout", "none")
#: the share of a training list that ``data.val=holdout`` keeps out of training
HOLDOUT_FRACTION = 0.05

SBD_HINT = (
    "run `python -m incseg.data prepare dataset=voc data.root=DIR` with the SBD release "
    "(benchmark_RELEASE/dataset/cls/*.mat) under DIR to build it, or `python -m incseg.data "
    "download dataset=voc data.root=DIR` to fetch VOC 2012 and SBD and build it"
)


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    mask: Path


def held_out(sample_id: str) -> bool:
    """Whether ``data.val=holdout`` keeps this training image out of training (for validation).

    Decided by the image id alone (the first 8 bytes of its SHA-256 as a fraction of 2^64,
    below :data:`HOLDOUT_FRACTION`): the same images on every machine, whatever the order of
    the list file, and adding or removing other images never moves one across.
    """
    digest = hashlib.sha256(sample_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < HOLDOUT_FRACTION * 2**64


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
    """A dataset on disk: ``samples(split)`` lists its (image, mask) pairs under the
    validation policy ``val`` (one of :data:`VAL_MODES`; None: the dataset's default).

    A subclass implements :meth:`listed` (its own lists) and sets ``own_val`` when the dataset
    ships a validation list of its own (``data.val=split``).
    """

    name: str
    num_classes: int
    #: class names in id order, for datasets that list them (``folder``); None: ids only
    class_names: tuple[str, ...] | None = None
    #: the advice of the scan's error for a mask value outside the classes
    mask_value_fix = "fix the mask or choose the right dataset"
    #: the dataset ships its own validation list (``data.val=split`` reads it)
    own_val = False

    def __init__(self, root: str | os.PathLike | None, val: str | None = None):
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
        self.val = ("split" if self.own_val else "none") if val is None else str(val)
        if self.val not in VAL_MODES:  # the config check names these for the user first
            raise ValueError(f"val={self.val!r} is not one of {', '.join(VAL_MODES)}")
        if self.val == "split" and not self.own_val:
            raise ValueError(f"{self.name} has no validation split of its own; use "
                             "val='holdout' or val='none'")

    layout_hint = ""

    @abstractmethod
    def listed(self, split: str) -> list[Sample]:
        """The dataset's own list ``split`` (train, test, and val where ``own_val``), in a
        fixed order."""

    def origin(self, split: str) -> tuple[str | None, list[int] | None]:
        """Which own list ``split`` is drawn from and which of its positions (None: all of
        them): the validation policy in one place. ``(None, [])``: an empty split."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if split == "test":
            return "test", None
        if split == "val" and self.val == "split":
            return "val", None
        if self.val != "holdout":
            return ("train", None) if split == "train" else (None, [])
        want = split == "val"  # holdout: val = the held-out ids, train = the rest
        return "train", [i for i, s in enumerate(self.listed("train")) if held_out(s.id) == want]

    def samples(self, split: str) -> list[Sample]:
        """The (image, mask) pairs of ``split`` (train, val or test), in a fixed order."""
        name, keep = self.origin(split)
        if name is None:
            return []
        listed = self.listed(name)
        return listed if keep is None else [listed[i] for i in keep]

    def has_split(self, split: str) -> bool:
        """False for a split that is empty by the validation policy (``val`` under ``none``)."""
        return self.origin(split)[0] is not None

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

    def check_list(self, name: str) -> list[Sample]:
        """``listed(name)`` after checking that it is not empty and that every file it names
        exists."""
        samples = self.listed(name)
        if not samples:
            raise DataError(f"the {name} split of {self.name} at {self.root} lists no images; "
                            "check its list file (or re-run python -m incseg.data prepare)")
        for s in samples:
            for path, what in ((s.image, "image"), (s.mask, "mask")):
                if not path.is_file():
                    raise DataError(f"{what} {path} (listed for split {name}) is missing; "
                                    f"restore it, or remove {s.id} from the {name} list")
        return samples

    def check_split(self, split: str) -> list[Sample]:
        """``samples(split)`` after checking the list it is drawn from (:meth:`check_list`);
        empty for ``val`` under ``val='none'``."""
        name, keep = self.origin(split)
        if name is None:
            return []
        listed = self.check_list(name)
        return listed if keep is None else [listed[i] for i in keep]


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

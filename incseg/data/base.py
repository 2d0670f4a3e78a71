"""What a dataset on disk is: :class:`Source` lists (image, mask) :class:`Sample` pairs per
split, under a validation policy.

The datasets themselves are in ``incseg.data.sources`` (VOC, ADE20K, ``shapes``) and
``incseg.data.folder`` (a user's own); both build on this module, which needs neither.

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

"""Task splits as data: which dataset classes each incremental step introduces.

A task is a list of steps, each a list of dataset class ids; background (0) belongs to step 0.
The model's output channel k is the k-th class in *task order* (``classes_seen``), so a task with
a non-natural class order (MiB's ``b``/``c`` orders) is just a custom split. Labels are remapped
from dataset ids to channels with a 256-entry lookup table (``train_lut`` / ``test_lut``): one
``lut[mask]`` gather per image, never a per-pixel Python loop.

A dataset that names its classes (``folder``'s ``classes.yaml``) brings its own class count and
lets a custom split name classes instead of numbering them; names become ids here, once, so
everything downstream (selection, lookup tables, results) speaks in ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from incseg.errors import ConfigError

IGNORE = 255

#: number of classes of each dataset, background (0) included
NUM_CLASSES = {"voc": 21, "shapes": 21, "ade": 151}
#: datasets whose classes are listed in their own data (``folder``: ``classes.yaml``)
OWN_CLASSES = ("folder",)


def _blocks(first: int, last: int, size: int) -> list[list[int]]:
    return [list(range(s, min(s + size, last + 1))) for s in range(first, last + 1, size)]


# VOC and `shapes` share class ids 1..20, so every VOC split applies to both.
_VOC = {
    "offline": [list(range(21))],
    "19-1": [list(range(20)), [20]],
    "15-5": [list(range(16)), list(range(16, 21))],
    "15-5s": [list(range(16)), [16], [17], [18], [19], [20]],
    "10-5-5": [list(range(11)), list(range(11, 16)), list(range(16, 21))],
    "10-1": [list(range(11))] + [[c] for c in range(11, 21)],
}
_ADE = {
    "offline": [list(range(151))],
    "100-50": [list(range(101)), list(range(101, 151))],
    "100-10": [list(range(101))] + _blocks(101, 150, 10),
    "100-5": [list(range(101))] + _blocks(101, 150, 5),
    "50": [list(range(51)), list(range(51, 101)), list(range(101, 151))],
}
SPLITS: dict[str, dict[str, list[list[int]]]] = {"voc": _VOC, "shapes": _VOC, "ade": _ADE}
#: names that mean the same split; results always use the canonical name
ALIASES = {"15-1": "15-5s"}


@dataclass
class Task:
    """A class-incremental task on one dataset.

    ``steps[t]`` lists the dataset class ids introduced at step t, in task order; 0 is in step 0.
    """

    dataset: str
    name: str
    steps: list[list[int]]
    num_dataset_classes: int

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.num_steps:
            raise ConfigError(
                f"step {step} is out of range for task {self.name} ({self.num_steps} steps)"
            )

    def classes_seen(self, step: int) -> list[int]:
        """Classes seen up to and including ``step``, in task order (background first)."""
        self._check_step(step)
        return [c for s in self.steps[: step + 1] for c in s]

    def classes_before(self, step: int) -> list[int]:
        """Classes seen before ``step`` (background included); empty at step 0."""
        self._check_step(step)
        return [c for s in self.steps[:step] for c in s]

    def classes_added(self, step: int) -> list[int]:
        """Classes introduced at ``step``."""
        self._check_step(step)
        return list(self.steps[step])

    @property
    def old_classes(self) -> list[int]:
        """The paper's 'old' group: background + step-0 classes (its '1-15' is in fact 0-15)."""
        return list(self.steps[0])

    @property
    def new_classes(self) -> list[int]:
        """The paper's 'new' group: every class added after step 0."""
        return [c for s in self.steps[1:] for c in s]

    @property
    def classes_per_step(self) -> list[int]:
        return [len(s) for s in self.steps]

    def joint(self) -> Task:
        """The offline (Joint) counterpart: one step over all classes, same channel order."""
        return Task(self.dataset, self.name, [self.classes_seen(self.num_steps - 1)],
                    self.num_dataset_classes)

    def train_lut(self, step: int, void_as_background: bool = True) -> np.ndarray:
        """Lookup table dataset id -> training label at ``step`` (the MiB protocol).

        Current classes keep their channel index; background, old and future classes -> 0;
        void (255) -> 0 when ``void_as_background`` (MiB's code, the paper) else ignored.
        """
        lut = np.full(256, IGNORE, dtype=np.uint8)
        lut[: self.num_dataset_classes] = 0
        seen = self.classes_seen(step)
        offset = len(self.classes_before(step))
        for i, c in enumerate(self.classes_added(step)):
            lut[c] = offset + i
        lut[0] = 0
        assert seen[0] == 0
        lut[IGNORE] = 0 if void_as_background else IGNORE
        return lut

    def test_lut(self, step: int, unseen_as: str = "ignore") -> np.ndarray:
        """Lookup table dataset id -> evaluation label after ``step``.

        Seen classes keep their channel index, void stays 255, classes not yet seen -> 255
        (``unseen_as='ignore'``, MiB) or 0 (``'background'``, PLOP).
        """
        if unseen_as not in ("ignore", "background"):
            raise ConfigError(
                f"data.unseen_as={unseen_as!r} is not valid; use 'ignore' (MiB) or 'background'"
            )
        fill = IGNORE if unseen_as == "ignore" else 0
        lut = np.full(256, IGNORE, dtype=np.uint8)
        lut[: self.num_dataset_classes] = fill
        for i, c in enumerate(self.classes_seen(step)):
            lut[c] = i
        lut[IGNORE] = IGNORE
        return lut


def remap(mask: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """``lut[mask]`` for a uint8 mask, through OpenCV's table lookup (about 4x faster than NumPy
    fancy indexing on a 512x512 mask: ~0.2 ms here)."""
    import cv2

    if mask.dtype == np.uint8 and lut.dtype == np.uint8 and mask.ndim == 2 and mask.size:
        return cv2.LUT(mask, lut)
    return np.take(lut, mask)


def _class_id(c, t: int, name: str, dataset: str, class_names: Sequence[str] | None,
              hint: str) -> int:
    """A split's entry as a class id: an id, or a name of the dataset's class list."""
    if isinstance(c, str) and class_names is not None:
        if c in class_names:
            return list(class_names).index(c)
        raise ConfigError(
            f"task {name}: step {t} names class {c!r}, which is not in the dataset's class list "
            f"({', '.join(class_names)}); use one of those names or an id "
            f"0..{len(class_names) - 1}"
        )
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
        raise ConfigError(f"task {name}: step {t} holds {c!r}, not a class id ({hint})")
    return int(c)


def _validate(dataset: str, name: str, steps: Sequence[Sequence[int | str]], n: int,
              class_names: Sequence[str] | None = None) -> list[list[int]]:
    hint = "e.g. task.steps=[[0,1,2,3],[4,5]]"
    if not isinstance(steps, Sequence) or isinstance(steps, str) or len(steps) == 0:
        raise ConfigError(f"task {name}: steps must be a non-empty list of class lists ({hint})")
    out: list[list[int]] = []
    seen: set[int] = set()
    for t, step in enumerate(steps):
        if isinstance(step, str) or not isinstance(step, Sequence) or len(step) == 0:
            raise ConfigError(
                f"task {name}: step {t} must be a non-empty list of class ids ({hint})"
            )
        ids = []
        for c in step:
            c = _class_id(c, t, name, dataset, class_names, hint)
            if not 0 <= c < n:
                raise ConfigError(
                    f"task {name}: class {c} in step {t} is outside {dataset}'s ids 0..{n - 1}"
                )
            if c in seen:
                raise ConfigError(
                    f"task {name}: class {c} appears twice; every class belongs to one step"
                )
            seen.add(c)
            ids.append(c)
        out.append(ids)
    if out[0][0] != 0:
        if 0 in out[0]:
            raise ConfigError(f"task {name}: background 0 must come first in step 0 ({hint})")
        raise ConfigError(f"task {name}: step 0 must contain the background class 0 ({hint})")
    return out


def get_task(dataset: str, name: str, steps: Sequence[Sequence[int | str]] | None = None,
             class_names: Sequence[str] | None = None) -> Task:
    """The task ``name`` on ``dataset``; ``steps`` gives a custom split (validated).

    ``class_names`` is the class list of a dataset that defines its own (``folder``): its
    length is the number of classes, ``steps`` may name classes, and ``offline`` is its only
    named split.

    >>> get_task("voc", "15-5").steps[1]
    [16, 17, 18, 19, 20]
    >>> get_task("folder", "custom", [["background", "sky"], ["car"]],
    ...          ["background", "car", "sky"]).steps
    [[0, 2], [1]]
    """
    if class_names is not None:
        n = len(class_names)
        known = {"offline": [list(range(n))]}
    elif dataset in NUM_CLASSES:
        n, known = NUM_CLASSES[dataset], SPLITS[dataset]
    elif dataset in OWN_CLASSES:
        raise ConfigError(f"dataset {dataset} lists its classes in its data root's classes.yaml "
                          "and none was given; pass data.root=DIR")
    else:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of: "
                          f"{', '.join(sorted((*NUM_CLASSES, *OWN_CLASSES)))}")
    if steps is not None:
        steps = [list(s) if isinstance(s, Sequence) and not isinstance(s, str) else s
                 for s in steps]
        return Task(dataset, name or "custom",
                    _validate(dataset, name or "custom", steps, n, class_names), n)
    canonical = ALIASES.get(str(name), str(name))
    if canonical not in known:
        names = ", ".join(list(known) + [a for a, c in ALIASES.items() if c in known])
        raise ConfigError(
            f"unknown task {name!r} for dataset {dataset}; choose one of: {names} "
            "(or a custom split: task=custom task.steps=[[0,1,...],[...]])"
        )
    return Task(dataset, canonical, [list(s) for s in known[canonical]], n)

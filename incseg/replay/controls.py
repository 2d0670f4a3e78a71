"""The two replay controls that bracket DeepInversion.

- noise (lower bound): the generator's unoptimised initialisation, N(0, 1) in the normalised
  space and clamped; same count, targets and cache layout as a DeepInversion set, ``kind="noise"``
  in the key. Whatever DeepInversion gains over it comes from the optimisation, not from
  replaying *some* images.
- exemplars (upper bound): real stored training images of the old classes, what a method with
  an exemplar memory could have kept. Only the images are replayed: like the synthetic ones,
  they are scored by the frozen model t-1, never by their labels.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from incseg.data.dataset import SegmentationDataset
from incseg.data.index import foreground, scan_labels
from incseg.data.transforms import train_transform
from incseg.replay.settings import InversionSettings
from incseg.tasks import Task

__all__ = ["ImagesOnly", "exemplar_dataset", "generator_settings"]


def generator_settings(kind: str, settings: InversionSettings) -> InversionSettings:
    """The settings the generator runs with for a replay set of ``kind``: for "noise", no
    iterations at all, so :func:`~incseg.replay.generator.synthesise` returns its (clamped)
    initialisation. The cache key keeps hashing the settings as given."""
    if kind == "noise":
        return replace(settings, iterations_low=0, iterations_full=0)
    return settings


class ImagesOnly(Dataset):
    """A view of a :class:`SegmentationDataset` that drops the masks."""

    def __init__(self, ds: SegmentationDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, item):
        return self.ds[item][0]


def exemplar_dataset(source, task: Task, step: int, n_per_class: int, size: int,
                     cache: Path | None, seed: int) -> tuple[Dataset, dict]:
    """Real exemplars of the old foreground classes of ``step``.

    For each old class (in order), ``n_per_class`` images are drawn (seeded) from *every*
    training image of ``source`` whose label holds the class — whichever step's training set
    the image belongs to, not only the step that introduced the class; an image already drawn
    for an earlier class is not drawn again. Returns the images (training augmentation, no
    masks) and a replay info dict like :meth:`ReplaySet.as_dict`'s.
    """
    labels = scan_labels(source, "train", cache, progress=False)
    samples = source.samples("train")
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c in foreground(task.classes_before(step)):
        pool = [i for i, lab in enumerate(labels) if c in foreground(lab) and i not in chosen]
        chosen += [int(i) for i in rng.permutation(pool)[:n_per_class]]
    ds = SegmentationDataset([samples[i] for i in chosen], task.train_lut(step),
                             train_transform(size, hflip=True, scale=(1.0, 1.0)))
    info = {"path": None, "images": len(chosen), "teacher_accuracy": None,
            "verifier_accuracy": None, "kind": "exemplars"}
    return ImagesOnly(ds), info

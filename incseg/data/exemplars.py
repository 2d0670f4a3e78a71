"""The upper-bound replay control: real stored training images of the old classes.

For each old foreground class, ``n_per_class`` training images that hold it are drawn from the
images of the step that introduced the class (what a method with an exemplar memory could have
kept). Only the images are replayed — like the synthetic ones, they are scored by the frozen
model t-1, never by their labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from incseg.data.dataset import SegmentationDataset
from incseg.data.index import foreground, scan_labels
from incseg.data.transforms import train_transform
from incseg.tasks import Task


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

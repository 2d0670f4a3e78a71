"""A segmentation dataset over a list of (image, mask) files with a label lookup table."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import albumentations as A
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from incseg.data.base import Sample
from incseg.data.index import read_mask
from incseg.data.transforms import reseed
from incseg.errors import DataError
from incseg.tasks import remap


def read_image(path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"image {path} cannot be read ({err}); replace or re-create it") from None


class SegmentationDataset(Dataset):
    """Images and remapped masks: ``(image float C x H x W normalised, mask long H x W)``.

    ``lut`` maps dataset ids to the step's labels (``Task.train_lut`` / ``test_lut``); it is
    applied *before* the geometric transforms so that pixels they invent (padding, rotation
    corners) are 255 = ignored, never background.
    Items may be indexed by ``int`` or by ``(index, seed)`` pairs from :class:`SeededSampler`.
    """

    def __init__(self, samples: Sequence[Sample], lut: np.ndarray, transform: A.Compose):
        self.samples = list(samples)
        self.lut = np.asarray(lut, dtype=np.uint8)
        if self.lut.shape != (256,):
            raise ValueError("lut must have 256 entries")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            item, seed = item
            reseed(self.transform, seed)
        s = self.samples[item]
        image = read_image(s.image)
        mask = remap(read_mask(s.mask), self.lut)
        if mask.shape != image.shape[:2]:
            raise DataError(f"mask {s.mask} and image {s.image} differ in size")
        out = self.transform(image=image, mask=mask)
        return out["image"], torch.as_tensor(out["mask"]).long()


class SeededSampler(Sampler):
    """A shuffling sampler whose order and per-sample augmentation seeds derive from
    (seed, step, epoch) only — the basis of exact resume. Lightning calls ``set_epoch``.

    Yields ``(index, sample_seed)`` pairs. With ``num_replicas`` > 1 (DDP) each rank takes its
    strided share of the same permutation, like ``DistributedSampler``.
    """

    def __init__(self, n: int, seed: int, step: int, shuffle: bool = True,
                 num_replicas: int = 1, rank: int = 0):
        self.n, self.seed, self.step, self.shuffle = n, int(seed), int(step), shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.step, self.epoch])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = self._rng()
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        seeds = rng.integers(0, 2**31 - 1, size=self.n)
        per_rank = len(self) * self.num_replicas
        order = np.resize(order, per_rank)  # pad by wrapping so every rank gets equal work
        for i in order[self.rank::self.num_replicas]:
            yield int(i), int(seeds[i])

    def __len__(self) -> int:
        return -(-self.n // self.num_replicas)

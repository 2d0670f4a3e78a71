"""albumentations pipelines (MiB's augmentation, Cermelli et al., CVPR 2020) with per-sample
seeding.

Training: a random resized crop to ``crop`` x ``crop`` over an area fraction 0.5-1.0 (what MiB's
``RandomResizedCrop(512, (0.5, 2.0))`` amounts to: its draws above 1.0 fall back to the whole
image) + horizontal flip; rotation and colour jitter optional (paper Table 1). Masks are padded
with 255 (ignored) wherever a transform invents pixels. Evaluation: shorter side resized to
``crop`` + centre crop (MiB's convention on VOC), or the full image. ImageNet normalisation
throughout.

Randomness is owned by the sampler, not by the worker: each sample arrives with its own seed
derived from (seed, step, epoch, index), so augmentations are the same whatever the number of
workers and a resumed run replays them exactly.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize() -> A.Normalize:
    return A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0)


def train_transform(crop: int, hflip: bool = True, rotation: float = 0.0,
                    color_jitter: float = 0.0,
                    scale: tuple[float, float] = (0.5, 1.0)) -> A.Compose:
    """Training pipeline: RandomResizedCrop(area ``scale``) [+ flip] [+ rotation] [+ jitter]."""
    if crop < 8:
        raise ValueError(f"data.crop={crop} is too small; use at least 8 pixels")
    ops: list = [A.RandomResizedCrop(size=(crop, crop), scale=tuple(scale), p=1.0)]
    if hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    if rotation:
        ops.append(A.Rotate(limit=float(rotation), border_mode=cv2.BORDER_CONSTANT, fill=0,
                            fill_mask=255, p=0.5))
    if color_jitter:
        j = float(color_jitter)
        ops.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(j, 0.5) / 4,
                                 p=0.5))
    ops += [normalize(), ToTensorV2()]
    return A.Compose(ops)


def eval_transform(crop: int | None, mode: str = "resize") -> A.Compose:
    """Evaluation pipeline: ``resize`` (shorter side to ``crop`` + centre crop) or ``full``."""
    if mode == "resize":
        ops: list = [A.SmallestMaxSize(max_size=crop), A.CenterCrop(crop, crop)]
    elif mode == "full":
        ops = []
    else:
        raise ValueError(f"data.test_mode={mode!r} is not valid; use 'resize' or 'full'")
    return A.Compose(ops + [normalize(), ToTensorV2()])


def reseed(compose: A.Compose, seed: int) -> None:
    """Give ``compose`` and each of its transforms an independent stream derived from ``seed``.

    (``Compose.set_random_seed`` hands every transform the *same* seed, which correlates, e.g.,
    the flip decision with the crop's first draw.)
    """
    states = np.random.SeedSequence(int(seed)).generate_state(len(compose.transforms) + 1)
    compose.set_random_seed(int(states[0]))
    for t, s in zip(compose.transforms, states[1:]):
        t.set_random_seed(int(s))

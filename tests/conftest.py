"""Shared fixtures: a small VOC-layout dataset written by the tests themselves."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# `model.pretrained=imagenet` downloads torchvision's file when it is missing; no test may reach
# the internet, so every test (and every subprocess it starts from os.environ) runs offline.
# The download tests lift it and point the URL at a server on 127.0.0.1.
os.environ["INCSEG_OFFLINE"] = "1"
# timm's weights (Hugging Face hub) likewise; huggingface_hub reads this at its import
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from incseg.data.prepare import save_palette_png  # noqa: E402

SIZE = 24

# Known class sets (foreground) of each training image; a 1-px void border surrounds objects.
TRAIN = {
    "a": [1],
    "b": [1, 16],
    "c": [16],
    "d": [17, 20],
    "e": [5, 19],
    "f": [20],
    "g": [],
    "h": [3, 17],
}
TEST = {"t1": [1], "t2": [16], "t3": [20], "t4": [], "t5": [3, 17]}


def draw_mask(classes: list[int], size: int = SIZE) -> np.ndarray:
    """Background with one square per class (side-by-side bands) and a void border of 1 px."""
    mask = np.zeros((size, size), np.uint8)
    n = max(len(classes), 1)
    w = size // n
    for i, c in enumerate(classes):
        x0, x1 = i * w + 2, (i + 1) * w - 2
        mask[3:size - 3, x0:x1] = 255
        mask[4:size - 4, x0 + 1:x1 - 1] = c
    return mask


def write_sample(base: Path, mask_dir: str, sid: str, classes: list[int], size=SIZE) -> None:
    rng = np.random.default_rng(abs(hash(sid)) % 2**32)
    img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(img).save(base / "JPEGImages" / f"{sid}.jpg", quality=95)
    save_palette_png(draw_mask(classes, size), base / mask_dir / f"{sid}.png")


def make_voc(root: Path, train=TRAIN, test=TEST) -> Path:
    """``root/VOCdevkit/VOC2012`` with train_aug (SegmentationClassAug) and val lists."""
    base = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug",
              "ImageSets/Segmentation"):
        (base / d).mkdir(parents=True, exist_ok=True)
    for sid, cl in train.items():
        write_sample(base, "SegmentationClassAug", sid, cl)
    for sid, cl in test.items():
        write_sample(base, "SegmentationClass", sid, cl)
    seg = base / "ImageSets" / "Segmentation"
    (seg / "train_aug.txt").write_text("".join(f"{s}\n" for s in train))
    (seg / "val.txt").write_text("".join(f"{s}\n" for s in test))
    (seg / "train.txt").write_text("".join(f"{s}\n" for s in list(train)[:2]))
    return root


@pytest.fixture
def voc_root(tmp_path) -> Path:
    return make_voc(tmp_path / "voc")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    c = tmp_path / "cache"
    monkeypatch.setenv("INCSEG_CACHE", str(c))
    return c

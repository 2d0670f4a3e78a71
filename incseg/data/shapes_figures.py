"""Figures of the ``shapes`` benchmark for the docs: a grid of generated images beside their
masks, and a sheet of each class design's classes (drawn by ``incseg.data.shapes_draw``)."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from incseg.data.prepare import voc_colormap
from incseg.data.shapes_draw import NUM_CLASSES, VOID, class_names, render

if TYPE_CHECKING:
    from incseg.data.shapes_params import ShapesParams


def _mask_rgb(mask: np.ndarray) -> np.ndarray:
    rgb = voc_colormap(256)[mask]
    rgb[mask == VOID] = 255
    return rgb


def _save_small_png(img: Image.Image, out_png: str | os.PathLike) -> None:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        out_png, format="PNG", optimize=True
    )


def sample_grid(root: str | os.PathLike, out_png: str | os.PathLike, n: int = 24,
                split: str = "train", cols: int = 6, zoom: int = 2) -> Path:
    """A PNG grid of the first ``n`` images of ``split`` beside their masks (VOC colours,
    void white)."""
    base = Path(root) / "VOCdevkit" / "VOC2012"
    ids = (base / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[:n]
    pairs = []
    for sid in ids:
        im = np.asarray(Image.open(base / "JPEGImages" / f"{sid}.jpg").convert("RGB"))
        mk = np.asarray(Image.open(base / "SegmentationClass" / f"{sid}.png"))
        pairs.append(np.concatenate([im, _mask_rgb(mk)], axis=1))
    h, w = pairs[0].shape[:2]
    gap = 4
    rows = math.ceil(len(pairs) / cols)
    canvas = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), 255, np.uint8)
    for k, pair in enumerate(pairs):
        y, x = gap + (k // cols) * (h + gap), gap + (k % cols) * (w + gap)
        canvas[y:y + h, x:x + w] = pair
    img = Image.fromarray(canvas)
    if zoom > 1:
        img = img.resize((img.width * zoom, img.height * zoom), Image.Resampling.NEAREST)
    _save_small_png(img, out_png)
    return Path(out_png)


def class_sheet(params: ShapesParams, out_png: str | os.PathLike, per_class: int = 3,
                cols: int = 4, zoom: int = 2) -> Path:
    """One cell per class id 1..20: ``per_class`` single-object examples and the class name
    (of ``params``' class design)."""
    p = dataclasses.replace(params, scale=(0.55, 0.7))
    n = p.size * zoom
    label_h = 14
    cell_w, cell_h = per_class * (n + 2) + 6, n + label_h + 6
    rows = math.ceil(20 / cols)
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    names = class_names(p)
    for cid in range(1, NUM_CLASSES):
        x0, y0 = ((cid - 1) % cols) * cell_w + 3, ((cid - 1) // cols) * cell_h + 3
        for k in range(per_class):
            rng = np.random.default_rng([p.seed, 99, cid, k])
            image, _, _ = render(p, rng, [cid], centred=True)
            tile = Image.fromarray(image).resize((n, n), Image.Resampling.NEAREST)
            sheet.paste(tile, (x0 + k * (n + 2), y0))
        draw.text((x0, y0 + n + 1), f"{cid}: {names[cid]}", fill=(0, 0, 0))
    _save_small_png(sheet, out_png)
    return Path(out_png)


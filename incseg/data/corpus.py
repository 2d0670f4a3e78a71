"""A procedurally generated pretraining corpus for the ``shapes`` benchmark: what ImageNet is
to PASCAL VOC.

Every published continual-segmentation number starts from an ImageNet backbone whose features
already separate objects the segmenter has not been taught yet (VOC's sheep and trains are
ImageNet classes); PLOP distils those features and DKD freezes BatchNorm and trains the backbone
at a tenth of the lr, both on that assumption. Trained from random weights on the step-0 classes
alone, a backbone has learned to map a future class to background instead.

The corpus is a single-label classification set, as ImageNet is, over a vocabulary larger than
the benchmark's: sixteen shapes (the benchmark's ten and six others) times four textures (solid
and striped, the benchmark's, and dotted and checkered), 64 classes; one object an image, in
any hue, on the benchmark's kind of cluttered background, at the benchmark's object size in
pixels on a 32 px canvas (a quarter of the pixels of a 64 px image, so four times the images
for the same CPU time). No image of it is a benchmark image: it has its own generator stream,
its own vocabulary, and no segmentation masks.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from incseg.data.shapes_draw import SHAPES, _background, _grid, _lerp, _rgb, shape_fn
from incseg.data.shapes_params import ShapesParams, refuse_unknown
from incseg.errors import ConfigError

# The benchmark's ten shapes and six others (their order is the labels'); five of those six
# are classes of the benchmark's ``shapes`` class design, as VOC's classes are ImageNet's.
CORPUS_SHAPES = SHAPES + ("ellipse", "pentagon", "octagon", "semicircle", "tee", "bar")
CORPUS_TEXTURES = ("solid", "striped", "dotted", "checkered")
MIN_VISIBLE = 24  # pixels of the object that must show for the image to name it


@dataclass(frozen=True)
class CorpusParams:
    """What the corpus is; every field is part of the pretrained backbone's cache key."""

    size: int = 32
    n_images: int = 20000
    scale: tuple[float, float] = (0.6, 1.0)  # of 32 px: the benchmark's 0.3-0.6 of 64 px
    clutter: float = 0.4
    stripe_contrast: float = 0.7
    seed: int = 1000

    def __post_init__(self) -> None:
        if not 16 <= int(self.size) <= 1024:
            raise ConfigError(f"corpus size={self.size!r} is invalid: must be between 16 and 1024")
        if int(self.n_images) < 1:
            raise ConfigError(f"corpus n_images={self.n_images!r} is invalid: must be >= 1")
        lo, hi = (float(x) for x in self.scale)
        if not 0.05 <= lo <= hi <= 1.0:
            raise ConfigError(f"corpus scale={list(self.scale)} is invalid: need 0.05 <= min "
                              "<= max <= 1")
        object.__setattr__(self, "scale", (lo, hi))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> CorpusParams:
        d = dict(d or {})
        refuse_unknown(cls, d, "corpus")
        if "scale" in d:
            d["scale"] = tuple(d["scale"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scale"] = list(d["scale"])
        return d

    @property
    def num_labels(self) -> int:
        return len(CORPUS_SHAPES) * len(CORPUS_TEXTURES)


def label_name(k: int) -> str:
    shape, texture = divmod(k, len(CORPUS_TEXTURES))
    return f"{CORPUS_SHAPES[shape]}-{CORPUS_TEXTURES[texture]}"


def _texture(kind: str, u: np.ndarray, v: np.ndarray, r: float, col: np.ndarray,
             shade: np.ndarray, contrast: float, rng: np.random.Generator) -> np.ndarray:
    tex = shade[..., None] * col
    if kind == "solid":
        return tex
    lum = float(col @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    target = np.zeros(3, np.float32) if lum > 0.45 else np.ones(3, np.float32)
    col2 = shade[..., None] * (col + contrast * (target - col))
    period = max(2.5, 2 * r / rng.uniform(3.5, 5.5)) / r  # in object units
    a = rng.uniform(0, math.pi)
    x = (u * math.cos(a) + v * math.sin(a)) / period + rng.random()
    y = (-u * math.sin(a) + v * math.cos(a)) / period + rng.random()
    if kind == "striped":
        second = np.mod(x, 1.0) < 0.5
    elif kind == "dotted":
        fx, fy = np.mod(x, 1.0) - 0.5, np.mod(y, 1.0) - 0.5
        second = fx * fx + fy * fy <= 0.3 ** 2
    else:  # checkered
        second = (np.floor(x) + np.floor(y)) % 2 == 0
    return np.where(second[..., None], col2, tex)


def render_corpus_image(p: CorpusParams, index: int) -> tuple[np.ndarray, int]:
    """Image ``index`` of the corpus: (H x W x 3 uint8, its shape-texture label)."""
    rng = np.random.default_rng([p.seed, 7331, index])
    img = _background(ShapesParams(size=p.size, clutter=p.clutter), rng)
    n = p.size
    yy, xx = _grid(n)
    n_tex = len(CORPUS_TEXTURES)
    s, t = int(rng.integers(len(CORPUS_SHAPES))), int(rng.integers(n_tex))
    for _ in range(8):  # a new pose for an object too small (or too cut off) to name
        r = rng.uniform(*p.scale) * n / 2
        cy, cx = rng.uniform(0.5 * r, n - 0.5 * r, 2)
        theta, aspect = rng.uniform(0, 2 * math.pi), rng.uniform(0.85, 1.15)
        dy, dx = yy - cy, xx - cx
        ct, st = math.cos(theta), math.sin(theta)
        u = (dx * ct + dy * st) / (r * aspect)
        v = (-dx * st + dy * ct) / (r / aspect)
        inside = shape_fn(CORPUS_SHAPES[s])(u, v)
        if np.count_nonzero(inside) >= MIN_VISIBLE:
            break
    col = _rgb(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0))
    sa = rng.uniform(0, 2 * math.pi)
    shade = 1.0 + 0.12 * (u * math.cos(sa) + v * math.sin(sa))
    tex = _texture(CORPUS_TEXTURES[t], u, v, r, col, shade, p.stripe_contrast, rng)
    img[inside] = tex[inside]
    img = img + _lerp(0.01, 0.06, p.clutter) * rng.standard_normal(img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), s * n_tex + t


def _render_range(args: tuple[dict, int, int]) -> tuple[np.ndarray, np.ndarray]:
    pd, start, stop = args
    p = CorpusParams.from_dict(pd)
    pairs = [render_corpus_image(p, i) for i in range(start, stop)]
    return np.stack([a for a, _ in pairs]), np.array([b for _, b in pairs], dtype=np.int64)


def corpus_grid(out_png: str | os.PathLike, params: CorpusParams | None = None, n: int = 24,
                cols: int = 8, zoom: int = 3) -> Path:
    """A PNG grid of the corpus' first ``n`` images (what ``docs/data.md`` shows)."""
    from incseg.data.shapes_figures import _save_small_png

    p = params or CorpusParams()
    gap, h = 4, p.size
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + gap) + gap, cols * (h + gap) + gap, 3), 255, np.uint8)
    for k in range(n):
        y, x = gap + (k // cols) * (h + gap), gap + (k % cols) * (h + gap)
        canvas[y:y + h, x:x + h] = render_corpus_image(p, k)[0]
    img = Image.fromarray(canvas)
    img = img.resize((img.width * zoom, img.height * zoom), Image.Resampling.NEAREST)
    _save_small_png(img, out_png)
    return Path(out_png)

"""The built-in benchmark ``shapes``: a procedurally generated, VOC-like segmentation dataset.

Twenty foreground classes (ids 1..20, background 0, void 255, exactly like PASCAL VOC) that are
told apart by **shape and texture**: ten shapes, each ``solid`` or ``striped``::

    id = 2 * shape + 1 + striped   (1 circle-solid, 2 circle-striped, ..., 20 arrow-striped)

Colour is only a partial cue: every class has a typical hue band, but each band is shared by
classes of different shapes (``hue_bands=10``: one solid and one striped shape a band; ``5``:
two of each), and ``hue_cue`` widens the bands until they overlap (0 = any colour). Backgrounds
carry a colour gradient, low-frequency noise and distractor strokes that are labelled
background (``clutter``). Each image holds 1-3 objects with random scale, rotation, aspect and
position; later objects are painted over earlier ones (occlusion) and the mask shows the
visible object. A band of void pixels (255) runs along every object outline, as in VOC.

Difficulty knobs (fields of :class:`ShapesParams`). The defaults sit between a "hard" setting
(random colours, heavy clutter: a from-scratch BiSeNet-R18 on 2 CPU cores reaches ~0.15 test
mIoU in 5 minutes) and an "easy" one (tight bands, clean backgrounds, black/white stripes:
~0.8-0.9). Probe, BiSeNet-R18 from scratch, 1000 iterations of batch 16 (~6 min, 1 thread):
defaults 0.63; ``hue_bands=5, hue_cue=1, clutter=0.25`` 0.42; ``hue_cue=0.85, clutter=0.3``
0.37; easy (``hue_cue=1, clutter=0.1, stripe_contrast=1``) 0.77. Overlapping hue bands are the
strongest knob, clutter and stripe contrast finer ones.

- ``hue_cue``: 0 = random hue, 1 = tight class-typical hue band.
- ``hue_bands``: how many hue bands the 20 classes share (5: four classes a band; 10: two).
- ``clutter``: 0..1, scales background noise amplitude, gradient strength, the number of
  distractor strokes and the pixel noise on the whole image.
- ``stripe_contrast``: 0..1, how far the second stripe colour moves towards black/white.
- ``scale``: (min, max) object size (outer diameter) as a fraction of the image side.
- ``void_width``: width of the void band in pixels (0 = none).

``generate`` writes the VOC layout; ``ensure_shapes`` keeps it in the content-keyed cache.
Every image's random generator is seeded from ``(seed, split, index)`` only, so generation is
deterministic (byte-identical files) whatever the order or number of worker processes.
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import logging
import math
import multiprocessing
import multiprocessing.context
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm import tqdm

from incseg.data.prepare import voc_colormap
from incseg.errors import ConfigError
from incseg.io import atomic_dir, atomic_write_json, content_key, entry_lock

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SHAPES = ("circle", "square", "triangle", "star", "cross",
          "ring", "hexagon", "diamond", "crescent", "arrow")
TEXTURES = ("solid", "striped")
NUM_CLASSES = 21  # background + 20
VOID = 255
CLASS_NAMES = ("background",) + tuple(f"{s}-{t}" for s in SHAPES for t in TEXTURES)

# Class-typical hue bands: ``hue_bands`` evenly spaced hues; class (shape s, striped t) has
# band (s + 2t) mod hue_bands. With 5 bands each is shared by four classes (the solid shapes
# s, s+5 and the striped shapes s-2, s+3): colour + texture leave two shapes to tell apart.
# With 10 bands each holds one solid and one striped shape: colour + texture name the class.
HUE_BANDS = (1, 2, 5, 10)
MANIFEST = "manifest.json"


def class_shape(cid: int) -> int:
    return (cid - 1) // 2


def class_striped(cid: int) -> bool:
    return (cid - 1) % 2 == 1


def class_hue_group(cid: int, bands: int = 5) -> int:
    return (class_shape(cid) + 2 * int(class_striped(cid))) % bands


_PALETTE = voc_colormap(256).flatten().tolist()


# --------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class ShapesParams:
    """Generation parameters; every field is part of the cache key."""

    size: int = 64
    n_train: int = 3000
    n_val: int = 300
    n_test: int = 600
    min_objects: int = 1
    max_objects: int = 3
    scale: tuple[float, float] = (0.3, 0.6)
    hue_cue: float = 0.95
    hue_bands: int = 10
    clutter: float = 0.4
    stripe_contrast: float = 0.7
    void_width: int = 1
    jpeg_quality: int = 95
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(field: str, value: Any, want: str) -> ConfigError:
            return ConfigError(f"shapes parameter {field}={value!r} is invalid: {want}")

        def as_int(field: str, lo: int, hi: int | None = None) -> None:
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) and not (
                isinstance(v, float) and v.is_integer()
            ):
                raise bad(field, v, "expected an integer")
            v = int(v)
            if v < lo or (hi is not None and v > hi):
                rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
                raise bad(field, v, f"must be {rng}")
            object.__setattr__(self, field, v)

        def as_float(field: str, lo: float, hi: float) -> None:
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise bad(field, v, "expected a number")
            v = float(v)
            if not lo <= v <= hi:
                raise bad(field, v, f"must be between {lo} and {hi}")
            object.__setattr__(self, field, v)

        as_int("size", 16, 1024)
        for f in ("n_train", "n_val", "n_test"):
            as_int(f, 1)
        as_int("min_objects", 1, 10)
        as_int("max_objects", 1, 10)
        if self.max_objects < self.min_objects:
            raise bad("max_objects", self.max_objects, f"must be >= min_objects={self.min_objects}")
        sc = self.scale
        if isinstance(sc, (str, bytes)) or not hasattr(sc, "__len__") or len(sc) != 2:
            raise bad("scale", sc, "expected [min, max] fractions of the image side")
        try:
            lo, hi = (float(x) for x in sc)
        except (TypeError, ValueError):
            raise bad("scale", sc, "expected [min, max] fractions of the image side") from None
        if not 0.05 <= lo <= hi <= 1.0:
            raise bad("scale", sc, "need 0.05 <= min <= max <= 1")
        object.__setattr__(self, "scale", (lo, hi))
        as_float("hue_cue", 0.0, 1.0)
        as_int("hue_bands", 1, 10)
        if self.hue_bands not in HUE_BANDS:
            raise bad("hue_bands", self.hue_bands, f"must be one of {HUE_BANDS}")
        as_float("clutter", 0.0, 1.0)
        as_float("stripe_contrast", 0.0, 1.0)
        as_int("void_width", 0, 16)
        as_int("jpeg_quality", 1, 100)
        as_int("seed", 0, 2**63 - 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ShapesParams:
        """Build from a mapping (e.g. a Hydra node); unknown keys or bad values -> ConfigError."""
        d = dict(d or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in d if k not in valid)
        if unknown:
            raise ConfigError(
                f"unknown shapes parameter(s) {', '.join(map(str, unknown))}; "
                f"valid keys: {', '.join(valid)}"
            )
        if "scale" in d and d["scale"] is not None and not isinstance(d["scale"], (str, bytes)):
            try:
                d["scale"] = tuple(d["scale"])
            except TypeError:
                pass  # __post_init__ reports it
        return cls(**d)

    def count(self, split: str) -> int:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scale"] = list(d["scale"])
        return d


# --------------------------------------------------------------------------------------------
# Shapes: inside tests in the object's frame (u, v), about a unit disk


def _regular_polygon(u: np.ndarray, v: np.ndarray, n: int, circumradius: float) -> np.ndarray:
    apothem = circumradius * math.cos(math.pi / n)
    inside = np.ones(u.shape, dtype=bool)
    for k in range(n):
        phi = -math.pi / 2 + math.pi / n + 2 * math.pi * k / n  # edge normals (vertex points up)
        inside &= u * math.cos(phi) + v * math.sin(phi) <= apothem
    return inside


def _star(u: np.ndarray, v: np.ndarray, points: int = 5, outer: float = 1.05,
          inner: float = 0.45) -> np.ndarray:
    rho = np.hypot(u, v)
    sector = 2 * math.pi / points
    t = np.abs(np.mod(np.arctan2(v, u) + sector / 2, sector) - sector / 2)  # 0 at a tip
    px, py = rho * np.cos(t), rho * np.sin(t)
    # Inside the triangle (origin, tip (outer, 0), inner vertex) folded over the star: on the
    # origin's side of the edge tip -> inner vertex.
    ix, iy = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
    return (ix - outer) * py - iy * (px - outer) >= 0


def _arrow(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    head = (u >= 0.0) & (u <= 1.0) & (np.abs(v) <= 0.75 * (1.0 - u))
    shaft = (u >= -0.95) & (u < 0.0) & (np.abs(v) <= 0.28)
    return head | shaft


SHAPE_FNS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u * u + v * v <= 0.9 ** 2,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    "triangle": lambda u, v: _regular_polygon(u, v, 3, 1.1),
    "star": _star,
    "cross": lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95))
    | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95)),
    "ring": lambda u, v: (u * u + v * v <= 0.95 ** 2) & (u * u + v * v >= 0.5 ** 2),
    "hexagon": lambda u, v: _regular_polygon(u, v, 6, 0.95),
    "diamond": lambda u, v: np.abs(u) / 0.6 + np.abs(v) / 1.05 <= 1.0,
    "crescent": lambda u, v: (u * u + v * v <= 0.95 ** 2) & ((u - 0.45) ** 2 + v * v >= 0.75 ** 2),
    "arrow": _arrow,
}


# --------------------------------------------------------------------------------------------
# Rendering


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}
_UPSAMPLE: dict[tuple[int, int], np.ndarray] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size not in _GRIDS:
        c = np.arange(size, dtype=np.float32) + 0.5
        _GRIDS[size] = (c[:, None].repeat(size, 1), c[None, :].repeat(size, 0))
    return _GRIDS[size]


def _upsample_matrix(size: int, g: int) -> np.ndarray:
    """size x g bilinear interpolation weights from g control points spread over the image."""
    key = (size, g)
    if key not in _UPSAMPLE:
        pos = (np.arange(size) + 0.5) / size * (g - 1)
        lo = np.clip(np.floor(pos).astype(int), 0, g - 2)
        w = pos - lo
        m = np.zeros((size, g), dtype=np.float32)
        m[np.arange(size), lo] = 1 - w
        m[np.arange(size), lo + 1] = w
        _UPSAMPLE[key] = m
    return _UPSAMPLE[key]


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _segment_mask(yy: np.ndarray, xx: np.ndarray, p0: np.ndarray, p1: np.ndarray,
                  width: float) -> np.ndarray:
    d = p1 - p0
    L2 = float(d @ d) + 1e-9
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / L2, 0.0, 1.0)
    dy = yy - (p0[0] + t * d[0])
    dx = xx - (p0[1] + t * d[1])
    return dy * dy + dx * dx <= (width / 2) ** 2


def _background(p: ShapesParams, rng: np.random.Generator) -> np.ndarray:
    n = p.size
    yy, xx = _grid(n)
    c = p.clutter
    c0 = _rgb(rng.random(), rng.uniform(0.05, 0.6), rng.uniform(0.25, 0.9))
    c1 = _rgb(rng.random(), rng.uniform(0.05, 0.6), rng.uniform(0.25, 0.9))
    a = rng.uniform(0, 2 * math.pi)
    t = ((yy * math.sin(a) + xx * math.cos(a)) / n)
    t = (t - t.min()) / (t.max() - t.min() + 1e-9)
    strength = _lerp(0.25, 1.0, c) * rng.uniform(0.5, 1.0)
    img = c0 + (strength * t)[..., None] * (c1 - c0)
    # Low-frequency colour noise (a coarse random grid, bilinearly upsampled).
    g = int(rng.integers(3, 7))
    m = _upsample_matrix(n, g)
    coarse = rng.standard_normal((g, g, 3)).astype(np.float32)
    img = img + _lerp(0.03, 0.22, c) * np.einsum("ig,ghc,jh->ijc", m, coarse, m)
    # Distractor strokes: straight and bent lines, labelled background.
    for _ in range(int(rng.poisson(_lerp(0.5, 8.0, c)))):
        pts = [rng.uniform(-0.1, 1.1, 2) * n]
        for _ in range(int(rng.integers(1, 3))):
            ang = rng.uniform(0, 2 * math.pi)
            length = rng.uniform(0.2, 0.7) * n
            pts.append(pts[-1] + length * np.array([math.sin(ang), math.cos(ang)]))
        width = rng.uniform(0.8, 2.2) * max(1.0, n / 64)
        col = _rgb(rng.random(), rng.uniform(0.0, 1.0), rng.uniform(0.1, 1.0))
        for p0, p1 in zip(pts[:-1], pts[1:]):
            img[_segment_mask(yy, xx, p0, p1, width)] = col
    return img


def _object(p: ShapesParams, rng: np.random.Generator, cid: int, centred: bool = False):
    """One object of class ``cid``: (inside mask, RGB texture over the whole grid)."""
    n = p.size
    yy, xx = _grid(n)
    r = rng.uniform(*p.scale) * n / 2
    if centred:
        cy = cx = n / 2
    else:
        lo, hi = 0.5 * r, n - 0.5 * r
        cy, cx = rng.uniform(lo, hi), rng.uniform(lo, hi)
    theta = rng.uniform(0, 2 * math.pi)
    aspect = rng.uniform(0.85, 1.15)
    dy, dx = yy - cy, xx - cx
    ct, st = math.cos(theta), math.sin(theta)
    u = (dx * ct + dy * st) / (r * aspect)
    v = (-dx * st + dy * ct) / (r / aspect)
    inside = SHAPE_FNS[SHAPES[class_shape(cid)]](u, v)

    # Band half-width: the whole hue circle at hue_cue 0, a quarter of the band spacing at 1.
    half = _lerp(0.5, 0.25 / p.hue_bands, p.hue_cue)
    hue = class_hue_group(cid, p.hue_bands) / p.hue_bands + rng.uniform(-half, half)
    col = _rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0))
    # Mild shading so that solid objects are not perfectly flat.
    sa = rng.uniform(0, 2 * math.pi)
    shade = 1.0 + 0.12 * (u * math.cos(sa) + v * math.sin(sa))
    tex = shade[..., None] * col
    if class_striped(cid):
        lum = float(col @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
        target = np.zeros(3, np.float32) if lum > 0.45 else np.ones(3, np.float32)
        col2 = col + p.stripe_contrast * (target - col)
        period = max(2.5, 2 * r / rng.uniform(3.5, 5.5))  # pixels
        sa2 = rng.uniform(0, math.pi)
        coord = (u * r * aspect * math.cos(sa2) + v * r / aspect * math.sin(sa2)) / period
        stripe = np.mod(coord + rng.random(), 1.0) < 0.5
        tex = np.where(stripe[..., None], shade[..., None] * col2, tex)
    return inside, tex


def _void_band(owner: np.ndarray, width: int) -> np.ndarray:
    """Pixels within the band of ``width`` px along instance outlines (object side first)."""
    void = np.zeros(owner.shape, dtype=bool)
    if width <= 0:
        return void
    inner, outer = (width + 1) // 2, width // 2

    def near_change(r: int) -> np.ndarray:
        k = np.arange(-r, r + 1)
        fp = (k[:, None] ** 2 + k[None, :] ** 2) <= r * r
        hi = ndimage.maximum_filter(owner, footprint=fp, mode="nearest")
        lo = ndimage.minimum_filter(owner, footprint=fp, mode="nearest")
        return (hi != owner) | (lo != owner)

    void |= (owner > 0) & near_change(inner)
    if outer > 0:
        void |= (owner == 0) & near_change(outer)
    return void


def render(p: ShapesParams, rng: np.random.Generator, classes: list[int] | None = None,
           centred: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one sample: (RGB uint8 image, uint8 mask with void 255, instance map).

    The instance map holds 0 for background and k for the k-th painted object (its visible
    pixels), before the void band; ``classes`` (painting order) defaults to a random draw.
    """
    n = p.size
    img = _background(p, rng)
    if classes is None:
        k = int(rng.integers(p.min_objects, p.max_objects + 1))
        classes = [int(c) for c in rng.integers(1, NUM_CLASSES, size=k)]
    owner = np.zeros((n, n), dtype=np.uint8)
    labels = np.zeros((n, n), dtype=np.uint8)
    drawn: list[int] = []
    for i, cid in enumerate(classes, 1):
        # Re-place an object that would hide more than 60% of an earlier one (a few tries).
        for _ in range(8):
            inside, tex = _object(p, rng, cid, centred)
            if not inside.any():
                continue
            ok = all(
                np.count_nonzero((owner == j) & ~inside) >= 0.4 * drawn[j - 1]
                for j in range(1, i)
            )
            if ok:
                break
        img[inside] = tex[inside]
        owner[inside] = i
        labels[inside] = cid
        drawn.append(int(np.count_nonzero(inside)))
    noise = _lerp(0.01, 0.06, p.clutter)
    img = img + noise * rng.standard_normal(img.shape).astype(np.float32)
    image = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    mask = labels.copy()
    mask[_void_band(owner, p.void_width)] = VOID
    return image, mask, owner


def sample_rng(p: ShapesParams, split: str, index: int) -> np.random.Generator:
    """The generator of image ``index`` of ``split``: a function of (seed, split, index) only."""
    return np.random.default_rng(np.random.SeedSequence([p.seed, SPLITS.index(split), index]))


def _balanced_class(p: ShapesParams, split: str, index: int) -> int:
    # One object per image cycles through the classes (in a per-split random order), so every
    # class is in at least ~1/20 of each split's images; the others are drawn uniformly.
    order = np.random.default_rng([p.seed, SPLITS.index(split), 2**31]).permutation(20) + 1
    return int(order[index % 20])


def render_sample(p: ShapesParams, split: str, index: int):
    """Image ``index`` of ``split``: (RGB uint8 image, mask, instance map), deterministic."""
    rng = sample_rng(p, split, index)
    k = int(rng.integers(p.min_objects, p.max_objects + 1))
    classes = [int(c) for c in rng.integers(1, NUM_CLASSES, size=k)]
    classes[int(rng.integers(0, k))] = _balanced_class(p, split, index)
    return render(p, rng, classes)


def sample_id(split: str, index: int) -> str:
    return f"{split}_{index + 1:06d}"


# --------------------------------------------------------------------------------------------
# Writing the VOC layout


def _write_range(args: tuple[dict, str, int, int, str]) -> list[list[int]]:
    """Render and write images [start, stop) of ``split``; returns the classes of each mask."""
    pd, split, start, stop, base = args
    p = ShapesParams.from_dict(pd)
    basep = Path(base)
    present = []
    for i in range(start, stop):
        image, mask, _ = render_sample(p, split, i)
        sid = sample_id(split, i)
        Image.fromarray(image, "RGB").save(
            basep / "JPEGImages" / f"{sid}.jpg", format="JPEG", quality=p.jpeg_quality,
            subsampling=0,
        )
        m = Image.fromarray(mask, "L").convert("P")
        m.putpalette(_PALETTE)
        m.save(basep / "SegmentationClass" / f"{sid}.png", format="PNG")
        present.append([int(c) for c in np.unique(mask) if 0 < c < VOID])
    return present


def _default_workers() -> int:
    try:
        return max(1, min(2, len(os.sched_getaffinity(0))))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, min(2, os.cpu_count() or 1))


def _fork_context() -> multiprocessing.context.BaseContext | None:
    """A fork context when forking is safe (POSIX, no other Python threads), else None.

    Forked workers start at once (no re-import); a process that already runs threads (a
    logger, a data loader) generates in-process instead, which only costs time.
    """
    if "fork" not in multiprocessing.get_all_start_methods() or threading.active_count() > 1:
        return None
    return multiprocessing.get_context("fork")


def generate(params: ShapesParams, out: str | os.PathLike, progress: bool = True,
             workers: int | None = None) -> dict[str, Any]:
    """Write the dataset under ``out/VOCdevkit/VOC2012`` (VOC layout).

    Returns a summary: image counts and, per split, the number of images holding each class.
    ``workers`` (default: up to 2 processes) does not change a single byte of the output.
    """
    base = Path(out) / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    workers = _default_workers() if workers is None else max(1, int(workers))
    total = sum(params.count(s) for s in SPLITS)
    ctx = _fork_context() if workers > 1 and total >= 200 else None
    if ctx is None:
        workers = 1
    pd = params.to_dict()
    chunk = 100
    jobs = [(pd, s, a, min(a + chunk, params.count(s)), str(base))
            for s in SPLITS for a in range(0, params.count(s), chunk)]
    results: list[list[list[int]]] = []
    bar = tqdm(total=total, desc="shapes", unit="img", disable=not progress, file=sys.stderr,
               leave=False)
    try:
        if workers == 1:
            for job in jobs:
                results.append(_write_range(job))
                bar.update(job[3] - job[2])
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
                for job, res in zip(jobs, ex.map(_write_range, jobs)):
                    results.append(res)
                    bar.update(job[3] - job[2])
    finally:
        bar.close()
    per_split: dict[str, list[int]] = {s: [0] * NUM_CLASSES for s in SPLITS}
    for job, res in zip(jobs, results):
        for present in res:
            for c in present:
                per_split[job[1]][c] += 1
    for s in SPLITS:
        ids = [sample_id(s, i) for i in range(params.count(s))]
        (base / "ImageSets" / "Segmentation" / f"{s}.txt").write_text("\n".join(ids) + "\n")
    return {
        "counts": {s: params.count(s) for s in SPLITS},
        "class_images": {s: per_split[s][1:] for s in SPLITS},
    }


# --------------------------------------------------------------------------------------------
# Cache


def shapes_key(params: ShapesParams) -> str:
    return content_key("shapes", dataclasses.asdict(params))


def _check_entry(entry: Path, params: ShapesParams) -> str | None:
    """None when ``entry`` is a complete dataset for ``params``, else what is wrong."""
    man_path = entry / MANIFEST
    if not man_path.is_file():
        return f"{MANIFEST} is missing"
    try:
        man = json.loads(man_path.read_text())
    except (OSError, ValueError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    if not isinstance(man, dict) or man.get("params") != params.to_dict():
        return f"{MANIFEST} was written for other parameters"
    counts = {s: params.count(s) for s in SPLITS}
    if man.get("counts") != counts:
        return f"{MANIFEST} lists other image counts"
    base = entry / "VOCdevkit" / "VOC2012"
    try:
        jpgs = set(os.listdir(base / "JPEGImages"))
        pngs = set(os.listdir(base / "SegmentationClass"))
        for s in SPLITS:
            ids = (base / "ImageSets" / "Segmentation" / f"{s}.txt").read_text().split()
            if len(ids) != counts[s]:
                return f"the {s} list has {len(ids)} ids, expected {counts[s]}"
            missing = [i for i in ids if f"{i}.jpg" not in jpgs or f"{i}.png" not in pngs]
            if missing:
                return f"{len(missing)} {s} images or masks are missing (e.g. {missing[0]})"
    except OSError as e:
        return f"unreadable layout ({e})"
    return None


def ensure_shapes(params: ShapesParams, cache: str | os.PathLike, progress: bool = True) -> Path:
    """The dataset root (the folder that holds ``VOCdevkit/``) for ``params`` in ``cache``.

    Generated once, under a file lock, into a temporary folder renamed into place; the manifest
    is written last. A broken entry is reported and rebuilt.
    """
    entry = Path(cache) / "shapes" / shapes_key(params)
    if entry.is_dir() and _check_entry(entry, params) is None:
        return entry
    with entry_lock(entry):
        if entry.exists():
            problem = _check_entry(entry, params)
            if problem is None:
                return entry  # another process finished it while we waited
            log.warning("shapes cache entry %s is broken (%s); regenerating it", entry, problem)
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        log.info("generating the shapes dataset into %s", entry)
        with atomic_dir(entry) as tmp:
            summary = generate(params, tmp, progress=progress)
            manifest = {"kind": "shapes", "key": entry.name, "params": params.to_dict(),
                        "classes": list(CLASS_NAMES), **summary}
            atomic_write_json(tmp / MANIFEST, manifest)
    return entry


# --------------------------------------------------------------------------------------------
# Figures


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
    """One cell per class id 1..20: ``per_class`` single-object examples and the class name."""
    p = dataclasses.replace(params, scale=(0.55, 0.7))
    n = p.size * zoom
    label_h = 14
    cell_w, cell_h = per_class * (n + 2) + 6, n + label_h + 6
    rows = math.ceil(20 / cols)
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for cid in range(1, NUM_CLASSES):
        x0, y0 = ((cid - 1) % cols) * cell_w + 3, ((cid - 1) // cols) * cell_h + 3
        for k in range(per_class):
            rng = np.random.default_rng([p.seed, 99, cid, k])
            image, _, _ = render(p, rng, [cid], centred=True)
            tile = Image.fromarray(image).resize((n, n), Image.Resampling.NEAREST)
            sheet.paste(tile, (x0 + k * (n + 2), y0))
        draw.text((x0, y0 + n + 1), f"{cid}: {CLASS_NAMES[cid]}", fill=(0, 0, 0))
    _save_small_png(sheet, out_png)
    return Path(out_png)


def write_docs(docs: str | os.PathLike = "docs", params: ShapesParams | None = None) -> None:
    """Regenerate ``docs/shapes_grid.png`` and ``docs/shapes_classes.png`` (default params)."""
    params = params or ShapesParams()
    with tempfile.TemporaryDirectory() as tmp:
        small = dataclasses.replace(params, n_train=24, n_val=1, n_test=1)
        generate(small, tmp, progress=False, workers=1)  # same images as the full set's first 24
        sample_grid(tmp, Path(docs) / "shapes_grid.png")
    class_sheet(params, Path(docs) / "shapes_classes.png")


if __name__ == "__main__":
    write_docs(sys.argv[1] if len(sys.argv) > 1 else "docs")

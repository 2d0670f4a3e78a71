"""Drawing the ``shapes`` benchmark: its classes, their geometry and one image's rendering.

Two class designs (``ShapesParams.classes``); 0 is background and 255 void in both, as in
PASCAL VOC. ``twins`` (the default): a class is a shape and a texture,
``id = 2 * shape + 1 + striped`` (1 circle-solid, 2 circle-striped, ..., 20 arrow-striped).
``shapes``: a class is a shape, ``id = shape + 1`` over :data:`DESIGN_SHAPES` ``["shapes"]``;
each object's texture is drawn at random.
Shapes are inside tests in the object's own frame, so that scale, rotation and aspect come
from one coordinate transform. Everything here is a pure function of the parameters and the
generator it is handed: which generator an image gets is ``incseg.data.shapes``' business
(that is what makes the dataset byte-identical whatever the number of worker processes).
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from incseg.data.shapes_params import ShapesParams

SHAPES = ("circle", "square", "triangle", "star", "cross",
          "ring", "hexagon", "diamond", "crescent", "arrow")
TEXTURES = ("solid", "striped")
NUM_CLASSES = 21  # background + 20
VOID = 255
CLASS_NAMES = ("background",) + tuple(f"{s}-{t}" for s in SHAPES for t in TEXTURES)  # twins

# The ``shapes`` design's 20 shapes: the ten above, then ten others in an order chosen so that
# the two shapes sharing a hue band at 10 bands (s and s + 10) never look alike (circle-tee,
# square-heart, ..., hexagon-chevron, crescent-pentagon): colour never hints at a look-alike.
# Octagon (a corpus shape) is left out: at 20-38 px it is a circle with a few flat pixels.
DESIGN_SHAPES = {
    "twins": SHAPES,
    "shapes": SHAPES + ("tee", "heart", "ellipse", "frame", "semicircle",
                        "bar", "chevron", "ell", "pentagon", "bowtie"),
}


def _design(p: ShapesParams | str | None) -> str:
    """The class design of a params object (or the design's name; None: the default)."""
    return getattr(p, "classes", p) or "twins"


def class_names(p: ShapesParams | str | None = None) -> tuple[str, ...]:
    """The names of class ids 0..20 under ``p``'s class design (``p``: params or the design's
    name; None: ``twins``, whose names are :data:`CLASS_NAMES`)."""
    if _design(p) == "twins":
        return CLASS_NAMES
    return ("background",) + DESIGN_SHAPES[_design(p)]


def class_shape(cid: int, design: str = "twins") -> int:
    """The index of class ``cid``'s shape in ``DESIGN_SHAPES[design]``."""
    return cid - 1 if design == "shapes" else (cid - 1) // 2


def class_striped(cid: int) -> bool:
    """Whether a ``twins`` class is striped (in the ``shapes`` design texture is per object)."""
    return (cid - 1) % 2 == 1


def class_hue_group(cid: int, bands: int = 5, design: str = "twins") -> int:
    """The hue band of class ``cid`` among ``bands`` (one of ``shapes_params.HUE_BANDS``)."""
    if design == "shapes":
        return class_shape(cid, design) % bands
    return (class_shape(cid) + 2 * int(class_striped(cid))) % bands


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


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # (x^2 + y^2 - 1)^3 <= x^2 y^3 (lobes up, tip down), scaled and centred on the unit disk
    x, y = u / 0.78, -v / 0.78 + 0.12
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


def _chevron(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # A ">" with a ~70 degree opening: a right-angled one would be an ell with mitred ends
    w = u + 0.25 + 1.4 * np.abs(v)
    return (w >= 0.3) & (w <= 0.95) & (np.abs(v) <= 0.7)


# Shapes beyond the benchmark's ten. The first six are the pretraining corpus' (its labels
# follow their order there); the ``shapes`` class design draws all of them but octagon.
EXTRA_SHAPE_FNS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "ellipse": lambda u, v: (u / 1.0) ** 2 + (v / 0.5) ** 2 <= 0.95 ** 2,
    "pentagon": lambda u, v: _regular_polygon(u, v, 5, 1.0),
    "octagon": lambda u, v: _regular_polygon(u, v, 8, 0.95),
    "semicircle": lambda u, v: (u * u + v * v <= 0.95 ** 2) & (v >= -0.2),
    "tee": lambda u, v: ((np.abs(u) <= 0.95) & (v >= 0.4) & (v <= 0.95))
    | ((np.abs(u) <= 0.28) & (v >= -0.95) & (v < 0.4)),
    "bar": lambda u, v: (np.abs(u) <= 0.95) & (np.abs(v) <= 0.35),
    "heart": _heart,
    "ell": lambda u, v: ((u >= -0.85) & (u <= -0.25) & (np.abs(v) <= 0.85))
    | ((v >= 0.25) & (v <= 0.85) & (np.abs(u) <= 0.85)),
    "bowtie": lambda u, v: (np.abs(u) <= 0.9) & (np.abs(v) <= 0.12 + 0.85 * np.abs(u)),
    "frame": lambda u, v: (np.maximum(np.abs(u), np.abs(v)) <= 0.85)
    & (np.maximum(np.abs(u), np.abs(v)) >= 0.45),
    "chevron": _chevron,
}


def shape_fn(name: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The inside test of shape ``name`` (one of the benchmark's or the extra shapes)."""
    return SHAPE_FNS.get(name) or EXTRA_SHAPE_FNS[name]


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
    """One object of class ``cid``: (inside mask, RGB texture over the whole grid, striped)."""
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
    inside = shape_fn(DESIGN_SHAPES[p.classes][class_shape(cid, p.classes)])(u, v)

    # Band half-width: the whole hue circle at hue_cue 0, a quarter of the band spacing at 1.
    half = _lerp(0.5, 0.25 / p.hue_bands, p.hue_cue)
    hue = class_hue_group(cid, p.hue_bands, p.classes) / p.hue_bands + rng.uniform(-half, half)
    col = _rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0))
    # Mild shading so that solid objects are not perfectly flat.
    sa = rng.uniform(0, 2 * math.pi)
    shade = 1.0 + 0.12 * (u * math.cos(sa) + v * math.sin(sa))
    tex = shade[..., None] * col
    # twins: the class says the texture; shapes: a coin flip, a nuisance within the class (the
    # draw comes after every twins draw, so the twins images keep their bytes)
    striped = class_striped(cid) if p.classes == "twins" else bool(rng.random() < 0.5)
    if striped:
        lum = float(col @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
        target = np.zeros(3, np.float32) if lum > 0.45 else np.ones(3, np.float32)
        col2 = col + p.stripe_contrast * (target - col)
        period = max(2.5, 2 * r / rng.uniform(3.5, 5.5))  # pixels
        sa2 = rng.uniform(0, math.pi)
        coord = (u * r * aspect * math.cos(sa2) + v * r / aspect * math.sin(sa2)) / period
        stripe = np.mod(coord + rng.random(), 1.0) < 0.5
        tex = np.where(stripe[..., None], shade[..., None] * col2, tex)
    return inside, tex, striped


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
            inside, tex, _ = _object(p, rng, cid, centred)
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

"""The generation parameters of the ``shapes`` benchmark (:class:`ShapesParams`), checked
where they are built.

They sit below both the drawing (``incseg.data.shapes_draw``, which reads them) and the
generator and cache (``incseg.data.shapes``, which keys the cache by them), so neither of those
needs the other to know what a valid parameter set is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from incseg.errors import ConfigError

# Class-typical hue bands: ``hue_bands`` evenly spaced hues; in the default class design
# (``twins``) class (shape s, striped t) has band (s + 2t) mod hue_bands. With 5 bands each is
# shared by four classes (the solid shapes s, s+5 and the striped shapes s-2, s+3): colour +
# texture leave two shapes to tell apart. With 10 bands each holds one solid and one striped
# shape: colour + texture name the class.
HUE_BANDS = (1, 2, 5, 10)

# What names a class. ``twins``: a shape and a texture (the bands above). ``shapes``: the
# shape alone, 20 shapes; each object's texture is drawn at random and shape s has band
# s mod hue_bands, so neither colour nor texture names a class, as in VOC, where an object's
# shape and parts do (``incseg.data.shapes_draw``).
CLASS_DESIGNS = ("twins", "shapes")


def refuse_unknown(cls: type, d: Mapping[str, Any], what: str) -> None:
    """One line naming the keys of ``d`` that are not fields of the dataclass ``cls``."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in d if k not in valid)
    if unknown:
        raise ConfigError(f"unknown {what} parameter(s) {', '.join(unknown)}; "
                          f"valid keys: {', '.join(valid)}")


@dataclass(frozen=True)
class ShapesParams:
    """Generation parameters; every field is part of the cache key (``classes`` only when it
    is not the default ``twins``: :meth:`key_dict`)."""

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
    classes: str = "twins"

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
        if not isinstance(self.classes, str) or self.classes not in CLASS_DESIGNS:
            raise bad("classes", self.classes, f"must be one of {CLASS_DESIGNS}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ShapesParams:
        """Build from a mapping (e.g. a Hydra node); unknown keys or bad values -> ConfigError."""
        d = dict(d or {})
        refuse_unknown(cls, d, "shapes")
        if "scale" in d and d["scale"] is not None and not isinstance(d["scale"], (str, bytes)):
            try:
                d["scale"] = tuple(d["scale"])
            except TypeError:
                pass  # __post_init__ reports it
        return cls(**d)

    def count(self, split: str) -> int:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]

    def key_dict(self) -> dict[str, Any]:
        """The fields as a dict, without ``classes`` when it is ``twins``: the default design
        keeps the cache key and manifest it had before the choice existed."""
        d = dataclasses.asdict(self)
        if d["classes"] == "twins":
            del d["classes"]
        return d

    def to_dict(self) -> dict[str, Any]:
        d = self.key_dict()
        d["scale"] = list(d["scale"])
        return d

"""Generator settings and the pixel space replay images live in.

:class:`InversionSettings` is the ``inversion`` config group; :func:`batch_plan` is how it cuts
a set into batches (the cache and the generator must agree on it). The pixel helpers are the
one place that converts between the ImageNet-normalised space the models see and pixel values:
the generator optimises in the normalised space (clamped to what a real pixel can be), the cache
stores uint8 PNGs, and readers normalise them back. Keep every such conversion here so that
what is stored and what is replayed cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from incseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from incseg.errors import ConfigError

__all__ = [
    "AUTO_BATCH_CPU",
    "BUDGETS",
    "COMPILE_MODES",
    "InversionSettings",
    "StopRule",
    "batch_plan",
    "clamp_normalised",
    "denormalise",
    "normalise",
    "pixel_range",
    "quantise",
]

#: the generator's class objectives (:attr:`InversionSettings.objective`)
OBJECTIVES = ("softmax", "sigmoid")
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
# Aliases Lightning users type; stored as the short form.
_PRECISION_ALIASES = {"32-true": "32", "bf16-mixed": "bf16", "16-mixed": "16", "32": "32",
                      "bf16": "bf16", "16": "16"}
#: ``fixed``: every image gets ``iterations_low + iterations_full`` (DeepInversion, the paper);
#: ``adaptive``: each image stops when :class:`StopRule` is met, those iterations its maximum
BUDGETS = ("fixed", "adaptive")
#: ``compile``: off, ``torch.compile`` (inductor, dynamic batch), or its CUDA-graph / autotune modes
COMPILE_MODES = (False, True, "reduce-overhead", "max-autotune")
#: images per optimisation batch that ``batch_size: auto`` takes on a CPU (no memory to fill: a
#: CPU step's cost grows with the batch, and past a few dozen images there is no overhead left
#: to amortise)
AUTO_BATCH_CPU = 32


@dataclass
class StopRule:
    """When an image of the adaptive budget is done with a stage (``inversion.stop``).

    Both must hold at an iteration, measured on the image the teacher saw there:

    - ``min_prob``: the teacher's probability of the image's target class, softmax over the
      LSE-LBA pooled image-level logits (all old channels, background included), is at least
      this (0: no such condition);
    - the BN-statistics term of the image (R_BN of DeepInversion, unweighted) has stopped
      falling: the mean of its last ``bn_window`` values is at least ``1 - bn_rel_drop`` times
      the mean of the ``bn_window`` values before them (so a stage lasts at least
      ``2 * bn_window`` iterations). Window means, not two single values: the random roll and
      flip of every iteration make the term jitter from one iteration to the next.

    The stage's iteration count (``iterations_low`` / ``iterations_full``) stays the maximum.
    """

    min_prob: float = 0.9
    bn_window: int = 10
    bn_rel_drop: float = 0.02

    def validate(self, bad) -> None:
        if not 0.0 <= float(self.min_prob) <= 1.0:
            raise bad(f"stop.min_prob must be in [0, 1], got {self.min_prob}")
        if isinstance(self.bn_window, bool) or int(self.bn_window) != self.bn_window \
                or int(self.bn_window) < 1:
            raise bad(f"stop.bn_window must be a whole number >= 1, got {self.bn_window}")
        if not 0.0 <= float(self.bn_rel_drop) < 1.0:
            raise bad(f"stop.bn_rel_drop must be in [0, 1), got {self.bn_rel_drop}")
        self.bn_window = int(self.bn_window)
        self.min_prob, self.bn_rel_drop = float(self.min_prob), float(self.bn_rel_drop)

    def met(self, probs: Sequence[float], bns: Sequence[float]) -> bool:
        """Whether the stage is done after the iterations whose probabilities and BN terms
        are ``probs`` / ``bns`` (oldest first; the last is the latest iteration's)."""
        w = self.bn_window
        if len(bns) < 2 * w or probs[-1] < self.min_prob:
            return False
        recent = sum(bns[-w:]) / w
        before = sum(bns[-2 * w:-w]) / w
        return recent >= (1.0 - self.bn_rel_drop) * before

    def iterations(self, probs: Sequence[float], bns: Sequence[float], maximum: int) -> int:
        """Iterations a stage of at most ``maximum`` takes on these traces (values per
        iteration, at least ``maximum`` of them or the stage stops within them)."""
        for i in range(1, maximum + 1):
            if self.met(probs[:i], bns[:i]):
                return i
        return maximum


@dataclass
class InversionSettings:
    """Generator settings (config group ``inversion``); defaults follow DeepInversion (Yin et
    al., CVPR 2020) scaled down to small images.

    ``jitter=None`` scales DeepInversion's 30 px at 224 px to the image size
    (``round(30 * image_size / 224)``: 9 px at 64). ``w_adi=None`` means 0.2 when a competition
    student is given (Adaptive DeepInversion, same paper), 0 otherwise. ``lse_beta`` is fixed
    (``r = lse_r0 + exp(lse_beta)``, LSE-LBA pooling). ``precision`` "bf16"/"16" runs the
    teacher (and student) forward under ``torch.autocast`` ("16" adds a dynamic gradient scaler
    on CUDA); the images and the loss stay float32.

    ``budget`` ``fixed`` gives every image ``iterations_low + iterations_full`` iterations in
    batches of ``batch_size`` (DeepInversion, the paper). ``adaptive`` optimises every image on
    its own objective (DeepInversion's loss of a batch of one: its own BN statistics, priors
    and CE, its own Adam moments, schedule and seeded random draws) and stops each stage of
    each image when ``stop`` (:class:`StopRule`) is met; finished images leave the optimisation
    batch and waiting ones take their slots, so an image is the same whatever batch it ran in
    and ``batch_size`` (``auto``: as many as the device holds, see
    :func:`incseg.replay.batching.auto_batch_size`) is not part of the set's key. ``compile``
    wraps the adaptive step's loss in ``torch.compile`` (``reduce-overhead``: with CUDA graphs).
    With the fixed budget ``stop`` and ``compile`` act on nothing and are not keyed.

    ``competition`` asks the protocol for a competition student (Adaptive DeepInversion, Yin et
    al.): by default the teacher's model with a ResNet-18 context path, as the paper's student
    (Di Salvo et al., appendix), or the ``conf/model`` option ``student_model``. The generator
    itself only sees whether a student is given.
    """

    n_per_class: int = 8
    batch_size: int | str = 32
    image_size: int = 64
    iterations_low: int = 200
    iterations_full: int = 100
    lr: float = 0.2
    betas: tuple[float, float] = (0.5, 0.9)
    warmup_frac: float = 0.05
    jitter: int | None = None
    flip: bool = True
    w_ce: float = 1.0
    w_bn: float = 0.01
    first_bn_multiplier: float = 10.0
    w_tv_l2: float = 1e-4
    w_tv_l1: float = 0.0
    w_l2: float = 1e-5
    w_adi: float | None = None
    adi_temperature: float = 3.0
    lse_r0: float = 5.0
    lse_beta: float = 0.0
    include_background: bool = False
    #: the class objective on the pooled logits, set by the protocol from the method's
    #: prediction rule: ``softmax`` (CE over the old classes) or ``sigmoid`` (one BCE per class)
    objective: str = "softmax"
    precision: str = "32"
    seed: int = 0
    competition: bool = False
    student_model: str | None = None
    budget: str = "fixed"
    stop: StopRule | Mapping[str, Any] | None = None
    compile: bool | str = False

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        self.precision = str(self.precision)
        self.validate()

    @property
    def adaptive(self) -> bool:
        return self.budget == "adaptive"

    @property
    def stop_rule(self) -> StopRule:
        return self.stop if isinstance(self.stop, StopRule) else StopRule()

    def validate(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"invalid inversion setting: {msg}")

        if self.budget not in BUDGETS:
            raise bad(f"budget must be fixed or adaptive, got {self.budget!r}")
        names = [f.name for f in dataclasses.fields(StopRule)]
        if isinstance(self.stop, Mapping):
            unknown = sorted(set(self.stop) - set(names))
            if unknown:
                raise bad(f"unknown stop setting(s) {', '.join(map(str, unknown))}; valid keys: "
                          f"{', '.join(names)}")
            self.stop = StopRule(**self.stop)
        elif self.stop is not None and not isinstance(self.stop, StopRule):
            raise bad(f"stop must be a mapping of {', '.join(names)} or null, got "
                      f"{self.stop!r}")
        self.stop_rule.validate(bad)
        if isinstance(self.batch_size, str):
            if self.batch_size != "auto":
                try:
                    self.batch_size = int(self.batch_size)
                except ValueError:
                    raise bad(f"batch_size must be a whole number or auto, got "
                              f"{self.batch_size!r}") from None
            elif not self.adaptive:
                raise bad("batch_size=auto needs budget=adaptive: with the fixed budget the "
                          "batch shapes the images (BN statistics are over the batch), so "
                          "give a number, or add inversion.budget=adaptive")
        for name in ("n_per_class", "batch_size", "image_size"):
            value = getattr(self, name)
            if value != "auto" and int(value) < 1:
                raise bad(f"{name} must be >= 1, got {value}")
        if self.compile not in COMPILE_MODES or (self.compile and not self.adaptive):
            raise bad(f"compile must be one of false, true, reduce-overhead, max-autotune and "
                      f"needs budget=adaptive, got compile={self.compile!r} with "
                      f"budget={self.budget}")
        for name in ("iterations_low", "iterations_full"):
            if int(getattr(self, name)) < 0:
                raise bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.iterations_low > 0 and self.image_size % 2:
            raise bad(f"image_size must be even for the half-resolution stage, got "
                      f"{self.image_size} (or set iterations_low=0)")
        if len(self.betas) != 2:
            raise bad(f"betas must be two numbers, got {list(self.betas)}")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise bad(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if self.jitter is not None and int(self.jitter) < 0:
            raise bad(f"jitter must be >= 0 or null, got {self.jitter}")
        if self.lr <= 0:
            raise bad(f"lr must be > 0, got {self.lr}")
        # a negative weight would reward the very mismatch its term measures
        for name in ("w_ce", "w_bn", "w_tv_l2", "w_tv_l1", "w_l2", "w_adi"):
            value = getattr(self, name)
            if value is not None and not float(value) >= 0:
                raise bad(f"{name} must be >= 0, got {value}")
        if not isinstance(self.competition, bool):
            raise bad(f"competition must be true or false, got {self.competition!r}")
        if self.student_model is not None and not self.competition:
            raise bad(f"student_model={self.student_model} is only used with competition=true; "
                      "add inversion.competition=true or drop inversion.student_model")
        if self.competition and self.w_adi is not None and not float(self.w_adi) > 0:
            raise bad(f"w_adi={self.w_adi} turns the competition off; use competition=false, or "
                      "w_adi > 0 (null: 0.2)")
        if self.objective not in OBJECTIVES:
            raise bad(f"objective must be one of {'|'.join(OBJECTIVES)}, got {self.objective!r}")
        if self.precision not in _PRECISION_ALIASES:
            raise bad(f"precision must be one of 32|bf16|16, got {self.precision!r}")
        self.precision = _PRECISION_ALIASES[self.precision]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> InversionSettings:
        """Build from a mapping (the resolved ``inversion`` config); unknown keys are errors."""
        d = dict(d or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(
                f"unknown inversion setting(s) {', '.join(unknown)}; valid keys: {', '.join(names)}"
            )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of the fields as given (``None`` kept)."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        if isinstance(self.stop, StopRule):
            out["stop"] = dataclasses.asdict(self.stop)
        return out

    @property
    def effective_jitter(self) -> int:
        if self.jitter is None:
            return int(round(30 * self.image_size / 224))
        return int(self.jitter)

    def effective_w_adi(self, has_student: bool) -> float:
        if not has_student:
            return 0.0
        return 0.2 if self.w_adi is None else float(self.w_adi)

    @property
    def lse_r(self) -> float:
        return float(self.lse_r0 + math.exp(self.lse_beta))

    def resolved(self, has_student: bool = False) -> dict[str, Any]:
        """The settings as they act (jitter and w_adi resolved): what cache keys hash.

        ``competition`` and ``student_model`` appear only with a student (their absence is what
        sets without one were keyed by); without one they act on nothing (e.g. the noise
        control).

        The fixed budget keys as before the adaptive one existed (no ``budget``, ``stop`` or
        ``compile``), so earlier sets stay valid. The adaptive budget keys its stopping rule but
        neither ``batch_size`` nor ``compile``: its images do not depend on them."""
        out = self.to_dict()
        out["jitter"] = self.effective_jitter
        out["w_adi"] = self.effective_w_adi(has_student)
        out.pop("competition")
        if out["objective"] == "softmax":  # the keys of every set made before there was a choice
            out.pop("objective")
        student_model = out.pop("student_model")
        if has_student:
            out.update(competition=True, student_model=student_model)
        out.pop("compile")
        if self.adaptive:
            out["stop"] = dataclasses.asdict(self.stop_rule)
            out.pop("batch_size")
        else:
            out.pop("budget")
            out.pop("stop")
        return out

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]


def batch_plan(targets: Sequence[int], settings: InversionSettings) -> list[list[int]]:
    """Target channel of every image, in batches.

    ``n_per_class * len(targets)`` images; image ``i`` targets ``targets[i % len(targets)]``,
    cut into consecutive batches of ``batch_size`` (the last one may be smaller). Cycling
    balances the set and mixes classes in every batch: the BN running statistics R_BN matches
    are an average over all classes, as the training batches were.

    With the adaptive budget a batch of the plan is only the unit a set is committed and
    resumed in (its images are optimised each on its own, in slots of ``batch_size``): one image
    of every class, the same on every device whatever ``batch_size`` resolves to.
    """
    targets = [int(t) for t in targets]
    if not targets:
        raise ConfigError("no target classes to synthesise; give at least one old class")
    n = settings.n_per_class * len(targets)
    flat = [targets[i % len(targets)] for i in range(n)]
    bs = len(targets) if settings.adaptive else int(settings.batch_size)
    return [flat[k:k + bs] for k in range(0, n, bs)]


# --------------------------------------------------------------------------------------------
# Pixel space


def _channel_stats(device=None) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std


def pixel_range(device=None) -> tuple[Tensor, Tensor]:
    """Per-channel ``(low, high)`` of the normalised space, each ``1 x 3 x 1 x 1``."""
    mean, std = _channel_stats(device)
    return (0.0 - mean) / std, (1.0 - mean) / std


def clamp_normalised(x: Tensor) -> Tensor:
    """Clamp a normalised ``B x 3 x H x W`` batch to the valid pixel range (a new tensor).

    DeepInversion clips after every step: an image outside [0, 1] could not be stored, so the
    teacher would be scored on something the student never replays."""
    low, high = pixel_range(x.device)
    return torch.maximum(torch.minimum(x, high.to(x.dtype)), low.to(x.dtype))


def denormalise(x: Tensor) -> Tensor:
    """Normalised ``B x 3 x H x W`` -> pixel values in [0, 1] (clamped)."""
    mean, std = _channel_stats(x.device)
    return (x.float() * std + mean).clamp(0.0, 1.0)


def normalise(x01: Tensor) -> Tensor:
    """Pixel values in [0, 1], ``B x 3 x H x W`` -> ImageNet-normalised."""
    mean, std = _channel_stats(x01.device)
    return (x01.float() - mean) / std


def quantise(images: Tensor) -> np.ndarray:
    """Normalised ``B x 3 x H x W`` -> uint8 ``B x H x W x 3`` (what the PNGs store)."""
    x = (denormalise(images.detach().cpu()) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def from_uint8(arrays) -> Tensor:
    """uint8 ``H x W x 3`` arrays (PNG pixels) -> normalised ``B x 3 x H x W`` float32: the
    inverse of :func:`quantise` up to rounding."""
    x01 = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return normalise(x01)

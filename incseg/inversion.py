"""DeepInversion for a segmentation teacher (SPEC 6.1): synthesise images of its old classes.

The image batch itself is the optimised parameter (initialised N(0, 1) in the ImageNet-normalised
space that real images are fed in, clamped to the valid pixel range after every Adam step). At
each iteration the batch is randomly rolled and flipped (and 2x average-pooled during the first,
half-resolution stage), fed to the frozen teacher, and the loss is

    w_ce CE(LSE-LBA(teacher logits), target) + w_bn R_BN + w_tv_l2 TV_L2 + w_tv_l1 TV_L1
    + w_l2 L2 (+ w_adi R_compete with a frozen competition student)

The one implementation of that loss is :meth:`InversionModule.compute_loss`; the optimisation
step around it is :meth:`InversionModule.optimisation_step`. Both the Lightning path
(``Trainer.fit(InversionModule(...))``, manual optimisation) and the plain loop of
:func:`synthesise` call them.

Many classes share one batch: images are assigned to target classes by cycling over the targets,
so the BN running statistics (an average over all classes) are matched by a batch that mixes
classes, as they were during training.

Best iterate (DeepInversion's rule): per batch, the iterate with the lowest total loss is kept and
returned. Only full-resolution iterations take part (half-resolution losses are not comparable:
BN statistics and TV terms change with the resolution); when there are no full-resolution
iterations the half-resolution ones are used, and with no iterations at all the (clamped)
initialisation is returned — which is exactly the "noise" control of SPEC 6.2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from incseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from incseg.errors import ConfigError
from incseg.losses.inversion import BNStatisticsHook, competition_loss, image_priors
from incseg.models.pooling import lse_lba_pool

__all__ = [
    "BestIterate",
    "InversionModule",
    "InversionSettings",
    "LossParts",
    "batch_plan",
    "clamp_normalised",
    "cosine_warmup_lr",
    "denormalise",
    "frozen",
    "image_level_logits",
    "model_logits",
    "normalise",
    "pixel_range",
    "synthesise",
]

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
# Aliases Lightning users type; stored as the short form.
_PRECISION_ALIASES = {"32-true": "32", "bf16-mixed": "bf16", "16-mixed": "16", "32": "32",
                      "bf16": "bf16", "16": "16"}


@dataclass
class InversionSettings:
    """Generator settings (config group ``inversion``; SPEC 6.1).

    ``jitter=None`` scales DeepInversion's 30 px at 224 px to the image size
    (``round(30 * image_size / 224)``: 9 px at 64). ``w_adi=None`` means 0.2 when a competition
    student is given, 0 otherwise. ``lse_beta`` is fixed (``r = lse_r0 + exp(lse_beta)``).
    ``precision`` "bf16"/"16" runs the teacher (and student) forward under ``torch.autocast``
    ("16" adds a dynamic gradient scaler on CUDA); the images and the loss stay float32.
    """

    n_per_class: int = 8
    batch_size: int = 32
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
    precision: str = "32"
    seed: int = 0

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        self.precision = str(self.precision)
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"invalid inversion setting: {msg}")

        for name in ("n_per_class", "batch_size", "image_size"):
            if int(getattr(self, name)) < 1:
                raise bad(f"{name} must be >= 1, got {getattr(self, name)}")
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
        """The settings as they act (jitter and w_adi resolved): what cache keys hash."""
        out = self.to_dict()
        out["jitter"] = self.effective_jitter
        out["w_adi"] = self.effective_w_adi(has_student)
        return out

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]


# --------------------------------------------------------------------------------------------
# Small helpers


def _channel_stats(device=None) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std


def pixel_range(device=None) -> tuple[Tensor, Tensor]:
    """Per-channel ``(low, high)`` of the normalised space, each ``1 x 3 x 1 x 1``."""
    mean, std = _channel_stats(device)
    return (0.0 - mean) / std, (1.0 - mean) / std


def clamp_normalised(x: Tensor) -> Tensor:
    """Clamp a normalised ``B x 3 x H x W`` batch to the valid pixel range (a new tensor)."""
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


def cosine_warmup_lr(i: int, n: int, base_lr: float, warmup_frac: float) -> float:
    """Learning rate of iteration ``i`` (0-based) of a stage of ``n`` iterations.

    Linear warm-up over the first ``int(warmup_frac * n)`` iterations (``base * (i+1)/w``), then a
    cosine from ``base`` to 0 over the rest (DeepInversion's ``lr_cosine_policy``).
    """
    w = int(warmup_frac * n)
    if i < w:
        return base_lr * (i + 1) / w
    rest = max(n - w, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (i - w) / rest)) * base_lr


def batch_plan(targets: Sequence[int], settings: InversionSettings) -> list[list[int]]:
    """Target channel of every image, in batches.

    ``n_per_class * len(targets)`` images; image ``i`` targets ``targets[i % len(targets)]``
    (cycling, so every batch mixes classes and the whole set is balanced), cut into consecutive
    batches of ``batch_size`` (the last one may be smaller).
    """
    targets = [int(t) for t in targets]
    if not targets:
        raise ConfigError("no target classes to synthesise; give at least one old class")
    n = settings.n_per_class * len(targets)
    flat = [targets[i % len(targets)] for i in range(n)]
    bs = settings.batch_size
    return [flat[k:k + bs] for k in range(0, n, bs)]


def model_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Pixel logits of ``model(x)``: a :class:`SegOutput`'s ``.logits`` or a plain tensor."""
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def image_level_logits(model: nn.Module, x: Tensor, r: float) -> tuple[Tensor, Tensor]:
    """``(pixel logits B x C x H x W, LSE-LBA pooled B x C)`` of ``model`` on ``x`` (no grad)."""
    with torch.no_grad():
        logits = model_logits(model, x).float()
        return logits, lse_lba_pool(logits, r)


@contextlib.contextmanager
def frozen(*models: nn.Module | None, device=None) -> Iterator[None]:
    """Put models in eval mode with ``requires_grad=False`` (optionally on ``device``); restore
    their mode, flags and device afterwards. Weights and buffers are never written."""
    saved = []
    for m in models:
        if m is None:
            continue
        flags = [(p, p.requires_grad) for p in m.parameters()]
        first = next(iter(m.parameters()), None)
        saved.append((m, m.training, flags, first.device if first is not None else None))
        m.eval()
        m.requires_grad_(False)
        if device is not None:
            m.to(device)
    try:
        yield
    finally:
        for m, training, flags, dev in saved:
            m.train(training)
            for p, flag in flags:
                p.requires_grad_(flag)
            if device is not None and dev is not None:
                m.to(dev)


class BestIterate:
    """Keeps the image batch with the lowest total loss seen (DeepInversion's rule).

    ``update(loss, images)`` stores a clone of ``images`` when ``loss`` is strictly lower than
    the best so far (the first finite loss always is); NaN/inf losses are never kept.
    """

    def __init__(self) -> None:
        self.loss: float = math.inf
        self.images: Tensor | None = None
        self.index: int | None = None  # number of the update that was kept (0-based)
        self._count = 0

    def update(self, loss: float, images: Tensor) -> bool:
        loss = float(loss)
        i = self._count
        self._count += 1
        if math.isfinite(loss) and (self.images is None or loss < self.loss):
            self.loss = loss
            self.images = images.detach().clone()
            self.index = i
            return True
        return False


class LossParts(NamedTuple):
    total: Tensor
    ce: Tensor
    bn: Tensor
    tv_l2: Tensor
    tv_l1: Tensor
    l2: Tensor
    adi: Tensor
    pooled: Tensor  # B x C_o teacher image-level logits (float32)


# --------------------------------------------------------------------------------------------
# The generator


class InversionModule(L.LightningModule):
    """One batch of DeepInversion images, optimised with manual optimisation.

    Args:
        teacher: frozen segmentation model (made eval + ``requires_grad=False`` here; its
            weights and BN buffers are never updated; Lightning's ``.train()`` leaves it in eval).
        targets: target channel of each image of the batch (``B``).
        settings: :class:`InversionSettings`.
        student: optional frozen competition student (Adaptive DeepInversion).
        batch_index: index of this batch in the set; with ``settings.seed`` it seeds the
            initialisation, jitter and flips, so a batch is the same alone or within a run.

    Lightning: ``Trainer(max_epochs=1).fit(module)`` runs all iterations (its
    ``train_dataloader`` yields one dummy item per iteration); :meth:`run` does the same without
    a Trainer. The result is :meth:`result_images` (the best iterate).
    """

    def __init__(
        self,
        teacher: nn.Module,
        targets: Sequence[int],
        settings: InversionSettings,
        student: nn.Module | None = None,
        batch_index: int = 0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.settings = settings
        self.batch_index = int(batch_index)
        self.teacher = teacher
        self.student = student
        for m in (teacher, student):
            if m is not None:
                m.eval()
                m.requires_grad_(False)
        first = next(iter(teacher.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        s = settings.image_size
        self.num_teacher_classes = self._count_channels(teacher, s, device)
        targets = [int(t) for t in targets]
        lowest = 0 if settings.include_background else 1
        for t in targets:
            if not lowest <= t < self.num_teacher_classes:
                raise ConfigError(
                    f"inversion target channel {t} outside {lowest}..{self.num_teacher_classes - 1}"
                    " (old foreground classes; background needs inversion.include_background=true)"
                )
        self.register_buffer("targets", torch.tensor(targets, dtype=torch.long, device=device))
        self.rng = torch.Generator().manual_seed(
            int(settings.seed) * 1_000_003 + self.batch_index
        )
        init = torch.randn(len(targets), 3, s, s, generator=self.rng)
        self.images = nn.Parameter(clamp_normalised(init).to(device))
        self.w_adi = settings.effective_w_adi(student is not None)
        self.iteration = 0
        self.history: list[float] = []
        self.best = BestIterate()
        self.start_loss: float | None = None
        self._hook: BNStatisticsHook | None = None
        self._scaler = torch.amp.GradScaler(
            device.type, enabled=settings.precision == "16" and device.type == "cuda"
        )

    @staticmethod
    def _count_channels(model: nn.Module, size: int, device) -> int:
        n = getattr(model, "num_classes", None)
        if isinstance(n, int):
            return n
        with torch.no_grad():
            return int(model_logits(model, torch.zeros(2, 3, size, size, device=device)).shape[1])

    # -- frozen submodules --------------------------------------------------------------------

    def train(self, mode: bool = True) -> InversionModule:
        super().train(mode)
        self.teacher.eval()
        if self.student is not None:
            self.student.eval()
        return self

    def _check_frozen(self) -> None:
        for m in (self.teacher, self.student):
            if m is None:
                continue
            assert not m.training, "inversion teacher/student must stay in eval mode"
            assert not any(p.requires_grad for p in m.parameters()), (
                "inversion teacher/student weights must have requires_grad=False"
            )

    def attach_hooks(self) -> None:
        if self._hook is None:
            self._hook = BNStatisticsHook(self.teacher, self.settings.first_bn_multiplier)

    def detach_hooks(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # -- schedule -----------------------------------------------------------------------------

    @property
    def total_iterations(self) -> int:
        return self.settings.iterations_low + self.settings.iterations_full

    def stage_of(self, it: int) -> tuple[int, int, int]:
        """``(stage, i within stage, stage length)``; stage 0 = half resolution, 1 = full."""
        k1 = self.settings.iterations_low
        if it < k1:
            return 0, it, k1
        return 1, it - k1, self.settings.iterations_full

    def _tracks_best(self, stage: int) -> bool:
        return stage == 1 or self.settings.iterations_full == 0

    # -- the loss -----------------------------------------------------------------------------

    def prepare_input(self, stage: int) -> Tensor:
        """The image batch as the teacher sees it this iteration: 2x average-pooled at stage 0,
        rolled by up to ``jitter`` px (half that at stage 0) and randomly flipped (batch-wide)."""
        x = self.images
        lim = self.settings.effective_jitter
        if stage == 0:
            x = F.avg_pool2d(x, kernel_size=2)
            lim = lim // 2
        if lim > 0:
            off = torch.randint(-lim, lim + 1, (2,), generator=self.rng).tolist()
            x = torch.roll(x, shifts=(off[0], off[1]), dims=(2, 3))
        if self.settings.flip and torch.rand((), generator=self.rng).item() > 0.5:
            x = torch.flip(x, dims=(3,))
        return x

    def _autocast(self, x: Tensor):
        dtype = self.settings.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=dtype)

    def compute_loss(self, x: Tensor) -> LossParts:
        """THE inversion loss on an input batch ``x`` (already jittered/pooled), SPEC 6.1."""
        st = self.settings
        self._check_frozen()
        if self._hook is None:
            raise RuntimeError("BN hooks are not attached; call attach_hooks() (run() does)")
        r = st.lse_r
        with self._autocast(x):
            t_logits = model_logits(self.teacher, x)
        bn = self._hook.loss.to(x.device)  # read right after the teacher's pass
        pooled = lse_lba_pool(t_logits.float(), r)  # all C_o channels, background included
        ce = F.cross_entropy(pooled, self.targets)
        tv_l2, tv_l1, l2 = image_priors(x)
        total = st.w_ce * ce + st.w_bn * bn + st.w_tv_l2 * tv_l2 + st.w_tv_l1 * tv_l1
        total = total + st.w_l2 * l2
        adi = torch.zeros((), device=x.device)
        if self.student is not None and self.w_adi > 0:
            with self._autocast(x):
                s_logits = model_logits(self.student, x)
            c_o = pooled.shape[1]
            if s_logits.shape[1] < c_o:
                raise ConfigError(
                    f"competition student has {s_logits.shape[1]} channels, fewer than the "
                    f"teacher's {c_o}; use a student trained on the same step"
                )
            s_pooled = lse_lba_pool(s_logits[:, :c_o].float(), r)
            adi = competition_loss(s_pooled, pooled, st.adi_temperature)
            total = total + self.w_adi * adi
        return LossParts(total, ce, bn, tv_l2, tv_l1, l2, adi, pooled.detach())

    # -- one optimisation step (shared by Lightning and the plain loop) -------------------------

    def configure_optimizers(self):
        """Two Adam optimisers over the images, one per stage (Adam restarted per stage)."""
        st = self.settings
        return [torch.optim.Adam([self.images], lr=st.lr, betas=st.betas, eps=1e-8)
                for _ in range(2)]

    def optimisation_step(self, optimizers: Sequence[torch.optim.Optimizer], backward=None
                          ) -> LossParts:
        """One iteration: LR, input, loss, best-iterate bookkeeping, step, clamp."""
        st = self.settings
        stage, i, n = self.stage_of(self.iteration)
        opt = optimizers[stage]
        lr = cosine_warmup_lr(i, n, st.lr, st.warmup_frac)
        for group in opt.param_groups:
            group["lr"] = lr
        x = self.prepare_input(stage)
        parts = self.compute_loss(x)
        value = float(parts.total.detach())
        if self.start_loss is None:
            self.start_loss = value
        if self._tracks_best(stage):
            self.best.update(value, self.images)  # the iterate the loss was measured on
        opt.zero_grad(set_to_none=True)
        (backward or torch.Tensor.backward)(self._scaler.scale(parts.total))
        self._scaler.step(opt)
        self._scaler.update()
        with torch.no_grad():
            self.images.copy_(clamp_normalised(self.images))
        self.history.append(value)
        self.iteration += 1
        return parts

    def run(self, progress: tqdm | None = None) -> InversionModule:
        """All iterations without a Trainer (hooks attached for the duration)."""
        optimizers = self.configure_optimizers()
        self.attach_hooks()
        try:
            while self.iteration < self.total_iterations:
                self.optimisation_step(optimizers)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{self.history[-1]:.3f}", refresh=False)
        finally:
            self.detach_hooks()
        return self

    # -- Lightning hooks ----------------------------------------------------------------------

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(self.total_iterations), batch_size=1)

    def on_train_start(self) -> None:
        self.attach_hooks()

    def on_train_end(self) -> None:
        self.detach_hooks()

    def on_exception(self, exception: BaseException) -> None:
        self.detach_hooks()

    def training_step(self, batch, batch_idx):
        if self.iteration >= self.total_iterations:
            return None
        optimizers = self.optimizers()
        if not isinstance(optimizers, (list, tuple)):
            optimizers = [optimizers]
        # The raw optimisers: the step (and gradient scaler) is ours, identical to run().
        raw = [getattr(o, "optimizer", o) for o in optimizers]
        parts = self.optimisation_step(raw, backward=self.manual_backward)
        self.log("inversion/loss", parts.total.detach(), prog_bar=True)
        return None

    # -- results ------------------------------------------------------------------------------

    def result_images(self) -> Tensor:
        """The best iterate (or the current images when no iteration was tracked)."""
        if self.best.images is not None:
            return self.best.images.detach().clone()
        return self.images.detach().clone()

    def summary(self) -> dict[str, Any]:
        """Per-batch figures: final/best/start loss and the teacher's image-level verdicts on the
        returned images (prediction: argmax of the pooled logits over the foreground channels,
        or all channels with ``include_background``; confidence: softmax over all channels)."""
        images = self.result_images()
        pred, conf, _ = teacher_verdicts(self.teacher, images, self.targets, self.settings)
        return {
            "index": self.batch_index,
            "count": int(images.shape[0]),
            "iterations": self.iteration,
            "start_loss": self.start_loss,
            "final_loss": self.history[-1] if self.history else None,
            "best_loss": self.best.loss if self.best.images is not None else None,
            "teacher_pred": pred.tolist(),
            "teacher_conf": conf.tolist(),
        }


def teacher_verdicts(
    teacher: nn.Module, images: Tensor, targets: Tensor, settings: InversionSettings
) -> tuple[Tensor, Tensor, Tensor]:
    """``(prediction B, confidence for the target B, pixel argmax B x H x W)`` of a frozen
    teacher on normalised ``images`` (no jitter, full resolution)."""
    logits, pooled = image_level_logits(teacher, images, settings.lse_r)
    conf = pooled.softmax(dim=1).gather(1, targets.view(-1, 1).to(pooled.device)).squeeze(1)
    if settings.include_background or pooled.shape[1] == 1:
        pred = pooled.argmax(dim=1)
    else:
        pred = pooled[:, 1:].argmax(dim=1) + 1
    return pred.cpu(), conf.cpu(), logits.argmax(dim=1).cpu()


def synthesise(
    teacher: nn.Module,
    targets: list[int],
    settings: InversionSettings,
    student: nn.Module | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    batches: Sequence[int] | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Synthesise ``settings.n_per_class`` images per target channel (see :func:`batch_plan`).

    Args:
        teacher: frozen segmentation model of the previous step (its mode, ``requires_grad``
            flags and device are restored afterwards; weights and buffers are not written).
        targets: target channels (old foreground classes, ``1..C_o-1``).
        settings: :class:`InversionSettings`.
        student: optional frozen competition student.
        progress: tqdm bar on stderr.
        device: where to optimise.
        batches: only these batch indices of the plan (default: all), e.g. to resume.

    Returns:
        ``(images N x 3 x H x W normalised on CPU, info)``; ``info`` has ``batches`` (per batch:
        index, count, iterations, start/final/best loss, teacher_pred, teacher_conf, seconds),
        the flat per-image ``targets``, ``teacher_pred``, ``teacher_conf`` and ``seconds``.
    """
    plan = batch_plan(targets, settings)
    indices = list(range(len(plan))) if batches is None else [int(k) for k in batches]
    for k in indices:
        if not 0 <= k < len(plan):
            raise ValueError(f"batch {k} outside the plan of {len(plan)} batches")
    device = torch.device(device)
    total = len(indices) * (settings.iterations_low + settings.iterations_full)
    images, records = [], []
    t0 = time.perf_counter()
    with frozen(teacher, student, device=device), tqdm(
        total=total, desc="deepinversion", disable=not progress, leave=False, dynamic_ncols=True
    ) as bar:
        for k in indices:
            tb = time.perf_counter()
            module = InversionModule(teacher, plan[k], settings, student=student, batch_index=k)
            module.to(device)
            module.run(progress=bar)
            images.append(module.result_images().cpu())
            rec = module.summary()
            rec["seconds"] = time.perf_counter() - tb
            records.append(rec)
            del module
    out = torch.cat(images) if images else torch.zeros(0, 3, settings.image_size,
                                                       settings.image_size)
    info = {
        "batches": records,
        "targets": [t for k in indices for t in plan[k]],
        "teacher_pred": [p for r in records for p in r["teacher_pred"]],
        "teacher_conf": [c for r in records for c in r["teacher_conf"]],
        "seconds": time.perf_counter() - t0,
    }
    return out, info

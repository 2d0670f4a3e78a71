"""DeepInversion for a segmentation teacher: synthesise images of its old classes.

DeepInversion (Yin et al., CVPR 2020; reference code NVlabs/DeepInversion) optimises the image
batch itself: initialised N(0, 1) in the ImageNet-normalised space that real images are fed in,
clamped to the valid pixel range after every Adam step. At each iteration the batch is randomly
rolled and flipped (and 2x average-pooled during the first, half-resolution stage, as the
reference code's multi-resolution setting), fed to the frozen teacher, and the loss is

    w_ce CE(LSE-LBA(teacher logits), target) + w_bn R_BN + w_tv_l2 TV_L2 + w_tv_l1 TV_L1
    + w_l2 L2 (+ w_adi R_compete with a frozen competition student)

LSE-LBA pooling turns the teacher's pixel logits into image-level scores, so the classification
CE of the paper applies to a segmentation model. For a model of one sigmoid per class (DKD,
STAR: ``InversionSettings.objective = "sigmoid"``, set from the method's prediction rule) the CE
becomes one BCE per class on the same pooled logits
(:func:`~incseg.losses.inversion.sigmoid_class_objective`). The one implementation of that loss is
:meth:`InversionModule.compute_loss`; :meth:`InversionModule.optimisation_step` is the step
around it. Per batch the best iterate is returned (:class:`BestIterate`). The module is a
LightningModule with manual optimisation, the image batch its parameter;
:func:`~incseg.replay.synthesis.synthesise` fits one per batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from incseg.losses.inversion import (
    BNStatisticsHook,
    competition_loss,
    image_priors,
    sigmoid_class_objective,
)
from incseg.models.pooling import lse_lba_pool
from incseg.replay.schedule import BestIterate, cosine_warmup_lr
from incseg.replay.settings import InversionSettings, clamp_normalised
from incseg.replay.verdicts import model_logits, teacher_verdicts

__all__ = [
    "BestIterate",
    "InversionModule",
    "LossParts",
    "cosine_warmup_lr",
]


class LossParts(NamedTuple):
    total: Tensor
    ce: Tensor
    bn: Tensor
    tv_l2: Tensor
    tv_l1: Tensor
    l2: Tensor
    adi: Tensor
    pooled: Tensor  # B x C_o teacher image-level logits (float32)


class InversionModule(L.LightningModule):
    """One batch of DeepInversion images; ``Trainer.fit`` (or :meth:`run`, the same iterations
    without a Trainer) optimises it, :meth:`result_images` is the best iterate.

    Args:
        teacher: frozen segmentation model (made eval + ``requires_grad=False`` here; its
            weights and BN buffers are never updated).
        targets: target channel of each image of the batch (``B``).
        settings: :class:`InversionSettings`.
        student: optional frozen competition student (Adaptive DeepInversion).
        batch_index: index of this batch in the set; with ``settings.seed`` it seeds the
            initialisation, jitter and flips, so a batch is the same alone or within a run
            (what makes resuming a half-filled replay set give the uninterrupted set).
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
        self._fitting = False
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
                raise ValueError(
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
        # The teacher and student are registered submodules: nn.Module.train() would put them
        # in train mode, and their BN layers would then move the running statistics R_BN matches.
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
        """THE inversion loss on an input batch ``x`` (already jittered/pooled); the terms are
        DeepInversion's (see the module docstring)."""
        st = self.settings
        self._check_frozen()
        if self._hook is None:
            raise RuntimeError("BN hooks are not attached; call attach_hooks() (run() does)")
        r = st.lse_r
        with self._autocast(x):
            t_logits = model_logits(self.teacher, x)
        bn = self._hook.loss.to(x.device)  # read right after the teacher's pass
        pooled = lse_lba_pool(t_logits.float(), r)  # all C_o channels, background included
        if st.objective == "sigmoid":  # one sigmoid per class (DKD, STAR)
            ce = sigmoid_class_objective(pooled, self.targets)
        else:
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
                raise ValueError(
                    f"competition student has {s_logits.shape[1]} channels, fewer than the "
                    f"teacher's {c_o}; use a student trained on the same step"
                )
            s_pooled = lse_lba_pool(s_logits[:, :c_o].float(), r)
            adi = competition_loss(s_pooled, pooled, st.adi_temperature)
            total = total + self.w_adi * adi
        return LossParts(total, ce, bn, tv_l2, tv_l1, l2, adi, pooled.detach())

    # -- optimisation -------------------------------------------------------------------------

    def make_optimizers(self) -> list[torch.optim.Optimizer]:
        """Two Adam optimisers over the images, one per stage: Adam restarts at full
        resolution, as NVlabs/DeepInversion does between its resolution stages."""
        st = self.settings
        return [torch.optim.Adam([self.images], lr=st.lr, betas=st.betas, eps=1e-8)
                for _ in range(2)]

    def optimisation_step(self, optimizers: Sequence[torch.optim.Optimizer]) -> LossParts:
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
        scaled = self._scaler.scale(parts.total)
        if self._fitting:  # inside Trainer.fit: through Lightning (its hooks see it)
            self.manual_backward(scaled)
        else:
            scaled.backward()
        self._scaler.step(opt)
        self._scaler.update()
        with torch.no_grad():
            self.images.copy_(clamp_normalised(self.images))
        self.history.append(value)
        self.iteration += 1
        return parts

    def run(self, progress: tqdm | None = None) -> InversionModule:
        """All iterations (BN hooks attached for the duration)."""
        optimizers = self.make_optimizers()
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

    # -- Lightning: Trainer.fit runs the iterations -------------------------------------------

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return self.make_optimizers()

    def train_dataloader(self) -> range:
        return range(self.iteration, self.total_iterations)  # one item per iteration

    def on_train_start(self) -> None:
        self._fitting = True
        self.attach_hooks()

    def training_step(self, batch: int, batch_idx: int) -> None:
        # the optimisers themselves, not Lightning's wrappers: the same steps as run()
        parts = self.optimisation_step(self.optimizers(use_pl_optimizer=False))
        self.log("loss", self.history[-1], prog_bar=True, logger=False, batch_size=1)
        every = self.trainer.log_every_n_steps
        if self.iteration % every == 0 or self.iteration == self.total_iterations:
            names = ("loss", "ce", "bn", "tv_l2", "tv_l1", "l2", "adi")
            self._log_metrics({f"inversion/{n}": float(v.detach())
                               for n, v in zip(names, parts, strict=False)})

    def on_train_end(self) -> None:
        self._fitting = False
        self.detach_hooks()
        rec = self.summary()
        hits = sum(int(p == t) for p, t in zip(rec["teacher_pred"], self.targets.tolist()))
        self._log_metrics({"inversion/batch": self.batch_index,
                           "inversion/batch_best_loss": rec["best_loss"],
                           "inversion/batch_final_loss": rec["final_loss"],
                           "inversion/batch_teacher_accuracy": hits / max(rec["count"], 1)})

    def _log_metrics(self, metrics: dict[str, float | None]) -> None:
        """To the Trainer's loggers, at the iteration's step within the whole set (batch
        ``k`` takes steps ``k * iterations`` on), so one logger run can hold every batch."""
        step = self.batch_index * self.total_iterations + self.iteration - 1
        for logger in self.loggers:
            logger.log_metrics({k: v for k, v in metrics.items() if v is not None}, step=step)

    # -- results ------------------------------------------------------------------------------

    def result_images(self) -> Tensor:
        """The best iterate (or the current images when no iteration was tracked)."""
        if self.best.images is not None:
            return self.best.images.detach().clone()
        return self.images.detach().clone()

    def summary(self) -> dict[str, Any]:
        """Per-batch figures: start/final/best loss and the teacher's verdicts
        (:func:`teacher_verdicts`) on the returned images."""
        images = self.result_images()
        device = self.targets.device  # the Trainer's teardown may have moved the module
        pred, conf, _ = teacher_verdicts(self.teacher, images.to(device), self.targets,
                                         self.settings)
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

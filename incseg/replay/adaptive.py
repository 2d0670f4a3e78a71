"""The adaptive budget: DeepInversion that stops each image when it is done, in batches that are
refilled as images finish (``inversion.budget=adaptive``).

Every image is optimised on its own objective: DeepInversion's loss (Yin et al., CVPR 2020) of
a batch of one, i.e. its own BN statistics (mean and variance over its pixels), its own priors,
CE and competition term, summed over the optimisation batch so that an image's gradient is its
own loss's. Its Adam moments, step count, learning-rate schedule position, stage and random
draws (initialisation, roll, flip: a ``torch.Generator`` seeded from the set's seed, its class
and its number in the set) are its own too. So an image is the same whether it ran alone, in a
full batch, or in a slot another image had just left; that is what lets finished images leave
and waiting ones take their slots ("continuous batching", as LLM servers batch requests), and
what keeps a set deterministic and resumable per plan batch whatever the batch size.

Each stage of an image (half resolution, then full) ends when :class:`StopRule` is met or at
the stage's iteration count; Adam restarts between the stages, as NVlabs/DeepInversion does.
The image returned is its lowest-loss full-resolution iterate (DeepInversion's rule, per image).

Why not the fixed budget's batch statistics: R_BN over a batch couples its images (each one's
gradient depends on all the others), so an image could neither leave the batch early nor be
reproduced outside it. With a batch of one per image the BN term asks each image to match the
teacher's running statistics by itself, as NVlabs' code does at batch size 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from incseg.losses.inversion import BNStatisticsHook, competition_loss, per_image_priors
from incseg.models.pooling import lse_lba_pool
from incseg.replay.schedule import cosine_warmup_lr
from incseg.replay.settings import InversionSettings, clamp_normalised
from incseg.replay.verdicts import model_logits

__all__ = ["AdaptiveInversion", "Finished", "ImageJob", "image_seed"]



class ImageJob(NamedTuple):
    """One image of a set: its number in the set, its target channel, its plan batch."""

    index: int
    target: int
    batch: int


def image_seed(seed: int, target: int, index: int) -> int:
    """The seed of one image's generator, from the set's seed, its target and its number (a
    hash, so neighbouring images do not get neighbouring seeds)."""
    digest = hashlib.sha256(f"incseg-inversion/{seed}/{target}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class _Image:
    """Host-side state of the image in one slot."""

    job: ImageJob
    rng: torch.Generator
    stage: int
    it: int = 0  # iterations done in the current stage
    stage_iterations: list[int] = field(default_factory=lambda: [0, 0])
    probs: list[float] = field(default_factory=list)  # current stage, oldest first
    bns: list[float] = field(default_factory=list)
    adam_steps: int = 0
    start_loss: float | None = None
    final_loss: float | None = None
    scale: float = 1.0  # its fp16 loss scale (a GradScaler of its own)
    good_steps: int = 0


class Finished(NamedTuple):
    job: ImageJob
    image: Tensor  # 3 x H x W, normalised, on the CPU
    stage_iterations: list[int]
    start_loss: float | None
    final_loss: float | None
    best_loss: float | None


def _roll_per_image(x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """``torch.roll`` of every image by its own ``(dy_i, dx_i)`` (pure copies, so an image
    rolled in a batch equals it rolled alone)."""
    b, c, h, w = x.shape
    rows = (torch.arange(h, device=x.device)[None, :] - dy[:, None]) % h  # B x H
    cols = (torch.arange(w, device=x.device)[None, :] - dx[:, None]) % w  # B x W
    x = x.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    return x.gather(3, cols[:, None, None, :].expand(b, c, h, w))


class AdaptiveInversion:
    """Slots of images under optimisation; :meth:`step` is one iteration of every occupied
    slot, :meth:`run` feeds a queue of :class:`ImageJob` through the slots and yields every
    image as it finishes.

    Args:
        teacher, student: frozen models (already eval, ``requires_grad=False``, on ``device``).
        settings: :class:`InversionSettings` (``stop``, ``iterations_low/full`` as maxima).
        slots: images per optimisation batch.
        device: where the slots live.
        compile_backend: ``torch.compile``'s backend when ``settings.compile`` is on (tests
            use ``aot_eager``, which traces the same graphs without building C++ kernels).
    """

    def __init__(self, teacher: nn.Module, settings: InversionSettings, slots: int,
                 device: torch.device | str, student: nn.Module | None = None,
                 compile_backend: str = "inductor") -> None:
        self.teacher, self.student, self.settings = teacher, student, settings
        self.device = torch.device(device)
        self.slots = int(slots)
        s, p = settings.image_size, self.slots
        self.x = torch.zeros(p, 3, s, s, device=self.device, requires_grad=True)
        self.m = torch.zeros(p, 3, s, s, device=self.device)
        self.v = torch.zeros(p, 3, s, s, device=self.device)
        self.best = torch.zeros(p, 3, s, s, device=self.device)
        self.best_loss = torch.full((p,), math.inf, device=self.device)
        self.targets = torch.zeros(p, dtype=torch.long, device=self.device)
        self.images: list[_Image | None] = [None] * p
        self.w_adi = settings.effective_w_adi(student is not None)
        self.rule = settings.stop_rule
        self.scaling = settings.precision == "16" and self.device.type == "cuda"
        self.steps = 0
        self._hook: BNStatisticsHook | None = None
        self._loss = self.group_loss
        if settings.compile:
            mode = settings.compile if isinstance(settings.compile, str) else None
            # dynamic: the stage groups change size whenever an image changes stage or leaves
            self._loss = torch.compile(self.group_loss, dynamic=True, mode=mode,
                                       backend=compile_backend)

    # -- the loss of a group of images at one resolution ----------------------------------

    def group_loss(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(total, probability of the target, R_BN)``, each ``B``: DeepInversion's loss of
        every image of ``x`` (already pooled/rolled/flipped) as a batch of one."""
        st = self.settings
        r = st.lse_r
        with self._autocast():
            t_logits = model_logits(self.teacher, x)
        bn = torch.broadcast_to(self._hook.loss.to(x.device), (x.shape[0],))
        pooled = lse_lba_pool(t_logits.float(), r)
        ce = F.cross_entropy(pooled, targets, reduction="none")
        tv_l2, tv_l1, l2 = per_image_priors(x)
        total = (st.w_ce * ce + st.w_bn * bn + st.w_tv_l2 * tv_l2 + st.w_tv_l1 * tv_l1
                 + st.w_l2 * l2)
        if self.student is not None and self.w_adi > 0:
            with self._autocast():
                s_logits = model_logits(self.student, x)
            c_o = pooled.shape[1]
            s_pooled = lse_lba_pool(s_logits[:, :c_o].float(), r)
            total = total + self.w_adi * competition_loss(s_pooled, pooled,
                                                          st.adi_temperature, per_image=True)
        prob = F.softmax(pooled.detach(), dim=1).gather(1, targets[:, None])[:, 0]
        return total, prob, bn.detach()

    def _autocast(self):
        dtype = self.settings.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # -- slots ------------------------------------------------------------------------------

    def occupied(self) -> int:
        return sum(img is not None for img in self.images)

    def place(self, slot: int, job: ImageJob, stage: int | None = None) -> None:
        """Start ``job`` in ``slot``: its generator draws its initialisation first, as the
        fixed budget's batch generator does."""
        st = self.settings
        rng = torch.Generator().manual_seed(image_seed(st.seed, job.target, job.index))
        init = torch.randn(1, 3, st.image_size, st.image_size, generator=rng)
        if stage is None:
            stage = 0 if st.iterations_low > 0 else 1
        with torch.no_grad():
            self.x[slot] = clamp_normalised(init)[0].to(self.device)
            self.m[slot] = 0.0
            self.v[slot] = 0.0
            self.best_loss[slot] = math.inf
            self.targets[slot] = int(job.target)
        self.images[slot] = _Image(job, rng, stage, scale=2.0 ** 16 if self.scaling else 1.0)

    def _stage_length(self, stage: int) -> int:
        return self.settings.iterations_low if stage == 0 else self.settings.iterations_full

    def _tracks_best(self, stage: int) -> bool:
        return stage == 1 or self.settings.iterations_full == 0

    def _prepare(self, x: Tensor, stage: int, imgs: Sequence[_Image]) -> Tensor:
        """Pool (stage 0), roll and flip each image with draws from its own generator, in the
        order :meth:`InversionModule.prepare_input` draws them."""
        lim = self.settings.effective_jitter
        if stage == 0:
            x = F.avg_pool2d(x, kernel_size=2)
            lim = lim // 2
        offs, flips = [], []
        for img in imgs:
            off = (torch.randint(-lim, lim + 1, (2,), generator=img.rng).tolist()
                   if lim > 0 else [0, 0])
            flip = bool(self.settings.flip
                        and torch.rand((), generator=img.rng).item() > 0.5)
            offs.append(off)
            flips.append(flip)
        if lim > 0:
            off = torch.tensor(offs, device=x.device)
            x = _roll_per_image(x, off[:, 0], off[:, 1])
        if any(flips):
            mask = torch.tensor(flips, device=x.device).view(-1, 1, 1, 1)
            x = torch.where(mask, torch.flip(x, dims=(3,)), x)
        return x

    # -- one iteration ------------------------------------------------------------------------

    def step(self) -> list[Finished]:
        """One iteration of every occupied slot; returns the images that finished."""
        st = self.settings
        if self._hook is None:
            self._hook = BNStatisticsHook(self.teacher, st.first_bn_multiplier, per_image=True)
        groups: dict[int, list[int]] = {0: [], 1: []}
        for slot, img in enumerate(self.images):
            if img is not None:
                groups[img.stage].append(slot)
        measured: dict[int, tuple[float, float, float]] = {}
        losses = []
        for stage, slots in groups.items():
            if not slots:
                continue
            imgs = [self.images[s] for s in slots]
            idx = torch.tensor(slots, device=self.device)
            xg = self.x.index_select(0, idx)
            total, prob, bn = self._loss(self._prepare(xg, stage, imgs), self.targets[idx])
            if self._tracks_best(stage):
                with torch.no_grad():  # the iterate the loss was measured on
                    better = torch.isfinite(total) & (total < self.best_loss[idx])
                    self.best_loss[idx] = torch.where(better, total.detach(), self.best_loss[idx])
                    self.best[idx] = torch.where(better.view(-1, 1, 1, 1), xg.detach(),
                                                 self.best[idx])
            scale = torch.tensor([img.scale for img in imgs], device=self.device)
            losses.append((total * scale).sum())
            values = torch.stack([total.detach().float(), prob.float(), bn.float()]).cpu()
            for j, s in enumerate(slots):
                measured[s] = tuple(float(v) for v in values[:, j])
        self.x.grad = None
        torch.stack(losses).sum().backward()
        self._adam(groups[0] + groups[1])
        self.steps += 1
        return self._advance(measured)

    def _adam(self, slots: list[int]) -> None:
        """Adam (torch's update, per slot: its own step count and learning rate), then the
        clamp to the pixel range; with fp16 each slot unscales its gradient and skips its step
        on inf/NaN, a GradScaler per image."""
        st = self.settings
        b1, b2 = st.betas
        p = self.slots
        with torch.no_grad():
            grad = self.x.grad
            live = torch.zeros(p, dtype=torch.bool)
            live[slots] = True
            if self.scaling:
                grad = grad / torch.tensor([img.scale if img else 1.0 for img in self.images],
                                           device=self.device).view(-1, 1, 1, 1)
                finite = torch.isfinite(grad).flatten(1).all(dim=1).cpu()
                for s in slots:
                    self._update_scale(self.images[s], bool(finite[s]))
                live &= finite
            lr = torch.zeros(p, dtype=torch.float64)
            bc2 = torch.ones(p, dtype=torch.float64)
            for s in slots:
                img = self.images[s]
                if not live[s]:
                    continue
                img.adam_steps += 1
                i, n = img.it, self._stage_length(img.stage)
                lr[s] = cosine_warmup_lr(i, n, st.lr, st.warmup_frac) / (1 - b1 ** img.adam_steps)
                bc2[s] = math.sqrt(1 - b2 ** img.adam_steps)
            mask = live.to(self.device).view(-1, 1, 1, 1)
            m = torch.where(mask, self.m.lerp(grad, 1 - b1), self.m)
            v = torch.where(mask, self.v * b2 + (1 - b2) * grad * grad, self.v)
            denom = v.sqrt() / bc2.to(self.device, torch.float32).view(-1, 1, 1, 1) + 1e-8
            step = lr.to(self.device, torch.float32).view(-1, 1, 1, 1) * (m / denom)
            x = torch.where(mask, clamp_normalised(self.x - step), self.x)
            self.m.copy_(m)
            self.v.copy_(v)
            self.x.copy_(x)

    @staticmethod
    def _update_scale(img: _Image, finite: bool) -> None:
        # torch.amp.GradScaler's defaults: halve on inf/NaN, double after 2000 good steps
        if not finite:
            img.scale, img.good_steps = img.scale * 0.5, 0
            return
        img.good_steps += 1
        if img.good_steps == 2000:
            img.scale, img.good_steps = img.scale * 2.0, 0

    def _advance(self, measured: dict[int, tuple[float, float, float]]) -> list[Finished]:
        """Count the iteration, and end stages and images whose rule is met."""
        done = []
        for slot, (total, prob, bn) in measured.items():
            img = self.images[slot]
            img.it += 1
            img.stage_iterations[img.stage] += 1
            img.probs.append(prob)
            img.bns.append(bn)
            if img.start_loss is None:
                img.start_loss = total
            img.final_loss = total
            if img.it < self._stage_length(img.stage) and not self.rule.met(img.probs,
                                                                               img.bns):
                continue
            if img.stage == 0 and self.settings.iterations_full > 0:
                img.stage, img.it, img.probs, img.bns, img.adam_steps = 1, 0, [], [], 0
                with torch.no_grad():  # Adam restarts at full resolution
                    self.m[slot] = 0.0
                    self.v[slot] = 0.0
                continue
            done.append(self._release(slot))
        return done

    def _release(self, slot: int) -> Finished:
        img = self.images[slot]
        best = float(self.best_loss[slot])
        source = self.best if math.isfinite(best) else self.x
        image = source[slot].detach().clone().cpu()
        self.images[slot] = None
        return Finished(img.job, image, list(img.stage_iterations), img.start_loss,
                        img.final_loss, best if math.isfinite(best) else None)

    def run(self, jobs: Sequence[ImageJob], progress: tqdm | None = None) -> Iterator[Finished]:
        """Every job through the slots, refilled as images finish; yields each finished one."""
        queue = list(jobs)[::-1]
        st = self.settings
        try:
            while queue or self.occupied():
                for slot in range(self.slots):
                    if self.images[slot] is None and queue:
                        job = queue.pop()
                        if st.iterations_low + st.iterations_full == 0:
                            self.place(slot, job)  # the noise control: its initialisation
                            yield self._release(slot)
                            continue
                        self.place(slot, job)
                if not self.occupied():
                    continue
                for fin in self.step():
                    if progress is not None:
                        progress.update(1)
                    yield fin
        finally:
            self.close()

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

"""A plain reference DeepInversion loop for a segmentation teacher: the inversion baseline.

This is the generator as the paper ran it, written the simplest way: fp32, full resolution
only, ONE class per batch (the paper synthesised class by class), Adam, and the loss

    CE(LSE-LBA pooled teacher logits, class) + w_bn R_BN + w_tv_l2 TV_L2 + w_l2 L2

with DeepInversion's per-iteration jitter (random roll) and flip, cosine LR with warm-up, and
the best iterate kept (lowest total loss). Plain torch: no Lightning, no multi-resolution, no
code shared with ``incseg.replay`` beyond the ImageNet constants, so the benchmark compares
the two designs, not a helper they share. Its hyperparameters are copied from the same
``InversionSettings`` our generator uses, so the only differences are the ones named above.

Default budget: as many iterations per class batch as our cpu settings run in total
(``iterations_low + iterations_full``), every one at full resolution.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class ReferenceSettings:
    iterations: int = 300
    lr: float = 0.2
    betas: tuple[float, float] = (0.5, 0.9)
    warmup_frac: float = 0.05
    jitter: int = 9
    flip: bool = True
    w_ce: float = 1.0
    w_bn: float = 0.01
    first_bn_multiplier: float = 10.0
    w_tv_l2: float = 1e-4
    w_l2: float = 1e-5
    lse_r: float = 6.0
    seed: int = 0

    @classmethod
    def like(cls, settings) -> ReferenceSettings:
        """The same hyperparameters as an ``incseg.replay.InversionSettings``, all of its
        iterations (both stages) spent at full resolution."""
        return cls(iterations=settings.iterations_low + settings.iterations_full,
                   lr=settings.lr, betas=tuple(settings.betas), warmup_frac=settings.warmup_frac,
                   jitter=settings.effective_jitter, flip=settings.flip, w_ce=settings.w_ce,
                   w_bn=settings.w_bn, first_bn_multiplier=settings.first_bn_multiplier,
                   w_tv_l2=settings.w_tv_l2, w_l2=settings.w_l2, lse_r=settings.lse_r,
                   seed=settings.seed)


class _BNHooks:
    """DeepInversion's feature hook: per BatchNorm input, ||mean - running_mean||_2 +
    ||var - running_var||_2 (biased variance over N, H, W), in the order the layers run."""

    def __init__(self, model: nn.Module):
        self.terms: list[Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, nn.BatchNorm2d)]

    def _hook(self, module, inputs, output) -> None:
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self.terms.append(torch.norm(module.running_mean - mean, 2)
                          + torch.norm(module.running_var - var, 2))

    def take(self, first_multiplier: float) -> Tensor:
        terms, self.terms = self.terms, []
        return first_multiplier * terms[0] + sum(terms[1:])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _lse_pool(logits: Tensor, r: float) -> Tensor:
    """B x C x H x W -> B x C: (logsumexp(r z) - log(HW)) / r."""
    z = logits.flatten(2)
    return (torch.logsumexp(r * z, dim=2) - math.log(z.shape[2])) / r


def _priors(x: Tensor) -> tuple[Tensor, Tensor]:
    """TV_L2 (sum of Frobenius norms of the four neighbour differences) and L2 (mean image
    norm)."""
    diffs = (x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
             x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
    tv = sum(torch.norm(d) for d in diffs)
    return tv, x.flatten(1).norm(dim=1).mean()


def _lr(i: int, n: int, base: float, warmup_frac: float) -> float:
    w = int(warmup_frac * n)
    if i < w:
        return base * (i + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (i - w) / max(n - w, 1))) * base


def invert_class(teacher: nn.Module, target: int, n: int, size: int,
                 st: ReferenceSettings) -> Tensor:
    """``n`` images of teacher channel ``target`` (normalised, N x 3 x size x size)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    low, high = (0 - mean) / std, (1 - mean) / std
    g = torch.Generator().manual_seed(st.seed * 1_000_003 + target)
    x = torch.randn(n, 3, size, size, generator=g)
    x = torch.maximum(torch.minimum(x, high), low).requires_grad_(True)
    labels = torch.full((n,), target, dtype=torch.long)
    opt = torch.optim.Adam([x], lr=st.lr, betas=st.betas)
    hooks = _BNHooks(teacher)
    best, best_loss = x.detach().clone(), math.inf
    try:
        for it in range(st.iterations):
            for group in opt.param_groups:
                group["lr"] = _lr(it, st.iterations, st.lr, st.warmup_frac)
            dx, dy = torch.randint(-st.jitter, st.jitter + 1, (2,), generator=g).tolist()
            xj = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
            if st.flip and torch.rand((), generator=g).item() > 0.5:
                xj = torch.flip(xj, dims=(3,))
            out = teacher(xj)
            logits = out.logits if hasattr(out, "logits") else out
            ce = F.cross_entropy(_lse_pool(logits, st.lse_r), labels)
            tv, l2 = _priors(xj)
            loss = (st.w_ce * ce + st.w_bn * hooks.take(st.first_bn_multiplier)
                    + st.w_tv_l2 * tv + st.w_l2 * l2)
            if loss.item() < best_loss:
                best_loss, best = loss.item(), x.detach().clone()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, high), low))
    finally:
        hooks.remove()
    return best


def reference_inversion(teacher: nn.Module, targets: list[int], n_per_class: int, size: int,
                        st: ReferenceSettings) -> tuple[Tensor, list[int], float]:
    """One batch per target class; returns (images, per-image targets, seconds)."""
    was_training = teacher.training
    flags = [(p, p.requires_grad) for p in teacher.parameters()]
    teacher.eval()
    teacher.requires_grad_(False)
    start = time.perf_counter()
    try:
        images = [invert_class(teacher, t, n_per_class, size, st) for t in targets]
    finally:
        teacher.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)
    seconds = time.perf_counter() - start
    return torch.cat(images), [t for t in targets for _ in range(n_per_class)], seconds

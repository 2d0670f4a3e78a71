"""The generator's schedule and its choice of iterate: DeepInversion's cosine learning rate with
a linear warm-up, and the lowest-loss iterate of a batch."""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["BestIterate", "cosine_warmup_lr"]


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


class BestIterate:
    """Keeps the image batch with the lowest total loss seen (DeepInversion's rule).

    ``update(loss, images)`` stores a clone of ``images`` when ``loss`` is strictly lower than
    the best so far (the first finite loss always is); NaN/inf losses are never kept. Only
    full-resolution iterations are offered (half-resolution losses are not comparable: BN
    statistics and TV terms change with the resolution) unless there are none; with no
    iterations at all the clamped initialisation is returned — the noise control.
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

"""Is a loss term too sharp for the optimiser? The curvature test behind ``replay.check``.

SGD with learning rate ``lr`` follows a quadratic ``lambda/2 p^2`` only while
``lr * lambda`` stays below a bound set by the momentum; above it each step overshoots by more
than the last and the iterate grows geometrically. A loss term whose Hessian has a larger
eigenvalue than that bound at the start of training diverges along that eigenvector as soon as
the iterate leaves the minimum. This is what made MSE replay at weight 1 collapse on `shapes`
15-5s (the figures: docs/measurements.md, "Replay curvature").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["sgd_stability_bound", "top_hessian_eigenvalue"]


def sgd_stability_bound(lr: float, momentum: float = 0.0, nesterov: bool = False) -> float:
    """The largest curvature ``lambda`` on which PyTorch's SGD converges on ``lambda/2 p^2``.

    With ``v <- b v + g`` and ``p <- p - lr v`` (heavy ball) the iteration matrix has spectral
    radius below 1 iff ``lr * lambda < 2 (1 + b)``; with Nesterov's ``p <- p - lr (g + b v)``
    iff ``lr * lambda < 2 (1 + b) / (1 + 2 b)``. Plain SGD (``b = 0``): ``2 / lr``.

    Args:
        lr: learning rate (> 0).
        momentum: ``b`` in [0, 1).
        nesterov: PyTorch's ``nesterov=True``.
    """
    if lr <= 0 or not 0 <= momentum < 1:
        raise ValueError(f"need lr > 0 and 0 <= momentum < 1, got lr={lr}, momentum={momentum}")
    b = momentum
    return (2 * (1 + b) / (1 + 2 * b) if nesterov else 2 * (1 + b)) / lr


def top_hessian_eigenvalue(loss_fn: Callable[[], Tensor], params: Sequence[Tensor],
                           iters: int = 20, seed: int = 0) -> float:
    """The eigenvalue of largest magnitude of the Hessian of ``loss_fn()`` with respect to
    ``params``, by power iteration on Hessian-vector products (double backward).

    ``loss_fn`` is called once; parameters it does not use are left out. The start vector comes
    from a generator of its own (``seed``), so the global random state is untouched. The
    estimate approaches the eigenvalue from below as ``iters`` grows (Rayleigh quotient).

    Returns:
        The Rayleigh quotient ``v . H v`` after ``iters`` iterations (0.0 when the loss does not
        depend on ``params``).
    """
    params = list(params)
    loss = loss_fn()
    if not loss.requires_grad:
        return 0.0
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    used = [(p, g) for p, g in zip(params, grads) if g is not None and g.requires_grad]
    if not used:
        return 0.0
    params, grads = [p for p, _ in used], [g for _, g in used]
    gen = torch.Generator().manual_seed(int(seed))
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
    lam = 0.0
    for _ in range(max(1, int(iters))):
        norm = math.sqrt(sum(float(x.double().pow(2).sum()) for x in v))
        if norm == 0.0:
            return 0.0
        v = [x / norm for x in v]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True,
                                 allow_unused=True)
        hv = [torch.zeros_like(p) if h is None else h for p, h in zip(params, hv)]
        lam = sum(float((a.double() * b.double()).sum()) for a, b in zip(v, hv))
        v = [h.detach() for h in hv]
    return lam

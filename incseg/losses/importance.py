"""Parameter-importance regularisers as MiB runs them for segmentation (Cermelli et al., CVPR
2020; fcdl94/MiB ``utils/regularizer.py``): EWC (Kirkpatrick et al., PNAS 2017) with an online
Fisher estimate, PI / Synaptic Intelligence (Zenke et al., ICML 2017) and RWalk (Chaudhry et
al., ECCV 2018). Each formula acts on one parameter tensor; the methods
(:mod:`incseg.methods.regularizer`) apply them to every tensor of the model.

Shapes: every argument is a tensor of the parameter's shape (``grad`` its gradient of the task
loss, before any penalty is added).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ewc_fisher_update", "normalize_importance", "penalty_gradient",
           "pi_path_update", "pi_score", "quadratic_penalty", "rw_final_score",
           "rw_score_update"]

NORM_EPS = 1e-8   # MiB's EPS in normalize_fn and in RW's score denominator
PI_EPS = 1e-20    # MiB's PI.get(): the squared displacement may be exactly 0


def normalize_importance(x: Tensor) -> Tensor:
    """N(X) = (X - min X) / (max X - min X + 1e-8), per tensor: every layer's importance in
    [0, 1] whatever its scale."""
    return (x - x.min()) / (x.max() - x.min() + NORM_EPS)


def ewc_fisher_update(fisher: Tensor, grad: Tensor, alpha: float = 0.9) -> Tensor:
    """F <- alpha * g² + (1 - alpha) * F: the empirical Fisher as an exponential moving average
    over iterations (MiB's ``EWC.update``, ``reg_alpha`` 0.9)."""
    return alpha * grad.pow(2) + (1 - alpha) * fisher


def pi_path_update(delta: Tensor, grad: Tensor, previous: Tensor, current: Tensor) -> Tensor:
    """δ <- δ + g ⊙ (θ_prev - θ): the path integral of -g · dθ, with θ_prev the weights at the
    previous update and g the gradient at θ (MiB's ``PI.update``)."""
    return delta + grad * (previous - current)


def pi_score(delta: Tensor, start: Tensor, end: Tensor, previous: Tensor | None = None
             ) -> Tensor:
    """S = max(0, δ / ((θ_end - θ_start)² + 1e-20)) (+ S_prev when the tensor had one): the
    step's contribution per unit of squared displacement, summed over steps (``PI.get``)."""
    score = (delta / ((end - start).pow(2) + PI_EPS)).clamp(min=0)
    return score if previous is None else score + previous


def rw_score_update(score: Tensor, grad: Tensor, snapshot: Tensor, current: Tensor,
                    fisher: Tensor) -> Tensor:
    """S <- S + g ⊙ (θ_snap - θ) / (0.5 F ⊙ (θ - θ_snap)² + 1e-8): the loss change per unit of
    KL-distance moved since the last snapshot (RWalk's score; MiB's ``RW.update``, every
    ``iterations`` iterations, with the Fisher before this iteration's update)."""
    den = 0.5 * fisher * (current - snapshot).pow(2) + NORM_EPS
    return score + grad * (snapshot - current) / den


def rw_final_score(score: Tensor, previous: Tensor | None = None) -> Tensor:
    """max(0, S), averaged with S_prev when the tensor had one: 0.5 (max(0, S) + S_prev)
    (``RW.get_score``)."""
    score = score.clamp(min=0)
    return score if previous is None else 0.5 * (score + previous)


def quadratic_penalty(params: dict[str, Tensor], anchors: dict[str, Tensor],
                      importance: dict[str, Tensor]) -> Tensor:
    """sum over the tensors of ``importance`` of sum(I ⊙ (θ - θ*)²): the weights of the old
    model (``anchors``) held in place in proportion to their importance (already normalised
    by the caller). Returns a scalar (0. with no tensor)."""
    total = torch.zeros(())
    for name, imp in importance.items():
        p = params[name]
        total = total.to(p.device) + (imp * (p - anchors[name]).pow(2)).sum()
    return total


def penalty_gradient(param: Tensor, anchor: Tensor, importance: Tensor, weight: float
                     ) -> Tensor:
    """d/dθ of weight * sum(I ⊙ (θ - θ*)²) = 2 weight I ⊙ (θ - θ*): added to the task
    gradient after the importance has read it (MiB backpropagates the penalty in a second
    ``backward`` after ``regularizer.update()``; the sum is the same)."""
    return 2.0 * weight * importance * (param - anchor)

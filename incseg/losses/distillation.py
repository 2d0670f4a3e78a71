"""Distillation losses between the new model and the frozen model of the previous step.

Shapes: ``logits`` (student) are ``B x C x H x W`` over all classes seen so far; ``old_logits``
(teacher) are ``B x C_o x H x W`` over the classes seen before this step (background first), so
``C_o = old_logits.shape[1] <= C``. The teacher is frozen: its outputs are treated as constants
(detached), so no gradient reaches it even if the caller forgot ``torch.no_grad``.
Every function returns a scalar tensor. The same functions work on image-level ``B x C`` logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "REPLAY_LOSSES",
    "feature_distillation",
    "knowledge_distillation",
    "replay_kl",
    "replay_loss",
    "replay_mse",
    "replay_sigmoid_kl",
    "replay_sigmoid_mse",
    "unbiased_knowledge_distillation",
]

REPLAY_LOSSES = ("mse", "kl", "ukd")


def _check_old(logits: Tensor, old_logits: Tensor) -> int:
    """Return ``C_o`` after checking that the teacher's classes are a prefix of the student's."""
    num_old = old_logits.shape[1]
    if logits.dim() != old_logits.dim() or num_old > logits.shape[1]:
        raise ValueError(
            f"old_logits {tuple(old_logits.shape)} must have at most as many channels as "
            f"logits {tuple(logits.shape)} and the same number of dimensions"
        )
    return num_old


def knowledge_distillation(logits: Tensor, old_logits: Tensor, alpha: float = 1.0) -> Tensor:
    """KD as used by LwF/ILT on segmentation (MiB's ``KnowledgeDistillationLoss``).

    Per pixel ``-(1/C_o) sum_{c<C_o} q_c log softmax(z[:, :C_o])_c`` with
    ``q = softmax(alpha * z_old)``; mean over pixels. The student's softmax is restricted to the
    old channels (new classes are ignored), and the ``1/C_o`` is MiB's mean over channels.

    Args:
        logits: ``B x C x H x W`` student scores (C >= C_o).
        old_logits: ``B x C_o x H x W`` teacher scores.
        alpha: sharpening/softening factor applied to the teacher's logits.

    Returns:
        Scalar. Minimised over the student when its old-channel softmax equals ``q``, where it is
        ``H(q) / C_o`` averaged over pixels.
    """
    num_old = _check_old(logits, old_logits)
    log_p = F.log_softmax(logits[:, :num_old], dim=1)
    q = F.softmax(alpha * old_logits.detach(), dim=1)
    return -(q * log_p).sum(dim=1).mean() / num_old


def unbiased_knowledge_distillation(
    logits: Tensor, old_logits: Tensor, alpha: float = 1.0
) -> Tensor:
    """MiB's unbiased KD (Cermelli et al., CVPR 2020, Eq. 5).

    The old model's "background" covers what are now new classes, so its background
    probability is matched to ``p_0 + sum_{c new} p_c`` of the new model:
    per pixel ``-(1/C_o)[q_0 log(p_0 + sum_{c>=C_o} p_c) + sum_{c=1}^{C_o-1} q_c log p_c]`` with
    ``q = softmax(alpha z_old)`` and ``p = softmax(z)`` over all seen classes; mean over pixels.
    Computed in log space with ``logsumexp``.

    Args:
        logits: ``B x C x H x W`` student scores over all seen classes.
        old_logits: ``B x C_o x H x W`` teacher scores.
        alpha: factor applied to the teacher's logits.

    Returns:
        Scalar. With no new classes (``C == C_o``) this equals :func:`knowledge_distillation`.
        (Unlike MiB's code, ``C == C_o`` is handled: its ``1:-new_cl`` slice is empty then.)
    """
    num_old = _check_old(logits, old_logits)
    den = torch.logsumexp(logits, dim=1)  # B x H x W
    bg_and_new = torch.cat([logits[:, :1], logits[:, num_old:]], dim=1)
    log_bg = torch.logsumexp(bg_and_new, dim=1) - den  # log(p_0 + sum_new p_c)
    log_old_fg = logits[:, 1:num_old] - den.unsqueeze(1)  # log p_c, c = 1..C_o-1
    q = F.softmax(alpha * old_logits.detach(), dim=1)
    per_pixel = q[:, 0] * log_bg + (q[:, 1:] * log_old_fg).sum(dim=1)
    return -per_pixel.mean() / num_old


def feature_distillation(features: Tensor, old_features: Tensor) -> Tensor:
    """ILT's feature distillation (Michieli & Zanuttigh, 2019): MSE, mean over all elements.

    Args:
        features: ``B x K x h x w`` student features (e.g. the context path's ``body``).
        old_features: same shape, from the frozen teacher.
    """
    return F.mse_loss(features, old_features.detach())


BACKGROUNDS = ("unbiased", "plain")


def old_view(logits: Tensor, num_old: int, background: str = "unbiased") -> Tensor:
    """The student's scores for the teacher's ``C_o`` classes, ``B x C_o x H x W``.

    ``plain``: the first ``C_o`` channels. ``unbiased`` (MiB's view of the background): what the
    teacher calls background is background *or a new class* for the student, so channel 0 is
    ``logsumexp`` over the background and the new channels. After ``init_balanced`` (background
    bias lowered by ``log(N_new + 1)``, new classes copies of it) this view equals the teacher's
    scores exactly; the plain view is off by ``log(N_new + 1)`` on the background, which a
    replay distance would then undo, un-balancing the new classes.
    """
    if background == "plain" or logits.shape[1] == num_old:
        return logits[:, :num_old]
    if background != "unbiased":
        raise ValueError(f"background={background!r} is not valid; use unbiased or plain")
    bg = torch.logsumexp(torch.cat([logits[:, :1], logits[:, num_old:]], dim=1), dim=1,
                         keepdim=True)
    return torch.cat([bg, logits[:, 1:num_old]], dim=1)


def replay_mse(logits: Tensor, old_logits: Tensor, background: str = "unbiased") -> Tensor:
    """Replay distance ``mse`` (the paper's best, Di Salvo et al.): MSE between the teacher's scores
    and the student's scores for the same ``C_o`` classes (:func:`old_view`).

    Args:
        logits: ``B x C x H x W`` student scores on the synthetic batch.
        old_logits: ``B x C_o x H x W`` teacher scores on the same batch.
        background: ``unbiased`` (background = background or new) or ``plain`` (channel 0).

    Returns:
        Scalar mean over all ``B * C_o * H * W`` elements.
    """
    num_old = _check_old(logits, old_logits)
    return F.mse_loss(old_view(logits, num_old, background), old_logits.detach())


def replay_kl(logits: Tensor, old_logits: Tensor, temperature: float = 1.0,
              background: str = "unbiased") -> Tensor:
    """Replay distance ``kl``: ``T^2 * KL(teacher || student)`` per pixel, mean over pixels.

    Both distributions are softmaxes at temperature ``T`` over the ``C_o`` old classes (the
    student's through :func:`old_view`); the ``T^2`` factor (Hinton et al., 2015) keeps gradient
    magnitudes comparable across ``T``.

    Args:
        logits: ``B x C x H x W`` student scores.
        old_logits: ``B x C_o x H x W`` teacher scores.
        temperature: ``T > 0``.
        background: ``unbiased`` or ``plain`` (see :func:`old_view`).

    Returns:
        Scalar mean over the ``B * H * W`` pixels; 0 when the old channels agree exactly.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_old = _check_old(logits, old_logits)
    # the unbiased background logit is formed at T = 1, then tempered like every other logit
    # (so a student fresh from init_balanced matches its teacher at any T)
    log_p = F.log_softmax(old_view(logits, num_old, background) / temperature, dim=1)
    log_q = F.log_softmax(old_logits.detach() / temperature, dim=1)
    kl = (log_q.exp() * (log_q - log_p)).sum(dim=1)  # per pixel
    return temperature**2 * kl.mean()


def replay_sigmoid_mse(logits: Tensor, old_logits: Tensor) -> Tensor:
    """Replay distance ``mse`` for a model of one sigmoid per class (DKD, STAR): the squared
    difference of the student's and the teacher's sigmoids of the old classes 1..C_o-1 (channel 0
    is no class score), mean over ``B * (C_o - 1) * H * W``. A sigmoid student predicts what its
    sigmoids say, so the distance is on them rather than on logits that a softmax would
    renormalise."""
    num_old = _check_old(logits, old_logits)
    return F.mse_loss(torch.sigmoid(logits[:, 1:num_old]),
                      torch.sigmoid(old_logits[:, 1:].detach()))


def replay_sigmoid_kl(logits: Tensor, old_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Replay distance ``kl`` for a model of one sigmoid per class: per pixel the sum over the
    old classes 1..C_o-1 of KL(Bernoulli(q_c) || Bernoulli(p_c)), q = σ(z_old / T) and
    p = σ(z / T), times T², mean over the ``B * H * W`` pixels; 0 when the sigmoids agree. Its
    gradient is DKD's KD (a BCE against the teacher's sigmoids) on the replayed images."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_old = _check_old(logits, old_logits)
    z, t = logits[:, 1:num_old] / temperature, old_logits[:, 1:].detach() / temperature
    q = torch.sigmoid(t)
    # KL = q (log q - log p) + (1 - q) (log(1 - q) - log(1 - p)), with log σ(x) = -softplus(-x)
    # and log(1 - σ(x)) = -softplus(x)
    kl = q * (F.softplus(-z) - F.softplus(-t)) + (1 - q) * (F.softplus(z) - F.softplus(t))
    return temperature**2 * kl.sum(dim=1).mean()


def replay_loss(kind: str, logits: Tensor, old_logits: Tensor, temperature: float = 1.0,
                background: str = "unbiased", prediction: str = "argmax") -> Tensor:
    """Dispatch ``replay.loss``: ``mse`` | ``kl`` | ``ukd``.

    ``ukd`` reuses :func:`unbiased_knowledge_distillation` on the student's full logits
    (alpha 1; unbiased by construction); ``temperature`` only affects ``kl``; ``background``
    only ``mse`` and ``kl``. ``prediction="sigmoid"`` (DKD, STAR): the sigmoid forms
    :func:`replay_sigmoid_mse` / :func:`replay_sigmoid_kl`, no background channel; ``ukd``
    (MiB's softmax over old and new classes) has none.

    Raises:
        ValueError: unknown ``kind`` (one line listing the valid kinds).
    """
    if prediction == "sigmoid":
        if kind == "mse":
            return replay_sigmoid_mse(logits, old_logits)
        if kind == "kl":
            return replay_sigmoid_kl(logits, old_logits, temperature)
        raise ValueError(f"replay.loss={kind!r} has no form for a model of one sigmoid per "
                         "class; use replay.loss=mse or replay.loss=kl")
    if kind == "mse":
        return replay_mse(logits, old_logits, background)
    if kind == "kl":
        return replay_kl(logits, old_logits, temperature=temperature, background=background)
    if kind == "ukd":
        return unbiased_knowledge_distillation(logits, old_logits)
    raise ValueError(
        f"unknown replay.loss={kind!r}; valid kinds are mse|kl|ukd (e.g. replay.loss=mse)"
    )

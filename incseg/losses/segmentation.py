"""Segmentation (classification) losses: plain CE, MiB's unbiased CE and BiSeNet's deep supervision.

Shapes: ``logits`` are ``B x C x H x W`` (C = every class seen so far, background = channel 0),
``labels`` are ``B x H x W`` integer class indices (task order) with ``ignore_index`` for pixels
that carry no supervision. All losses return a scalar tensor, the per-pixel losses averaged by
``reduction``:

- ``"valid"`` (the default): over the non-ignored pixels, as ``F.nll_loss(reduction="mean")``;
- ``"all"``: over all B·H·W pixels, an ignored pixel counting as 0 — what MiB's, PLOP's and
  the paper's trainers compute (``reduction="none"`` in the criterion, then ``.mean()``;
  fcdl94/MiB ``train.py``, arthurdouillard/CVPR2021_PLOP ``train.py``).

The two agree when no pixel is ignored (MiB's convention: void trained as background, no
padding); with ignored pixels (void kept at 255 as PLOP does, rotation padding) ``valid`` is
larger by total / valid pixels, which weighs CE more against a distillation term.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["REDUCTIONS", "bisenet_loss", "cross_entropy", "unbiased_cross_entropy"]

#: how the per-pixel losses are averaged (module docstring; ``train.loss_reduction``)
REDUCTIONS = ("valid", "all")


def _mean_nll(log_probs: Tensor, labels: Tensor, ignore_index: int,
              reduction: str = "valid") -> Tensor:
    """Mean NLL over the non-ignored pixels (``valid``) or over all pixels (``all``); 0
    (still attached to the graph) if all are ignored.

    Args:
        log_probs: ``B x C x H x W`` log-probabilities (or anything ``nll_loss`` accepts).
        labels: ``B x H x W`` class indices, ``ignore_index`` where unlabelled.
        reduction: one of :data:`REDUCTIONS`.

    ``F.nll_loss(reduction="mean")`` divides by the number of valid pixels and returns NaN when
    that number is 0 (a crop that is all 255 happens on VOC borders). Summing and dividing by
    ``max(count, 1)`` gives the same mean otherwise and a zero with a valid (zero) gradient then.
    Both reductions divide the same sum in the same way, so with no ignored pixel they give
    the same bits.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {', '.join(REDUCTIONS)}")
    total = F.nll_loss(log_probs, labels, ignore_index=ignore_index, reduction="sum")
    if reduction == "valid":
        count = (labels != ignore_index).sum()
    else:
        count = torch.tensor(labels.numel(), device=labels.device)
    return total / count.clamp(min=1).to(total.dtype)


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = 255,
                  reduction: str = "valid") -> Tensor:
    """Pixel-wise cross-entropy, averaged by ``reduction`` (module docstring).

    Args:
        logits: ``B x C x H x W`` raw scores.
        labels: ``B x H x W`` long class indices; ``ignore_index`` pixels are skipped.
        ignore_index: label value that contributes nothing (VOC's 255 border).
        reduction: ``"valid"`` (mean over non-ignored pixels) or ``"all"`` (over B·H·W).

    Returns:
        Scalar tensor; exactly 0 (connected to ``logits``' graph, never NaN) when every pixel is
        ignored.
    """
    return _mean_nll(F.log_softmax(logits, dim=1), labels, ignore_index, reduction)


def unbiased_cross_entropy(
    logits: Tensor, labels: Tensor, num_old: int, ignore_index: int = 255,
    reduction: str = "valid",
) -> Tensor:
    """MiB's unbiased cross-entropy (Cermelli et al., CVPR 2020, Eq. 4).

    At step t the ground truth only labels the new classes; everything else (old classes
    included) is "background". So a background pixel is scored against the probability of
    *background or any old class*, while a new-class pixel uses the ordinary softmax:

    - label 0 (and any label ``< num_old``, which is mapped to 0):
      ``-log sum_{k < C_o} softmax(z)_k``
    - label ``c >= C_o``: ``-log softmax(z)_c``

    Args:
        logits: ``B x C x H x W`` scores over all seen classes (old first, then new).
        labels: ``B x H x W`` long; not modified (remapping happens on a copy).
        num_old: ``C_o``, classes seen before this step, background included (``1 <= C_o <= C``).
        ignore_index: label value that contributes nothing.
        reduction: ``"valid"`` (mean over non-ignored pixels) or ``"all"`` (over B·H·W, as
            MiB's trainer averages the criterion's ``reduction="none"`` output).

    Returns:
        Scalar mean (0, never NaN, if every pixel is ignored). With ``num_old == 1`` this is
        exactly :func:`cross_entropy`.
    """
    num_classes = logits.shape[1]
    if not 1 <= num_old <= num_classes:
        raise ValueError(f"num_old must be in [1, {num_classes}] (channels), got {num_old}")
    # log-normaliser over all classes; logsumexp keeps this stable for large logits.
    den = torch.logsumexp(logits, dim=1, keepdim=True)  # B x 1 x H x W
    log_bg = torch.logsumexp(logits[:, :num_old], dim=1, keepdim=True) - den  # B x 1 x H x W
    log_new = logits[:, num_old:] - den  # B x (C - C_o) x H x W
    # Channels 1..C_o-1 are never selected after the remap below; zeros keep the layout aligned
    # with the label ids so that nll_loss can index by class id.
    filler = log_bg.new_zeros((logits.shape[0], num_old - 1, *logits.shape[2:]))
    log_probs = torch.cat([log_bg, filler, log_new], dim=1)
    # Remap on a copy: the caller's labels are shared with metrics and the other heads.
    remapped = labels.clone()
    old = (labels < num_old) & (labels != ignore_index)
    remapped[old] = 0
    return _mean_nll(log_probs, remapped, ignore_index, reduction)


def bisenet_loss(
    main: Tensor,
    aux: Sequence[Tensor] | None,
    labels: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """BiSeNet's deeply supervised loss (Yu et al., ECCV 2018, Eq. 3): ``L(main) + sum_i L(aux_i)``.

    Args:
        main: ``B x C x H x W`` logits of the main (FFM) head.
        aux: the auxiliary heads' ``B x C x H x W`` logits (context-path heads, training only);
            ``None`` or empty for none.
        labels: ``B x H x W`` long targets shared by all heads.
        loss_fn: ``(logits, labels) -> scalar``, e.g. :func:`cross_entropy` or a
            ``functools.partial`` of :func:`unbiased_cross_entropy`.

    Returns:
        Scalar sum (the paper weights every term by 1).
    """
    total = loss_fn(main, labels)
    for head in aux or ():
        total = total + loss_fn(head, labels)
    return total

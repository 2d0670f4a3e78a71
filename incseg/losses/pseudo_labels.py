"""PLOP's pseudo-labels (Douillard et al., CVPR 2021, Sec. 3.2): background pixels of step t
take the old model's prediction where it is confident, judged by the entropy of its output
against a per-class threshold (the median uncertainty of that class over the step's data).

Shapes: probabilities / logits ``B x C_o x H x W``, labels ``B x H x W`` (task order, 255 =
ignored). Reference: arthurdouillard/CVPR2021_PLOP ``train.py`` (``find_median``,
``entropy``, the ``pseudo == "entropy"`` branch and ``classif_adaptive_factor``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["adaptive_factor", "entropy_histogram", "guessed_background", "histogram_median",
           "normalized_entropy", "pseudo_label", "reference_entropy",
           "reference_histogram_median", "uncertainty_thresholds", "weighted_cross_entropy"]

IGNORE = 255


def normalized_entropy(probs: Tensor) -> Tensor:
    """H(p) / log C per pixel, in [0, 1] (0: one-hot, 1: uniform). ``B x C x H x W`` ->
    ``B x H x W``."""
    c = probs.shape[1]
    if c < 2:
        raise ValueError("the entropy of a prediction needs at least 2 classes")
    return torch.special.entr(probs).sum(dim=1) / math.log(c)


def reference_entropy(probs: Tensor, num_classes: int) -> Tensor:
    """The reference's uncertainty, literally: its ``entropy`` takes the *mean* over the
    channels, -(1 / log C_o) * mean_c p_c log(p_c + 1e-8), and its callers divide that again
    by log C (C: every class of the step, the new ones included). This is H / (C_o log C_o
    log C), a few hundredths at most on VOC, which is what its 0.001 floor was tuned against.
    ``probs``: ``B x C_o x H x W``; ``num_classes``: C."""
    c_o = probs.shape[1]
    ent = -torch.mean(probs * torch.log(probs + 1e-8), dim=1) / math.log(c_o + 1e-8)
    return ent / math.log(num_classes)


def entropy_histogram(values: Tensor, classes: Tensor, num_classes: int, bins: int) -> Tensor:
    """Counts of ``values`` (uncertainties in [0, 1]) per predicted class, in ``bins`` equal
    bins over [0, 1] (a value of 1 or more falls in the last one). ``values``, ``classes``:
    1-D of one length -> ``num_classes x bins`` long."""
    idx = (values * bins).long().clamp(min=0, max=bins - 1)
    flat = classes.long() * bins + idx
    return torch.bincount(flat, minlength=num_classes * bins).view(num_classes, bins)


def histogram_median(hist: Tensor) -> Tensor:
    """Per class (row), the median of the binned values, interpolated linearly inside the bin
    where the cumulative count reaches half the total; 0 for a class with no values. Bins
    cover [0, 1]. ``C x bins`` counts -> ``C`` floats."""
    counts = hist.double()
    bins = counts.shape[1]
    total = counts.sum(dim=1)
    half = total / 2
    before = counts.cumsum(dim=1) - counts  # count in the bins below each bin
    # the first bin whose cumulative count reaches half (never an empty bin when total > 0)
    reached = (before + counts) >= half[:, None]
    b = reached.float().argmax(dim=1)
    below = before.gather(1, b[:, None])[:, 0]
    inside = counts.gather(1, b[:, None])[:, 0].clamp(min=1)
    median = (b.double() + (half - below) / inside) / bins
    return torch.where(total > 0, median, torch.zeros_like(median)).float()


def reference_histogram_median(hist: Tensor) -> Tensor:
    """The reference's ``find_median`` loop, literally: its running sum adds the *bin index*
    where the bin's count belongs (``running_sum += lower_border * nb_bins``), so the bin it
    stops at is not the median's once the counts are large. Kept behind ``method.median=
    reference`` to reproduce the published code; 0 for a class with no values."""
    bins = hist.shape[1]
    out = torch.zeros(hist.shape[0])
    for c in range(hist.shape[0]):
        row = hist[c].double()
        total = row.sum()
        if total <= 0:
            continue
        half = total / 2
        running = 0.0
        for b in range(bins):
            lower = b / bins
            index = int(lower * bins)  # as written: 29 / 100 * 100 rounds down to bin 28
            if running <= half <= running + row[index]:
                break
            running += lower * bins
        out[c] = float(lower + (half - running) / row[index] * (1 / bins))
    return out


def uncertainty_thresholds(median: Tensor, floor: float = 0.001) -> Tensor:
    """τ_c = max(median_c, floor) (the reference's ``--threshold 0.001`` for PLOP)."""
    return torch.maximum(median, torch.full_like(median, float(floor)))


def guessed_background(labels: Tensor, num_old: int, known: Tensor | None = None) -> Tensor:
    """The pixels whose label hides the old classes: label < C_o (background, or an old class
    that the step's labels turned into background), outside the ``known`` images (B bools: a
    labelled memory's, whose labels are ground truth). ``labels`` ``B x H x W`` -> bools."""
    background = labels < num_old
    if known is not None:
        background &= ~known.to(device=labels.device, dtype=torch.bool).view(-1, 1, 1)
    return background


def pseudo_label(labels: Tensor, old_logits: Tensor, thresholds: Tensor, uncertainty: Tensor,
                 known: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Background pixels (label < C_o) take the old model's class ŷ = argmax where their
    uncertainty is below τ[ŷ] (ŷ may be 0: confident background stays background); the other
    background pixels are ignored (255). New-class and void pixels keep their labels, and so
    does every pixel of a ``known`` image (its labels are ground truth, not hidden classes).

    Args:
        labels: ``B x H x W`` long (not modified).
        old_logits: ``B x C_o x H x W`` of the previous model.
        thresholds: ``C_o`` floats τ.
        uncertainty: ``B x H x W`` the uncertainty of the old prediction, on τ's scale.
        known: ``B`` bools or None (no such image).

    Returns:
        (new labels ``B x H x W``, kept mask ``B x H x W``: background pixels pseudo-labelled).
    """
    num_old = old_logits.shape[1]
    background = guessed_background(labels, num_old, known)
    predicted = old_logits.argmax(dim=1)
    kept = background & (uncertainty < thresholds.to(uncertainty.device)[predicted])
    out = labels.clone()
    out[background] = IGNORE
    out[kept] = predicted[kept]
    return out, kept


def adaptive_factor(labels: Tensor, kept: Tensor, num_old: int, known: Tensor | None = None
                    ) -> Tensor:
    """Per image a = #(background pixels kept) / (#background pixels + 1e-6): the share of the
    image's background that the old model labels confidently (0 for an image without
    background, as in the reference); 1 for a ``known`` image, all of whose labels are kept.
    ``labels``, ``kept``: ``B x H x W``; ``known``: ``B`` bools or None -> ``B``."""
    background = (labels < num_old).flatten(1).sum(dim=1).float()
    factor = kept.flatten(1).sum(dim=1).float() / (background + 1e-6)
    if known is not None:
        factor = torch.where(known.to(device=factor.device, dtype=torch.bool),
                             torch.ones_like(factor), factor)
    return factor


def weighted_cross_entropy(logits: Tensor, labels: Tensor, weights: Tensor | None = None
                           ) -> Tensor:
    """mean over B·H·W of w_b · CE(z, y) per pixel; ignored pixels contribute 0 and still
    count in the denominator (the reference's ``reduction='none'`` then ``.mean()``).
    ``logits`` ``B x C x H x W``, ``labels`` ``B x H x W``, ``weights`` ``B`` (None: 1)."""
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    if weights is not None:
        loss = loss * weights.to(loss.dtype)[:, None, None]
    return loss.mean()

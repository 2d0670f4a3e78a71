"""PLOP's local POD (Douillard et al., "PLOP: Learning without Forgetting for Continual
Semantic Segmentation", CVPR 2021, Eq. 2-3): a feature distillation that keeps the *statistics*
of the old model's maps over width and height, at several scales, rather than every value.

Shapes: maps are ``B x C x H x W``; embeddings ``B x D``. The reference
(arthurdouillard/CVPR2021_PLOP ``train.py``: ``features_distillation``, ``_local_pod``) squares
each map first, pools, and compares with an L2 norm per image, mean over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["collapse_new_logits", "local_pod_embedding", "local_pod_loss", "pod_distance"]

#: the scales of the reference (``--spp_scales 1 2 4``): 1x1, 2x2 and 4x4 regions
SCALES = (1, 2, 4)


def local_pod_embedding(x: Tensor, scales: Sequence[int] = SCALES) -> Tensor:
    """Φ(x): for every scale s, the map split into s x s regions, and per region its mean over
    the width (one value per row and channel) then its mean over the height (one per column
    and channel), flattened over channels and concatenated.

    Args:
        x: ``B x C x H x W`` (already squared by the caller, as POD does).
        scales: region grids; a region is ``H // s`` x ``W // s`` pixels from the top-left
            corner, so trailing rows / columns that do not fill a region are left out (the
            reference's ``k = w // s``; it uses the width's k for the height too, which is the
            same on its square crops). A scale whose region would be empty (a map smaller than
            s, e.g. the 1/32 stage of a 32-pixel crop) is skipped.

    Returns:
        ``B x D`` with D = sum over kept scales of s^2 * C * (H // s + W // s).
    """
    b, _, h, w = x.shape
    emb = []
    for s in scales:
        kh, kw = h // s, w // s
        if kh == 0 or kw == 0:
            continue
        for i in range(s):
            for j in range(s):
                region = x[..., i * kh:(i + 1) * kh, j * kw:(j + 1) * kw]
                emb.append(region.mean(dim=3).reshape(b, -1))  # over the width: per row
                emb.append(region.mean(dim=2).reshape(b, -1))  # over the height: per column
    if not emb:
        raise ValueError(f"no POD scale fits a {h}x{w} map (scales {list(scales)})")
    return torch.cat(emb, dim=1)


def pod_distance(old: Tensor, new: Tensor, scales: Sequence[int] = SCALES) -> Tensor:
    """Mean over the batch of ||Φ(old²) - Φ(new²)||₂ (no normalisation of the embeddings, as
    the reference's PLOP setting runs it). ``old``, ``new``: ``B x C x H x W``, same shape."""
    if old.shape != new.shape:
        raise ValueError(f"POD compares maps of one shape, got {tuple(old.shape)} and "
                         f"{tuple(new.shape)}")
    diff = local_pod_embedding(old.pow(2), scales) - local_pod_embedding(new.pow(2), scales)
    return diff.norm(p=2, dim=1).mean()


def collapse_new_logits(logits: Tensor, num_old: int) -> Tensor:
    """The new model's logits over the old model's C_o channels: the new classes' logits are
    added to the background's (they were background for the old model), the old classes' are
    kept (the reference's ``extra_channels: sum``). ``logits``: ``B x C x H x W`` ->
    ``B x C_o x H x W``."""
    if not 1 <= num_old <= logits.shape[1]:
        raise ValueError(f"num_old must be in [1, {logits.shape[1]}], got {num_old}")
    bg = logits[:, :1] + logits[:, num_old:].sum(dim=1, keepdim=True)
    return torch.cat([bg, logits[:, 1:num_old]], dim=1)


def local_pod_loss(old_maps: Sequence[Tensor], new_maps: Sequence[Tensor],
                   weights: Sequence[float], scales: Sequence[int] = SCALES) -> Tensor:
    """L_POD = (1 / #maps) * sum_i weights[i] * pod_distance(old_maps[i], new_maps[i]).

    The reference divides by the number of maps, the logits included, and weighs each map by
    its factor (PLOP: 0.01 for the features, 0.0005 for the logits, both times
    sqrt(C / C_new): :func:`incseg.methods.plop.PLOP` computes them)."""
    if not len(old_maps) == len(new_maps) == len(weights) > 0:
        raise ValueError("POD needs as many old maps, new maps and weights, at least one")
    total = sum(w * pod_distance(a, b, scales) for a, b, w in zip(old_maps, new_maps, weights))
    return total / len(old_maps)

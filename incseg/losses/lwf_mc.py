"""LwF-MC: iCaRL's classification and distillation losses without exemplars (Rebuffi et al.,
CVPR 2017), one sigmoid per class, as MiB applies them to segmentation (fcdl94/MiB
``train.py`` with ``--icarl``: ``BCEWithLogitsLossWithIgnoreIndex`` and the ``icarl_combined``
term).

Shapes: logits ``B x C x H x W``, labels ``B x H x W`` (255 = ignored), old logits
``B x C_o x H x W``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["bce_distillation", "one_hot_bce"]


def one_hot_bce(logits: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """BCE-with-logits of every channel against the one-hot label, summed over the C channels;
    an ignored pixel's row is zero. Mean over B·H·W, ignored pixels in the denominator (MiB's
    ``reduction='none'`` then ``loss.mean()``).

    Returns a scalar; with every pixel ignored, 0 (still attached to ``logits``' graph)."""
    c = logits.shape[1]
    valid = labels != ignore_index
    index = torch.where(valid, labels, torch.zeros_like(labels))
    target = F.one_hot(index, c).permute(0, 3, 1, 2).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=1)
    return (loss * valid.to(loss.dtype)).mean()


def bce_distillation(logits: Tensor, old_logits: Tensor) -> Tensor:
    """C_o * mean over B·C_o·H·W of BCE-with-logits(z[:, :C_o], σ(z_old)): the old model's
    sigmoid outputs as soft targets for the old channels, summed over those channels (MiB
    multiplies its mean by ``n_cl_old`` "to sum the contribution of each class")."""
    num_old = old_logits.shape[1]
    if logits.shape[1] < num_old:
        raise ValueError(f"the new logits have {logits.shape[1]} channels, fewer than the old "
                         f"model's {num_old}")
    target = torch.sigmoid(old_logits).to(logits.dtype)
    return num_old * F.binary_cross_entropy_with_logits(logits[:, :num_old], target)

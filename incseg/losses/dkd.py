"""DKD's losses (Baek et al., "Decomposed Knowledge Distillation for Class-Incremental Semantic
Segmentation", NeurIPS 2022), as its code computes them (cvlab-yonsei/DKD ``models/loss.py``:
``WBCELoss``, ``KDLoss``, ``ACLoss``; ``trainer/trainer_voc.py``; ``models/model.py``).

One sigmoid per channel: channel 0 is the auxiliary classifier (AC), channel c >= 1 is class c.
Every loss is a BCE-with-logits without an ignore index (a void pixel is a negative for every
class, like background), averaged over B·H·W per channel and summed over the channels (the
reference's ``.mean(dim=[0, 2, 3])`` then ``.sum()``).

Shapes: logits ``B x C x H x W``, labels ``B x H x W``, decoder feature ``B x D x h x w``,
classifier weights ``K x D (x 1 x 1)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["auxiliary_classifier_loss", "decomposed_logits", "new_class_bce",
           "per_class_bce", "sigmoid_distillation"]


def per_class_bce(logits: Tensor, target: Tensor, pos_weight: float | None = None) -> Tensor:
    """BCE-with-logits of ``logits`` against ``target`` (same shape, values in [0, 1]): the
    mean over B·H·W of each channel, summed over the channels. ``pos_weight`` multiplies the
    positive part, -w·y·log σ(z) - (1 - y)·log(1 - σ(z)) (``BCEWithLogitsLoss(pos_weight)``)."""
    pw = None
    if pos_weight is not None:
        pw = torch.full((logits.shape[1], 1, 1), float(pos_weight), dtype=logits.dtype,
                        device=logits.device)
    loss = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), pos_weight=pw,
                                              reduction="none")
    return loss.mean(dim=(0, 2, 3)).sum()


def new_class_bce(logits: Tensor, labels: Tensor, first: int,
                  pos_weight: float | None = None) -> Tensor:
    """The step's classification loss (the reference's ``WBCELoss``): channels ``first`` ..
    C-1 (the step's classes; at step 0 every class but the AC) against the one-hot labels.
    A pixel of any other value (background, void 255, an earlier class) is a negative of
    every one of them, and counts in the mean."""
    channels = torch.arange(first, logits.shape[1], device=labels.device).view(1, -1, 1, 1)
    target = labels.unsqueeze(1) == channels
    return per_class_bce(logits[:, first:], target, pos_weight)


def sigmoid_distillation(logits: Tensor, old_logits: Tensor) -> Tensor:
    """BCE of ``logits`` against the old model's sigmoid outputs σ(``old_logits``), same shape
    (the reference's ``KDLoss``: the logits KD and both decomposed terms)."""
    if logits.shape != old_logits.shape:
        raise ValueError(f"distilled logits {tuple(logits.shape)} and old logits "
                         f"{tuple(old_logits.shape)} differ in shape")
    return per_class_bce(logits, torch.sigmoid(old_logits))


def decomposed_logits(feature: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """The positive and negative parts of the class logits without their bias (the reference's
    ``forward_class_prediction_positive`` / ``_negative``): with f = ReLU(feature),
    z⁺_c = f·max(W_c, 0) and z⁻_c = f·min(W_c, 0), each ``B x K x h x w``. The reference's
    feature is a ReLU output already (its ASPP ends with one, as this suite's decoders do); the
    ReLU keeps z⁺ >= 0 >= z⁻ for a model whose decoder feature is not."""
    w = weight.reshape(weight.shape[0], -1, 1, 1)
    f = F.relu(feature)
    return F.conv2d(f, w.clamp(min=0)), F.conv2d(f, w.clamp(max=0))


def auxiliary_classifier_loss(ac_logits: Tensor) -> Tensor:
    """BCE of the AC's ``B x 1 x H x W`` logits against 0 everywhere (the reference's
    ``ACLoss``): every pixel is a negative of the AC. New classifiers start as copies of it,
    so a new class begins scoring every pixel low (nothing is predicted as new yet)."""
    return per_class_bce(ac_logits, torch.zeros_like(ac_logits))

"""How logits become one class per pixel: the rule a method's model is evaluated with.

``argmax`` (every softmax method): the class of the largest logit. ``sigmoid`` (DKD, Baek et
al., NeurIPS 2022; cvlab-yonsei/DKD ``trainer/trainer_voc.py``): one sigmoid per class, channel
0 is not a class score (DKD's auxiliary classifier); a pixel is the class of the largest
sigmoid above 0.5, and background where no class's sigmoid exceeds 0.5.

Both are written as *prediction scores* whose argmax over channels is the prediction, so the
confusion matrix, ``incseg.predict`` and the report overlays take one path: for ``sigmoid``,
channel 0 becomes a constant 0 logit (σ = 0.5), which wins the argmax exactly when every class
logit is <= 0 (``argmax`` takes the first of equal maxima: a class at exactly 0.5 is background,
as the reference's ``> 0.5``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PREDICTIONS", "check_prediction", "prediction_scores"]

#: the prediction rules a method may name (``Method.prediction``)
PREDICTIONS = ("argmax", "sigmoid")


def check_prediction(rule: str) -> str:
    if rule not in PREDICTIONS:
        raise ValueError(f"prediction={rule!r} is not one of {', '.join(PREDICTIONS)}")
    return rule


def prediction_scores(logits: Tensor, rule: str = "argmax") -> Tensor:
    """B x C x H x W logits -> B x C x H x W scores whose argmax over dim 1 is the prediction
    under ``rule`` (``logits`` itself for ``argmax``)."""
    if check_prediction(rule) == "argmax":
        return logits
    return torch.cat([torch.zeros_like(logits[:, :1]), logits[:, 1:]], dim=1)

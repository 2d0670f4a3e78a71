"""StudentModule: an incremental step t >= 1 against the frozen model of step t-1.

A method is a set of loss terms with weights (conf/method/*.yaml), not a subclass:
    ft   CE                              lwf  CE + 100 KD
    ilt  CE + 100 KD + 100 feature MSE   mib  unbiased CE + 10 unbiased KD (+ init_balanced)
KD terms act on the main head only (as MiB and the paper's code do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from incseg.errors import ConfigError
from incseg.losses import (
    feature_distillation,
    knowledge_distillation,
    unbiased_knowledge_distillation,
)
from incseg.models import BiSeNet
from incseg.systems.base import Recipe, SegmentationSystem
from incseg.tasks import Task

LOSSES = ("ce", "unbiased_ce")
KDS = ("none", "kd", "ukd")
FEATURES = ("body", "ffm")


@dataclass
class MethodSpec:
    name: str = "mib"
    loss: str = "unbiased_ce"
    kd: str = "ukd"
    kd_weight: float = 10.0
    kd_alpha: float = 1.0
    feat_weight: float = 0.0
    feat_layer: str = "body"
    init_balanced: bool = True

    def __post_init__(self):
        for key, value, valid in (("loss", self.loss, LOSSES), ("kd", self.kd, KDS),
                                  ("feat_layer", self.feat_layer, FEATURES)):
            if value not in valid:
                raise ConfigError(f"method.{key}={value!r} is not valid; use one of "
                                  f"{', '.join(valid)}")


def freeze(model: BiSeNet) -> BiSeNet:
    """Frozen previous model: eval mode (BN running statistics fixed), no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class StudentModule(SegmentationSystem):
    """Step t >= 1: the method's losses against ``old_model`` (frozen; never updated)."""

    def __init__(self, model: BiSeNet, old_model: BiSeNet, task: Task, step: int,
                 recipe: Recipe, method: MethodSpec):
        super().__init__(model, task, step, recipe)
        self.old_model = freeze(old_model)
        self.method = method
        self.num_old = len(task.classes_before(step))
        if old_model.num_classes != self.num_old:
            raise ConfigError(f"the previous model has {old_model.num_classes} outputs but "
                              f"{self.num_old} classes were seen before step {step}")

    def train(self, mode: bool = True):
        super().train(mode)
        self.old_model.eval()  # Lightning puts every submodule in train mode: not this one
        return self

    def training_loss(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        m = self.method
        out = self.model(images)
        with torch.no_grad():
            old = self.old_model(images)
        num_old = self.num_old if m.loss == "unbiased_ce" else None
        terms = {"seg": self.segmentation_loss(out, labels, num_old)}
        if m.kd == "kd":
            terms["kd"] = m.kd_weight * knowledge_distillation(out.logits, old.logits, m.kd_alpha)
        elif m.kd == "ukd":
            terms["kd"] = m.kd_weight * unbiased_knowledge_distillation(out.logits, old.logits,
                                                                        m.kd_alpha)
        if m.feat_weight:
            terms["feat"] = m.feat_weight * feature_distillation(out.features[m.feat_layer],
                                                                 old.features[m.feat_layer])
        terms["loss"] = sum(terms.values())
        return terms

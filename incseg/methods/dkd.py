"""DKD (Baek et al., "Decomposed Knowledge Distillation for Class-Incremental Semantic
Segmentation", NeurIPS 2022), as its code trains it (cvlab-yonsei/DKD ``train_voc.py``,
``trainer/trainer_voc.py``, ``models/model.py``, ``models/loss.py``).

One sigmoid per channel. Channel 0 is the auxiliary classifier (AC): the main classifier's
background row, read on the decoder feature with its gradient stopped (the reference's
``cls[0]`` on ``x_pl.detach()``), trained to score every pixel as a negative; each new
classifier starts as a copy of it. A pixel is predicted as the class of the largest sigmoid
above 0.5, else background (``prediction = "sigmoid"``, :mod:`incseg.prediction`).

Loss, every term a BCE-with-logits averaged over B·H·W per channel and summed over channels
(:mod:`incseg.losses.dkd`):

    step 0:  bce(step-0 classes, pos_weight 2) + ac
    t >= 1:  bce(new classes) + 5 kd + 5 dkd⁺ + 5 dkd⁻ + ac

kd: the old foreground channels against the old model's sigmoids; dkd⁺ / dkd⁻: the same for
the logits of the positive / negative classifier weights on the (ReLU'd) decoder feature, at
the feature's resolution, without bias. From step 1 every BatchNorm is frozen (eval mode, its
affine parameters out of the optimiser) and only the new classifiers are weight-decayed; at
every step the layers outside the backbone learn 10x faster (the reference's ASPP and
classifiers; here everything but ``model.backbone``).

The AC is computed here from the model's main head rather than inside the model, so every
model's forward stays as it is: the logits' channel 0 (the same numbers, not detached) enters
no loss. On BiSeNet the auxiliary heads (its deep supervision) get the step's BCE
only, as every method's classification loss reaches every head here; their channel 0 is no AC
(unused) and their new rows keep ``add_step``'s initialisation. KD, DKD and AC read the main
head, the only one the reference has.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from incseg.errors import ConfigError
from incseg.losses.dkd import (
    auxiliary_classifier_loss,
    decomposed_logits,
    new_class_bce,
    sigmoid_distillation,
)
from incseg.methods.base import Batch, Method, StepContext, check_weight
from incseg.methods.regularizer import check_flag
from incseg.models.base import SegOutput
from incseg.models.heads import IncrementalHead


def classifier_heads(model: nn.Module) -> tuple[IncrementalHead, ...]:
    """The model's classifier heads, main (on the ``decoder`` feature) first: ``heads()`` of
    BiSeNet and DeepLabV3. DKD reads the main one's weights (AC, decomposed logits)."""
    heads = getattr(model, "heads", None)
    found = tuple(heads()) if callable(heads) else ()
    if not found or not all(isinstance(h, IncrementalHead) for h in found):
        raise ConfigError(f"DKD reads the weights of the main classifier, and "
                          f"{type(model).__name__} exposes no heads() of IncrementalHead (main "
                          "first, as BiSeNet and DeepLabV3); choose one of those models or "
                          "another method")
    return found


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name}={value:g} must be > 0")
    return value


class DKD(Method):
    """Settings (``conf/method/dkd.yaml``): the weights of the five terms, ``pos_weight`` of
    the BCE's positives at step 0 and ``pos_weight_incremental`` after, ``head_lr_factor``
    (lr of everything but the backbone / lr of the backbone), ``freeze_bn`` (from step 1).

    The recipe's lr is the heads' lr and the backbone trains ``head_lr_factor`` times slower:
    the reference's heads run at 0.01 at step 0 and 0.001 after, which is MiB's recipe, and its
    backbone at a tenth of that. Multiplying the recipe's lr by 10 instead would put a recipe
    made for MiB (this suite's dataset presets) 10 times above the reference's heads."""

    uses_old_outputs = True
    needs_features = ("decoder",)
    trains_step0 = True
    prediction = "sigmoid"
    #: from step 1: lr of the new classifiers / ``lr`` (STAR: 10, its ``lr * 100`` group)
    new_lr_factor = 1.0
    #: from step 1: the recipe's weight decay on every group (STAR), not on the new
    #: classifiers only (DKD's ``weight_decay: 0`` groups)
    decay_all_incremental = False

    def __init__(self, bce_weight: float = 1.0, kd_weight: float = 5.0,
                 dkd_pos_weight: float = 5.0, dkd_neg_weight: float = 5.0,
                 ac_weight: float = 1.0, pos_weight: float = 2.0,
                 pos_weight_incremental: float = 1.0, head_lr_factor: float = 10.0,
                 freeze_bn: bool = True) -> None:
        super().__init__()
        self.bce_weight = check_weight("bce_weight", bce_weight)
        self.kd_weight = check_weight("kd_weight", kd_weight)
        self.dkd_pos_weight = check_weight("dkd_pos_weight", dkd_pos_weight)
        self.dkd_neg_weight = check_weight("dkd_neg_weight", dkd_neg_weight)
        self.ac_weight = check_weight("ac_weight", ac_weight)
        self.pos_weight = _positive("pos_weight", pos_weight)
        self.pos_weight_incremental = _positive("pos_weight_incremental",
                                                pos_weight_incremental)
        self.head_lr_factor = _positive("head_lr_factor", head_lr_factor)
        self.freeze_bn = check_flag("freeze_bn", freeze_bn)

    # ---- set-up -------------------------------------------------------------------------------
    def add_classes(self, model: nn.Module, n_new: int) -> None:
        """New classes; the main head's new rows copy the AC's weight and bias (the
        reference's ``init_novel_classifier``, used when its AC weight is > 0; else random)."""
        model.add_step(n_new, init_balanced=False)
        if self.ac_weight > 0:
            head = classifier_heads(model)[0]
            with torch.no_grad():
                new, first = head.convs[-1], head.convs[0]
                new.weight.copy_(first.weight[:1].expand_as(new.weight))
                new.bias.copy_(first.bias[:1].expand_as(new.bias))

    def setup(self, ctx: StepContext) -> None:
        super().setup(ctx)
        for model in (ctx.model, ctx.old_model):
            if model is not None:
                classifier_heads(model)  # one line now rather than at the first batch

    @property
    def frozen_bn(self) -> bool:
        return self.freeze_bn and self.ctx is not None and self.ctx.step >= 1

    def on_train_mode(self, model: nn.Module) -> None:
        """From step 1, BatchNorms normalise with the old data's statistics and keep them (the
        reference's ``freeze_bn`` at every epoch; its affines are out of the optimiser)."""
        if self.frozen_bn:
            for m in model.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """backbone: ``lr / head_lr_factor``; the rest: ``lr`` (the reference's groups).
        From step 1, BatchNorm affines are left out (with ``freeze_bn``) and weight decay is
        0 but on the new classifiers (the reference's ``weight_decay: 0`` groups)."""
        incremental = self.ctx.step >= 1
        backbone = getattr(model, "backbone", None)
        slow = {id(p) for p in backbone.parameters()} if isinstance(backbone, nn.Module) \
            else set()
        skip = {id(p) for m in model.modules() if isinstance(m, _BatchNorm)
                for p in m.parameters()} if self.frozen_bn else set()
        new = {id(p) for h in classifier_heads(model) for p in h.convs[-1].parameters()} \
            if incremental else set()
        decay = {"weight_decay": 0.0} if incremental and not self.decay_all_incremental else {}
        groups: dict[str, dict[str, Any]] = {
            "backbone": {"params": [], "lr": lr / self.head_lr_factor, **decay},
            "head": {"params": [], "lr": lr, **decay},
            "new": {"params": [], "lr": lr * self.new_lr_factor},
        }
        for p in model.parameters():
            if not p.requires_grad or id(p) in skip:
                continue
            key = "new" if id(p) in new else "backbone" if id(p) in slow else "head"
            groups[key]["params"].append(p)
        return [g for g in groups.values() if g["params"]]

    # ---- the loss -----------------------------------------------------------------------------
    @property
    def first_new(self) -> int:
        """The first channel of the step's classes (at step 0, 1: channel 0 is the AC)."""
        return max(self.ctx.num_old, 1)

    def classification_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        pw = self.pos_weight if self.ctx.step == 0 else self.pos_weight_incremental
        return self.bce_weight * new_class_bce(logits, labels, self.first_new, pw)

    def auxiliary_logits(self, out: SegOutput) -> Tensor:
        """B x 1 x H x W: the main head's channel 0 on the decoder feature with its gradient
        stopped, upsampled as the logits (the reference's AC on ``x_pl.detach()``)."""
        first = classifier_heads(self.ctx.model)[0].convs[0]
        z = F.conv2d(out.features["decoder"].detach(), first.weight[:1], first.bias[:1])
        return F.interpolate(z, size=out.logits.shape[-2:], mode="bilinear", align_corners=False)

    def segmentation_loss(self, out: SegOutput, labels: Tensor) -> Tensor:
        """BCE of the step's classes on every head + ``ac_weight`` x the AC loss (at step 0
        too, where it is the whole loss with the BCE)."""
        loss = super().segmentation_loss(out, labels)
        if self.ac_weight > 0:
            loss = loss + self.ac_weight * auxiliary_classifier_loss(self.auxiliary_logits(out))
        return loss

    def terms(self, batch: Batch, out: SegOutput, old_out: SegOutput) -> dict[str, Tensor]:
        num_old = self.ctx.num_old
        # the old foreground classes: channels 1 .. C_o - 1 of both models
        kd = sigmoid_distillation(out.logits[:, 1:num_old], old_out.logits[:, 1:])
        w_new = torch.cat([c.weight for c in classifier_heads(self.ctx.model)[0].convs])
        w_old = torch.cat([c.weight for c in classifier_heads(self.ctx.old_model)[0].convs])
        pos, neg = decomposed_logits(out.features["decoder"], w_new[1:num_old])
        with torch.no_grad():
            old_pos, old_neg = decomposed_logits(old_out.features["decoder"], w_old[1:num_old])
        return {"kd": self.kd_weight * kd,
                "dkd_pos": self.dkd_pos_weight * sigmoid_distillation(pos, old_pos),
                "dkd_neg": self.dkd_neg_weight * sigmoid_distillation(neg, old_neg)}

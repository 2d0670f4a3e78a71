"""ILT (Michieli & Zanuttigh, ICCV-W 2019): LwF's output distillation plus an MSE between the
new and the old model's features."""

import torch
from torch import Tensor

from incseg.losses import feature_distillation
from incseg.methods.base import Batch, check_weight
from incseg.methods.lwf import LwF
from incseg.models.base import SegOutput
from incseg.models.norm import batch_statistics

LAYERS = ("decoder", "encoder")
FEAT_BN = ("batch", "running")


class ILT(LwF):
    """``feat_layer``: the contract feature distilled (``decoder``: what the classifier reads;
    ``encoder``: the backbone's last stage, as ILT and MiB do for DeepLab). ``feat_bn``:
    ``batch`` runs the teacher's BatchNorms on the batch's statistics, like the training
    student (:func:`incseg.models.norm.batch_statistics`), ``running`` in eval mode."""

    def __init__(self, kd_weight: float = 100.0, kd_alpha: float = 1.0,
                 feat_weight: float = 100.0, feat_layer: str = "decoder",
                 feat_bn: str = "batch") -> None:
        super().__init__(kd_weight, kd_alpha)
        for key, value, valid in (("feat_layer", feat_layer, LAYERS),
                                  ("feat_bn", feat_bn, FEAT_BN)):
            if value not in valid:
                raise ValueError(f"{key}={value!r} is not valid; use one of {', '.join(valid)}")
        self.feat_weight = check_weight("feat_weight", feat_weight)
        self.feat_layer, self.feat_bn = feat_layer, feat_bn
        self.needs_features = (feat_layer,)

    def terms(self, batch: Batch, out: SegOutput, old_out: SegOutput) -> dict[str, Tensor]:
        terms = super().terms(batch, out, old_out)
        old_feat = old_out.features[self.feat_layer]
        if self.feat_bn == "batch":
            old_model = self.ctx.old_model
            with torch.no_grad(), batch_statistics(old_model):
                old_feat = old_model(batch.images).features[self.feat_layer]
        terms["feat"] = self.feat_weight * feature_distillation(out.features[self.feat_layer],
                                                                old_feat)
        return terms

"""LwF-MC (Rebuffi et al., iCaRL, CVPR 2017: LwF with one sigmoid per class), the baseline of
MiB's tables (fcdl94/MiB ``--method LWF-MC``): at every step, step 0 included, BCE-with-logits
against the one-hot labels on every head; from step 1, plus ``kd_weight`` (10) times the BCE of
the old channels against the old model's sigmoid outputs, on the main head."""

from __future__ import annotations

from torch import Tensor

from incseg.losses.lwf_mc import bce_distillation, one_hot_bce
from incseg.methods.base import Batch, Method, check_weight
from incseg.models.base import SegOutput


class LwFMC(Method):
    """Step 0 trains with this method's BCE too (``trains_step0``): its step-0 model is not the
    plain-CE one the other methods share. Prediction stays the argmax of the logits, as in
    MiB."""

    uses_old_outputs = True
    trains_step0 = True

    def __init__(self, kd_weight: float = 10.0) -> None:
        super().__init__()
        self.kd_weight = check_weight("kd_weight", kd_weight)

    def classification_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return one_hot_bce(logits, labels)

    def terms(self, batch: Batch, out: SegOutput, old_out: SegOutput) -> dict[str, Tensor]:
        # main head only, as MiB does
        return {"kd": self.kd_weight * bce_distillation(out.logits, old_out.logits)}

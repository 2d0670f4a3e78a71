"""MiB (Cermelli et al., "Modeling the Background", CVPR 2020): unbiased CE, unbiased KD and
the background-balanced initialisation of the new heads (on all three BiSeNet heads)."""

from torch import Tensor

from incseg.losses import unbiased_knowledge_distillation
from incseg.methods.base import Batch, Method, check_weight
from incseg.models.base import SegOutput


class MiB(Method):
    """``kd_weight`` 10 as in the paper; MiB's later code uses 100 for single-class steps."""

    classification = "unbiased_ce"
    init_balanced = True
    uses_old_outputs = True

    def __init__(self, kd_weight: float = 10.0, kd_alpha: float = 1.0) -> None:
        super().__init__()
        self.kd_weight = check_weight("kd_weight", kd_weight)
        self.kd_alpha = check_weight("kd_alpha", kd_alpha)

    def terms(self, batch: Batch, out: SegOutput, old_out: SegOutput) -> dict[str, Tensor]:
        # main head only, as MiB does
        return {"kd": self.kd_weight * unbiased_knowledge_distillation(
            out.logits, old_out.logits, self.kd_alpha)}

"""Learning without Forgetting (Li & Hoiem, ECCV 2016), as the paper and MiB apply it to
segmentation: CE + lambda * KD on the old classes' logits of the main head."""

from torch import Tensor

from incseg.losses import knowledge_distillation
from incseg.methods.base import Batch, Method, check_weight
from incseg.models.base import SegOutput


class LwF(Method):
    uses_old_outputs = True

    def __init__(self, kd_weight: float = 100.0, kd_alpha: float = 1.0) -> None:
        super().__init__()
        self.kd_weight = check_weight("kd_weight", kd_weight)
        self.kd_alpha = check_weight("kd_alpha", kd_alpha)

    def terms(self, batch: Batch, out: SegOutput, old_out: SegOutput) -> dict[str, Tensor]:
        # main head only, as the paper's code and MiB do
        return {"kd": self.kd_weight * knowledge_distillation(out.logits, old_out.logits,
                                                              self.kd_alpha)}

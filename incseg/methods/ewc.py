"""EWC (Kirkpatrick et al., PNAS 2017) as MiB runs it for segmentation: the empirical Fisher as
a running average of squared task gradients over every iteration since step 0, normalised per
tensor; penalty weight 500 (fcdl94/MiB ``argparser.py``; PLOP's copy uses 100)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from incseg.losses.importance import ewc_fisher_update
from incseg.methods.regularizer import ImportanceRegularizer, check_fraction


class EWC(ImportanceRegularizer):
    """``alpha``: the newest squared gradient's share in the running Fisher (MiB's
    ``reg_alpha`` 0.9). A weight the earlier steps did not have (a new classifier) starts at
    a Fisher of 1, as in MiB."""

    def __init__(self, reg_weight: float = 500.0, alpha: float = 0.9,
                 normalize: bool = True) -> None:
        super().__init__(reg_weight, normalize)
        self.alpha = check_fraction("alpha", alpha)
        self.fisher: dict[str, Tensor] = {}

    def _start(self, params: dict[str, nn.Parameter]) -> None:
        prev = self.previous.get("fisher", {})
        self.fisher = {n: prev[n].clone().to(p.device) if n in prev else torch.ones_like(p)
                       for n, p in params.items()}

    def _update(self, params, grads) -> None:
        for n, g in grads.items():
            self.fisher[n] = ewc_fisher_update(self.fisher[n], g, self.alpha)

    def _final(self, params):
        return {"fisher": self.fisher}

    def _penalty_importance(self):
        return {n: self._norm(f) for n, f in self.previous.get("fisher", {}).items()}

    def _running(self):
        return {"fisher": self.fisher}

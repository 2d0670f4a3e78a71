"""RWalk (Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018) as MiB runs
it for segmentation: EWC's running Fisher plus a path score, the loss change per unit of
Fisher-weighted squared displacement, taken every ``iterations`` iterations and averaged with
the earlier steps' score; the penalty weighs N(F) + N(S); weight 100 (fcdl94/MiB
``argparser.py``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from incseg.losses.importance import ewc_fisher_update, rw_final_score, rw_score_update
from incseg.methods.regularizer import ImportanceRegularizer, check_fraction, clone_params


class RW(ImportanceRegularizer):
    """``alpha``: the Fisher's running-average share (0.9); ``iterations``: iterations between
    score updates (MiB's ``reg_iterations`` 10)."""

    def __init__(self, reg_weight: float = 100.0, alpha: float = 0.9, iterations: int = 10,
                 normalize: bool = True) -> None:
        super().__init__(reg_weight, normalize)
        self.alpha = check_fraction("alpha", alpha)
        if isinstance(iterations, bool) or int(iterations) != iterations or iterations < 1:
            raise ValueError(f"iterations={iterations!r} must be a whole number >= 1")
        self.iterations = int(iterations)
        self.fisher: dict[str, Tensor] = {}
        self.score: dict[str, Tensor] = {}
        self.snapshot: dict[str, Tensor] | None = None
        self.count = 0

    def _start(self, params: dict[str, nn.Parameter]) -> None:
        prev = self.previous.get("fisher", {})
        self.fisher = {n: prev[n].clone().to(p.device) if n in prev else torch.ones_like(p)
                       for n, p in params.items()}
        self.score = {n: torch.zeros_like(p) for n, p in params.items()}
        self.snapshot, self.count = None, 0

    def _update(self, params, grads) -> None:
        if self.count % self.iterations == 0:
            if self.snapshot is not None:  # with the Fisher before this iteration's update
                for n, g in grads.items():
                    self.score[n] = rw_score_update(self.score[n], g, self.snapshot[n],
                                                    params[n], self.fisher[n])
            self.snapshot = clone_params(params, grads)
        self.count += 1
        for n, g in grads.items():
            self.fisher[n] = ewc_fisher_update(self.fisher[n], g, self.alpha)

    def _final(self, params):
        prev = self.previous.get("score", {})
        return {"fisher": self.fisher,
                "score": {n: rw_final_score(s, prev[n].to(s.device) if n in prev else None)
                          for n, s in self.score.items()}}

    def _penalty_importance(self):
        fisher, score = self.previous.get("fisher", {}), self.previous.get("score", {})
        return {n: self._norm(f) + (self._norm(score[n]) if n in score else 0)
                for n, f in fisher.items()}

    def _running(self):
        return {"fisher": self.fisher, "score": self.score, "snapshot": self.snapshot,
                "count": self.count}

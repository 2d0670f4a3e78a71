"""PI, Synaptic Intelligence's path integral (Zenke et al., ICML 2017), as MiB runs it for
segmentation: per weight, the sum over iterations of g ⊙ (θ_prev - θ) (the loss decrease the
weight's motion caused), divided at the step's end by its squared displacement over the step,
clipped at 0 and summed over steps; penalty weight 500 (fcdl94/MiB ``argparser.py``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from incseg.losses.importance import pi_path_update, pi_score
from incseg.methods.regularizer import ImportanceRegularizer, clone_params


class PI(ImportanceRegularizer):
    """The displacement is measured from the step's start: the old model's weights, and a new
    classifier's initial ones (MiB's ``starting_new``)."""

    def __init__(self, reg_weight: float = 500.0, normalize: bool = True) -> None:
        super().__init__(reg_weight, normalize)
        self.delta: dict[str, Tensor] = {}
        self.start: dict[str, Tensor] = {}
        self.snapshot: dict[str, Tensor] | None = None

    def _start(self, params: dict[str, nn.Parameter]) -> None:
        self.start = clone_params(params)
        self.delta = {n: torch.zeros_like(p) for n, p in params.items()}
        self.snapshot = None

    def _update(self, params, grads) -> None:
        if self.snapshot is not None:  # the first iteration only takes the snapshot
            for n, g in grads.items():
                self.delta[n] = pi_path_update(self.delta[n], g, self.snapshot[n], params[n])
        self.snapshot = clone_params(params, grads)

    def _final(self, params):
        prev = self.previous.get("score", {})
        return {"score": {n: pi_score(self.delta[n], self.start[n], p.detach(),
                                      prev[n].to(p.device) if n in prev else None)
                          for n, p in params.items()}}

    def _penalty_importance(self):
        return {n: self._norm(s) for n, s in self.previous.get("score", {}).items()}

    def _running(self):
        return {"delta": self.delta, "start": self.start, "snapshot": self.snapshot}

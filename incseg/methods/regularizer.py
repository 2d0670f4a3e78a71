"""The machinery EWC, PI and RW share, as MiB runs them (fcdl94/MiB ``utils/regularizer.py``
and ``train.py``): a weight-importance estimate updated at every iteration from the task
loss's gradients, normalised per tensor, and a quadratic penalty that holds the old model's
weights in place in proportion to the importance of earlier steps.

Per iteration, in MiB's order: the task loss's backward; the importance update from those
gradients (:meth:`ImportanceRegularizer.on_before_optimizer_step`); then the penalty's gradient,
``2 w N(I) ⊙ (θ - θ_old)``, added to them (MiB's second ``backward``; the sum is the same);
the optimiser step. The penalty's value is one of the logged terms (``reg``); it carries no
graph, so the gradients the importance reads are the task's alone.

Which weights: every parameter of the previous model (encoder, decoder, its classifiers,
normalisation affines); the step's new classifiers are free. The importance accumulates from
step 0 (``trains_step0``: step 0 trains through this method) and travels to the next step in
the step's model file (:meth:`next_step_state`). A subclass says how its importance grows
(``_update``), what it hands on (``_final``) and what the penalty weighs with
(``_penalty_importance``).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from incseg.losses.importance import normalize_importance, penalty_gradient, quadratic_penalty
from incseg.methods.base import Batch, Method, StepContext, check_weight
from incseg.models.base import SegOutput

log = logging.getLogger(__name__)

Tensors = dict[str, Tensor]


def check_fraction(name: str, value: float) -> float:
    """A decay in (0, 1] (the share of the newest squared gradient in the running Fisher)."""
    value = float(value)
    if not 0 < value <= 1:
        raise ValueError(f"{name}={value:g} must be in (0, 1]")
    return value


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a boolean; use {name}=true or {name}=false")
    return value


def to_device(tensors: Tensors, device: torch.device) -> Tensors:
    return {k: v.to(device) for k, v in tensors.items()}


def to_cpu(tensors: Tensors) -> Tensors:
    return {k: v.detach().cpu() for k, v in tensors.items()}


def clone_params(params: dict[str, nn.Parameter], names=None) -> Tensors:
    return {n: p.detach().clone() for n, p in params.items() if names is None or n in names}


class ImportanceRegularizer(Method, ABC):
    """CE on the step's labels + ``reg_weight`` * sum N(I) ⊙ (θ - θ_old)².

    ``normalize``: N(X) = (X - min) / (max - min + 1e-8) per tensor (MiB's default; false:
    the raw importance, MiB's ``--reg_no_normalize``)."""

    trains_step0 = True

    def __init__(self, reg_weight: float, normalize: bool = True) -> None:
        super().__init__()
        self.reg_weight = check_weight("reg_weight", reg_weight)
        self.normalize = check_flag("normalize", normalize)
        self.previous: dict[str, Tensors] = {}   # the earlier steps' importance, raw
        self.importance: Tensors = {}            # what the penalty weighs (normalised)
        self.anchors: dict[str, nn.Parameter] = {}  # the old model's weights (frozen)
        self.params: dict[str, nn.Parameter] = {}
        self.handover: dict[str, Tensors] | None = None
        self._device: torch.device | None = None

    # ---- what a subclass defines (EWC, PI, RW) ----------------------------------------------
    @abstractmethod
    def _start(self, params: dict[str, nn.Parameter]) -> None:
        """Set the step's running accumulators up (``self.previous`` is known)."""

    @abstractmethod
    def _update(self, params: dict[str, nn.Parameter], grads: Tensors) -> None:
        """One iteration's importance update from the task gradients (no_grad)."""

    @abstractmethod
    def _final(self, params: dict[str, nn.Parameter]) -> dict[str, Tensors]:
        """The importance handed to the next step, at the step's end."""

    @abstractmethod
    def _penalty_importance(self) -> Tensors:
        """The penalty's weights from ``self.previous`` (per tensor of the old model)."""

    @abstractmethod
    def _running(self) -> dict[str, Any]:
        """The running accumulators by name (what a mid-step resume restores)."""

    def _norm(self, x: Tensor) -> Tensor:
        return normalize_importance(x) if self.normalize else x

    # ---- the Method interface ---------------------------------------------------------------
    def load_previous_step(self, state: dict[str, Any]) -> None:
        self.previous = {kind: dict(tensors) for kind, tensors in (state or {}).items()}

    def setup(self, ctx: StepContext) -> None:
        super().setup(ctx)
        if ctx.model is None:
            raise ValueError(f"{type(self).__name__} reads the trained model's weights: the "
                             "StepContext must carry the model")
        self.params = dict(ctx.model.named_parameters())
        self.importance, self.anchors = {}, {}
        self.handover = None
        if ctx.old_model is not None:
            if self.previous:
                old = dict(ctx.old_model.named_parameters())
                with torch.no_grad():
                    self.importance = self._penalty_importance()
                unknown = sorted(set(self.importance) - set(old))
                if unknown:
                    raise ValueError(f"the importance handed over from step {ctx.step - 1} "
                                     f"names weights the model lacks ({', '.join(unknown[:3])})")
                self.anchors = {n: old[n] for n in self.importance}
            else:
                log.warning("%s at step %d: no importance from the earlier steps; the penalty "
                            "is off for this step", type(self).__name__, ctx.step)
        with torch.no_grad():
            self._start(self.params)
        self._device = None

    def penalty_curvature(self) -> float | None:
        """``w sum I (θ - θ*)²`` is a quadratic whose curvature along a weight is ``2 w I``:
        its largest is ``2 w max I`` (``2 w`` for a normalised importance, ``4 w`` for RW's
        sum of two). None before there is an importance (step 0)."""
        if not self.importance or not self.reg_weight:
            return None
        return 2.0 * self.reg_weight * max(float(t.max()) for t in self.importance.values())

    def _on_device(self, device: torch.device) -> None:
        """The accumulators follow the model (built on the CPU, trained where Lightning puts
        it; a resumed state arrives on the CPU)."""
        if self._device == device:
            return
        self.importance = to_device(self.importance, device)
        for name, value in self._running().items():
            if isinstance(value, dict):
                setattr(self, name, to_device(value, device))
        self._device = device

    def terms(self, batch: Batch, out: SegOutput, old_out: SegOutput | None
              ) -> dict[str, Tensor]:
        if not self.importance:
            return {}
        self._on_device(out.logits.device)
        with torch.no_grad():  # the value only: its gradient is added after the update
            value = quadratic_penalty(self.params, self.anchors, self.importance)
        return {"reg": self.reg_weight * value}

    def on_before_optimizer_step(self, model: nn.Module) -> None:
        grads = {n: p.grad for n, p in self.params.items() if p.grad is not None}
        if not grads:
            return
        self._on_device(next(iter(grads.values())).device)
        with torch.no_grad():
            # fp16 training skips a step whose gradients overflowed: so does the importance
            if bool(torch.stack([torch.isfinite(g).all() for g in grads.values()]).all()):
                self._update(self.params, grads)
            if self.reg_weight > 0:
                for n, imp in self.importance.items():
                    p = self.params[n]
                    g = penalty_gradient(p, self.anchors[n], imp, self.reg_weight)
                    if p.grad is None:
                        p.grad = g
                    else:
                        p.grad.add_(g)

    def on_step_end(self, model: nn.Module, old_model: nn.Module | None) -> None:
        self._on_device(next(iter(self.params.values())).device)
        with torch.no_grad():
            final = self._final(self.params)
        self.handover = {kind: to_cpu(t) for kind, t in final.items()}

    def on_fit_end(self, model: nn.Module, train_loader) -> None:
        """A step killed after its last epoch checkpoint resumes into a fit with nothing left
        to train, where Lightning runs no ``on_train_end``: the hand-over is made here then,
        from the accumulators the checkpoint restored, so the next step keeps its penalty."""
        if self.handover is None:
            self.on_step_end(model, None)

    def next_step_state(self) -> dict[str, Any]:
        return self.handover or {}

    def state_dict(self) -> dict[str, Any]:
        return {name: (to_cpu(v) if isinstance(v, dict) else v)
                for name, v in self._running().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            if name in self._running():
                setattr(self, name, dict(value) if isinstance(value, dict) else value)
        self._device = None

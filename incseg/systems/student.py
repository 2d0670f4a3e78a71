"""StudentModule: an incremental step t >= 1 against the frozen model of step t-1.

The system is the same for every method: the method (``incseg.methods``) gives the
classification loss and its terms, the replay term (``incseg.replay.term``) the synthetic
batch's distance; the student adds them up, calls the method's hooks and carries their state
through the epoch checkpoints.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from incseg.errors import CheckpointError, ConfigError
from incseg.methods.base import Batch, Method, StepContext
from incseg.models.base import SegmentationModel, model_output
from incseg.models.norm import freeze
from incseg.replay.term import ReplayTerm
from incseg.stability import sgd_stability_bound
from incseg.systems.base import Recipe, SegmentationSystem
from incseg.tasks import Task

log = logging.getLogger(__name__)


class StudentModule(SegmentationSystem):
    """Step t >= 1: ``method``'s losses against ``old_model`` (frozen; never updated), plus
    ``replay`` on the synthetic batch when the loader yields one."""

    def __init__(self, model: SegmentationModel, old_model: SegmentationModel, task: Task,
                 step: int, recipe: Recipe, method: Method, replay: ReplayTerm | None = None):
        super().__init__(model, task, step, recipe)
        self.old_model = freeze(old_model)
        self.method = method
        self.replay = replay
        self.num_old = len(task.classes_before(step))
        self.replay_stability: dict | None = None  # the curvature test's figures
        if old_model.num_classes != self.num_old:
            raise CheckpointError(f"the previous model has {old_model.num_classes} outputs but "
                                  f"{self.num_old} classes were seen before step {step}")
        method.setup(StepContext(step=step, num_old=self.num_old,
                                 num_classes=model.num_classes, old_model=self.old_model,
                                 model=self.model,
                                 reduction=recipe.loss_reduction))
        method.on_train_mode(self.model)  # e.g. DKD's frozen BatchNorms, from the start

    def train(self, mode: bool = True):
        super().train(mode)
        self.old_model.eval()  # Lightning puts every submodule in train mode: not this one
        return self

    def training_loss(self, images: Tensor, labels: Tensor, replay: Tensor | None = None,
                      known: Tensor | None = None) -> dict[str, Tensor]:
        """L = L_B + the method's terms (+ w D_replay on the synthetic batch)."""
        m = self.method
        out = self.method_forward(images)
        old = None
        if m.uses_old_outputs:
            with torch.no_grad():
                old = model_output(self.old_model, images, m.needs_features)
        terms = {"seg": m.segmentation_loss(out, labels)}
        terms.update(m.terms(Batch(images, labels, known), out, old))
        if replay is not None and self.replay is not None:
            if self.replay.spec.decay != "none":
                self.replay.progress = self._progress()
            terms["replay"] = self.replay(self.model, self.old_model, replay)
        terms["loss"] = sum(terms.values())
        return terms

    def _progress(self) -> float:
        """The fraction of the step's optimiser steps done (0 outside a Trainer)."""
        if self._trainer is None:
            return 0.0
        return self.global_step / max(1, int(self.trainer.estimated_stepping_batches))

    def param_groups(self) -> list[dict]:
        return self.method.param_groups(self.model, self.recipe.lr)

    # ---- the method's and the replay term's hooks --------------------------------------------
    def on_train_start(self) -> None:
        if self.global_step > 0:
            return  # resumed mid-step: the state travels with the epoch checkpoint
        self.method.on_step_start(self.model, self.old_model, self.trainer.train_dataloader)
        self._check_penalty_curvature()
        rt = self.replay
        if rt is None or not rt.spec.check or rt.check_images is None or not len(rt.check_images):
            return
        r = self.recipe
        images = self._prepare(rt.check_images.to(self.device))
        self.replay_stability = rt.check_stability(self.model, self.old_model, images, r.lr,
                                                   r.momentum, r.nesterov, self.step)

    def _check_penalty_curvature(self) -> None:
        """A weight penalty sharper than SGD at this lr can follow makes the weights oscillate
        with a growing amplitude until they are non-finite (EWC at MiB's weight 500 with the
        5x higher lr of a CPU recipe): refused before the first iteration, with the fix."""
        lam = self.method.penalty_curvature()
        if lam is None:
            return
        r = self.recipe
        bound = sgd_stability_bound(r.lr, r.momentum, r.nesterov)
        if lam > bound:
            name = type(self.method).__name__
            scale = bound / lam
            raise ConfigError(
                f"method {name}: the weight penalty's largest curvature {lam:g} (2 x "
                f"reg_weight x the largest normalised importance) is above {bound:.0f}, the "
                f"most SGD with lr {r.lr:g} and {'Nesterov ' if r.nesterov else ''}momentum "
                f"{r.momentum:g} can follow: step {self.step} would diverge; use "
                f"method.reg_weight <= {self.method.reg_weight * scale:.3g} or an incremental "
                f"lr <= {r.lr * scale:.3g} (MiB's recipe: weight 500 at lr 0.001)")

    def on_before_optimizer_step(self, optimizer) -> None:
        self.method.on_before_optimizer_step(self.model)

    def on_train_end(self) -> None:
        self.method.on_step_end(self.model, self.old_model)

    def on_fit_end(self) -> None:
        self._method_fit_end()

    def on_train_epoch_end(self) -> None:
        if self.replay is not None and self.replay.left_out:
            log.warning(
                "step %d epoch %d replay: the student could not score %d replay images that "
                "its teacher scores (non-finite or |logit| >= 1e4): training is diverging; "
                "lower replay.weight or use replay.loss=kl", self.step, self.current_epoch,
                self.replay.left_out)
            self.replay.left_out = 0
        super().on_train_epoch_end()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["incseg_replay_stability"] = self.replay_stability
        checkpoint["incseg_method"] = self.method.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.replay_stability = checkpoint.get("incseg_replay_stability",
                                               self.replay_stability)
        self.method.load_state_dict(checkpoint.get("incseg_method") or {})

"""The shared training template: forward, deep supervision, SGD + poly, evaluation."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial

import lightning as L
import numpy as np
import torch
from torch import Tensor

from incseg.errors import ConfigError, IncsegError, TrainingError
from incseg.losses import bisenet_loss, cross_entropy
from incseg.methods.base import Method
from incseg.metrics import SegMetric, summarize
from incseg.models.base import SegmentationModel, SegOutput, missing_features, model_output
from incseg.prediction import prediction_scores
from incseg.tasks import Task


@dataclass
class Recipe:
    """SGD (momentum, Nesterov as in MiB), weight decay, poly LR per iteration (power 0.9);
    ``loss_reduction`` averages the classification losses (``incseg.losses.segmentation``)."""

    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    channels_last: bool = False
    loss_reduction: str = "valid"


class SegmentationSystem(L.LightningModule):
    """Trains ``model`` on one step of ``task`` and evaluates it.

    Evaluation is scored with ``score_task`` at ``score_step`` (for Joint: the incremental task
    being compared with, so old/new follow its split). Confusion matrices of the last val and
    test runs are kept in ``val_confusion`` / ``test_confusion``; summaries in ``*_summary``.
    A subclass that trains with a ``method`` evaluates with its prediction rule.
    """

    method: Method | None = None

    def __init__(self, model: SegmentationModel, task: Task, step: int, recipe: Recipe,
                 score_task: Task | None = None, score_step: int | None = None):
        super().__init__()
        self.model = model
        self.task, self.step, self.recipe = task, step, recipe
        self.score_task = score_task or task
        self.score_step = step if score_step is None else score_step
        seen = len(self.score_task.classes_seen(self.score_step))
        if seen != model.num_classes:
            raise IncsegError(
                f"the model has {model.num_classes} outputs but step {self.score_step} of task "
                f"{self.score_task.name} has seen {seen} classes"
            )
        self.val_metric = SegMetric(model.num_classes)
        self.test_metric = SegMetric(model.num_classes)
        self.val_summary: dict | None = None
        self.test_summary: dict | None = None
        self.test_confusion: Tensor | None = None
        self._features_checked = False

    @property
    def prediction(self) -> str:
        """How logits become classes in evaluation (:mod:`incseg.prediction`): the method's."""
        return "argmax" if self.method is None else self.method.prediction

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.method is not None:
            self.method.on_train_mode(self.model)
        return self

    def method_forward(self, images: Tensor) -> SegOutput:
        """The model's output for the method's loss, with the optional features the method
        reads; the first one is checked for them all (one line instead of a KeyError deep in
        the method)."""
        m = self.method
        out = model_output(self.model, images, m.needs_features if m is not None else ())
        if m is not None and not self._features_checked:
            missing = missing_features(out, m.needs_features)
            if missing:
                raise ConfigError(
                    f"the method {type(m).__name__} reads the model features "
                    f"{', '.join(missing)}, which {type(self.model).__name__} does not provide; "
                    "choose another model or another method setting")
            self._features_checked = True
        return out

    def _method_fit_end(self) -> None:
        """The method's pass over the step's data after the fit (:meth:`Method.on_fit_end`),
        on the device that trained: Lightning has moved the model back to the CPU by then."""
        if type(self.method).on_fit_end is Method.on_fit_end:
            return  # nothing to run: no round trip of the model to the device
        device = self.trainer.strategy.root_device
        where = next(self.model.parameters()).device
        self.model.to(device)
        try:
            self.method.on_fit_end(self.model, self.trainer.train_dataloader)
        finally:
            self.model.to(where)

    # ---- the loss: subclasses (the student) add their method's terms ------------------------
    def training_loss(self, images: Tensor, labels: Tensor, replay: Tensor | None = None,
                      known: Tensor | None = None) -> dict[str, Tensor]:
        """Paper Eq. 3: L_B = CE(main) + CE(aux1) + CE(aux2), over every class of the step.
        ``known``: the images whose labels hold every seen class (:class:`Batch`)."""
        out = self.model(images)
        ce = partial(cross_entropy, reduction=self.recipe.loss_reduction)
        return {"loss": bisenet_loss(out.logits, out.aux, labels, ce)}

    def param_groups(self) -> list[dict]:
        """The optimiser's parameter groups: every trainable parameter of the model."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    # ---- Lightning hooks ---------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        """Inference: B x 3 x H x W -> logits B x C x H x W."""
        return self.model(images).logits

    def setup(self, stage: str) -> None:
        # channels_last: the weights too (every model of the system, the frozen previous one
        # included), not just the input, or each convolution reorders its weights per call
        # (docs/measurements.md).
        if self.recipe.channels_last:
            self.to(memory_format=torch.channels_last)

    def _prepare(self, images: Tensor) -> Tensor:
        if self.recipe.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def training_step(self, batch, batch_idx: int) -> Tensor:
        # With replay the loader is a CombinedLoader: {"real": (x, y), "replay": x_synthetic}.
        replay = None
        if isinstance(batch, dict):
            replay = batch.get("replay")
            batch = batch["real"]
        # a labelled memory with complete labels adds a third element (incseg.data.memory)
        images, labels, *rest = batch
        known = rest[0] if rest else None
        if replay is not None:
            replay = self._prepare(replay)
        terms = self.training_loss(self._prepare(images), labels, replay, known)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            bad = [k for k, v in terms.items() if k != "loss" and not torch.isfinite(v)]
            raise TrainingError(
                f"non-finite loss ({loss.item()}; term {', '.join(bad) or 'loss'}) at step "
                f"{self.step}, epoch "
                f"{self.current_epoch}, batch {batch_idx}; lower the learning rate "
                "(train.lr / train.lr_incremental) or use trainer.precision=32-true — the last "
                "good epoch checkpoint is kept, so rerunning resumes from it"
            )
        bs = images.shape[0]
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=bs)
        return loss

    def _eval_update(self, metric: SegMetric, batch) -> None:
        images, labels = batch
        logits = self.model(self._prepare(images)).logits
        metric.update(prediction_scores(logits, self.prediction), labels)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_update(self.val_metric, batch)

    def on_validation_epoch_end(self) -> None:
        self.val_summary = summarize(self.val_metric.compute(), self.score_task, self.score_step)
        self.val_metric.reset()
        for key in ("miou_all", "miou_old", "miou_new"):
            if self.val_summary.get(key) is not None:
                self.log(f"val/{key}", self.val_summary[key], prog_bar=key == "miou_all")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_update(self.test_metric, batch)

    def on_test_epoch_end(self) -> None:
        self.test_confusion = self.test_metric.compute().cpu()
        self.test_summary = summarize(self.test_confusion, self.score_task, self.score_step)
        self.test_metric.reset()
        for key in ("miou_all", "miou_old", "miou_new"):
            if self.test_summary.get(key) is not None:
                self.log(f"test/{key}", self.test_summary[key])

    def configure_optimizers(self):
        r = self.recipe
        opt = torch.optim.SGD(self.param_groups(), lr=r.lr, momentum=r.momentum,
                              nesterov=r.nesterov, weight_decay=r.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def poly(it: int) -> float:
            return max(0.0, 1.0 - it / total) ** r.poly_power

        sched = torch.optim.lr_scheduler.LambdaLR(opt, poly)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- exact resume: RNG states travel with the epoch checkpoints -------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["incseg_rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]),
            "python": list(random.getstate()[1]),
        }
        # a run killed after its last epoch resumes with nothing left to train: the record it
        # then writes must still carry the last validation (exact resume)
        checkpoint["incseg_val_summary"] = self.val_summary

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.val_summary = checkpoint.get("incseg_val_summary", self.val_summary)
        rng = checkpoint.get("incseg_rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            np.random.set_state(("MT19937", np.asarray(rng["numpy"], dtype=np.uint32),
                                 rng["numpy_pos"], 0, 0.0))
            random.setstate((3, tuple(rng["python"]), None))


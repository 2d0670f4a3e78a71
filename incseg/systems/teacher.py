"""TeacherModule: step-0 training, and Joint (offline) training on all classes at once."""

from __future__ import annotations

from torch import Tensor

from incseg.methods.base import Method, StepContext
from incseg.models.base import SegmentationModel
from incseg.systems.base import Recipe, SegmentationSystem
from incseg.tasks import Task


class TeacherModule(SegmentationSystem):
    """Plain BiSeNet training with CE on the main and both auxiliary heads (paper Eq. 3).

    At step 0 of an incremental task the model sees the step-0 classes only (future classes are
    background in its labels, the MiB protocol). For Joint, ``task`` is the one-step offline
    counterpart of the task being compared with and ``score_task`` that task itself.

    ``method``: a method with ``trains_step0`` (EWC / PI / RW, whose importance accumulates
    from step 0; LwF-MC and DKD, whose step 0 trains with BCE): its segmentation loss, its
    parameter groups, its prediction rule, its hooks and its state in the epoch checkpoints.
    There is no previous model, hence no ``terms``.
    """

    def __init__(self, model: SegmentationModel, task: Task, step: int, recipe: Recipe,
                 score_task: Task | None = None, score_step: int | None = None,
                 method: Method | None = None):
        super().__init__(model, task, step, recipe, score_task, score_step)
        self.method = method
        if method is not None:
            method.setup(StepContext(step=step, num_old=len(task.classes_before(step)),
                                     num_classes=model.num_classes, old_model=None,
                                     model=self.model))
            method.on_train_mode(self.model)

    def training_loss(self, images: Tensor, labels: Tensor, replay: Tensor | None = None,
                      known: Tensor | None = None) -> dict[str, Tensor]:
        if self.method is None:
            return super().training_loss(images, labels, replay, known)
        return {"loss": self.method.segmentation_loss(self.method_forward(images), labels)}

    def param_groups(self) -> list[dict]:
        if self.method is None:
            return super().param_groups()
        return self.method.param_groups(self.model, self.recipe.lr)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.method is not None:
            self.method.on_before_optimizer_step(self.model)

    def on_train_end(self) -> None:
        if self.method is not None:
            self.method.on_step_end(self.model, None)

    def on_fit_end(self) -> None:
        if self.method is not None:
            self._method_fit_end()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.method is not None:
            checkpoint["incseg_method"] = self.method.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.method is not None:
            self.method.load_state_dict(checkpoint.get("incseg_method") or {})

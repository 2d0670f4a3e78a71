"""The method interface: what one class-incremental method adds to the shared training step.

A method is one short file (mammoth's and Avalanche's habit): a :class:`Method` subclass named
by ``_target_`` in ``conf/method/<name>.yaml``, with its weights as constructor arguments. The
student (``incseg.systems.student``) computes, for every batch of a step t >= 1,

    L = method.segmentation_loss(out, labels) + sum(method.terms(batch, out, old_out).values())
        (+ the replay term, when replay is on)

and calls the hooks around the step. A method sees the models and the batches it is given,
never the Trainer or the DataModule. Joint training is not a method but a protocol mode.

The protocol builds a new method object per step. What a method carries from one step to the
next (EWC's Fisher, PI's and RW's scores) it returns from :meth:`Method.next_step_state`; the
protocol stores it in the step's model file and hands it to the next step's method through
:meth:`Method.load_previous_step`. A method whose step 0 is not the shared plain-CE teacher
(its importance accumulates from step 0, or its step-0 loss is its own) sets
``trains_step0``: step 0 then trains with its loss and hooks, in a step-0 cache entry of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader

from incseg.losses import REDUCTIONS, bisenet_loss, cross_entropy, unbiased_cross_entropy
from incseg.models.base import SegOutput
from incseg.prediction import check_prediction

#: classification losses a method can train its heads with
CLASSIFICATION = ("ce", "unbiased_ce")


@dataclass
class Batch:
    """One training batch of the current step: images B x 3 x H x W, labels B x H x W, and
    ``known`` (B bools, or None): the images whose labels are the ground truth of every class
    seen so far (a labelled memory's, :class:`incseg.data.memory.JoinedDataset`), where a step
    image's background hides the old classes."""

    images: Tensor
    labels: Tensor
    known: Tensor | None = None


@dataclass
class StepContext:
    """What a method knows about its step: the step index, ``num_old`` = C_o (classes seen
    before the step, background included), ``num_classes`` (seen up to the step), the frozen
    model of the previous step (None at step 0), the model being trained (its weights are
    what EWC / PI / RW hold in place; None where a caller has no model to give) and the run's
    ``reduction`` (``train.loss_reduction``)."""

    step: int
    num_old: int
    num_classes: int
    old_model: nn.Module | None
    model: nn.Module | None = None
    reduction: str = "valid"


class Method:
    """Base class: fine-tuning with plain CE; subclasses add their terms.

    Class attributes a method sets:
      classification     "ce" or "unbiased_ce" (MiB): the loss on the new labels, on every
                         head (BiSeNet's main and auxiliary ones, paper Eq. 3)
      init_balanced      new heads start as MiB's background-balanced initialisation
      uses_old_outputs   the student runs the frozen previous model on each batch for ``terms``
      needs_features     contract feature keys (``encoder``, ``stages``, ``decoder``; the
                         optional ``stages_preact``, ``logits_small``, which the model then
                         computes for it) it reads
      trains_step0       step 0 trains with this method (its segmentation loss, parameter
                         groups and hooks; no ``terms``) instead of the plain-CE teacher shared
                         by the others
      reduction          None: the classification loss is averaged as the run says
                         (``train.loss_reduction``); "valid" or "all" where the method's
                         reference defines its loss with that mean
      prediction         how its logits are evaluated (:mod:`incseg.prediction`): "argmax",
                         or "sigmoid" (DKD: background where no class's sigmoid exceeds 0.5)
    """

    classification = "ce"
    init_balanced = False
    uses_old_outputs = False
    needs_features: tuple[str, ...] = ()
    trains_step0 = False
    reduction: str | None = None
    prediction = "argmax"

    def __init__(self) -> None:
        if self.classification not in CLASSIFICATION:
            raise ValueError(f"classification={self.classification!r} is not one of "
                             f"{', '.join(CLASSIFICATION)}")
        if self.reduction not in (None, *REDUCTIONS):
            raise ValueError(f"reduction={self.reduction!r} is not one of "
                             f"{', '.join(REDUCTIONS)} (or None: train.loss_reduction)")
        check_prediction(self.prediction)
        self.ctx: StepContext | None = None

    # ---- set-up -------------------------------------------------------------------------------
    def add_classes(self, model: nn.Module, n_new: int) -> None:
        """Grow the copy of the previous step's model by the step's ``n_new`` classes (before
        :meth:`setup`): new heads as ``init_balanced`` says; a method may start them otherwise
        (DKD: from its auxiliary classifier)."""
        model.add_step(n_new, init_balanced=self.init_balanced)

    def setup(self, ctx: StepContext) -> None:
        """Called once by the student before the step trains (or resumes)."""
        self.ctx = ctx

    def on_train_mode(self, model: nn.Module) -> None:
        """Each time the system enters training mode (once built, and on ``train()``): a method
        may keep parts of the model in eval mode (DKD's frozen BatchNorms from step 1)."""

    # ---- the loss -----------------------------------------------------------------------------
    def classification_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """One head's loss: B x C x H x W logits, B x H x W labels -> scalar."""
        reduction = self.reduction or self.ctx.reduction
        if self.classification == "unbiased_ce":
            return unbiased_cross_entropy(logits, labels, self.ctx.num_old, reduction=reduction)
        return cross_entropy(logits, labels, reduction=reduction)

    def segmentation_loss(self, out: SegOutput, labels: Tensor) -> Tensor:
        """The classification loss summed over the main and auxiliary heads."""
        return bisenet_loss(out.logits, out.aux, labels, self.classification_loss)

    def terms(self, batch: Batch, out: SegOutput, old_out: SegOutput | None
              ) -> dict[str, Tensor]:
        """The method's weighted extra loss terms, by name (logged as ``train/<name>``).
        ``old_out`` is the frozen previous model's output on the batch (None unless
        ``uses_old_outputs``)."""
        return {}

    # ---- hooks --------------------------------------------------------------------------------
    def on_step_start(self, model: nn.Module, old_model: nn.Module,
                      train_loader: Iterable) -> None:
        """Before the first iteration of a step (not on resume: state comes back through
        :meth:`load_state_dict`): a pass over the step's data, e.g. PLOP's entropy thresholds."""

    def on_before_optimizer_step(self, model: nn.Module) -> None:
        """After backward, before each optimiser step: e.g. EWC / PI / RW importance updates
        from the gradients."""

    def on_step_end(self, model: nn.Module, old_model: nn.Module) -> None:
        """After the last iteration of a step."""

    def on_fit_end(self, model: nn.Module, train_loader: Iterable) -> None:
        """After the step's fit, also one resumed with nothing left to train (where
        :meth:`on_step_end` is not called again): a pass of the trained model over the step's
        data whose result the next step starts from (STAR's class prototypes). Read the data
        through :func:`fresh_loader`."""

    def penalty_curvature(self) -> float | None:
        """The largest curvature of the method's quadratic weight penalty (EWC / PI / RW), which
        SGD at the step's lr must be able to follow; None for a method without one."""
        return None

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """The optimiser's parameter groups (one, every trainable parameter, by default); a
        method may freeze parts or give the heads their own learning rate."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    # ---- exact resume -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What the method accumulates during a step (saved in every epoch checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume."""

    # ---- from one step to the next ------------------------------------------------------------
    def next_step_state(self) -> dict[str, Any]:
        """What the next step's method starts from (read after :meth:`on_step_end`; tensors and
        plain values only: it is saved in the step's model file). Empty by default."""
        return {}

    def load_previous_step(self, state: dict[str, Any]) -> None:
        """Called before :meth:`setup` with the previous step's :meth:`next_step_state` (empty
        when it had none)."""


def fresh_loader(loader) -> Iterable:
    """The step's training batches, read again without touching the Trainer's own iterator
    (with persistent workers a second ``iter`` of the same DataLoader would reset it). The
    sampler yields (index, seed) pairs, so the pass sees the very crops of the first epoch
    and draws no random number."""
    if isinstance(loader, Mapping):  # with replay: {"real": ..., "replay": ...}
        loader = loader["real"]
    if not isinstance(loader, DataLoader):
        return loader
    how = ({"batch_sampler": loader.batch_sampler} if loader.batch_size is None else
           {"batch_size": loader.batch_size, "sampler": loader.sampler,
            "drop_last": loader.drop_last})
    return DataLoader(loader.dataset, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, worker_init_fn=loader.worker_init_fn,
                      persistent_workers=False, **how)


def check_weight(name: str, value: float) -> float:
    """A loss weight as a float, refused when negative (a negative weight would reward the
    very forgetting the term measures)."""
    value = float(value)
    if not value >= 0:
        raise ValueError(f"{name}={value:g} must be >= 0")
    return value

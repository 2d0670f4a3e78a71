"""STAR (Chen et al., "Saving 100x Storage: Prototype Replay for Reconstructing Training Sample
Distribution in Class-Incremental Semantic Segmentation", NeurIPS 2023), as its code trains it
(jinpeng0528/STAR ``trainer/trainer_voc.py``, ``base/base_trainer.py``, ``models/loss.py``,
``train_voc.py``, ``configs/config_voc.json``, ``scripts/voc/*``). Built on DKD's code: one
sigmoid per class, background where no class's sigmoid exceeds 0.5, frozen BatchNorms from
step 1; but none of DKD's distillation terms and no auxiliary classifier (channel 0 of this
suite's head enters no loss; the prediction rule ignores it).

Instead of images, STAR keeps per old class a prototype and a few statistics of its decoder
features (:mod:`incseg.losses.star`), computed by the trained model at the end of each step
over the step's data, and at every iteration of a later step replays features drawn from
them, in the numbers that restore the class frequencies of the whole dataset:

    per iteration, for old class c:  (n_c - n̂_c) / iterations features   (overlap; n̂_c: the
        step's background pixels the old model calls c; disjoint: n_c / iterations)
    background repeated with ratio   ρ = n_0' / n̂_0 - 0.5 (overlap; n_0' = n_0 (1 - 0.01 |C_t|))

Loss of step t >= 1 (the reference's weights, all per class means summed over the new classes):

    mbce  (BCE(new logits, labels; pos_weight 4) + w_f BCE(new logits of replayed features, 0)
           + w_b BCE(new logits at repeated background pixels, 0)) / (1 + w_f + w_b)
          w_f = #replayed / (B·h·w), w_b = ρ · #background pixels the old model leaves / (B·h·w)
    + 5 ocfm   decoder features of old-class pixels held to the old model's (``PKDLoss``)
    + 0.05 sad 1 / distance of each new class's centre to the nearest old prototype (``ContLoss``)

Step 0 is the BCE alone (pos_weight 4). The logged terms split mbce into ``seg``,
``proto_replay`` and ``bg_repeat``. On BiSeNet the auxiliary heads get the step's BCE (as
DKD here); replay, OCFM and SAD read the main head and its decoder feature.

Where the reference's code is not what it means, the default is the meaning and
``literal=true`` the code: (a) the old model's prediction in training compares raw logits with
0.5 (``logit_old > 0.5``, σ > 0.62) where evaluation uses σ > 0.5; (b) from step 1 the noise of
the k-th new class is measured from the k-th row of the concatenated prototypes, an *old*
class's prototype; (c) the replayed norm is drawn per element of a feature, not per feature.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from incseg.errors import CheckpointError
from incseg.losses.dkd import per_class_bce
from incseg.losses.star import (
    ClassSums,
    class_statistics,
    class_sums,
    feature_distillation_in_region,
    old_sigmoid_prediction,
    prototype_separation,
    sample_prototype_features,
    subsample_labels,
)
from incseg.methods.base import Batch, StepContext, check_weight, fresh_loader
from incseg.methods.dkd import DKD, _positive, classifier_heads
from incseg.methods.regularizer import check_flag
from incseg.models.base import SegOutput

log = logging.getLogger(__name__)

#: what STAR hands to the next step (per old foreground class, plus ``numbers``' background)
STATISTICS = ("prototypes", "noise", "norm_mean", "norm_std")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _first_epoch(train_loader: Iterable) -> Iterator:
    """The step's batches with the crops of its first epoch, whatever epoch the Trainer's
    sampler is at (after the fit it is at the last one, or at another after a resume): the
    end-of-step pass then sees the same data in a run and in its resumed twin."""
    loader = fresh_loader(train_loader)
    samplers = [s for s in (getattr(loader, "sampler", None),
                            getattr(getattr(loader, "batch_sampler", None), "sampler", None))
                if s is not None and hasattr(s, "set_epoch") and hasattr(s, "epoch")]
    epochs = [s.epoch for s in samplers]
    try:
        for s in samplers:
            s.set_epoch(0)
        yield from loader
    finally:
        for s, e in zip(samplers, epochs):
            s.set_epoch(e)


def replay_plan(previous_numbers: Tensor, predicted: Tensor, iterations: int, n_new: int,
                overlap: bool) -> dict[str, Tensor]:
    """How step t replays, from the pixel counts of step t-1 (``previous_numbers``:
    background, then each old class) and those the old model predicts on step t's background
    pixels (``predicted``, same layout), over ``iterations`` per epoch (the reference's
    ``Trainer_incremental._train_epoch`` at epoch 1):

    per_iter        features replayed per old class and iteration (truncated, >= 0)
    extra_bg_ratio  how often a background pixel the old model leaves is repeated (>= 0)
    numbers         the counts handed on: background, then each old class (the new
                    classes' counts are added at the step's end)

    In the overlap setting the old classes already appear in the step's background, so only
    what is missing is replayed, and 1 % of the previous background per new class is taken
    for the new classes' share of it."""
    prev, pred = previous_numbers.double(), predicted.double()
    if overlap:
        per_iter = torch.trunc((prev[1:] - pred[1:]) / iterations)
        prev_bg = prev[0] * (1 - 0.01 * n_new)
        ratio = prev_bg / pred[0] - 0.5 if pred[0] > 0 else prev.new_zeros(())
        numbers = torch.cat([(pred[0] * 0.5 + prev_bg).view(1), prev[1:]])
    else:
        per_iter = torch.trunc(prev[1:] / iterations)
        prev_bg = prev[0]
        ratio = prev_bg / pred[0] if pred[0] > 0 else prev.new_zeros(())
        numbers = torch.cat([(pred[0] + prev_bg).view(1), prev[1:] + pred[1:]])
    return {"per_iter": per_iter.clamp(min=0).long(), "extra_bg_ratio": ratio.clamp(min=0).float(),
            "numbers": numbers.float()}


class STAR(DKD):
    """Settings (``conf/method/star.yaml``): ``bce_weight`` (the reference's ``mbce``),
    ``ocfm_weight`` (``pkd``), ``sad_weight`` (``cont``), ``pos_weight`` (every step),
    ``prototype_replay`` / ``background_repeat`` (each part of the replay on or off),
    ``head_lr_factor`` (lr outside the backbone / backbone lr), ``new_lr_factor`` (from step 1,
    new classifiers' lr / ``lr``), ``freeze_bn``, ``overlap`` (the run's setting: it changes the
    replayed numbers) and ``literal`` (the reference's code where it differs from its intent)."""

    decay_all_incremental = True

    def __init__(self, bce_weight: float = 1.0, ocfm_weight: float = 5.0,
                 sad_weight: float = 0.05, pos_weight: float = 4.0,
                 prototype_replay: bool = True, background_repeat: bool = True,
                 head_lr_factor: float = 10.0, new_lr_factor: float = 10.0,
                 freeze_bn: bool = True, overlap: bool = True, literal: bool = False) -> None:
        super().__init__(bce_weight=bce_weight, kd_weight=0.0, dkd_pos_weight=0.0,
                         dkd_neg_weight=0.0, ac_weight=0.0, pos_weight=pos_weight,
                         pos_weight_incremental=pos_weight, head_lr_factor=head_lr_factor,
                         freeze_bn=freeze_bn)
        self.ocfm_weight = check_weight("ocfm_weight", ocfm_weight)
        self.sad_weight = check_weight("sad_weight", sad_weight)
        self.new_lr_factor = _positive("new_lr_factor", new_lr_factor)
        self.prototype_replay = check_flag("prototype_replay", prototype_replay)
        self.background_repeat = check_flag("background_repeat", background_repeat)
        self.overlap = check_flag("overlap", overlap)
        self.literal = check_flag("literal", literal)
        self.previous: dict[str, Tensor] = {}   # what step t-1 handed over
        self.plan: dict[str, Tensor] = {}       # the step's replay numbers (on_step_start)
        self.handover: dict[str, Tensor] = {}   # what this step hands on (on_fit_end)
        self._on: dict[str, Tensor] = {}        # ``previous`` on the training device

    @property
    def threshold_logit(self) -> float:
        return 0.5 if self.literal else 0.0

    # ---- set-up -------------------------------------------------------------------------------
    def add_classes(self, model: nn.Module, n_new: int) -> None:
        """New classifiers start at random, the main one's weights He-normal (the reference's
        ``_init_classifier``; its checkpoint then loads the old ones)."""
        model.add_step(n_new, init_balanced=False)
        nn.init.kaiming_normal_(classifier_heads(model)[0].convs[-1].weight)

    def load_previous_step(self, state: dict[str, Any]) -> None:
        self.previous = {k: v for k, v in (state or {}).items() if isinstance(v, Tensor)}

    def setup(self, ctx: StepContext) -> None:
        super().setup(ctx)
        if ctx.step == 0:
            return
        missing = [k for k in (*STATISTICS, "numbers") if k not in self.previous]
        if missing:
            raise CheckpointError(
                f"STAR at step {ctx.step} replays the class prototypes of step {ctx.step - 1}, "
                f"and its model file holds no {', '.join(missing)}; rerun step {ctx.step - 1} "
                "with method=star (delete its model file)")
        k = ctx.num_old - 1
        if self.previous["prototypes"].shape[0] != k or self.previous["numbers"].shape[0] != k + 1:
            raise CheckpointError(
                f"STAR at step {ctx.step}: the model file of step {ctx.step - 1} holds "
                f"prototypes of {self.previous['prototypes'].shape[0]} classes, not the {k} "
                "old foreground classes; rerun that step")

    def on_train_mode(self, model: nn.Module) -> None:
        """DKD's frozen BatchNorms, and from step 1 dropout off (the reference's
        ``freeze_dropout``; this suite's models have none of their own)."""
        super().on_train_mode(model)
        if self.ctx is not None and self.ctx.step >= 1:
            for m in model.modules():
                if isinstance(m, nn.Dropout):
                    m.eval()

    def _previous_on(self, device: torch.device) -> dict[str, Tensor]:
        if not self._on or next(iter(self._on.values())).device != device:
            self._on = {k: v.to(device) for k, v in self.previous.items()}
        return self._on

    # ---- before the first iteration: how many features to replay ----------------------------
    @torch.no_grad()
    def on_step_start(self, model: nn.Module, old_model: nn.Module,
                      train_loader: Iterable) -> None:
        """One pass of the old model over the step's data (the reference's
        ``compute_pred_number``): per old class, how many background-labelled pixels it
        predicts as that class; and the background pixels it leaves as background."""
        num_old = self.ctx.num_old
        device = next(old_model.parameters()).device
        predicted = torch.zeros(num_old, dtype=torch.float64, device=device)
        iterations = 0
        for batch in _first_epoch(train_loader):
            images, labels = batch[0].to(device), batch[1].to(device)
            out = old_model(images)
            pred = old_sigmoid_prediction(out.logits, self.threshold_logit)
            size = out.features["decoder"].shape[-2:]
            small, pred_small = subsample_labels(labels, size), subsample_labels(pred, size)
            predicted += torch.bincount(pred_small[small == 0], minlength=num_old).double()
            iterations += 1
        if _distributed():
            torch.distributed.all_reduce(predicted)
        self.plan = {k: v.cpu() for k, v in replay_plan(
            self.previous["numbers"], predicted.cpu(), max(iterations, 1),
            self.ctx.num_classes - num_old, self.overlap).items()}
        log.info("STAR step %d: per iteration %d replayed features (per old class %s), "
                 "background repeat ratio %.3f", self.ctx.step, int(self.plan["per_iter"].sum()),
                 self.plan["per_iter"].tolist(), float(self.plan["extra_bg_ratio"]))

    # ---- the loss -----------------------------------------------------------------------------
    def segmentation_loss(self, out: SegOutput, labels: Tensor) -> Tensor:
        """Step 0: the BCE on every head. From step 1 the BCE of the main head is normalised
        with the replay's weights, which need the old model: :meth:`terms` returns it as
        ``seg`` (in place of this zero)."""
        if self.ctx.step == 0:
            return super().segmentation_loss(out, labels)
        return out.logits.new_zeros(())

    def _new_logits(self, features: Tensor) -> Tensor:
        """The new classifiers' logits of ``N x D`` features, as ``1 x K_new x N x 1`` (the
        reference passes replayed features through its classifiers as a 1 x D x N x 1 map)."""
        conv = classifier_heads(self.ctx.model)[0].convs[-1]
        return conv(features.T.reshape(1, features.shape[1], -1, 1))

    def terms(self, batch: Batch, out: SegOutput, old_out: SegOutput) -> dict[str, Tensor]:
        if not self.plan:
            raise RuntimeError("STAR's replay numbers are set by on_step_start (or a resumed "
                               "state) before its first batch")
        labels, z = batch.labels, out.logits
        f, f_old = out.features["decoder"], old_out.features["decoder"]
        prev = self._previous_on(f.device)
        first = self.first_new
        with torch.no_grad():
            pred = old_sigmoid_prediction(old_out.logits, self.threshold_logit)
            background = labels == 0
            old_region = (background & (pred > 0)).unsqueeze(1)
            kept_bg = subsample_labels(background & (pred == 0), f.shape[-2:])
        cells = f.shape[0] * f.shape[-2] * f.shape[-1]
        zero = z.new_zeros(())
        fake_loss, w_fake = zero, 0.0
        if self.prototype_replay:
            # the draws come from a generator seeded by the global (checkpointed) CPU stream,
            # so a resumed run replays the same features on any device
            gen = torch.Generator(device=f.device)
            gen.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
            fake = sample_prototype_features(
                prev["prototypes"], prev["noise"], prev["norm_mean"], prev["norm_std"],
                self.plan["per_iter"], gen, norm_per_element=self.literal).to(f.dtype)
            if fake.shape[0]:
                logits = self._new_logits(fake)
                fake_loss = per_class_bce(logits, torch.zeros_like(logits))
                w_fake = fake.shape[0] / cells
        bg_loss, w_bg = zero, 0.0
        if self.background_repeat and bool(kept_bg.any()):
            picked = f.permute(0, 2, 3, 1)[kept_bg]                      # M x D, with gradient
            logits = self._new_logits(picked)
            bg_loss = per_class_bce(logits, torch.zeros_like(logits))
            w_bg = float(self.plan["extra_bg_ratio"]) * picked.shape[0] / cells
        denom = 1 + w_fake + w_bg
        seg = self.classification_loss(z, labels) / denom
        for aux in out.aux:
            seg = seg + self.classification_loss(aux, labels)
        channels = torch.arange(first, z.shape[1], device=labels.device).view(1, -1, 1, 1)
        targets = (labels.unsqueeze(1) == channels)
        return {
            "seg": seg,
            "proto_replay": self.bce_weight * w_fake * fake_loss / denom,
            "bg_repeat": self.bce_weight * w_bg * bg_loss / denom,
            "ocfm": self.ocfm_weight * feature_distillation_in_region(f, f_old, old_region),
            "sad": self.sad_weight * prototype_separation(f, targets, prev["prototypes"]),
        }

    # ---- after the step: what the next step replays -----------------------------------------
    @torch.no_grad()
    def on_fit_end(self, model: nn.Module, train_loader: Iterable) -> None:
        """The trained model's pass over the step's data (the reference's
        ``compute_cls_number``, ``compute_prototypes`` and ``compute_noise``, in eval mode):
        the step's classes' statistics, appended to the old ones."""
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            sums, background = self._class_sums(model, train_loader)
        finally:
            for m, mode in modes.items():
                m.training = mode
        stats = class_statistics(sums)
        step = self.ctx.step
        if self.literal and step >= 1:  # (b): the k-th row of old + new prototypes
            rows = torch.cat([self.previous["prototypes"], stats["prototypes"].cpu()])
            stats = class_statistics(sums, rows[:sums["count"].shape[0]].to(sums["unit"]))
        stats = {k: v.cpu() for k, v in stats.items()}
        if step == 0:
            numbers = torch.cat([background.float().view(1).cpu(), stats["counts"]])
            self.handover = {k: stats[k] for k in STATISTICS}
        else:
            numbers = torch.cat([self.plan["numbers"], stats["counts"]])
            self.handover = {k: torch.cat([self.previous[k], stats[k]]) for k in STATISTICS}
        self.handover["numbers"] = numbers
        empty = [int(c) for c, n in zip(range(self.first_new, self.ctx.num_classes),
                                         stats["counts"]) if n == 0]
        if empty:
            log.warning("STAR step %d: classes %s have no pixel at the decoder's resolution "
                        "in the step's data: nothing of them will be replayed", step, empty)

    def _class_sums(self, model: nn.Module, train_loader: Iterable) -> tuple[ClassSums, Tensor]:
        device = next(model.parameters()).device
        classes = torch.arange(self.first_new, self.ctx.num_classes, device=device)
        sums, background = ClassSums(), torch.zeros((), dtype=torch.float64, device=device)
        for batch in _first_epoch(train_loader):
            images, labels = batch[0].to(device), batch[1].to(device)
            f = model(images).features["decoder"]
            small = subsample_labels(labels, f.shape[-2:])
            sums.add(class_sums(f, small, classes))
            background += (small == 0).sum()
        if not sums:
            raise CheckpointError(f"STAR step {self.ctx.step}: the step's training data yielded "
                                  "no batch to compute the class prototypes from")
        if _distributed():
            for v in (*sums.values(), background):
                torch.distributed.all_reduce(v)
        return sums, background

    def next_step_state(self) -> dict[str, Any]:
        return dict(self.handover)

    # ---- exact resume -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"plan": dict(self.plan)} if self.plan else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("plan"):
            self.plan = dict(state["plan"])

"""StudentModule: an incremental step t >= 1 against the frozen model of step t-1.

A method is a set of loss terms with weights (conf/method/*.yaml), not a subclass:
    ft   CE                              lwf  CE + 100 KD
    ilt  CE + 100 KD + 100 FFM-feature MSE  mib  unbiased CE + 10 unbiased KD (+ init_balanced)
KD terms act on the main head only (as MiB and the paper's code do).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from incseg.errors import ConfigError
from incseg.losses import (
    feature_distillation,
    knowledge_distillation,
    replay_loss,
    unbiased_knowledge_distillation,
)
from incseg.models import BiSeNet
from incseg.stability import sgd_stability_bound, top_hessian_eigenvalue
from incseg.systems.base import Recipe, SegmentationSystem
from incseg.tasks import Task

log = logging.getLogger(__name__)

LOSSES = ("ce", "unbiased_ce")
KDS = ("none", "kd", "ukd")
FEATURES = ("body", "ffm")
FEAT_BN = ("batch", "running")
REPLAY_BN = ("running", "batch", "teacher")


@contextmanager
def _bn_mode(model: torch.nn.Module, training: bool, track_running_stats: bool | None = None):
    """Set every BatchNorm of ``model`` to ``training`` (and ``track_running_stats``) for the
    block, whatever mode the rest of the model is in; restored afterwards."""
    saved = []
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            saved.append((mod, mod.training, mod.track_running_stats))
            mod.training = training
            if track_running_stats is not None:
                mod.track_running_stats = track_running_stats
    try:
        yield model
    finally:
        for mod, training_, track in saved:
            mod.training, mod.track_running_stats = training_, track


def running_statistics(model: torch.nn.Module):
    """Run ``model``'s BatchNorms on their running statistics (as in eval mode), without
    updating them, while the rest of the model stays in training mode.

    The replay forward of the student uses it: the frozen teacher scores the synthetic batch
    with running statistics, so a train-mode student would differ from it by the BN mode alone
    (on `shapes` 15-5 the replay MSE of a student equal to its teacher is 1.4, 15% of the
    logits' mean square) and be pushed to distort its weights to close that gap; and synthetic
    batches would leak into the running statistics used at test time.
    """
    return _bn_mode(model, training=False)


@contextmanager
def teacher_statistics(model: torch.nn.Module, teacher: torch.nn.Module):
    """Run ``model``'s BatchNorms in eval mode on the *teacher's* running statistics (the
    BatchNorms are paired by name; the student is a copy of its teacher, so every one has a
    twin), without updating any buffer; restored afterwards.

    Why one would: the synthetic images are made to match the teacher's BN statistics (the
    old data's), while the student's own running statistics drift within a few iterations toward
    the current step's data (on 15-5s, images of one class), so with ``bn=running`` part of the
    replay distance measures that drift rather than the weights'. Measured (15-5s, seed 0, mse,
    ``inversion=cpu_small``): it did *not* cure the instability it was written for, the replay
    MSE still starts each step at ~1 and the model collapsed at step 4 instead of step 5 (final
    old / new / all 0.441 / 0.157 / 0.374 against 0.284 / 0.168 / 0.256 with ``bn=running``);
    the KL distance, ~100x smaller, ran stable. Kept as an ablation; the default is ``running``.
    """
    twins = dict(teacher.named_modules())
    pairs = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            twin = twins.get(name)
            if not isinstance(twin, torch.nn.modules.batchnorm._BatchNorm) or \
                    twin.running_mean is None or twin.running_mean.shape != mod.running_mean.shape:
                raise ValueError(f"replay.bn=teacher: the teacher has no BatchNorm {name!r} "
                                 "matching the student's")
            pairs.append((mod, twin))
    saved = [(mod, mod.running_mean, mod.running_var) for mod, _ in pairs]
    for mod, twin in pairs:
        mod._buffers["running_mean"] = twin.running_mean
        mod._buffers["running_var"] = twin.running_var
    try:
        with running_statistics(model):  # eval-mode BN on the swapped-in statistics
            yield model
    finally:
        for mod, mean, var in saved:
            mod._buffers["running_mean"], mod._buffers["running_var"] = mean, var


def batch_statistics(model: torch.nn.Module):
    """Run ``model``'s BatchNorms on the batch's statistics without touching their buffers.

    The student trains with BN in training mode (batch statistics); a teacher in eval mode
    normalises with running statistics. On batches drawn from a few new classes the two differ
    a lot (on `shapes` 15-5s, the step-0 model's layer4 features differ by 37% of their energy
    between the modes), so a feature MSE against an eval-mode teacher penalises the BN mode,
    not the drift of the weights. Inside this context the teacher normalises like the student:
    at the start of a step the two features are equal and the MSE is 0.
    """
    return _bn_mode(model, training=True, track_running_stats=False)  # no buffer update


@dataclass
class MethodSpec:
    name: str = "mib"
    loss: str = "unbiased_ce"
    kd: str = "ukd"
    kd_weight: float = 10.0
    kd_alpha: float = 1.0
    feat_weight: float = 0.0
    feat_layer: str = "body"
    feat_bn: str = "batch"
    init_balanced: bool = True

    def __post_init__(self):
        for key, value, valid in (("loss", self.loss, LOSSES), ("kd", self.kd, KDS),
                                  ("feat_layer", self.feat_layer, FEATURES),
                                  ("feat_bn", self.feat_bn, FEAT_BN)):
            if value not in valid:
                raise ConfigError(f"method.{key}={value!r} is not valid; use one of "
                                  f"{', '.join(valid)}")


@dataclass
class ReplaySpec:
    """Replay in the student (SPEC 6.2): w * D(z_student, z_teacher) on a synthetic batch.

    ``loss``: mse (first C_o channels, the paper's best), kl (T^2 KL(teacher||student)), ukd
    (MiB's unbiased KD on the student's full logits). The three differ in scale, so the weight
    is per loss. ``check``: power iterations for the curvature test at the start of the step
    (:meth:`StudentModule.check_replay_stability`; 0 = off).
    """

    kind: str = "deepinversion"
    loss: str = "mse"
    weight: float = 1.0
    temperature: float = 1.0
    bn: str = "running"
    background: str = "unbiased"
    check: int = 20

    def __post_init__(self):
        if self.background not in ("unbiased", "plain"):
            raise ConfigError(f"replay.background={self.background!r} is not valid; use "
                              "unbiased or plain")
        if self.bn not in REPLAY_BN:
            raise ConfigError(f"replay.bn={self.bn!r} is not valid; use one of "
                              f"{', '.join(REPLAY_BN)}")


def freeze(model: BiSeNet) -> BiSeNet:
    """Frozen previous model: eval mode (BN running statistics fixed), no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class StudentModule(SegmentationSystem):
    """Step t >= 1: the method's losses against ``old_model`` (frozen; never updated)."""

    def __init__(self, model: BiSeNet, old_model: BiSeNet, task: Task, step: int,
                 recipe: Recipe, method: MethodSpec, replay: ReplaySpec | None = None):
        super().__init__(model, task, step, recipe)
        self.old_model = freeze(old_model)
        self.method = method
        self.replay = replay
        self.num_old = len(task.classes_before(step))
        self.replay_stability: dict | None = None  # check_replay_stability's figures
        self._replay_left_out = 0  # replay images the student could not score, this epoch
        if old_model.num_classes != self.num_old:
            raise ConfigError(f"the previous model has {old_model.num_classes} outputs but "
                              f"{self.num_old} classes were seen before step {step}")

    def train(self, mode: bool = True):
        super().train(mode)
        self.old_model.eval()  # Lightning puts every submodule in train mode: not this one
        return self

    def training_loss(self, images: Tensor, labels: Tensor,
                      replay: Tensor | None = None) -> dict[str, Tensor]:
        """L = L_B + lambda L_KD (+ ILT feature term) (+ w D_replay on the synthetic batch)."""
        m = self.method
        out = self.model(images)
        with torch.no_grad():
            old = self.old_model(images)
        num_old = self.num_old if m.loss == "unbiased_ce" else None
        terms = {"seg": self.segmentation_loss(out, labels, num_old)}
        if m.kd == "kd":
            terms["kd"] = m.kd_weight * knowledge_distillation(out.logits, old.logits, m.kd_alpha)
        elif m.kd == "ukd":
            terms["kd"] = m.kd_weight * unbiased_knowledge_distillation(out.logits, old.logits,
                                                                        m.kd_alpha)
        if m.feat_weight:
            old_feat = old.features[m.feat_layer]
            if m.feat_bn == "batch":  # like the student: see batch_statistics
                with torch.no_grad(), batch_statistics(self.old_model):
                    old_feat = self.old_model(images).features[m.feat_layer]
            terms["feat"] = m.feat_weight * feature_distillation(out.features[m.feat_layer],
                                                                 old_feat)
        if replay is not None and self.replay is not None:
            terms["replay"] = self.replay_term(replay)
        terms["loss"] = sum(terms.values())
        return terms

    def replay_term(self, replay: Tensor, count: bool = True) -> Tensor:
        """``w * D(student, teacher)`` on a synthetic batch (SPEC 6.2); no labels needed."""
        # Both models see the synthetic batch (paper Fig. 4, blue path).
        if self.replay.bn == "running":  # like the teacher: see running_statistics
            with running_statistics(self.model):
                z = self.model(replay).logits
        elif self.replay.bn == "teacher":  # the old data's statistics: teacher_statistics
            with teacher_statistics(self.model, self.old_model):
                z = self.model(replay).logits
        else:  # batch statistics of the synthetic batch (and their running average)
            z = self.model(replay).logits
        with torch.no_grad():
            z_old = self.old_model(replay).logits
        # An image the teacher itself cannot score (non-finite or absurd logits: an
        # under-trained teacher's tiny BN variances blow up on out-of-distribution inputs
        # such as the noise control; a softmax is one-hot long before |z| = 1e4, while the
        # squared distance of such logits overflows) carries no knowledge to distil: it is
        # left out, never averaged in.
        # The same for the student: near-zero running variances amplify small weight
        # changes on such inputs; an image it cannot score yet gives no usable gradient. (On
        # images the teacher scores, that is a student diverging: counted and reported.)
        def sane(t: torch.Tensor) -> torch.Tensor:
            return (torch.isfinite(t) & (t.abs() < 1e4)).flatten(1).all(dim=1)

        teacher_ok = sane(z_old)
        usable = teacher_ok & sane(z.detach())
        if count:
            self._replay_left_out += int((teacher_ok & ~usable).sum())
        if not bool(usable.all()):
            z, z_old = z[usable], z_old[usable]
        if z.shape[0] == 0:  # nothing to distil
            return z.sum() * 0.0
        return self.replay.weight * replay_loss(self.replay.loss, z, z_old,
                                                self.replay.temperature,
                                                self.replay.background)

    def check_replay_stability(self, images: Tensor) -> dict:
        """The curvature test (:mod:`incseg.stability`): the largest Hessian eigenvalue of the
        weighted replay term on ``images`` at the current weights, against the largest
        curvature that this step's SGD (initial lr, momentum, Nesterov) can follow. Above it,
        training diverges along that direction (MSE replay on `shapes` 15-5s: 364-1577 against
        271); a warning says which weight would fit. Leaves weights, buffers and the global
        random state as they were."""
        r = self.recipe
        bound = sgd_stability_bound(r.lr, r.momentum, r.nesterov)
        params = [p for p in self.model.parameters() if p.requires_grad]
        buffers = {k: v.clone() for k, v in self.model.named_buffers()}  # bn=batch updates them
        try:
            lam = top_hessian_eigenvalue(lambda: self.replay_term(images, count=False), params,
                                         iters=self.replay.check)
        finally:
            with torch.no_grad():
                for k, v in self.model.named_buffers():
                    v.copy_(buffers[k])
        self.replay_stability = {"sharpness": round(lam, 4),
                                 "stability_bound": round(bound, 4)}
        if lam > bound:
            fit = self.replay.weight * bound / lam
            log.warning(
                "step %d replay: the largest curvature of %g * %s (%.0f) is above %.0f, the "
                "most that SGD with lr %g and %smomentum %g can follow: training is likely to "
                "diverge; use replay.weight below %.2g or replay.loss=kl", self.step,
                self.replay.weight, self.replay.loss, lam, bound, r.lr,
                "Nesterov " if r.nesterov else "", r.momentum, fit)
        return self.replay_stability

    def on_train_start(self) -> None:
        if self.replay is None or not self.replay.check or self.global_step > 0:
            return  # off, or resumed mid-step (the figures travel with the epoch checkpoint)
        dm = getattr(self.trainer, "datamodule", None)
        ds = getattr(dm, "replay_dataset", None)
        if ds is None or len(ds) == 0:
            return
        # a fixed, class-mixed batch; (index, seed) reads are deterministic and leave the
        # augmentation streams of training alone
        idx = np.linspace(0, len(ds) - 1, num=min(8, len(ds))).round().astype(int)
        images = torch.stack([ds[(int(i), 0)] for i in idx]).to(self.device)
        self.check_replay_stability(self._prepare(images))

    def on_train_epoch_end(self) -> None:
        if self._replay_left_out:
            log.warning(
                "step %d epoch %d replay: the student could not score %d replay images that "
                "its teacher scores (non-finite or |logit| >= 1e4): training is diverging; "
                "lower replay.weight or use replay.loss=kl", self.step, self.current_epoch,
                self._replay_left_out)
        self._replay_left_out = 0
        super().on_train_epoch_end()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["incseg_replay_stability"] = self.replay_stability

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.replay_stability = checkpoint.get("incseg_replay_stability",
                                               self.replay_stability)

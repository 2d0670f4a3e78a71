"""StudentModule: an incremental step t >= 1 against the frozen model of step t-1.

A method is a set of loss terms with weights (conf/method/*.yaml), not a subclass:
    ft   CE                              lwf  CE + 100 KD
    ilt  CE + 100 KD + 100 FFM-feature MSE  mib  unbiased CE + 10 unbiased KD (+ init_balanced)
KD terms act on the main head only (as MiB and the paper's code do).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

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
from incseg.systems.base import Recipe, SegmentationSystem
from incseg.tasks import Task

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
    is per loss.
    """

    kind: str = "deepinversion"
    loss: str = "mse"
    weight: float = 1.0
    temperature: float = 1.0
    bn: str = "running"
    background: str = "unbiased"

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
            # Both models see the synthetic batch (paper Fig. 4, blue path); no labels needed.
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
            # changes on such inputs; an image it cannot score yet gives no usable gradient.
            def sane(t: torch.Tensor) -> torch.Tensor:
                return (torch.isfinite(t) & (t.abs() < 1e4)).flatten(1).all(dim=1)

            usable = sane(z_old) & sane(z.detach())
            if not bool(usable.all()):
                z, z_old = z[usable], z_old[usable]
            terms["replay"] = (z.sum() * 0.0 if z.shape[0] == 0  # nothing to distil
                               else self.replay.weight * replay_loss(
                                   self.replay.loss, z, z_old, self.replay.temperature,
                                   self.replay.background))
        terms["loss"] = sum(terms.values())
        return terms

"""The student's replay term (Di Salvo et al., Fig. 4): ``w * D(student, teacher)`` on a batch
of synthetic images of the old classes, with no labels needed.

``D``: ``mse`` (on the first C_o channels, the paper's best), ``kl`` (T^2 KL(teacher||student)),
``ukd`` (MiB's unbiased KD on the student's full logits). The three differ in scale, so the
weight is per distance. A method of one sigmoid per class (DKD, STAR; ``prediction``) gets the
sigmoid forms: ``mse`` on the old classes' sigmoids, ``kl`` a sum of per-class Bernoulli KLs;
``ukd`` and the teacher-label CE (softmax losses) are refused. Before a step trains, a curvature
test (:mod:`incseg.stability`) checks that SGD at the step's learning rate can follow the
weighted term at all.

Two options aim at the new-class cost of replay (new classes lose a little mIoU with every
distance): ``label_weight`` adds a cross-entropy on the synthetic batch with the teacher's pixel
predictions as labels, its background read as "background or a new class" (MiB's unbiased view,
so replay never teaches that a new class is absent: the "half-real, half-fake" direction of
Smith et al., 2021); ``decay`` lowers the replay weight over the step (linear or cosine to 0), so
the last iterations fit the new classes alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from incseg.losses import REPLAY_LOSSES, cross_entropy, old_view, replay_loss
from incseg.models.norm import running_statistics, teacher_statistics
from incseg.prediction import check_prediction
from incseg.stability import sgd_stability_bound, top_hessian_eigenvalue

log = logging.getLogger(__name__)

REPLAY_KINDS = ("deepinversion", "noise", "exemplars")
REPLAY_BN = ("running", "batch", "teacher")
BACKGROUNDS = ("unbiased", "plain")
DECAYS = ("none", "linear", "cosine")


def decay_factor(decay: str, progress: float) -> float:
    """The replay weight's multiplier at ``progress`` in [0, 1] of the step's iterations:
    1 throughout (``none``), ``1 - p`` (``linear``) or ``(1 + cos(pi p)) / 2`` (``cosine``)."""
    p = min(max(float(progress), 0.0), 1.0)
    if decay == "linear":
        return 1.0 - p
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    return 1.0


@dataclass
class ReplaySpec:
    """What the student does with a synthetic batch.

    ``bn``: which BatchNorm statistics the student scores it with (``running``: its own, like
    the teacher; ``teacher``: the teacher's; ``batch``: the synthetic batch's). ``background``:
    ``unbiased`` compares the student's logsumexp(background, new classes) with the teacher's
    background. ``check``: power iterations of the curvature test (0 = off). ``label_weight``:
    the teacher-label cross-entropy's weight (0 = off); ``decay``: ``none``, ``linear`` or
    ``cosine`` (module docstring).
    """

    kind: str = "deepinversion"
    loss: str = "mse"
    weight: float = 1.0
    temperature: float = 1.0
    bn: str = "running"
    background: str = "unbiased"
    check: int = 20
    label_weight: float = 0.0
    decay: str = "none"
    prediction: str = "argmax"

    def __post_init__(self):
        for key, valid in (("kind", REPLAY_KINDS), ("loss", REPLAY_LOSSES), ("bn", REPLAY_BN),
                           ("background", BACKGROUNDS), ("decay", DECAYS)):
            if getattr(self, key) not in valid:
                raise ValueError(f"{key}={getattr(self, key)!r} is not valid; use one of "
                                 f"{', '.join(valid)}")
        self.weight, self.temperature = float(self.weight), float(self.temperature)
        self.label_weight = float(self.label_weight)
        for key in ("weight", "label_weight"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key}={getattr(self, key):g} must be >= 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature:g} must be > 0")
        self.check = int(self.check)
        check_prediction(self.prediction)
        if self.prediction == "sigmoid":
            # the method's rule: one sigmoid per class, background where none exceeds 0.5
            if self.loss == "ukd":
                raise ValueError(
                    "loss=ukd is MiB's unbiased distillation over one softmax, and the method "
                    "predicts with one sigmoid per class (DKD, STAR); use replay.loss=mse or "
                    "replay.loss=kl, which compare the old classes' sigmoids")
            if self.label_weight:
                raise ValueError(
                    f"label_weight={self.label_weight:g}: the teacher-label cross-entropy is a "
                    "softmax loss, and the method predicts with one sigmoid per class (DKD, "
                    "STAR); use replay.label_weight=0")

    @classmethod
    def from_config(cls, rc: Mapping[str, Any] | None, prediction: str = "argmax"
                    ) -> ReplaySpec | None:
        """The spec of a ``replay`` config group (None for ``replay=none``); ``weight: null``
        takes the per-distance default of ``weights``. ``prediction``: the method's rule
        (:attr:`incseg.methods.Method.prediction`), which the distance follows."""
        if rc is None or rc.get("name", "none") == "none":
            return None
        loss = rc.get("loss")
        weight = rc.get("weight")
        if weight is None:
            weight = (rc.get("weights") or {}).get(loss, 1.0)
        return cls(kind=str(rc["name"]), loss=str(loss), weight=weight,
                   temperature=rc.get("temperature", 1.0), bn=str(rc.get("bn", "running")),
                   background=str(rc.get("background", "unbiased")),
                   check=rc.get("check", 20), label_weight=rc.get("label_weight", 0.0),
                   decay=str(rc.get("decay", "none")), prediction=prediction)


def _sane(t: Tensor) -> Tensor:
    """Per image: every logit finite and below 1e4 in magnitude."""
    return (torch.isfinite(t) & (t.abs() < 1e4)).flatten(1).all(dim=1)


class ReplayTerm:
    """``w * D(student, teacher)`` on a synthetic batch; given to the student's constructor.

    ``check_images``: a fixed, class-mixed batch of the replay set for the curvature test.
    ``left_out`` counts, per epoch, the images the teacher scores but the student cannot.
    ``progress`` (the fraction of the step's iterations done) is set by the student before each
    batch; only ``decay`` reads it.
    """

    def __init__(self, spec: ReplaySpec, check_images: Tensor | None = None) -> None:
        self.spec = spec
        self.check_images = check_images
        self.left_out = 0
        self.progress = 0.0

    def __call__(self, model: nn.Module, old_model: nn.Module, images: Tensor,
                 count: bool = True) -> Tensor:
        s = self.spec
        # Both models see the synthetic batch (paper Fig. 4, blue path).
        if s.bn == "running":  # like the teacher: see running_statistics
            with running_statistics(model):
                z = model(images).logits
        elif s.bn == "teacher":  # the old data's statistics: see teacher_statistics
            with teacher_statistics(model, old_model):
                z = model(images).logits
        else:  # batch statistics of the synthetic batch (and their running average)
            z = model(images).logits
        with torch.no_grad():
            z_old = old_model(images).logits
        # An image the teacher itself cannot score (non-finite or absurd logits: an
        # under-trained teacher's tiny BN variances blow up on out-of-distribution inputs such
        # as the noise control; a softmax is one-hot long before |z| = 1e4, while the squared
        # distance of such logits overflows) carries no knowledge to distil: it is left out.
        # The same for the student; on images the teacher scores, that is a student diverging:
        # counted and reported.
        teacher_ok = _sane(z_old)
        usable = teacher_ok & _sane(z.detach())
        if count:
            self.left_out += int((teacher_ok & ~usable).sum())
        if not bool(usable.all()):
            z, z_old = z[usable], z_old[usable]
        if z.shape[0] == 0:  # nothing to distil
            return z.sum() * 0.0
        loss = s.weight * replay_loss(s.loss, z, z_old, s.temperature, s.background,
                                      s.prediction)
        if s.label_weight:
            # the teacher's argmax over its C_o classes as labels; the student's background is
            # logsumexp(background, new classes) whatever ``background`` says for the distance
            labels = z_old.argmax(dim=1)
            loss = loss + s.label_weight * cross_entropy(old_view(z, z_old.shape[1]), labels)
        return decay_factor(s.decay, self.progress) * loss

    def check_stability(self, model: nn.Module, old_model: nn.Module, images: Tensor,
                        lr: float, momentum: float, nesterov: bool, step: int) -> dict:
        """The largest Hessian eigenvalue of the weighted term on ``images`` at the current
        weights, against the largest curvature SGD (lr, momentum, Nesterov) can follow; above
        it, training diverges along that direction (docs/measurements.md). A warning says which
        weight would fit. Leaves weights, buffers and the global random state as they were."""
        s = self.spec
        bound = sgd_stability_bound(lr, momentum, nesterov)
        params = [p for p in model.parameters() if p.requires_grad]
        buffers = {k: v.clone() for k, v in model.named_buffers()}  # bn=batch updates them
        try:
            lam = top_hessian_eigenvalue(lambda: self(model, old_model, images, count=False),
                                         params, iters=s.check)
        finally:
            with torch.no_grad():
                for k, v in model.named_buffers():
                    v.copy_(buffers[k])
        if lam > bound:
            # the curvature is linear in the weights: scaling every weight of the term by
            # bound / lam brings it to the bound (the label CE is not scaled by replay.weight)
            fit = bound / lam
            term = f"{s.weight:g} * {s.loss}"
            if s.prediction == "sigmoid":
                term += " of the old classes' sigmoids"
            if s.label_weight:
                term += f" + {s.label_weight:g} * teacher-label CE"
                fix = (f"scale replay.weight and replay.label_weight by {fit:.2g} "
                       f"(to {s.weight * fit:.2g} and {s.label_weight * fit:.2g})")
            else:
                fix = f"use replay.weight below {s.weight * fit:.2g}"
            if s.loss != "kl":  # advising KL to a KL run would send the user in a circle
                fix += " or replay.loss=kl"
            log.warning(
                "step %d replay: the largest curvature of %s (%.0f) is above %.0f, the most "
                "that SGD with lr %g and %smomentum %g can follow: training is likely to "
                "diverge; %s", step, term, lam, bound, lr, "Nesterov " if nesterov else "",
                momentum, fix)
        return {"sharpness": round(lam, 4), "stability_bound": round(bound, 4)}

"""The replay options aimed at the new-class cost: the teacher-label CE on the synthetic batch and
the decaying replay weight, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from incseg.models.base import SegOutput
from incseg.replay.term import ReplaySpec, ReplayTerm, decay_factor


class Fixed(nn.Module):
    """A "model" whose logits are given per pixel: a list of P lists of C scores gives
    1 x C x 1 x P logits (repeated over the batch)."""

    def __init__(self, pixels):
        super().__init__()
        z = torch.tensor(pixels, dtype=torch.float32)  # P x C
        self.z = nn.Parameter(z.T.reshape(1, z.shape[1], 1, z.shape[0]))

    def forward(self, x):
        return SegOutput(self.z.expand(x.shape[0], -1, -1, -1))


@pytest.mark.parametrize(("decay", "p", "want"), [
    ("none", 0.7, 1.0), ("linear", 0.25, 0.75), ("linear", 1.0, 0.0), ("cosine", 0.5, 0.5),
    ("cosine", 1 / 3, 0.75), ("cosine", 0.0, 1.0), ("linear", 1.5, 0.0),
])
def test_decay_factor(decay, p, want):
    assert decay_factor(decay, p) == pytest.approx(want)


def test_teacher_label_ce_hand_computed():
    # two pixels; student: 3 channels (background, one old class, one new), all logits 0
    # teacher: pixel 0 says background (2 > 0), pixel 1 says class 1 (0 < 3)
    student = Fixed([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    teacher = Fixed([[2.0, 0.0], [0.0, 3.0]])
    x = torch.zeros(1, 3, 1, 2)
    term = ReplayTerm(ReplaySpec(loss="kl", weight=0.0, label_weight=1.0))
    # background pixel: the student's background is logsumexp(bg, new) = log 2 against class 1's
    # 0: -log(2/3); class-1 pixel: -log(1/3); the mean over the two pixels
    want = (math.log(1.5) + math.log(3.0)) / 2
    assert term(student, teacher, x).item() == pytest.approx(want, rel=1e-6)
    # with a label weight of 0.5 and the KL distance on as well, the two add up
    kl_only = ReplayTerm(ReplaySpec(loss="kl", weight=1.0))(student, teacher, x).item()
    both = ReplayTerm(ReplaySpec(loss="kl", weight=1.0, label_weight=0.5))(student, teacher, x)
    assert both.item() == pytest.approx(kl_only + 0.5 * want, rel=1e-6)


def test_label_ce_off_leaves_the_distance_unchanged():
    student = Fixed([[0.3, -0.2, 0.1]])
    teacher = Fixed([[1.0, 0.0]])
    x = torch.zeros(2, 3, 1, 1)
    a = ReplayTerm(ReplaySpec(loss="mse", weight=0.1))(student, teacher, x)
    b = ReplayTerm(ReplaySpec(loss="mse", weight=0.1, label_weight=0.0, decay="none"))(
        student, teacher, x)
    assert a.item() == b.item() and a.item() > 0


def test_decay_scales_the_whole_term_by_progress():
    student = Fixed([[0.3, -0.2, 0.1]])
    teacher = Fixed([[1.0, 0.0]])
    x = torch.zeros(2, 3, 1, 1)
    full = ReplayTerm(ReplaySpec(loss="kl", weight=1.0, label_weight=1.0))(student, teacher, x)
    term = ReplayTerm(ReplaySpec(loss="kl", weight=1.0, label_weight=1.0, decay="linear"))
    term.progress = 0.75
    assert term(student, teacher, x).item() == pytest.approx(0.25 * full.item(), rel=1e-6)
    term.progress = 0.0
    assert term(student, teacher, x).item() == pytest.approx(full.item(), rel=1e-6)


@pytest.mark.parametrize(("kwargs", "msg"), [
    ({"label_weight": -1}, "label_weight=-1 must be >= 0"),
    ({"decay": "exp"}, "decay='exp' is not valid"),
])
def test_spec_refuses_out_of_range(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        ReplaySpec(**kwargs)


def test_from_config_reads_the_new_keys():
    spec = ReplaySpec.from_config({"name": "deepinversion", "loss": "kl", "weights": {"kl": 1.0},
                                   "label_weight": 0.5, "decay": "cosine"})
    assert (spec.label_weight, spec.decay) == (0.5, "cosine")
    old = ReplaySpec.from_config({"name": "deepinversion", "loss": "kl", "weights": {"kl": 1.0}})
    assert (old.label_weight, old.decay) == (0.0, "none")

"""The curvature test behind replay.check: SGD's stability bound, the power iteration for the
Hessian's top eigenvalue, and the student's check at the start of a step."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from incseg.methods.mib import MiB
from incseg.models import build_model
from incseg.replay.term import ReplaySpec, ReplayTerm
from incseg.stability import sgd_stability_bound, top_hessian_eigenvalue
from incseg.systems import StudentModule
from incseg.systems.base import Recipe
from incseg.tasks import get_task


def test_sgd_stability_bound_hand_values():
    # Nesterov, b = 0.9: 2 * 1.9 / 2.8 / 0.005 = 271.43 (the 15-5s recipe)
    assert sgd_stability_bound(0.005, 0.9, nesterov=True) == pytest.approx(3.8 / 2.8 / 0.005)
    assert sgd_stability_bound(0.005, 0.9, nesterov=True) == pytest.approx(271.428571, rel=1e-6)
    assert sgd_stability_bound(0.005, 0.9) == pytest.approx(760.0)  # heavy ball: 2 (1 + b) / lr
    assert sgd_stability_bound(0.1) == pytest.approx(20.0)  # plain SGD: 2 / lr
    assert sgd_stability_bound(0.1, 0.0, nesterov=True) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="lr > 0"):
        sgd_stability_bound(0.0, 0.9)
    with pytest.raises(ValueError, match="momentum"):
        sgd_stability_bound(0.1, 1.0)


@pytest.mark.parametrize("nesterov", [False, True])
def test_bound_separates_torch_sgd_converging_from_diverging(nesterov):
    """PyTorch's own SGD on lambda/2 p^2: 5% under the bound it converges, 5% over it
    diverges."""
    lr, b = 0.01, 0.9
    bound = sgd_stability_bound(lr, b, nesterov)
    finals = {}
    for factor in (0.95, 1.05):
        lam = factor * bound
        p = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
        opt = torch.optim.SGD([p], lr=lr, momentum=b, nesterov=nesterov)
        for _ in range(3000):
            opt.zero_grad()
            (0.5 * lam * p.pow(2)).sum().backward()
            opt.step()
            if abs(p.item()) > 1e6:
                break
        finals[factor] = abs(p.item())
    assert finals[0.95] < 1e-3
    assert finals[1.05] > 1e3


def test_top_hessian_eigenvalue_of_a_quadratic_and_rng_untouched():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    a = torch.tensor(q @ np.diag([7.0, 3.0, -2.0, 0.5]) @ q.T)
    x = torch.nn.Parameter(torch.tensor(rng.normal(size=4)))
    state = torch.get_rng_state()
    lam = top_hessian_eigenvalue(lambda: 0.5 * x @ a @ x, [x], iters=200)
    assert lam == pytest.approx(7.0, rel=1e-6)
    assert torch.equal(torch.get_rng_state(), state)


def test_top_hessian_eigenvalue_of_least_squares_and_unused_parameters():
    """mean((X w + c - y)^2) over n rows: Hessian 2/n [X 1]^T [X 1] (hand: numpy's eigvalsh)."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(12, 3))
    y = rng.normal(size=12)
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    c = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    unused = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    Xt, yt = torch.tensor(X), torch.tensor(y)
    lam = top_hessian_eigenvalue(lambda: ((Xt @ w + c - yt) ** 2).mean(), [w, unused, c],
                                 iters=300)
    design = np.hstack([X, np.ones((12, 1))])
    assert lam == pytest.approx(np.linalg.eigvalsh(2 / 12 * design.T @ design).max(), rel=1e-6)
    assert top_hessian_eigenvalue(lambda: (unused * 0).sum().detach(), [unused]) == 0.0


def _student(weight: float, lr: float = 0.005, loss: str = "mse",
             label_weight: float = 0.0) -> StudentModule:
    torch.manual_seed(0)
    task = get_task("voc", "15-5")
    old = build_model("bisenet_r18", [16])
    old.train()
    with torch.no_grad():  # running statistics as after step-0 training
        for _ in range(3):
            old(torch.randn(4, 3, 32, 32) * 2 + 1)
    new = build_model("bisenet_r18", [16])
    new.load_state_dict(old.state_dict())
    new.add_step(5, init_balanced=True)
    return StudentModule(new, old, task, 1, Recipe(lr=lr), MiB(kd_weight=10),
                         ReplayTerm(ReplaySpec(loss=loss, weight=weight, check=8,
                                               label_weight=label_weight)))


def _check(student: StudentModule, images: torch.Tensor) -> dict:
    """The student's curvature test at its recipe's SGD settings."""
    r = student.recipe
    return student.replay.check_stability(student.model, student.old_model, images, r.lr,
                                          r.momentum, r.nesterov, student.step)


def test_student_check_scales_with_the_weight_and_changes_nothing():
    images = torch.randn(4, 3, 32, 32)
    full, tenth = _student(1.0), _student(0.1)
    before = {k: v.clone() for k, v in full.model.state_dict().items()}
    rng = torch.get_rng_state()
    a = _check(full, images)
    b = _check(tenth, images)
    assert a["sharpness"] > 0
    assert b["sharpness"] == pytest.approx(0.1 * a["sharpness"], rel=1e-3)
    assert a["stability_bound"] == pytest.approx(271.4286, rel=1e-6)
    after = full.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN buffers
    assert torch.equal(torch.get_rng_state(), rng)


def test_student_check_warns_above_the_bound_only(caplog):
    images = torch.randn(4, 3, 32, 32)
    probe = _check(_student(1.0), images)["sharpness"]
    # a learning rate whose bound is 4x below / 4x above the measured curvature
    lr_over = sgd_stability_bound(1.0, 0.9, True) / (probe / 4)
    lr_under = sgd_stability_bound(1.0, 0.9, True) / (probe * 4)
    with caplog.at_level(logging.WARNING, logger="incseg.replay.term"):
        _check(_student(1.0, lr=lr_under), images)
        assert "likely to diverge" not in caplog.text
        _check(_student(1.0, lr=lr_over), images)
    assert "likely to diverge" in caplog.text
    assert "replay.weight below 0.25" in caplog.text  # w * bound / lambda = 1 / 4
    assert "or replay.loss=kl" in caplog.text  # an MSE run is pointed to KL


@pytest.mark.parametrize("label_weight", [0.0, 2.0])
def test_student_check_advice_fits_the_term(caplog, label_weight):
    """A KL run is not told to use KL; with the teacher-label CE on, both weights scale (the
    curvature of w * KL + l * CE is linear in (w, l), and replay.weight alone leaves the CE)."""
    images = torch.randn(4, 3, 32, 32)
    probe = _check(_student(1.0, loss="kl", label_weight=label_weight), images)["sharpness"]
    lr_over = sgd_stability_bound(1.0, 0.9, True) / (probe / 4)
    with caplog.at_level(logging.WARNING, logger="incseg.replay.term"):
        _check(_student(1.0, lr=lr_over, loss="kl", label_weight=label_weight), images)
    assert "likely to diverge" in caplog.text
    assert "replay.loss=kl" not in caplog.text
    if label_weight:
        assert "1 * kl + 2 * teacher-label CE" in caplog.text
        assert "replay.weight and replay.label_weight by 0.25 (to 0.25 and 0.5)" in caplog.text
    else:
        assert "use replay.weight below 0.25" in caplog.text


def test_replay_images_the_diverged_student_cannot_score_are_reported(caplog):
    """A student whose logits blew up (|z| >= 1e4) on images its teacher scores: left out of the
    replay term and reported at the end of the epoch as a diverging run."""
    student = _student(1.0)
    images = torch.randn(3, 3, 32, 32)
    assert student.replay(student.model, student.old_model, images).isfinite()
    assert student.replay.left_out == 0
    with torch.no_grad():
        for p in student.model.head.parameters():
            p.mul_(1e7)
    term = student.replay(student.model, student.old_model, images)
    assert term.item() == 0.0 and student.replay.left_out == 3
    with caplog.at_level(logging.WARNING, logger="incseg.systems.student"):
        student.on_train_epoch_end()
    assert "could not score 3 replay images" in caplog.text
    assert student.replay.left_out == 0  # counted per epoch

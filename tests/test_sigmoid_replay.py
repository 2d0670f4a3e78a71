"""Replay for methods of one sigmoid per class (DKD, STAR): the generator's per-class BCE
objective and the replay distances on the old sigmoids against hand-computed values, the
replay set's key, the refused softmax-only options in one line, the curvature warning's wording,
and DKD / STAR (and PLOP, a softmax method) with DeepInversion on the smoke protocol."""

from __future__ import annotations

import logging
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import incseg.run
from incseg.losses import (
    replay_loss,
    replay_sigmoid_kl,
    replay_sigmoid_mse,
    sigmoid_class_objective,
)
from incseg.methods import method_prediction
from incseg.replay import InversionModule
from incseg.replay.term import ReplaySpec, ReplayTerm
from incseg.replay.verdicts import teacher_verdicts
from tests.test_inversion import Toy, small


def sp(x: float) -> float:
    """softplus: BCE-with-logits(z, 0) = sp(z), BCE(z, 1) = sp(-z)."""
    return math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_the_generators_sigmoid_objective_is_one_bce_per_class_on_the_pooled_logits():
    # channels: 0 (no class), 1, 2; image 0 targets class 1, image 1 class 2
    pooled = torch.tensor([[9.0, 2.0, -1.0], [-9.0, 0.5, 3.0]])
    class1 = (sp(-2.0) + sp(0.5)) / 2     # a positive, then a negative; mean over the batch
    class2 = (sp(-1.0) + sp(-3.0)) / 2
    got = sigmoid_class_objective(pooled, torch.tensor([1, 2]))
    assert got.item() == pytest.approx(class1 + class2)
    # channel 0 plays no part; a background target (0) is a negative of every class
    pooled[:, 0] = 100.0
    assert sigmoid_class_objective(pooled, torch.tensor([1, 2])).item() == pytest.approx(
        class1 + class2)
    assert sigmoid_class_objective(pooled[:1], torch.tensor([0])).item() == pytest.approx(
        sp(2.0) + sp(-1.0))


def test_the_generator_uses_the_objective_its_settings_name():
    teacher = Toy(4)
    x = torch.randn(2, 3, 16, 16)
    for objective in ("softmax", "sigmoid"):
        module = InversionModule(teacher, [1, 2], small(objective=objective))
        module.attach_hooks()
        try:
            parts = module.compute_loss(x)
        finally:
            module.detach_hooks()
        targets = torch.tensor([1, 2])
        expected = (sigmoid_class_objective(parts.pooled, targets) if objective == "sigmoid"
                    else F.cross_entropy(parts.pooled, targets))
        assert parts.ce.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_objective_keys_a_replay_set_only_when_it_is_not_the_softmax_one():
    soft, sigm = small(), small(objective="sigmoid")
    assert "objective" not in soft.resolved()  # the keys of the sets made before the choice
    assert sigm.resolved()["objective"] == "sigmoid"
    from incseg.errors import ConfigError

    with pytest.raises(ConfigError, match="objective must be one of softmax|sigmoid"):
        small(objective="tanh").validate()


def test_teacher_verdicts_read_a_sigmoid_teachers_confidence_as_its_sigmoid():
    teacher = Toy(4)
    x = torch.randn(3, 3, 16, 16)
    pred, conf, pixels = teacher_verdicts(teacher, x, torch.tensor([1, 2, 3]),
                                          small(objective="sigmoid"))
    from incseg.replay.verdicts import image_level_logits

    logits, pooled = image_level_logits(teacher, x, small().lse_r)
    assert torch.allclose(conf, torch.sigmoid(pooled[[0, 1, 2], [1, 2, 3]]))
    fg = logits[:, 1:]
    expected = fg.argmax(dim=1) + 1
    expected[(fg > 0).sum(dim=1) == 0] = 0
    assert torch.equal(pixels, expected)


# ---- the replay distances ----------------------------------------------------------------------
def test_sigmoid_replay_mse_compares_the_old_classes_sigmoids():
    z = torch.tensor([5.0, 0.0, math.log(3), 7.0]).view(1, 4, 1, 1)   # student: +1 new class
    z_old = torch.tensor([-5.0, 0.0, 0.0]).view(1, 3, 1, 1)           # teacher: channels 0..2
    # channel 0 is no class, channel 3 is new: (0.5 - 0.5)^2 and (0.75 - 0.5)^2, mean of 2
    assert replay_sigmoid_mse(z, z_old).item() == pytest.approx(0.0625 / 2)


def test_sigmoid_replay_kl_is_a_sum_of_bernoulli_kls_and_zero_at_agreement():
    z = torch.tensor([0.0, 1.0, -1.0]).view(1, 3, 1, 1)
    z_old = torch.tensor([9.0, math.log(3), -1.0]).view(1, 3, 1, 1)   # q = 0.75, σ(-1)

    def kl(q, p):
        return q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))

    assert replay_sigmoid_kl(z, z_old).item() == pytest.approx(kl(0.75, sig(1.0)), rel=1e-5)
    assert replay_sigmoid_kl(z_old, z_old).item() == pytest.approx(0.0, abs=1e-7)
    # T = 2: the tempered sigmoids, times T^2
    t = 2 * 2 * (kl(sig(math.log(3) / 2), sig(0.5)) + kl(sig(-0.5), sig(-0.5)))
    assert replay_sigmoid_kl(z, z_old, temperature=2).item() == pytest.approx(t, rel=1e-5)
    # its gradient is that of DKD's KD, a BCE against the teacher's sigmoids
    a = torch.randn(2, 4, 3, 3, requires_grad=True)
    old = torch.randn(2, 3, 3, 3)
    replay_sigmoid_kl(a, old).backward()
    b = a.detach().clone().requires_grad_(True)
    bce = F.binary_cross_entropy_with_logits(b[:, 1:3], torch.sigmoid(old[:, 1:]),
                                             reduction="none").sum(dim=1).mean()
    bce.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_replay_loss_follows_the_methods_prediction_rule():
    z, z_old = torch.randn(2, 5, 4, 4), torch.randn(2, 3, 4, 4)
    assert replay_loss("mse", z, z_old, prediction="sigmoid").item() == pytest.approx(
        replay_sigmoid_mse(z, z_old).item())
    assert replay_loss("kl", z, z_old, 2.0, prediction="sigmoid").item() == pytest.approx(
        replay_sigmoid_kl(z, z_old, 2.0).item())
    with pytest.raises(ValueError, match="replay.loss='ukd' has no form for a model of one"):
        replay_loss("ukd", z, z_old, prediction="sigmoid")
    assert method_prediction({"_target_": "incseg.methods.dkd.DKD"}) == "sigmoid"
    assert method_prediction({"_target_": "incseg.methods.star.STAR"}) == "sigmoid"
    assert method_prediction({"_target_": "incseg.methods.mib.MiB"}) == "argmax"
    assert method_prediction({"joint": True}) == "argmax"


def test_the_curvature_warning_names_the_sigmoid_distance(caplog):
    from tests.test_star import Tiny

    torch.manual_seed(0)
    old = Tiny([3])
    new = Tiny([3, 2])
    new.load_state_dict(old.state_dict(), strict=False)
    spec = ReplaySpec(loss="mse", weight=1e6, check=5, prediction="sigmoid")
    with caplog.at_level(logging.WARNING):
        ReplayTerm(spec).check_stability(new, old, torch.randn(4, 3, 8, 8), 0.01, 0.9, True, 1)
    assert "1e+06 * mse of the old classes' sigmoids" in caplog.text


# ---- refused in one line (docs/errors.md row 96) -----------------------------------------------
BAD = [
    pytest.param(["method=dkd", "replay=deepinversion", "replay.loss=ukd"],
                 "replay.loss=ukd is MiB's unbiased distillation over one softmax, and the "
                 "method predicts with one sigmoid per class (DKD, STAR); use replay.loss=mse or "
                 "replay.loss=kl, which compare the old classes' sigmoids", id="sigmoid-ukd"),
    pytest.param(["method=star", "replay=deepinversion", "replay.label_weight=0.5"],
                 "replay.label_weight=0.5: the teacher-label cross-entropy is a softmax loss, "
                 "and the method predicts with one sigmoid per class (DKD, STAR); use "
                 "replay.label_weight=0", id="sigmoid-label-weight"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_a_softmax_only_replay_option_with_a_sigmoid_method_is_one_line(tmp_path, monkeypatch,
                                                                        capsys, args, message):
    monkeypatch.setattr(sys, "argv", ["incseg.run", *args, f"paths.runs_dir={tmp_path / 'r'}",
                                      f"paths.cache_dir={tmp_path / 'c'}"])
    with pytest.raises(SystemExit) as exc:
        incseg.run.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == f"error: {message}", lines[0]
    assert not (tmp_path / "r").exists()


# ---- the protocol ------------------------------------------------------------------------------
TINY = ["experiment=smoke", "logger=none", "dataset.generator.n_train=64",
        "dataset.generator.n_val=8", "dataset.generator.n_test=16", "replay=deepinversion",
        "inversion.n_per_class=1", "inversion.iterations_low=4", "inversion.iterations_full=4"]


@pytest.mark.parametrize("method", ["dkd", "star", pytest.param("plop", marks=pytest.mark.slow)])
def test_sigmoid_methods_run_with_deepinversion_on_the_smoke_protocol(tmp_path, caplog, method):
    from incseg.config import compose
    from incseg.protocol import run_protocol

    cfg = compose([*TINY, f"paths.cache_dir={tmp_path / 'cache'}", f"method={method}"])
    with caplog.at_level("INFO"):
        res = run_protocol(cfg, tmp_path / "run")
    assert res["method"] == method and res["replay"] == "deepinversion"
    assert all(v is None or 0 <= v <= 1 for v in res["final"].values())
    manifests = list((tmp_path / "cache" / "replay").glob("*/manifest.json"))
    assert len(manifests) == 1
    import json

    settings = json.loads(manifests[0].read_text())["settings"]
    assert settings.get("objective") == (None if method == "plop" else "sigmoid")
    assert "step 1 replay: 15 deepinversion images" in caplog.text

"""STAR: each term and each stored statistic against hand-computed values on tiny tensors, the
replay plan, the loss as the student assembles it, learning-rate groups, the hand-over through
the step's model file (also across a resume), bad settings in one line, and smoke protocol runs
of STAR and STAR-M."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import incseg.run
from incseg.errors import CheckpointError
from incseg.losses.dkd import new_class_bce, per_class_bce
from incseg.losses.star import (
    class_statistics,
    class_sums,
    feature_distillation_in_region,
    old_sigmoid_prediction,
    prototype_separation,
    sample_prototype_features,
    subsample_labels,
)
from incseg.methods.base import StepContext
from incseg.methods.star import STAR, replay_plan
from incseg.models import IncrementalHead, SegOutput
from incseg.systems import StudentModule, TeacherModule
from incseg.systems.base import Recipe
from incseg.tasks import get_task

TASK = get_task("shapes", "15-5")


def sp(x: float) -> float:
    """softplus: BCE-with-logits(z, 0)."""
    return math.log1p(math.exp(x))


# ---- the stored statistics ---------------------------------------------------------------------
def test_labels_are_read_at_the_centre_of_each_feature_cell():
    y = torch.arange(64 * 64).view(1, 64, 64)
    small = subsample_labels(y, (4, 4))
    assert torch.equal(small, y[:, 8::16, 8::16])  # the reference's reading at stride 16
    y = torch.arange(8 * 8).view(1, 8, 8)
    assert subsample_labels(y, (2, 2)).tolist() == [[[2 * 8 + 2, 2 * 8 + 6],
                                                      [6 * 8 + 2, 6 * 8 + 6]]]


def _hand_feature():
    """2 x 2 cells, D = 2: class 1 at (3, 4) and (0, 2), class 2 at (1, 0), background (5, 5)."""
    f = torch.tensor([[3.0, 0.0], [1.0, 5.0]]), torch.tensor([[4.0, 2.0], [0.0, 5.0]])
    return torch.stack(f).unsqueeze(0), torch.tensor([[[1, 1], [2, 0]]])


def test_prototypes_noise_norms_and_counts_on_a_hand_made_feature_map():
    f, y = _hand_feature()
    stats = class_statistics(class_sums(f, y, torch.tensor([1, 2, 3])))
    # class 1: unit vectors (0.6, 0.8) and (0, 1); their sum (0.6, 1.8) normalised
    p = torch.tensor([0.6, 1.8]) / math.sqrt(3.6)
    assert stats["prototypes"][0].tolist() == pytest.approx(p.tolist())
    noise = [math.sqrt(((0.6 - p[0]) ** 2 + (0 - p[0]) ** 2) / 2),
             math.sqrt(((0.8 - p[1]) ** 2 + (1 - p[1]) ** 2) / 2)]
    assert stats["noise"][0].tolist() == pytest.approx(noise, abs=1e-6)
    assert stats["norm_mean"][0].item() == pytest.approx(3.5)           # |f| = 5 and 2
    assert stats["norm_std"][0].item() == pytest.approx(math.sqrt(4.5))  # unbiased
    # class 2: one pixel: its own direction, no spread, std 0 (the reference: NaN)
    assert stats["prototypes"][1].tolist() == [1.0, 0.0]
    assert stats["noise"][1].tolist() == [0.0, 0.0] and stats["norm_std"][1].item() == 0
    # class 3 has no pixel: zeros throughout
    assert all(stats[k][2].abs().sum() == 0 for k in stats)
    assert stats["counts"].tolist() == [2.0, 1.0, 0.0]
    # noise measured from other centres (the reference's indexing from step 1, literal=true)
    q = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    moved = class_statistics(class_sums(f, y, torch.tensor([1, 2, 3])), q)
    assert moved["noise"][0].tolist() == pytest.approx([math.sqrt(0.18), math.sqrt(0.02)])


def test_sums_over_batches_add_up_to_the_sums_over_their_union():
    f, y = _hand_feature()
    classes = torch.tensor([1, 2])
    whole = class_sums(torch.cat([f, 2 * f]), torch.cat([y, y]), classes)
    parts = class_sums(f, y, classes).add(class_sums(2 * f, y, classes))
    assert all(torch.allclose(whole[k], parts[k]) for k in whole)


def test_replayed_features_scatter_around_the_prototype_with_the_stored_norms():
    p = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
    zeros = torch.zeros(3, 2)
    # no spread: every replayed feature is its prototype times the mean norm, classes in order
    f = sample_prototype_features(p, zeros, torch.tensor([2.0, 3.0, 4.0]), torch.zeros(3),
                                  torch.tensor([2, 0, 1]))
    assert torch.allclose(f, torch.tensor([[1.2, 1.6], [1.2, 1.6], [0.0, 4.0]]))
    # a norm spread only: each feature keeps the prototype's direction (a norm per feature) ...
    g = torch.Generator().manual_seed(0)
    f = sample_prototype_features(p, zeros, torch.ones(3), torch.ones(3),
                                  torch.tensor([50, 0, 0]), g)
    assert torch.allclose(f[:, 0] * 0.8, f[:, 1] * 0.6, atol=1e-6)
    # ... unless drawn per element (the reference's code): then the direction changes
    g = torch.Generator().manual_seed(0)
    f = sample_prototype_features(p, zeros, torch.ones(3), torch.ones(3),
                                  torch.tensor([50, 0, 0]), g, norm_per_element=True)
    assert not torch.allclose(f[:, 0] * 0.8, f[:, 1] * 0.6, atol=1e-3)
    # the draws: eps (D x n) first, then the norm, from the given generator
    g = torch.Generator().manual_seed(3)
    eps, r = torch.randn(2, 4, generator=g), torch.randn(1, 4, generator=g)
    s = torch.tensor([[0.1, 0.2], [0, 0], [0, 0]])
    f = sample_prototype_features(p, s, torch.tensor([5.0, 1, 1]), torch.tensor([0.5, 0, 0]),
                                  torch.tensor([4, 0, 0]), torch.Generator().manual_seed(3))
    expected = ((p[0].view(2, 1) + eps * s[0].view(2, 1)) * (r * 0.5 + 5)).T
    assert torch.allclose(f, expected)
    assert sample_prototype_features(p, zeros, torch.ones(3), zeros[:, 0],
                                     torch.zeros(3, dtype=torch.long)).shape == (0, 2)


# ---- the terms ---------------------------------------------------------------------------------
def test_old_prediction_sigmoid_rule_and_the_references_raw_logit_threshold():
    # channel 0 is no class; pixels: class 2 wins, only 0.3 (σ > 0.5, logit < 0.5), none
    z = torch.tensor([[9.0, 1.0, 2.0], [9.0, 0.3, -1.0], [9.0, -1.0, -2.0]]).T.reshape(1, 3, 1, 3)
    assert old_sigmoid_prediction(z).tolist() == [[[2, 1, 0]]]
    assert old_sigmoid_prediction(z, 0.5).tolist() == [[[2, 0, 0]]]


def test_ocfm_is_a_region_weighted_feature_mse_per_channel():
    f = torch.tensor([[1.0, 2.0], [3.0, -1.0]]).view(1, 2, 1, 2)        # D = 2, 1 x 2 cells
    f_old = torch.tensor([[0.0, 0.0], [1.0, 0.0]]).view(1, 2, 1, 2)
    region = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]).view(1, 1, 2, 4)
    # the region at the feature's size: (1, 0); squared differences in cell 0: 1 and 4
    assert feature_distillation_in_region(f, f_old, region).item() == pytest.approx(5 / 2)
    half = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]).view(1, 1, 2, 4)
    # (0.5, 0) after bilinear resizing: the weights divide out
    assert feature_distillation_in_region(f, f_old, half).item() == pytest.approx(5 / 2)
    assert feature_distillation_in_region(f, f_old, torch.zeros_like(region)).item() == 0


def test_sad_is_the_mean_inverse_distance_to_the_nearest_old_prototype():
    f = torch.tensor([[2.0, 0.0], [0.0, 3.0]]).view(1, 2, 1, 2)   # cell 0: (2, 0), cell 1: (0, 3)
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 2, 1, 2)  # class A at cell 0; B absent
    protos = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    # A's centre (1, 0): distances sqrt(2) and sqrt(0.8); B: a zero centre, distance 1
    expected = (1 / math.sqrt(0.8) + 1.0) / 2
    assert prototype_separation(f, targets, protos).item() == pytest.approx(expected, rel=1e-6)


def test_replay_plan_overlap_and_disjoint_hand_computed():
    prev = torch.tensor([1000.0, 310.0, 45.0])      # background, class 1, class 2
    pred = torch.tensor([400.0, 10.0, 60.0])        # what the old model finds on the step's bg
    p = replay_plan(prev, pred, iterations=10, n_new=2, overlap=True)
    assert p["per_iter"].tolist() == [30, 0]        # (310 - 10) / 10; (45 - 60) / 10 < 0 -> 0
    assert p["extra_bg_ratio"].item() == pytest.approx(1000 * 0.98 / 400 - 0.5)
    assert p["numbers"].tolist() == pytest.approx([400 * 0.5 + 980, 310, 45])
    p = replay_plan(prev, pred, iterations=10, n_new=2, overlap=False)
    assert p["per_iter"].tolist() == [31, 4]        # truncated
    assert p["extra_bg_ratio"].item() == pytest.approx(2.5)
    assert p["numbers"].tolist() == pytest.approx([1400, 320, 105])
    none = replay_plan(prev, torch.zeros(3), 10, 2, True)
    assert none["extra_bg_ratio"].item() == 0      # no background left: nothing to repeat


# ---- the method on a tiny model ----------------------------------------------------------------
class Tiny(nn.Module):
    """backbone (conv + BN) -> decoder at 1/2 (conv + BN + ReLU) -> one incremental head."""

    def __init__(self, per_step):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.decoder = nn.Sequential(nn.Conv2d(4, 4, 1, stride=2), nn.BatchNorm2d(4), nn.ReLU())
        self.head = IncrementalHead(4, per_step)

    num_classes = property(lambda self: self.head.num_classes)
    classes_per_step = property(lambda self: self.head.classes_per_step)

    def heads(self):
        return (self.head,)

    def add_step(self, n_new, init_balanced=True):
        self.head.add_step(n_new)

    def forward(self, x):
        f = self.decoder(self.backbone(x))
        logits = F.interpolate(self.head(f), size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
        return SegOutput(logits, [], {"decoder": f})


def _batch(seed=1, classes=(16, 21)):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(*classes, (2, 8, 8), generator=g)
    y[:, :4] = 0
    return torch.randn(2, 3, 8, 8, generator=g), y


def _handover(seed=0):
    """What a step 0 of 15 foreground classes hands on (D = 4)."""
    g = torch.Generator().manual_seed(seed)
    return {"prototypes": F.normalize(torch.rand(15, 4, generator=g), dim=1),
            "noise": torch.rand(15, 4, generator=g) * 0.1,
            "norm_mean": torch.rand(15, generator=g) + 1, "norm_std": torch.rand(15, generator=g),
            "numbers": torch.arange(16.0) * 10 + 100}


def _student(method=None, seed=0):
    torch.manual_seed(seed)
    old = Tiny([16])
    with torch.no_grad():
        old.head.convs[0].bias.fill_(-0.1)  # it calls some background an old class
    new = copy.deepcopy(old)
    method = method or STAR()
    method.load_previous_step(_handover())
    method.add_classes(new, 5)
    module = StudentModule(new, old, TASK, 1, Recipe(), method)
    method.on_step_start(new, old, [_batch(2), _batch(3)])
    return module, method


def test_the_plan_comes_from_the_old_models_pass_and_rides_in_the_state():
    module, star = _student()
    old = module.old_model
    predicted = torch.zeros(16, dtype=torch.float64)
    for x, y in (_batch(2), _batch(3)):
        pred = subsample_labels(old_sigmoid_prediction(old(x).logits), (4, 4))
        small = subsample_labels(y, (4, 4))
        predicted += torch.bincount(pred[small == 0], minlength=16).double()
    expected = replay_plan(_handover()["numbers"], predicted, 2, 5, True)
    assert all(torch.equal(star.plan[k], expected[k]) for k in expected)
    assert star.plan["per_iter"].sum() > 0 and star.plan["extra_bg_ratio"] > 0
    resumed = STAR()
    resumed.load_state_dict(star.state_dict())
    assert all(torch.equal(resumed.plan[k], star.plan[k]) for k in star.plan)


def test_student_terms_are_the_references_loss_with_its_weights():
    module, star = _student()
    module.train()
    with torch.no_grad():  # the student has moved away from the old model
        module.model.decoder[0].weight.add_(0.1)
    x, y = _batch()
    torch.manual_seed(5)
    terms = module.training_loss(x, y)
    assert set(terms) == {"seg", "proto_replay", "bg_repeat", "ocfm", "sad", "loss"}
    out, old = module.model(x), module.old_model(x)
    f, head = out.features["decoder"], module.model.head.convs[-1]
    # the replayed features: the same draws from a generator seeded off the global stream
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    h = _handover()
    fake = sample_prototype_features(h["prototypes"], h["noise"], h["norm_mean"],
                                     h["norm_std"], star.plan["per_iter"], gen)
    fake_logits = head(fake.T.reshape(1, 4, -1, 1))
    pred = old_sigmoid_prediction(old.logits)
    kept = subsample_labels((y == 0) & (pred == 0), (4, 4))
    bg_logits = head(f.permute(0, 2, 3, 1)[kept].T.reshape(1, 4, -1, 1))
    cells = 2 * 4 * 4
    w_f = fake.shape[0] / cells
    w_b = float(star.plan["extra_bg_ratio"]) * int(kept.sum()) / cells
    denom = 1 + w_f + w_b
    assert terms["seg"].item() == pytest.approx(
        new_class_bce(out.logits, y, 16, 4.0).item() / denom, rel=1e-5)
    assert terms["proto_replay"].item() == pytest.approx(
        w_f * per_class_bce(fake_logits, torch.zeros_like(fake_logits)).item() / denom, rel=1e-5)
    assert terms["bg_repeat"].item() == pytest.approx(
        w_b * per_class_bce(bg_logits, torch.zeros_like(bg_logits)).item() / denom, rel=1e-5)
    region = ((y == 0) & (pred > 0)).unsqueeze(1)
    assert terms["ocfm"].item() == pytest.approx(
        5 * feature_distillation_in_region(f, old.features["decoder"], region).item(), rel=1e-5)
    targets = y.unsqueeze(1) == torch.arange(16, 21).view(1, -1, 1, 1)
    assert terms["sad"].item() == pytest.approx(
        0.05 * prototype_separation(f, targets, h["prototypes"]).item(), rel=1e-5)
    assert terms["proto_replay"] > 0 and terms["bg_repeat"] > 0 and terms["ocfm"] > 0
    # the replayed features teach the new classifiers only; nothing reaches the decoder
    module.zero_grad()
    terms["proto_replay"].backward()
    assert head.weight.grad.abs().sum() > 0
    assert module.model.head.convs[0].weight.grad is None
    assert all(p.grad is None for p in module.model.decoder.parameters())
    # switched off, each part leaves the BCE alone
    off, star_off = _student(STAR(prototype_replay=False, background_repeat=False))
    t = off.training_loss(x, y)
    assert t["proto_replay"].item() == 0 and t["bg_repeat"].item() == 0
    assert t["seg"].item() == pytest.approx(
        new_class_bce(off.model(x).logits, y, 16, 4.0).item(), rel=1e-5)


def test_step0_is_the_bce_with_pos_weight_4_and_no_auxiliary_classifier():
    torch.manual_seed(0)
    teacher = TeacherModule(Tiny([16]), TASK, 0, Recipe(), method=STAR())
    x, y = _batch(classes=(0, 16))
    loss = teacher.training_loss(x, y)["loss"]
    assert loss.item() == pytest.approx(new_class_bce(teacher.model(x).logits, y, 1, 4.0).item(),
                                        rel=1e-6)


def test_new_classifiers_start_he_normal_and_learn_10x_faster_with_decay_everywhere():
    module, star = _student()
    m = module.model
    assert not torch.equal(m.head.convs[1].weight[0], m.head.convs[0].weight[0])
    groups = star.param_groups(m, 0.01)
    by_lr = {(g["lr"], g.get("weight_decay")): {id(p) for p in g["params"]} for g in groups}
    assert by_lr == {
        (0.001, None): {id(m.backbone[0].weight), id(m.backbone[0].bias)},
        (0.01, None): {id(p) for p in [m.decoder[0].weight, m.decoder[0].bias,
                                       *m.head.convs[0].parameters()]},
        (0.1, None): {id(p) for p in m.head.convs[1].parameters()},
    }
    assert all(not b.training for b in m.modules() if isinstance(b, nn.BatchNorm2d))


def _fitted_step(step):
    """A method that has run its end-of-step pass over two batches of a tiny model."""
    torch.manual_seed(0)
    if step == 0:
        model, star = Tiny([16]), STAR()
        star.setup(StepContext(0, 0, 16, None, model))
        data = [_batch(4, (0, 16)), _batch(5, (0, 16))]
    else:
        module, star = _student()
        model, data = module.model, [_batch(4), _batch(5)]
    star.on_fit_end(model, data)
    return model, star, data


def test_step0_stores_its_classes_statistics_from_the_trained_models_pass():
    model, star, data = _fitted_step(0)
    h = star.next_step_state()
    assert set(h) == {"prototypes", "noise", "norm_mean", "norm_std", "numbers"}
    model.eval()
    sums = None
    background = 0
    for x, y in data:
        f = model(x).features["decoder"]
        small = subsample_labels(y, f.shape[-2:])
        s = class_sums(f, small, torch.arange(1, 16))
        sums = s if sums is None else sums.add(s)
        background += int((small == 0).sum())
    expected = class_statistics(sums)
    assert h["prototypes"].shape == (15, 4) and h["prototypes"].dtype == torch.float32
    for k in ("prototypes", "noise", "norm_mean", "norm_std"):
        assert torch.allclose(h[k], expected[k])
    assert h["numbers"].tolist() == [background, *expected["counts"].tolist()]
    assert model.training is False or all(not m.training for m in model.modules())


def test_a_later_step_appends_the_new_classes_to_the_handed_over_ones():
    model, star, data = _fitted_step(1)
    h, prev = star.next_step_state(), _handover()
    assert h["prototypes"].shape == (20, 4) and h["numbers"].shape == (21,)
    assert torch.equal(h["prototypes"][:15], prev["prototypes"])
    assert torch.equal(h["numbers"][:16], star.plan["numbers"])
    assert model.training and all(not b.training for b in model.modules()
                                  if isinstance(b, nn.BatchNorm2d))  # modes given back


def test_the_statistics_travel_in_the_step_model_file(tmp_path):
    from incseg.checkpoints import read_model_file, save_model
    from incseg.models import build_model

    _, star, _ = _fitted_step(0)
    model = build_model("bisenet_r18", [16])
    path = tmp_path / "step0.pt"
    save_model(path, model, "bisenet_r18", TASK.steps, 0,
               extra={"method_state": star.next_step_state()})
    back = read_model_file(path)["method_state"]
    nxt = STAR()
    nxt.load_previous_step(back)
    assert all(torch.equal(nxt.previous[k], star.handover[k]) for k in star.handover)
    nxt.setup(StepContext(1, 16, 21, Tiny([16]), Tiny([16, 5])))


def test_a_model_file_without_the_prototypes_is_one_line():
    star = STAR()
    with pytest.raises(CheckpointError, match=r"^STAR at step 1 replays the class prototypes of "
                                              r"step 0, and its model file holds no prototypes, "
                                              r"noise, norm_mean, norm_std, numbers; rerun step 0"):
        star.setup(StepContext(1, 16, 21, Tiny([16]), Tiny([16, 5])))
    star.load_previous_step({k: v[:3] for k, v in _handover().items()})
    with pytest.raises(CheckpointError, match="holds prototypes of 3 classes, not the 15 old"):
        star.setup(StepContext(1, 16, 21, Tiny([16]), Tiny([16, 5])))


BAD = [
    pytest.param(["method=star", "method.sad_weight=-1"],
                 "method=star: sad_weight=-1 must be >= 0", id="star-negative-weight"),
    pytest.param(["method=star", "method.new_lr_factor=0"],
                 "method=star: new_lr_factor=0 must be > 0", id="star-lr-factor"),
    pytest.param(["method=star", "method.literal=maybe"],
                 "method=star: literal='maybe' is not a boolean; use literal=true or "
                 "literal=false", id="star-flag"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_star_settings_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setattr(sys, "argv", ["incseg.run", *args, f"paths.runs_dir={tmp_path / 'r'}",
                                      f"paths.cache_dir={tmp_path / 'c'}"])
    with pytest.raises(SystemExit) as exc:
        incseg.run.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {message}; check method.* overrides"), lines[0]
    assert not (tmp_path / "r").exists()


# ---- the protocol ------------------------------------------------------------------------------
TINY = ["experiment=smoke", "logger=none", "dataset.generator.n_train=64",
        "dataset.generator.n_val=8", "dataset.generator.n_test=16"]


def _state(path):
    from incseg.checkpoints import read_model_file

    return read_model_file(path)["method_state"]


def test_smoke_protocol_runs_star_on_15_5s(tmp_path, caplog):
    from incseg.config import compose
    from incseg.protocol import run_protocol

    cfg = compose([*TINY, f"paths.cache_dir={tmp_path / 'cache'}", "method=star", "task=15-5s"])
    with caplog.at_level("INFO"):
        res = run_protocol(cfg, tmp_path / "run")
    assert res["method"] == "star" and [s["step"] for s in res["steps"]] == list(range(6))
    assert "step-0 cache miss" in caplog.text and "STAR step 5: per iteration" in caplog.text
    assert all(v is None or 0 <= v <= 1 for v in res["final"].values())
    for t in range(6):
        state = _state(tmp_path / "run" / "checkpoints" / f"step{t}.pt")
        k = 15 + t
        assert state["prototypes"].shape == (k, 256) and state["numbers"].shape == (k + 1,)
        assert all(torch.isfinite(v).all() for v in state.values())
        norms = state["prototypes"].norm(dim=1)
        assert torch.allclose(norms[norms > 0], torch.ones_like(norms[norms > 0]), atol=1e-5)


@pytest.mark.slow  # two STAR runs
def test_a_star_run_resumed_after_its_last_epoch_ends_as_the_uninterrupted_run(tmp_path,
                                                                              monkeypatch):
    """Killed after each epoch of step 1 (the plan rides in the epoch checkpoint), or after the
    last one (the fit then has nothing left to train, and the statistics pass runs all the
    same): the same results and the same hand-over."""
    from incseg.config import compose
    from incseg.protocol import run_protocol
    from tests.resume_checks import kill_after_step1_epoch, step_numbers

    args = [*TINY, f"paths.cache_dir={tmp_path / 'cache'}", "method=star",
            "train.epochs_incremental=2"]
    ref = run_protocol(compose(args), tmp_path / "reference")
    for kill_at in (1, 2):
        cut = tmp_path / f"cut{kill_at}"
        kill_after_step1_epoch(monkeypatch, kill_at, lambda cut=cut: run_protocol(compose(args),
                                                                                   cut))
        res = run_protocol(compose(args), cut)
        assert step_numbers(res) == step_numbers(ref) and res["final"] == ref["final"]
        a = _state(tmp_path / "reference" / "checkpoints" / "step1.pt")
        b = _state(cut / "checkpoints" / "step1.pt")
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_smoke_protocol_runs_star_m_on_15_5s(tmp_path):
    from incseg.config import compose
    from incseg.protocol import run_protocol

    cfg = compose(["experiment=smoke", "logger=none", f"paths.cache_dir={tmp_path / 'cache'}",
                   "method=star_m", "task=15-5s"])
    assert cfg.memory.size == 50 and cfg.memory.labels == "current"
    res = run_protocol(cfg, tmp_path / "run")
    assert res["method_label"] == "STAR-M" and res["memory"]["size"] == 50
    assert [s["memory"]["images"] for s in res["steps"][1:]] == [50] * 5
    assert all(v is None or 0 <= v <= 1 for v in res["final"].values())


def test_star_m_runs_with_the_labelled_memory(tmp_path):
    from incseg.config import compose
    from incseg.protocol import run_protocol

    cfg = compose([*TINY, f"paths.cache_dir={tmp_path / 'cache'}", "method=star_m",
                   "memory.size=10"])
    res = run_protocol(cfg, tmp_path / "run")
    assert res["method"] == "star_m" and res["method_label"] == "STAR-M"
    assert res["steps"][1]["memory"]["images"] == 10
    assert _state(tmp_path / "run" / "checkpoints" / "step1.pt")["prototypes"].shape == (20, 256)


@pytest.mark.slow  # STAR on BiSeNet runs in the fast suite
def test_star_runs_on_deeplab(tmp_path, caplog):
    """DeepLabV3's decoder feature is its ASPP output at stride 16 (the reference's ``x_pl``):
    2 x 2 cells on 32 px crops, where a small class can miss every cell centre."""
    from incseg.config import compose
    from incseg.protocol import run_protocol

    with caplog.at_level("WARNING"):
        out = run_protocol(compose([*TINY, "model=deeplabv3_r50", "model.backbone=resnet18",
                                    f"paths.cache_dir={tmp_path / 'cache'}", "method=star"]),
                           tmp_path / "run")
    assert out["method"] == "star" and len(out["steps"]) == 2
    assert all(0.0 <= out["final"][k] <= 1.0 for k in ("old", "new", "all"))
    state = _state(tmp_path / "run" / "checkpoints" / "step1.pt")
    missing = state["numbers"][16:] == 0   # new classes without a pixel: zeros, and a warning
    assert torch.all(state["prototypes"][15:][missing] == 0)
    assert not missing.any() or "have no pixel at the decoder's resolution" in caplog.text

"""DKD: each loss term against hand-computed values, the sigmoid prediction rule, the AC (its
stopped gradient, new heads copied from it), frozen BatchNorms and the learning-rate groups,
bad settings in one line, and smoke protocol runs on BiSeNet (15-5s) and DeepLabV3."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import incseg.run
from incseg.errors import ConfigError
from incseg.losses.dkd import (
    auxiliary_classifier_loss,
    decomposed_logits,
    new_class_bce,
    per_class_bce,
    sigmoid_distillation,
)
from incseg.methods.base import StepContext
from incseg.methods.dkd import DKD
from incseg.models import IncrementalHead, SegOutput
from incseg.prediction import prediction_scores
from incseg.systems import StudentModule, TeacherModule
from incseg.systems.base import Recipe
from incseg.tasks import get_task

LN2 = math.log(2)


def sp(x: float) -> float:
    """softplus: BCE-with-logits(z, 0) = sp(z), BCE(z, 1) = sp(-z)."""
    return math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---- the losses --------------------------------------------------------------------------------
def test_new_class_bce_with_pos_weight_is_a_per_class_mean_summed():
    # channels: AC, class 1, class 2; two pixels: class 1 and void (a negative of every class)
    z = torch.tensor([[9.0, 2.0, -1.0], [9.0, 0.5, 3.0]]).T.reshape(1, 3, 1, 2)
    labels = torch.tensor([[[1, 255]]])
    ch1 = (2 * sp(-2.0) + sp(0.5)) / 2          # positive x pos_weight 2, then a negative
    ch2 = (sp(-1.0) + sp(3.0)) / 2
    assert new_class_bce(z, labels, first=1, pos_weight=2).item() == pytest.approx(ch1 + ch2)
    assert new_class_bce(z, labels, first=1).item() == pytest.approx(
        (sp(-2.0) + sp(0.5)) / 2 + ch2)
    # from step 1 only the step's channels: label 1 (an old class) is a negative of channel 2
    assert new_class_bce(z, labels, first=2).item() == pytest.approx(ch2)
    # background labels and void alike: no positive at all
    assert new_class_bce(z, torch.tensor([[[0, 255]]]), first=1).item() == pytest.approx(
        (sp(2.0) + sp(0.5)) / 2 + ch2)


def test_sigmoid_kd_and_ac_hand_computed():
    new = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    old = torch.tensor([math.log(3), 0.0]).view(1, 2, 1, 1)   # σ = 0.75, 0.5
    first = -(0.75 * math.log(sig(1)) + 0.25 * math.log(1 - sig(1)))
    assert sigmoid_distillation(new, old).item() == pytest.approx(first + LN2)
    with pytest.raises(ValueError, match="differ in shape"):
        sigmoid_distillation(new, old[:, :1])
    ac = torch.tensor([0.0, math.log(3)]).view(1, 1, 1, 2)
    assert auxiliary_classifier_loss(ac).item() == pytest.approx((LN2 + math.log(4)) / 2)
    # the mean is per channel over B·H·W, then summed over channels
    two = torch.zeros(2, 2, 1, 1)
    assert per_class_bce(two, torch.ones_like(two), pos_weight=3).item() == pytest.approx(
        2 * 3 * LN2)


def test_decomposed_logits_split_the_weights_by_sign_on_the_relud_feature():
    f = torch.tensor([-1.0, 2.0, 3.0]).view(1, 3, 1, 1)        # ReLU: (0, 2, 3)
    w = torch.tensor([[1.0, -3.0, 0.5], [-2.0, 1.0, -1.0]])     # K=2 classes x D=3
    pos, neg = decomposed_logits(f, w)
    assert pos.flatten().tolist() == pytest.approx([0 + 0 + 1.5, 0 + 2 + 0])
    assert neg.flatten().tolist() == pytest.approx([0 - 6 + 0, 0 + 0 - 3])
    # the two parts add up to the logit without its bias
    assert torch.allclose(pos + neg, F.conv2d(F.relu(f), w.view(2, 3, 1, 1)))
    # a gradient reaches only the weights of the part's sign (and the feature)
    w = w.clone().requires_grad_()
    decomposed_logits(f, w)[0].sum().backward()
    assert w.grad.tolist() == [[0.0, 0.0, 3.0], [0.0, 2.0, 0.0]]


# ---- the prediction rule -----------------------------------------------------------------------
def test_sigmoid_prediction_is_background_iff_no_class_sigmoid_exceeds_a_half():
    # pixels: all below 0.5; one above; two above (the larger wins); exactly 0.5; AC large
    z = torch.tensor([[0.0, -1.0, -2.0], [-5.0, 0.3, -1.0], [0.0, 1.0, 2.0], [0.0, 0.0, -1.0],
                      [50.0, -0.1, -0.2]]).T.reshape(1, 3, 1, 5)
    pred = prediction_scores(z, "sigmoid").argmax(dim=1).flatten().tolist()
    assert pred == [0, 1, 2, 0, 0]
    # the reference's formula (trainer_voc.py: argmax of classes 1.., 0 where none > 0.5)
    p = torch.sigmoid(z)
    ref = p[:, 1:].argmax(dim=1) + 1
    ref[(p[:, 1:] > 0.5).sum(dim=1) == 0] = 0
    assert pred == ref.flatten().tolist()
    assert prediction_scores(z, "argmax") is z  # every other method: untouched
    with pytest.raises(ValueError, match="prediction='softmax' is not one of"):
        prediction_scores(z, "softmax")


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


TASK = get_task("shapes", "15-5")


def _student(method=None, seed=0):
    torch.manual_seed(seed)
    old = Tiny([16])
    new = copy.deepcopy(old)
    method = method or DKD()
    method.add_classes(new, 5)
    return StudentModule(new, old, TASK, 1, Recipe(), method), method


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(16, 21, (2, 8, 8), generator=g)
    y[:, :4] = 0
    return torch.randn(2, 3, 8, 8, generator=g), y


def test_evaluation_uses_the_methods_prediction_rule():
    module, _ = _student()
    assert module.prediction == "sigmoid"
    x, y = _batch()
    module.eval()
    module._eval_update(module.test_metric, (x, y))
    with torch.no_grad():
        z = module.model(x).logits
    expected = torch.sigmoid(z)[:, 1:].argmax(dim=1) + 1
    expected[(torch.sigmoid(z)[:, 1:] > 0.5).sum(dim=1) == 0] = 0
    counts = torch.bincount(y.flatten() * 21 + expected.flatten(), minlength=21 * 21)
    assert torch.equal(module.test_metric.compute().cpu(), counts.view(21, 21))
    plain = TeacherModule(Tiny([16]), TASK, 0, Recipe())
    assert plain.prediction == "argmax"


# ---- the AC ------------------------------------------------------------------------------------
def test_new_heads_start_as_copies_of_the_ac():
    module, _ = _student()
    first, new = module.model.head.convs[0], module.model.head.convs[-1]
    assert torch.equal(new.weight, first.weight[:1].expand_as(new.weight))
    assert torch.equal(new.bias, first.bias[:1].expand(5))
    assert not torch.equal(first.weight[0], first.weight[1])  # not the whole old head
    torch.manual_seed(0)
    m = Tiny([16])
    DKD(ac_weight=0).add_classes(m, 5)  # no AC: random, as the reference's `ac: 0`
    assert not torch.equal(m.head.convs[-1].weight[0], m.head.convs[0].weight[0])


def test_the_ac_is_channel_0_on_the_decoder_with_its_gradient_stopped():
    module, dkd = _student()
    x, y = _batch()
    out = module.model(x)
    ac = dkd.auxiliary_logits(out)
    assert torch.allclose(ac, out.logits[:, :1], atol=1e-6)
    auxiliary_classifier_loss(ac).backward()
    head = module.model.head.convs[0]
    assert head.weight.grad[0].abs().sum() > 0 and head.weight.grad[1:].abs().sum() == 0
    assert all(p.grad is None for p in module.model.decoder.parameters())
    assert all(p.grad is None for p in module.model.backbone.parameters())


def test_student_terms_are_the_reference_losses_on_the_right_channels():
    module, dkd = _student()
    module.train()
    x, y = _batch()
    terms = module.training_loss(x, y)
    assert set(terms) == {"seg", "kd", "dkd_pos", "dkd_neg", "loss"}
    out, old = module.model(x), module.old_model(x)
    ac = auxiliary_classifier_loss(dkd.auxiliary_logits(out))
    # step 1: BCE of channels 16..20 with pos_weight 1, + the AC
    assert terms["seg"].item() == pytest.approx(
        (new_class_bce(out.logits, y, 16, 1.0) + ac).item(), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(
        5 * sigmoid_distillation(out.logits[:, 1:16], old.logits[:, 1:]).item(), rel=1e-5)
    w_new = torch.cat([c.weight for c in module.model.head.convs])[1:16]
    w_old = module.old_model.head.convs[0].weight[1:]
    assert torch.equal(w_new, w_old)  # the student starts from the old model
    pos, neg = decomposed_logits(out.features["decoder"], w_new)
    o_pos, o_neg = decomposed_logits(old.features["decoder"], w_old)
    assert pos.shape == (2, 15, 4, 4)  # the decoder's resolution
    assert terms["dkd_pos"].item() == pytest.approx(
        5 * sigmoid_distillation(pos, o_pos).item(), rel=1e-5)
    assert terms["dkd_neg"].item() == pytest.approx(
        5 * sigmoid_distillation(neg, o_neg).item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(
        sum(terms[k].item() for k in ("seg", "kd", "dkd_pos", "dkd_neg")), rel=1e-6)


def test_step0_is_bce_with_pos_weight_2_plus_the_ac():
    torch.manual_seed(0)
    dkd = DKD()
    teacher = TeacherModule(Tiny([16]), TASK, 0, Recipe(), method=dkd)
    x, y = _batch()
    y = y.clamp(max=15)
    loss = teacher.training_loss(x, y)["loss"]
    out = teacher.model(x)
    expected = new_class_bce(out.logits, y, 1, 2.0) + auxiliary_classifier_loss(out.logits[:, :1])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_on_bisenet_the_aux_heads_get_the_bce_only_and_keep_their_own_new_rows():
    from incseg.models import build_model

    torch.manual_seed(0)
    old = build_model("bisenet_r18", [16])
    new = copy.deepcopy(old)
    dkd = DKD()
    dkd.add_classes(new, 5)
    main, aux1, aux2 = new.heads()
    assert torch.equal(main.convs[1].weight[3], main.convs[0].weight[0])
    assert not torch.equal(aux1.convs[1].weight[3], aux1.convs[0].weight[0])
    module = StudentModule(new, old, TASK, 1, Recipe(), dkd)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(16, 21, (2, 32, 32))
    out = new(x)
    assert len(out.aux) == 2
    bce = sum(new_class_bce(h, y, 16, 1.0) for h in (out.logits, *out.aux))
    ac = auxiliary_classifier_loss(dkd.auxiliary_logits(out))
    assert module.training_loss(x, y)["seg"].item() == pytest.approx((bce + ac).item(),
                                                                    rel=1e-5)


# ---- BatchNorms and learning rates -------------------------------------------------------------
def _bn(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_batchnorms_frozen_from_step1_and_their_affines_not_optimised():
    module, dkd = _student()
    before = [(b.running_mean.clone(), b.running_var.clone()) for b in _bn(module.model)]
    assert all(not b.training for b in _bn(module.model))  # from the module's construction
    module.train()                                          # and after every train()
    assert module.model.training and all(not b.training for b in _bn(module.model))
    opt = torch.optim.SGD(module.param_groups(), lr=0.1)
    x, y = _batch()
    module.training_loss(x, y)["loss"].backward()
    opt.step()
    for b, (mean, var) in zip(_bn(module.model), before):
        assert torch.equal(b.running_mean, mean) and torch.equal(b.running_var, var)
    affines = {id(p) for b in _bn(module.model) for p in b.parameters()}
    assert not affines & {id(p) for g in module.param_groups() for p in g["params"]}
    # step 0 trains its BatchNorms
    torch.manual_seed(0)
    teacher = TeacherModule(Tiny([16]), TASK, 0, Recipe(), method=DKD())
    teacher.train()
    mean = _bn(teacher.model)[0].running_mean.clone()
    teacher.training_loss(x, y.clamp(max=15))
    assert not torch.equal(_bn(teacher.model)[0].running_mean, mean)
    frozen_off, _ = _student(DKD(freeze_bn=False))
    assert all(b.training for b in _bn(frozen_off.model))


def test_lr_groups_backbone_x1_the_rest_x10_decay_on_new_classifiers_only():
    module, dkd = _student()
    groups = dkd.param_groups(module.model, 0.01)
    m = module.model
    by_lr = {(g["lr"], g.get("weight_decay")): {id(p) for p in g["params"]} for g in groups}
    assert by_lr == {
        (0.001, 0.0): {id(m.backbone[0].weight), id(m.backbone[0].bias)},
        (0.01, 0.0): {id(p) for p in [m.decoder[0].weight, m.decoder[0].bias,
                                      *m.head.convs[0].parameters()]},
        (0.01, None): {id(p) for p in m.head.convs[1].parameters()},  # the recipe's decay
    }
    torch.manual_seed(0)
    teacher = TeacherModule(Tiny([16]), TASK, 0, Recipe(lr=0.05), method=DKD(head_lr_factor=4))
    groups = teacher.param_groups()
    assert [(g["lr"], g.get("weight_decay"), len(g["params"])) for g in groups] == [
        (0.0125, None, 4), (0.05, None, 6)]  # step 0: every BN affine, every decay


# ---- bad settings and models: one line each (docs/errors.md rows 89-91) ------------------------
BAD = [
    pytest.param(["method=dkd", "method.kd_weight=-1"], "method=dkd: kd_weight=-1 must be >= 0",
                 id="dkd-negative-weight"),
    pytest.param(["method=dkd", "method.pos_weight=0"], "method=dkd: pos_weight=0 must be > 0",
                 id="dkd-pos-weight"),
    pytest.param(["method=dkd", "method.freeze_bn=maybe"],
                 "method=dkd: freeze_bn='maybe' is not a boolean; use freeze_bn=true or "
                 "freeze_bn=false", id="dkd-flag"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_dkd_settings_one_line(tmp_path, monkeypatch, capsys, args, message):
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


def test_a_model_without_classifier_heads_is_one_line():
    class NoHeads(Tiny):
        heads = None

    with pytest.raises(ConfigError, match=r"^DKD reads the weights of the main classifier, and "
                                          r"NoHeads exposes no heads\(\) of IncrementalHead"):
        TeacherModule(NoHeads([16]), TASK, 0, Recipe(), method=DKD())


def test_a_model_without_the_decoder_feature_is_one_line_at_step0():
    class NoDecoder(Tiny):
        def forward(self, x):
            out = super().forward(x)
            return SegOutput(out.logits, [], {"encoder": out.features["decoder"]})

    teacher = TeacherModule(NoDecoder([16]), TASK, 0, Recipe(), method=DKD())
    with pytest.raises(ConfigError, match="the method DKD reads the model features decoder, "
                                          "which NoDecoder does not provide"):
        teacher.training_loss(*_batch())


def test_setup_refuses_an_old_model_without_heads():
    dkd = DKD()
    with pytest.raises(ConfigError, match="Linear exposes no heads"):
        dkd.setup(StepContext(1, 16, 21, nn.Linear(1, 1), Tiny([16, 5])))
    dkd.setup(StepContext(1, 16, 21, Tiny([16]), Tiny([16, 5])))
    assert dkd.first_new == 16


# ---- the protocol ------------------------------------------------------------------------------
TINY = ["experiment=smoke", "logger=none", "dataset.generator.n_train=64",
        "dataset.generator.n_val=8", "dataset.generator.n_test=16"]


def test_smoke_protocol_runs_dkd_on_15_5s(tmp_path, caplog):
    from incseg.checkpoints import read_model_file
    from incseg.config import compose
    from incseg.protocol import run_protocol
    from incseg.viz import load_segmenter

    cfg = compose([*TINY, f"paths.cache_dir={tmp_path / 'cache'}", "method=dkd", "task=15-5s"])
    assert cfg.data.unseen_as == "background"
    with caplog.at_level("INFO"):
        res = run_protocol(cfg, tmp_path / "run")
    assert res["method"] == "dkd" and [s["step"] for s in res["steps"]] == list(range(6))
    assert "step-0 cache miss" in caplog.text  # its own step 0 (BCE + AC), not the CE one
    for s in res["steps"]:
        assert all(s[k] is None or 0 <= s[k] <= 1 for k in ("miou_all", "miou_old", "miou_new"))
    assert all(v is None or 0 <= v <= 1 for v in res["final"].values())
    ckpt = tmp_path / "run" / "checkpoints" / "step5.pt"
    assert read_model_file(ckpt)["prediction"] == "sigmoid"
    model, class_ids, meta = load_segmenter(ckpt)
    assert meta["prediction"] == "sigmoid" and len(class_ids) == 21


def test_dkd_runs_on_deeplab(tmp_path):
    """The decoder feature of DeepLabV3 is its ASPP output, the reference's ``x_pl``."""
    from incseg.config import compose
    from incseg.protocol import run_protocol

    out = run_protocol(compose([*TINY, "model=deeplabv3_r50", "model.backbone=resnet18",
                                f"paths.cache_dir={tmp_path / 'cache'}", "method=dkd"]),
                       tmp_path / "run")
    assert out["method"] == "dkd" and len(out["steps"]) == 2
    assert all(0.0 <= out["final"][k] <= 1.0 for k in ("old", "new", "all"))

"""PLOP, EWC / PI / RW and LwF-MC: every formula against hand-computed values on tiny tensors,
the methods' wiring (hooks, hand-over between steps, exact resume), their bad settings, and a
smoke protocol run of each."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from torch import nn

import incseg.run
from incseg.losses.importance import (
    ewc_fisher_update,
    normalize_importance,
    penalty_gradient,
    pi_path_update,
    pi_score,
    quadratic_penalty,
    rw_final_score,
    rw_score_update,
)
from incseg.losses.lwf_mc import bce_distillation, one_hot_bce
from incseg.losses.pod import (
    collapse_new_logits,
    local_pod_embedding,
    local_pod_loss,
    pod_distance,
)
from incseg.losses.pseudo_labels import (
    adaptive_factor,
    entropy_histogram,
    histogram_median,
    normalized_entropy,
    pseudo_label,
    reference_entropy,
    reference_histogram_median,
    uncertainty_thresholds,
    weighted_cross_entropy,
)
from incseg.methods.base import Batch, StepContext
from incseg.methods.ewc import EWC
from incseg.methods.lwf_mc import LwFMC
from incseg.methods.pi import PI
from incseg.methods.plop import PLOP
from incseg.methods.rw import RW
from incseg.models.base import SegOutput, model_output

LN2, LN3 = math.log(2), math.log(3)


# ---- local POD ---------------------------------------------------------------------------------
def test_local_pod_embedding_pools_width_and_height_per_region():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    emb = local_pod_embedding(x, scales=(1, 2))
    expected = [1.5, 5.5, 9.5, 13.5, 6, 7, 8, 9,            # s=1: per-row, per-column means
                0.5, 4.5, 2, 3, 2.5, 6.5, 4, 5,             # s=2: top-left, top-right
                8.5, 12.5, 10, 11, 10.5, 14.5, 12, 13]      # bottom-left, bottom-right
    assert emb.tolist() == [expected]
    # channels are flattened channel by channel inside each pooling
    two = torch.cat([x, 2 * x], dim=1)
    emb2 = local_pod_embedding(two, scales=(1,))[0].tolist()
    assert emb2 == [1.5, 5.5, 9.5, 13.5, 3, 11, 19, 27, 6, 7, 8, 9, 12, 14, 16, 18]


def test_local_pod_regions_drop_the_remainder_and_skip_empty_scales():
    x = torch.zeros(1, 1, 5, 5)
    x[..., 4, :] = 100.0  # the last row: only the whole-map scale sees it (5 // 2 = 2)
    emb = local_pod_embedding(x, scales=(1, 2))
    assert emb[0, :10].abs().sum() > 0 and emb[0, 10:].abs().sum() == 0
    assert emb.shape == (1, 5 + 5 + 4 * (2 + 2))
    # a 1 x 1 map (a 1/32 stage of a 32-px crop): scales 2 and 4 have no pixel, scale 1 stays
    one = torch.full((2, 3, 1, 1), 2.0)
    assert local_pod_embedding(one).shape == (2, 3 * 2)
    with pytest.raises(ValueError, match="no POD scale"):
        local_pod_embedding(one, scales=(2,))


def test_pod_distance_squares_then_takes_the_l2_norm_per_image_and_the_batch_mean():
    old = torch.stack([torch.ones(1, 2, 2), -torch.ones(1, 2, 2)])  # B=2
    new = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    # image 0: 12 pooled values (s=1: 2+2, s=2: 4 x (1+1); s=4 skipped) of 1 against 0;
    # image 1: (-1)^2 == 1^2, nothing to distil
    assert pod_distance(old, new).item() == pytest.approx(math.sqrt(12) / 2)


def test_collapse_new_logits_adds_the_new_classes_to_the_background():
    z = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    assert collapse_new_logits(z, num_old=2).flatten().tolist() == [8.0, 2.0]
    assert torch.equal(collapse_new_logits(z, num_old=4), z)


def test_local_pod_loss_weighs_each_map_and_divides_by_their_number():
    a, b = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    loss = local_pod_loss([a, a, a], [b, a, b], [0.5, 7.0, 2.0], scales=(1, 2))
    assert loss.item() == pytest.approx((0.5 + 2.0) * math.sqrt(12) / 3)


def _ctx(num_old=2, num_classes=3, old=None, model=None, step=1):
    return StepContext(step=step, num_old=num_old, num_classes=num_classes, old_model=old,
                       model=model)


def test_plop_pod_maps_weights_and_schedule():
    plop = PLOP(pod_weight=0.01, pod_logits_weight=0.0005)
    plop.setup(_ctx(num_old=2, num_classes=3))
    zeros, ones = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    new_logits = torch.zeros(1, 3, 2, 2)
    new_logits[:, 2] = 1.0  # a new class: its logit joins the background's for POD
    # the default reads the pre-activation stages and the pre-upsampling logits
    new = SegOutput(torch.zeros(1, 3, 4, 4), features={
        "stages_preact": [ones], "decoder": zeros, "logits_small": new_logits})
    old = SegOutput(torch.zeros(1, 2, 4, 4), features={
        "stages_preact": [zeros], "decoder": zeros, "logits_small": torch.zeros(1, 2, 2, 2)})
    # stage: sqrt(12); decoder: 0; logits (collapsed [1, 0] vs [0, 0]): sqrt(12); three maps,
    # each factor times sqrt(C / C_new) = sqrt(3)
    expected = math.sqrt(3) * (0.01 + 0.0005) * math.sqrt(12) / 3
    assert plop.pod(new, old).item() == pytest.approx(expected)
    flat = PLOP(pod_schedule=False)
    flat.setup(_ctx())
    assert flat.pod(new, old).item() == pytest.approx(expected / math.sqrt(3))


# ---- pseudo-labels ---------------------------------------------------------------------------
def test_entropies_hand_computed():
    p = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    ent = normalized_entropy(p.view(3, 3, 1, 1)).flatten()
    assert ent.tolist() == pytest.approx([1.5 * LN2 / LN3, 0.0, 1.0], abs=1e-6)
    # the reference's scale: H / (C_o log C_o log C); [.5, .5] with C = 4: 1 / (2 log 4)
    half = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
    assert reference_entropy(half, 4).item() == pytest.approx(1 / (2 * math.log(4)), rel=1e-6)


def test_entropy_histogram_bins_per_predicted_class():
    values = torch.tensor([0.0, 0.05, 0.15, 1.0, 0.999])
    hist = entropy_histogram(values, torch.tensor([0, 0, 1, 1, 1]), num_classes=2, bins=10)
    assert hist[0].tolist() == [2] + [0] * 9
    assert hist[1].tolist() == [0, 1] + [0] * 7 + [2]  # 1.0 falls in the last bin


def test_histogram_median_true_and_reference():
    hist = torch.tensor([[2, 0, 2], [1, 2, 1], [0, 0, 4], [0, 0, 0]])
    # half the count is reached in bin b: median = (b + (half - below) / count_b) / bins
    assert histogram_median(hist).tolist() == pytest.approx([1 / 3, 0.5, 2.5 / 3, 0.0])
    # the reference adds bin indices (0, 1, 2, ...) to its running sum instead of counts
    ref = reference_histogram_median(torch.tensor([[1, 2, 1], [0, 0, 0]]))
    assert ref[0].item() == pytest.approx(1 / 3 + (2 / 2) / 3)  # 2/3, the true median is 0.5
    assert ref[1].item() == 0.0
    # it never stops on [5, 5, 5, 5]: last bin, running sum 0+1+2+3 = 6
    four = reference_histogram_median(torch.tensor([[5, 5, 5, 5]]))
    assert four.item() == pytest.approx(3 / 4 + (10 - 6) / 5 / 4)
    assert histogram_median(torch.tensor([[5, 5, 5, 5]])).item() == pytest.approx(0.5)
    assert uncertainty_thresholds(torch.tensor([0.0, 0.3]), 0.001).tolist() == \
        pytest.approx([0.001, 0.3])


def test_pseudo_labels_and_adaptive_factor():
    # one image, pixels A..D background, E a new class (2), F void; old model: 2 classes
    labels = torch.tensor([[[0, 0, 0], [0, 2, 255]]])
    old_logits = torch.zeros(1, 2, 2, 3)
    old_logits[0, 1, 0, 1] = 5.0  # B: old class 1
    uncertainty = torch.tensor([[[0.1, 0.2, 0.6], [0.9, 0.0, 0.0]]])
    thresholds = torch.tensor([0.5, 0.3])
    out, kept = pseudo_label(labels, old_logits, thresholds, uncertainty)
    # A: background kept as 0; B: class 1 (0.2 < 0.3); C, D: too uncertain -> ignored
    assert out.tolist() == [[[0, 1, 255], [255, 2, 255]]]
    assert kept.tolist() == [[[True, True, False], [False, False, False]]]
    assert labels[0, 0, 2] == 0  # the caller's labels untouched
    no_bg = torch.full((1, 2, 3), 2)
    factor = adaptive_factor(torch.cat([labels, no_bg]), torch.cat([kept, no_bg < 0]), 2)
    assert factor.tolist() == pytest.approx([2 / 4, 0.0])  # no background: 0 (the reference)


def test_weighted_cross_entropy_is_a_mean_over_every_pixel():
    logits = torch.zeros(2, 2, 1, 2)
    labels = torch.tensor([[[0, 255]], [[1, 1]]])
    loss = weighted_cross_entropy(logits, labels, torch.tensor([1.0, 0.5]))
    assert loss.item() == pytest.approx((LN2 + 0 + 0.5 * LN2 + 0.5 * LN2) / 4)


class LogitsAsImages(nn.Module):
    """An old model whose logits are its input (so a test chooses them)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return SegOutput(x)


def _plop_batch():
    """Pixels A B C (confident background), D (uniform: uncertain), E (new class 2), F void."""
    old = torch.zeros(1, 2, 2, 3)
    old[0, 0, 0, :] = 10.0
    old[0, 1, 1, 1] = 10.0  # E: the old model says class 1, but E is labelled new
    labels = torch.tensor([[[0, 0, 0], [0, 2, 255]]])
    return old, labels


def test_plop_thresholds_from_a_pass_over_the_step_data():
    plop = PLOP(bins=2, threshold=0.001, median="histogram", entropy="normalized")
    plop.setup(_ctx(old=LogitsAsImages()))
    old, labels = _plop_batch()
    plop.on_step_start(None, plop.ctx.old_model, [(old, labels)])
    # background only: A B C in bin 0 (entropy ~0), D in bin 1 (entropy 1), all predicted 0;
    # median (0 + 2/3) / 2; class 1 never predicted on background: the floor
    assert plop.thresholds.tolist() == pytest.approx([1 / 3, 0.001])
    restored = PLOP()
    restored.load_state_dict(plop.state_dict())
    assert torch.equal(restored.thresholds, plop.thresholds)


def test_plop_defaults_to_the_published_codes_arithmetic():
    """The config and the class default to the reference's uncertainty scale and median loop,
    with which its results were made. On the same batch its uncertainties are H / (C_o log C_o
    log C) = H / (2 ln 2 ln 3) and all four background pixels fall in bin 0 of 2, so the loop's
    median is the bin's middle, 1/4 (the true median of H / log C_o above is 1/3)."""
    from incseg.config import compose

    method = compose(["method=plop"]).method
    assert (method.median, method.entropy) == ("reference", "reference")
    plop = PLOP(bins=2, threshold=0.001)
    plop.setup(_ctx(old=LogitsAsImages()))
    old, labels = _plop_batch()
    plop.on_step_start(None, plop.ctx.old_model, [(old, labels)])
    assert plop.thresholds.tolist() == pytest.approx([1 / 4, 0.001])


def test_plop_terms_pseudo_labelled_adaptive_ce_on_every_head():
    plop = PLOP(bins=2, median="histogram", entropy="normalized")
    plop.setup(_ctx(old=LogitsAsImages()))
    old, labels = _plop_batch()
    plop.on_step_start(None, plop.ctx.old_model, [(old, labels)])
    feats = {"stages_preact": [torch.zeros(1, 1, 2, 2)], "decoder": torch.zeros(1, 1, 2, 2)}
    out = SegOutput(torch.zeros(1, 3, 2, 3, requires_grad=True),
                    aux=[torch.zeros(1, 3, 2, 3)],
                    features={**feats, "logits_small": torch.zeros(1, 3, 2, 3)})
    feats["logits_small"] = old
    terms = plop.terms(Batch(old, labels), out, SegOutput(old, features=feats))
    # labels -> [0 0 0; 255 2 255]; factor 3 / 4 (3 of 4 background pixels kept); CE ln 3 on
    # 4 valid pixels of 6, per head, two heads
    assert terms["seg"].item() == pytest.approx(2 * 0.75 * 4 * LN3 / 6, rel=1e-5)
    assert plop.segmentation_loss(out, labels).item() == 0.0  # the CE is the `seg` term
    off = PLOP(bins=2, adaptive_factor=False)
    off.setup(plop.ctx)
    off.thresholds = plop.thresholds
    assert off.terms(Batch(old, labels), out, SegOutput(old, features=feats))["seg"].item() \
        == pytest.approx(2 * 4 * LN3 / 6, rel=1e-5)
    with pytest.raises(RuntimeError, match="on_step_start"):
        PLOP().terms(Batch(old, labels), out, SegOutput(old, features=feats))


# ---- EWC / PI / RW -------------------------------------------------------------------------------
def test_importance_formulas_hand_computed():
    assert normalize_importance(torch.tensor([1.0, 3.0, 5.0])).tolist() == \
        pytest.approx([0.0, 0.5, 1.0])
    assert normalize_importance(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]
    one, two, half = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.5)
    assert ewc_fisher_update(one, two).item() == pytest.approx(0.9 * 4 + 0.1)
    assert pi_path_update(torch.tensor(0.0), two, one, half).item() == pytest.approx(1.0)
    assert pi_score(one, torch.tensor(0.0), half).item() == pytest.approx(4.0)
    assert pi_score(one, torch.tensor(0.0), half, one).item() == pytest.approx(5.0)
    assert pi_score(-one, torch.tensor(0.0), half).item() == 0.0  # clipped at 0
    # RW: 2 * (1 - 0.5) / (0.5 * 4 * 0.25 + 1e-8)
    assert rw_score_update(torch.tensor(0.0), two, one, half, torch.tensor(4.0)).item() == \
        pytest.approx(2.0)
    assert rw_final_score(-one).item() == 0.0
    assert rw_final_score(-one, torch.tensor(4.0)).item() == pytest.approx(2.0)
    assert rw_final_score(two, torch.tensor(4.0)).item() == pytest.approx(3.0)
    params = {"w": torch.tensor([1.0, 2.0])}
    anchors, imp = {"w": torch.zeros(2)}, {"w": torch.tensor([1.0, 0.5])}
    assert quadratic_penalty(params, anchors, imp).item() == pytest.approx(1 + 0.5 * 4)
    assert penalty_gradient(params["w"], anchors["w"], imp["w"], 10.0).tolist() == \
        pytest.approx([20.0, 20.0])


class Toy(nn.Module):
    """Two weight tensors (and, grown, a third: the next step's new classifier)."""

    def __init__(self, grown: bool = False):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.b = nn.Parameter(torch.tensor([0.5]))
        if grown:
            self.c = nn.Parameter(torch.tensor([3.0]))


def _iterate(method, model, grads, moves=None):
    """One iteration: the task gradients, the method's hook, then the weights ``moves`` set."""
    for name, g in grads.items():
        getattr(model, name).grad = torch.tensor(g)
    method.on_before_optimizer_step(model)
    with torch.no_grad():
        for name, value in (moves or {}).items():
            getattr(model, name).copy_(torch.tensor(value))


def _step0(method, model, iterations):
    method.load_previous_step({})
    method.setup(_ctx(num_old=0, num_classes=3, step=0, model=model))
    for grads, moves in iterations:
        _iterate(method, model, grads, moves)
    method.on_step_end(model, None)
    return method.next_step_state()


def _step1(method, handover, old, moves):
    """Step 1 from ``old`` (grown by a new weight ``c``), moved to ``moves``."""
    model = Toy(grown=True)
    model.load_state_dict(old.state_dict(), strict=False)
    with torch.no_grad():
        for name, value in moves.items():
            getattr(model, name).copy_(torch.tensor(value))
    method.load_previous_step(handover)
    method.setup(_ctx(num_old=2, num_classes=3, old=old, model=model))
    return model


def test_ewc_fisher_from_step0_penalty_and_its_gradient_at_step1():
    model = Toy()
    handover = _step0(EWC(reg_weight=10), model, [({"w": [1.0, 2.0], "b": [4.0]}, None),
                                                  ({"w": [0.0, 1.0], "b": [0.0]}, None)])
    # F starts at 1: [.9 + .1, .9*4 + .1] = [1, 3.7], then [.1 * 1, .9 + .37]; b 14.5 -> 1.45
    assert handover["fisher"]["w"].tolist() == pytest.approx([0.1, 1.27])
    assert handover["fisher"]["b"].tolist() == pytest.approx([1.45])
    old = copy.deepcopy(model).requires_grad_(False)
    ewc = EWC(reg_weight=10)
    new = _step1(ewc, handover, old, {"w": [2.0, 5.0]})
    # N(F_w) = [0, 1], N(F_b) = 0 (one value); displacement of w [1, 3]: 10 * (0 + 9) = 90
    reg = ewc.terms(None, SegOutput(torch.zeros(1)), None)["reg"]
    assert reg.item() == pytest.approx(90.0, rel=1e-6) and not reg.requires_grad
    _iterate(ewc, new, {"w": [1.0, 1.0], "b": [1.0], "c": [1.0]})
    # the Fisher reads the task gradients only; the new weight c starts at 1 and is free
    assert ewc.fisher["w"].tolist() == pytest.approx([0.91, 0.9 + 0.127])
    assert ewc.fisher["c"].tolist() == pytest.approx([1.0])
    # then the penalty's gradient 2 * 10 * N(F) * (θ - θ_old) joins them
    assert new.w.grad.tolist() == pytest.approx([1.0, 1.0 + 60.0], rel=1e-6)
    assert new.b.grad.tolist() == [1.0] and new.c.grad.tolist() == [1.0]
    assert set(ewc.anchors) == {"w", "b"}  # the previous model's weights, never the new c


def test_pi_path_integral_score_and_sum_over_steps():
    model = Toy()
    handover = _step0(PI(reg_weight=10), model, [
        ({"w": [1.0, 2.0], "b": [1.0]}, {"w": [0.5, 1.0], "b": [1.0]}),   # snapshot only
        ({"w": [2.0, 0.0], "b": [-1.0]}, {"w": [0.0, 1.0], "b": [1.5]}),
    ])
    # δ = g * (θ_prev - θ) from the 2nd update on: δ_w = [2 * .5, 0], δ_b = -1 * -.5;
    # S = δ / (θ_end - θ_start)^2 = [1 / 1, 0 / 1], .5 / 1
    assert handover["score"]["w"].tolist() == pytest.approx([1.0, 0.0])
    assert handover["score"]["b"].tolist() == pytest.approx([0.5])
    old = copy.deepcopy(model).requires_grad_(False)
    pi = PI(reg_weight=10)
    new = _step1(pi, handover, old, {})
    assert pi.importance["w"].tolist() == pytest.approx([1.0, 0.0])
    _iterate(pi, new, {"w": [1.0, 1.0], "b": [1.0], "c": [1.0]}, {"w": [-1.0, 1.0]})
    _iterate(pi, new, {"w": [1.0, 0.0], "b": [0.0], "c": [0.0]})
    pi.on_step_end(new, old)
    # δ_w = [1 * (0 - -1), 0] over a displacement [-1, 0]: 1 / 1 + the previous 1
    assert pi.next_step_state()["score"]["w"].tolist() == pytest.approx([2.0, 0.0])
    assert pi.next_step_state()["score"]["c"].tolist() == [0.0]  # new: no previous score


def test_rw_score_every_iterations_with_the_fisher_before_the_update():
    model = Toy()
    handover = _step0(RW(reg_weight=10, alpha=0.5, iterations=2), model, [
        ({"w": [2.0, 0.0], "b": [0.0]}, {"w": [0.5, 2.0]}),   # count 0: snapshot θ=1
        ({"w": [1.0, 0.0], "b": [0.0]}, {"w": [0.0, 2.0]}),   # count 1: Fisher only
        ({"w": [2.0, 0.0], "b": [0.0]}, None),                # count 2: score, snapshot
    ])
    # F: 1 -> .5*4 + .5 = 2.5 -> .5 + 1.25 = 1.75 -> 2 + .875 = 2.875; score at count 2:
    # 2 * (1 - 0) / (.5 * 1.75 * 1 + 1e-8)
    assert handover["fisher"]["w"].tolist() == pytest.approx([2.875, 0.125])
    assert handover["score"]["w"].tolist() == pytest.approx([2 / 0.875, 0.0])
    old = copy.deepcopy(model).requires_grad_(False)
    rw = RW(reg_weight=10, alpha=0.5, iterations=2)
    _step1(rw, handover, old, {})
    # the penalty weighs N(F) + N(S): [1, 0] + [1, 0]
    assert rw.importance["w"].tolist() == pytest.approx([2.0, 0.0])
    rw.on_step_end(None, old)  # no iteration: S = 0, averaged with the previous one
    assert rw.next_step_state()["score"]["w"].tolist() == pytest.approx([1 / 0.875, 0.0])


#: three iterations of step 0: the task gradients, then the weights' moves
RESUME_ITERATIONS = [({"w": [1.0, -2.0], "b": [0.5]}, {"w": [0.9, 2.1], "b": [0.4]}),
                     ({"w": [0.5, -1.0], "b": [0.2]}, {"w": [0.8, 2.2], "b": [0.3]}),
                     ({"w": [0.3, -0.5], "b": [0.1]}, {"w": [0.7, 2.3], "b": [0.2]})]


def _started(method_cls):
    method, model = method_cls(reg_weight=1), Toy()
    method.setup(_ctx(num_old=0, step=0, model=model))
    return method, model


def _same_handover(a: dict, b: dict) -> bool:
    return bool(a) and a.keys() == b.keys() and all(
        torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])


@pytest.mark.parametrize("method_cls", [EWC, PI, RW])
def test_regulariser_state_survives_a_mid_step_resume(method_cls):
    straight, model = _started(method_cls)
    for grads, moves in RESUME_ITERATIONS:
        _iterate(straight, model, grads, moves)
    straight.on_step_end(model, None)
    first, model = _started(method_cls)
    _iterate(first, model, *RESUME_ITERATIONS[0])
    state = first.state_dict()
    resumed, fresh = _started(method_cls)  # the resumed process: weights from the checkpoint
    fresh.load_state_dict(model.state_dict())
    resumed.load_state_dict(state)
    for grads, moves in RESUME_ITERATIONS[1:]:
        _iterate(resumed, fresh, grads, moves)
    resumed.on_step_end(fresh, None)
    assert _same_handover(straight.next_step_state(), resumed.next_step_state())


@pytest.mark.parametrize("method_cls", [EWC, PI, RW])
def test_regulariser_resumed_after_its_last_epoch_hands_over_as_the_uninterrupted_step(
        method_cls):
    """Killed after the last epoch checkpoint, the rerun's fit has nothing to train and
    Lightning runs no on_train_end: the hand-over comes from on_fit_end, from the restored
    accumulators, equal to the uninterrupted step's (it was empty, and the next step ran
    without its penalty)."""
    straight, model = _started(method_cls)
    for grads, moves in RESUME_ITERATIONS[:2]:
        _iterate(straight, model, grads, moves)
    state = straight.state_dict()  # the last epoch checkpoint
    straight.on_step_end(model, None)
    straight.on_fit_end(model, [])  # after a full fit: changes nothing
    resumed, fresh = _started(method_cls)
    fresh.load_state_dict(model.state_dict())
    resumed.load_state_dict(state)
    assert resumed.next_step_state() == {}
    resumed.on_fit_end(fresh, [])
    assert _same_handover(straight.next_step_state(), resumed.next_step_state())


# ---- LwF-MC ------------------------------------------------------------------------------------
def test_lwf_mc_losses_hand_computed():
    logits = torch.zeros(1, 2, 1, 2)
    # every channel BCE(0, y) = ln 2, two channels per pixel; the void pixel counts 0 but is
    # in the denominator
    assert one_hot_bce(logits, torch.tensor([[[1, 255]]])).item() == pytest.approx(LN2)
    z = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  BCE(z, 0) = softplus(z)
    assert one_hot_bce(z, torch.tensor([[[1]]])).item() == pytest.approx(sp(2) + sp(1))
    new = torch.tensor([0.0, 0.0, 5.0]).view(1, 3, 1, 1)
    old = torch.zeros(1, 2, 1, 1)  # sigmoid 0.5: BCE(0, .5) = ln 2 per old channel
    assert bce_distillation(new, old).item() == pytest.approx(2 * LN2)


def test_lwf_mc_method_bce_on_every_head_and_kd_on_the_main_one():
    m = LwFMC(kd_weight=10)
    assert m.trains_step0 and m.uses_old_outputs
    labels = torch.tensor([[[0, 2]]])
    out = SegOutput(torch.zeros(1, 3, 1, 2), aux=[torch.zeros(1, 3, 1, 2)])
    assert m.segmentation_loss(out, labels).item() == pytest.approx(2 * 3 * LN2)
    old = SegOutput(torch.zeros(1, 2, 1, 2))
    assert m.terms(None, out, old)["kd"].item() == pytest.approx(10 * 2 * LN2)


# ---- the systems call the methods --------------------------------------------------------------
def test_student_loss_holds_plops_pseudo_labelled_ce_and_pod():
    from incseg.models import build_model
    from incseg.systems import StudentModule
    from incseg.systems.base import Recipe
    from incseg.tasks import get_task

    torch.manual_seed(0)
    old = build_model("bisenet_r18", [16])
    new = copy.deepcopy(old)
    new.add_step(5, init_balanced=True)
    plop = PLOP()
    module = StudentModule(new, old, get_task("voc", "15-5"), 1, Recipe(), plop)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 21, (2, 32, 32))
    y[:, :16] = 0  # background (old classes are background in a step's labels)
    module.train()
    plop.on_step_start(new, module.old_model, [(x, y)])
    terms = module.training_loss(x, y)
    assert terms["seg"].item() > 0 and terms["pod"].item() >= 0
    assert terms["loss"].item() == pytest.approx(terms["seg"].item() + terms["pod"].item())
    again = plop.terms(Batch(x, y), model_output(new, x, plop.needs_features),
                       model_output(module.old_model, x, plop.needs_features))
    assert terms["seg"].item() == pytest.approx(again["seg"].item(), rel=1e-5)


def test_teacher_trains_step0_with_the_methods_loss_and_hooks():
    from incseg.models import build_model
    from incseg.systems import TeacherModule
    from incseg.systems.base import Recipe
    from incseg.tasks import get_task

    torch.manual_seed(0)
    model = build_model("bisenet_r18", [16])
    teacher = TeacherModule(model, get_task("voc", "15-5"), 0, Recipe(), method=LwFMC())
    teacher.train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 16, (2, 32, 32))
    out = model(x)
    bce = sum(one_hot_bce(h, y) for h in (out.logits, *out.aux))
    assert teacher.training_loss(x, y)["loss"].item() == pytest.approx(bce.item(), rel=1e-5)
    ewc = EWC()
    teacher = TeacherModule(model, get_task("voc", "15-5"), 0, Recipe(), method=ewc)
    teacher.training_loss(x, y)["loss"].backward()
    teacher.on_before_optimizer_step(None)
    teacher.on_train_end()
    w = "backbone.conv1.weight"
    g = dict(model.named_parameters())[w].grad
    assert torch.allclose(ewc.next_step_state()["fisher"][w], 0.9 * g ** 2 + 0.1)
    ckpt = {}
    teacher.on_save_checkpoint(ckpt)
    assert torch.equal(ckpt["incseg_method"]["fisher"][w], ewc.fisher[w].cpu())


# ---- bad settings: one line each (docs/errors.md rows 73-78) ------------------------------------
BAD = [
    pytest.param(["method=plop", "method.median=mean"],
                 "method=plop: median='mean' is not valid; use one of histogram, reference",
                 id="plop-choice"),
    pytest.param(["method=plop", "method.pod_stages=relu"],
                 "method=plop: pod_stages='relu' is not valid; use one of preact, activated",
                 id="plop-stages"),
    pytest.param(["method=plop", "method.pod_scales=[0,2]"],
                 "method=plop: pod_scales=[0, 2] must be a non-empty list of whole numbers >= 1, "
                 "e.g. [1, 2, 4]",
                 id="plop-scales"),
    pytest.param(["method=plop", "method.threshold=1.5"],
                 "method=plop: threshold=1.5 must be in [0, 1] (an uncertainty)",
                 id="plop-threshold"),
    pytest.param(["method=plop", "method.bins=0"],
                 "method=plop: bins=0 must be a whole number >= 1", id="plop-bins"),
    pytest.param(["method=ewc", "method.alpha=0"], "method=ewc: alpha=0 must be in (0, 1]",
                 id="ewc-alpha"),
    pytest.param(["method=rw", "method.iterations=0"],
                 "method=rw: iterations=0 must be a whole number >= 1", id="rw-iterations"),
    pytest.param(["method=pi", "method.normalize=maybe"],
                 "method=pi: normalize='maybe' is not a boolean; use normalize=true or "
                 "normalize=false", id="pi-flag"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_method_settings_one_line(tmp_path, monkeypatch, capsys, args, message):
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
#: what each method hands from one step to the next (in the step's model file)
HANDOVER = {"ewc": {"fisher"}, "pi": {"score"}, "rw": {"fisher", "score"}, "lwf_mc": set(),
            "plop": set()}
#: RW's score every 2 iterations, so the few of a tiny step see it grow
SETTINGS = {"rw": ["method.iterations=2"]}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _handover(path):
    from incseg.checkpoints import read_model_file

    return read_model_file(path).get("method_state") or {}


@pytest.mark.parametrize("method", sorted(HANDOVER))
def test_smoke_protocol_runs_each_new_method(cache, tmp_path, caplog, method):
    from incseg.config import compose
    from incseg.protocol import run_protocol

    run = tmp_path / method
    cfg = compose([*TINY, f"paths.cache_dir={cache}", f"method={method}",
                   *SETTINGS.get(method, [])])
    with caplog.at_level("INFO"):
        res = run_protocol(cfg, run)
    assert [s["step"] for s in res["steps"]] == [0, 1] and res["method"] == method
    final = res["final"]
    assert all(v is None or 0 <= v <= 1 for v in final.values()) and "hiou" in final
    # none of them shares the plain-CE step 0 (its own loss, its own state, or PLOP's data)
    assert "step-0 cache miss" in caplog.text
    for step in (0, 1):
        state = _handover(run / "checkpoints" / f"step{step}.pt")
        assert set(state) == HANDOVER[method]
        for tensors in state.values():
            assert all(torch.isfinite(t).all() and (t >= 0).all() for t in tensors.values())
    if method == "plop":
        data = res["provenance"]["config"]["data"]
        assert (data["void_as_background"], data["unseen_as"]) == (False, "background")
        assert "PLOP step 1: entropy thresholds" in caplog.text
    if HANDOVER[method]:  # step 1's method starts from step 0's importance
        _check_student_takes_over(cfg, run)


def _check_student_takes_over(cfg, run):
    from incseg.config import cache_dir_from_cfg, source_from_cfg, task_from_cfg
    from incseg.protocol.loop import build_student

    student = build_student(cfg, run, cache_dir_from_cfg(cfg), source_from_cfg(cfg),
                            task_from_cfg(cfg), 1)
    method = student.module.method
    step0 = _handover(run / "checkpoints" / "step0.pt")
    old = dict(student.module.old_model.named_parameters())
    assert set(method.importance) == set(old)  # every old weight, not the new head's
    assert set(dict(student.module.model.named_parameters())) - set(old)
    kind = "fisher" if "fisher" in step0 else "score"
    extra = {n: normalize_importance(t) for n, t in step0.get("score", {}).items()} \
        if kind == "fisher" else {}
    for n, t in step0[kind].items():
        expected = normalize_importance(t) + extra.get(n, 0)
        assert torch.allclose(method.importance[n], expected)


@pytest.mark.slow  # three runs of a regulariser; exact resume is covered fast by test_resume
def test_a_regulariser_resumed_mid_step_or_after_its_last_epoch_ends_as_the_uninterrupted_run(
        cache, tmp_path, monkeypatch):
    from incseg.checkpoints import safe_load
    from incseg.config import compose
    from incseg.protocol import run_protocol
    from tests.resume_checks import kill_after_step1_epoch, step_numbers

    # lr 0.01 moves the weights within two epochs; RW's weight 30 keeps its penalty (curvature
    # 4 x 30) below the 136 that SGD at that lr can follow (MiB's 100 is refused there)
    args = [*TINY, f"paths.cache_dir={cache}", "method=rw", "method.iterations=2",
            "method.reg_weight=30", "train.epochs_incremental=2", "train.lr_incremental=0.01"]
    ref = run_protocol(compose(args), tmp_path / "reference")
    # killed after step 1's first epoch (mid-step), and after its last one (the rerun's fit
    # has nothing left to train: the hand-over comes from the restored state)
    for kill_at in (1, 2):
        cut = tmp_path / f"cut{kill_at}"
        kill_after_step1_epoch(monkeypatch, kill_at, lambda cut=cut: run_protocol(compose(args),
                                                                                   cut))
        state = safe_load(cut / "checkpoints" / "step1-last.ckpt")["incseg_method"]
        assert state["count"] > 0 and state["snapshot"]  # the RW state rides in the checkpoint
        res = run_protocol(compose(args), cut)
        assert step_numbers(res) == step_numbers(ref) and res["final"] == ref["final"]
        a, b = _handover(tmp_path / "reference" / "checkpoints" / "step1.pt"), \
            _handover(cut / "checkpoints" / "step1.pt")
        assert a and all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])
    assert any((a["score"][n] > 0).any() for n in a["score"])  # the score did accumulate


def test_the_methods_preset_composes_every_job_in_a_run_dir_of_its_own():
    import itertools

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from incseg.config import compose
    from incseg.protocol.preflight import check_run

    name = "experiment=cpu/methods"
    params = OmegaConf.to_container(compose([name], return_hydra_config=True)
                                    .hydra.sweeper.params)
    assert {str(params["task"]), str(params["seed"])} == {"15-5s", "0,1,2"}
    methods = str(params["method"]).split(",")
    assert sorted(methods) == sorted(["ft", "lwf", "lwf_mc", "ilt", "mib", "plop", "dkd",
                                      "joint"])  # EWC / PI / RW: cpu/methods_regularizers
    dirs = set()
    for seed, method in itertools.product((0, 2), methods):
        cfg = compose([name, f"seed={seed}", f"method={method}", "task=15-5s"],
                      return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        check_run(cfg)
        dirs.add(f"{cfg.hydra.sweep.dir}/{cfg.hydra.sweep.subdir}")
        assert cfg.data.void_as_background is (method != "plop")
    assert len(dirs) == 2 * len(methods)


def test_weight_penalty_curvature_is_checked_against_sgd_before_a_step():
    """EWC's penalty w sum I (θ - θ*)² has curvature 2 w I along a weight: 2 x 500 x 1 = 1000
    for MiB's weight and a normalised importance, above the 2 (1 + b) / ((1 + 2 b) lr) = 135.7
    that Nesterov SGD (b = 0.9) at lr 0.01 can follow: the step is refused with the fix."""
    from incseg.errors import ConfigError
    from incseg.methods.ewc import EWC
    from incseg.methods.rw import RW
    from tests.test_protocol import _student

    ewc = EWC(reg_weight=500)
    assert ewc.penalty_curvature() is None  # no importance yet: step 0
    ewc.importance = {"a": torch.tensor([0.2, 1.0]), "b": torch.tensor([0.5])}
    assert ewc.penalty_curvature() == pytest.approx(1000.0)
    rw = RW(reg_weight=100)
    rw.importance = {"a": torch.tensor([2.0])}  # N(F) + N(S): at most 2
    assert rw.penalty_curvature() == pytest.approx(400.0)

    module, _ = _student(method=ewc)  # Recipe(): lr 0.01, Nesterov momentum 0.9
    ewc.importance = {"a": torch.tensor([0.2, 1.0])}
    with pytest.raises(ConfigError, match=r"largest curvature 1000 .* above 136, the most SGD "
                                          r"with lr 0.01 and Nesterov momentum 0.9 can follow: "
                                          r"step 1 would diverge; use method.reg_weight <= 67.9"):
        module._check_penalty_curvature()
    ewc.reg_weight = 60  # 120 < 135.7
    module._check_penalty_curvature()

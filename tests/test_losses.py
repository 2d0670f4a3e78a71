"""Losses against values computed by hand (math on explicit numbers), not by the code under test."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from incseg.losses import (
    BNStatisticsHook,
    bisenet_loss,
    bn_layer_distance,
    bn_statistics_loss,
    competition_loss,
    cross_entropy,
    feature_distillation,
    image_priors,
    knowledge_distillation,
    replay_kl,
    replay_loss,
    replay_mse,
    unbiased_cross_entropy,
    unbiased_knowledge_distillation,
)

E = math.exp
LN = math.log


def _softmax(values: list[float]) -> list[float]:
    exps = [E(v) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _pixels(*columns: list[float]) -> torch.Tensor:
    """``1 x C x 1 x P`` tensor from per-pixel channel lists (pixel p = columns[p])."""
    return torch.tensor(columns, dtype=torch.float64).T.reshape(1, len(columns[0]), 1, -1)


# ----------------------------------------------------------------------------- cross-entropy


def test_cross_entropy_hand_value_and_ignore():
    logits = _pixels([1.0, 2.0, 0.5], [0.2, -1.0, 3.0])
    labels = torch.tensor([[[1, 2]]])
    px0 = -LN(E(2.0) / (E(1.0) + E(2.0) + E(0.5)))
    px1 = -LN(E(3.0) / (E(0.2) + E(-1.0) + E(3.0)))
    assert cross_entropy(logits, labels).item() == pytest.approx((px0 + px1) / 2, rel=1e-12)
    ignored = torch.tensor([[[255, 2]]])
    assert cross_entropy(logits, ignored).item() == pytest.approx(px1, rel=1e-12)


def test_cross_entropy_all_ignored_is_zero_and_differentiable():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.full((2, 4, 4), 255)
    for loss in (cross_entropy(logits, labels), unbiased_cross_entropy(logits, labels, 2)):
        assert not torch.isnan(loss)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_unbiased_ce_equals_ce_when_one_old_class():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 3, 4), generator=gen)
    labels[0, 0, :2] = 255
    ce = cross_entropy(logits, labels)
    ref = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255)
    assert ce.item() == pytest.approx(ref.item(), rel=1e-12)
    assert unbiased_cross_entropy(logits, labels, num_old=1).item() == pytest.approx(
        ce.item(), rel=1e-12
    )


def test_unbiased_ce_hand_values_1x3x1x2():
    # C = 3, C_o = 2: class 1 is old (seen as background), class 2 is new.
    logits = _pixels([1.0, 2.0, 0.5], [0.2, -1.0, 3.0])
    z0 = E(1.0) + E(2.0) + E(0.5)
    z1 = E(0.2) + E(-1.0) + E(3.0)
    # pixel 0 labelled 1 (old -> background): -log(p_0 + p_1)
    px0 = -LN((E(1.0) + E(2.0)) / z0)
    # pixel 1 labelled 2 (new): -log p_2
    px1 = -LN(E(3.0) / z1)
    labels = torch.tensor([[[1, 2]]])
    loss = unbiased_cross_entropy(logits, labels, num_old=2)
    assert loss.item() == pytest.approx((px0 + px1) / 2, rel=1e-12)
    # A label 0 on pixel 1 gives -log(p_0 + p_1) there too.
    both_bg = unbiased_cross_entropy(logits, torch.tensor([[[0, 0]]]), num_old=2)
    assert both_bg.item() == pytest.approx((px0 - LN((E(0.2) + E(-1.0)) / z1)) / 2, rel=1e-12)
    # ignore_index: only pixel 1 counts.
    ignored = unbiased_cross_entropy(logits, torch.tensor([[[255, 2]]]), num_old=2)
    assert ignored.item() == pytest.approx(px1, rel=1e-12)


def test_unbiased_ce_does_not_modify_labels():
    logits = torch.randn(1, 4, 2, 2)
    labels = torch.tensor([[[1, 2], [3, 255]]])
    before = labels.clone()
    unbiased_cross_entropy(logits, labels, num_old=3)
    assert torch.equal(labels, before)


def test_unbiased_ce_negative_ignore_index_not_mapped_to_background():
    logits = _pixels([1.0, 2.0, 0.5], [0.2, -1.0, 3.0])
    px1 = -LN(E(3.0) / (E(0.2) + E(-1.0) + E(3.0)))
    loss = unbiased_cross_entropy(logits, torch.tensor([[[-1, 2]]]), num_old=2, ignore_index=-1)
    assert loss.item() == pytest.approx(px1, rel=1e-12)


def test_unbiased_ce_stable_for_huge_logits():
    logits = _pixels([1000.0, 999.0, -1000.0], [0.0, 0.0, 2000.0])
    loss = unbiased_cross_entropy(logits.float(), torch.tensor([[[0, 2]]]), num_old=2)
    # pixel 0: p_0 + p_1 ~ 1 -> 0; pixel 1: p_2 ~ 1 -> 0
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-5)


def test_bisenet_loss_sums_heads():
    gen = torch.Generator().manual_seed(1)
    main, a1, a2 = (torch.randn(2, 3, 4, 4, generator=gen) for _ in range(3))
    labels = torch.randint(0, 3, (2, 4, 4), generator=gen)
    f = torch.nn.functional.cross_entropy
    expected = f(main, labels) + f(a1, labels) + f(a2, labels)
    got = bisenet_loss(main, [a1, a2], labels, cross_entropy)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert bisenet_loss(main, None, labels, cross_entropy).item() == pytest.approx(
        f(main, labels).item(), rel=1e-6
    )
    assert bisenet_loss(main, [], labels, cross_entropy).item() == pytest.approx(
        f(main, labels).item(), rel=1e-6
    )


# ----------------------------------------------------------------------------- distillation

# Two pixels, C_o = 2 old classes, C = 3 (class 2 new).
OLD = [[1.0, 0.0], [-0.5, 2.0]]
NEW = [[0.5, 1.5, 2.0], [1.0, 0.0, -1.0]]


def _hand_kd(alpha: float) -> float:
    total = 0.0
    for z_old, z in zip(OLD, NEW):
        q = _softmax([alpha * v for v in z_old])
        p = _softmax(z[:2])  # softmax over the old channels only
        total += -(q[0] * LN(p[0]) + q[1] * LN(p[1])) / 2
    return total / len(OLD)


def _hand_ukd(alpha: float) -> float:
    total = 0.0
    for z_old, z in zip(OLD, NEW):
        q = _softmax([alpha * v for v in z_old])
        p = _softmax(z)  # softmax over all seen classes
        total += -(q[0] * LN(p[0] + p[2]) + q[1] * LN(p[1])) / 2
    return total / len(OLD)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_kd_and_ukd_hand_values(alpha):
    old, new = _pixels(*OLD), _pixels(*NEW)
    assert knowledge_distillation(new, old, alpha).item() == pytest.approx(
        _hand_kd(alpha), rel=1e-12
    )
    assert unbiased_knowledge_distillation(new, old, alpha).item() == pytest.approx(
        _hand_ukd(alpha), rel=1e-12
    )


def test_kd_minimal_when_models_agree():
    z_old = [0.3, -1.2, 2.0]
    old = _pixels(z_old)
    # Agreeing student: same old channels up to a constant shift, plus an arbitrary new channel.
    agree = _pixels([v + 5.0 for v in z_old] + [4.0])
    perturbed = _pixels([0.3, -0.2, 2.0, 4.0])
    q = _softmax(z_old)
    entropy_over_c_o = -sum(v * LN(v) for v in q) / 3
    kd_agree = knowledge_distillation(agree, old)
    assert kd_agree.item() == pytest.approx(entropy_over_c_o, rel=1e-12)
    assert kd_agree.item() < knowledge_distillation(perturbed, old).item()


def test_ukd_without_new_classes_is_kd():
    # Hand: C == C_o == 2, so p_0 + sum_new p = p_0 and p = softmax over the old channels.
    old, new = _pixels(*OLD), _pixels(*[z[:2] for z in NEW])
    hand = 0.0
    for z_old, z in zip(OLD, NEW):
        q, p = _softmax(z_old), _softmax(z[:2])
        hand += -(q[0] * LN(p[0]) + q[1] * LN(p[1])) / 2
    hand /= 2
    assert unbiased_knowledge_distillation(new, old).item() == pytest.approx(hand, rel=1e-12)
    assert knowledge_distillation(new, old).item() == pytest.approx(hand, rel=1e-12)
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    assert unbiased_knowledge_distillation(a, b).item() == pytest.approx(
        knowledge_distillation(a, b).item(), rel=1e-5
    )


def test_distillation_does_not_backprop_into_teacher():
    student = torch.randn(1, 3, 2, 2, requires_grad=True)
    teacher = torch.randn(1, 2, 2, 2, requires_grad=True)
    loss = unbiased_knowledge_distillation(student, teacher) + knowledge_distillation(
        student, teacher
    )
    loss.backward()
    assert student.grad is not None and teacher.grad is None


def test_feature_distillation_mse():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    b = torch.tensor([0.0, 2.0, 5.0, 4.0]).view(1, 4, 1, 1)
    assert feature_distillation(a, b).item() == pytest.approx((1 + 0 + 4 + 0) / 4)


def test_replay_mse_hand_value():
    old, new = _pixels(*OLD), _pixels(*NEW)
    # squared differences on channels 0, 1 of both pixels; new channel 2 is ignored
    sq = (0.5 - 1.0) ** 2 + (1.5 - 0.0) ** 2 + (1.0 + 0.5) ** 2 + (0.0 - 2.0) ** 2
    assert replay_mse(new, old, "plain").item() == pytest.approx(sq / 4, rel=1e-12)
    assert replay_loss("mse", new, old, background="plain").item() == pytest.approx(
        sq / 4, rel=1e-12)


def test_replay_mse_unbiased_background_hand_value():
    old, new = _pixels(*OLD), _pixels(*NEW)
    # the student's background = log(e^bg + e^new): pixel 1 log(e^0.5 + e^2), pixel 2 log(e + 1/e)
    bg1, bg2 = LN(E(0.5) + E(2.0)), LN(E(1.0) + E(-1.0))
    sq = (bg1 - 1.0) ** 2 + (1.5 - 0.0) ** 2 + (bg2 + 0.5) ** 2 + (0.0 - 2.0) ** 2
    assert replay_mse(new, old).item() == pytest.approx(sq / 4, rel=1e-12)
    assert replay_loss("mse", new, old).item() == pytest.approx(sq / 4, rel=1e-12)


def test_replay_distances_are_zero_after_init_balanced():
    """init_balanced lowers the background bias by log(N_new + 1): the unbiased view of the
    student equals its teacher exactly, the plain view is off on the background channel."""
    from incseg.models import build_model

    torch.manual_seed(0)
    teacher = build_model("bisenet_r18", [16]).eval()
    student = build_model("bisenet_r18", [16])
    student.load_state_dict(teacher.state_dict())
    student.add_step(5, init_balanced=True)
    student.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        z_old, z = teacher(x).logits, student(x).logits
    assert replay_mse(z, z_old).item() == pytest.approx(0.0, abs=1e-9)
    assert replay_kl(z, z_old, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    plain = replay_mse(z, z_old, "plain").item()
    assert plain == pytest.approx(LN(6) ** 2 / 16, rel=1e-4)  # (log 6)^2 on 1 of 16 channels


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_replay_kl_hand_value(temperature):
    old, new = _pixels(*OLD), _pixels(*NEW)
    plain = unbiased = 0.0
    for z_old, z in zip(OLD, NEW):
        q = _softmax([v / temperature for v in z_old])
        p = _softmax([v / temperature for v in z[:2]])
        plain += sum(qc * LN(qc / pc) for qc, pc in zip(q, p))
        bg = LN(E(z[0]) + E(z[2]))  # background or new, at T = 1, then tempered
        p = _softmax([bg / temperature, z[1] / temperature])
        unbiased += sum(qc * LN(qc / pc) for qc, pc in zip(q, p))
    plain, unbiased = temperature**2 * plain / 2, temperature**2 * unbiased / 2
    assert replay_kl(new, old, temperature, "plain").item() == pytest.approx(plain, rel=1e-12)
    assert replay_kl(new, old, temperature).item() == pytest.approx(unbiased, rel=1e-12)
    assert replay_loss("kl", new, old, temperature).item() == pytest.approx(unbiased,
                                                                           rel=1e-12)


def test_replay_kl_zero_when_equal():
    old = torch.randn(2, 3, 4, 4)
    student = torch.cat([old, torch.randn(2, 2, 4, 4)], dim=1)
    assert replay_kl(student, old, 2.0, "plain").item() == pytest.approx(0.0, abs=1e-6)


def test_replay_dispatcher_ukd_and_unknown_kind():
    old, new = _pixels(*OLD), _pixels(*NEW)
    assert replay_loss("ukd", new, old).item() == pytest.approx(_hand_ukd(1.0), rel=1e-12)
    with pytest.raises(ValueError) as info:  # tensor code; the config check says it first
        replay_loss("l1", new, old)
    message = str(info.value)
    assert "\n" not in message and "mse|kl|ukd" in message and "'l1'" in message


# ----------------------------------------------------------------------------- DeepInversion


def test_bn_layer_distance_hand_numbers():
    # channel 0 sees [1, 3] (mean 2, biased var 1), channel 1 sees [0, 4] (mean 2, var 4)
    x = torch.tensor([[[[1.0]], [[0.0]]], [[[3.0]], [[4.0]]]])
    d = bn_layer_distance(x, torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0]))
    # ||(0, 3)|| + ||(0, 4)|| = 3 + 4
    assert d.item() == pytest.approx(7.0)


class _TinyNet(nn.Module):
    """Conv -> BN_a -> ReLU -> Conv -> BN_b; BN_b registered before BN_a; BN_unused never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_unused = nn.BatchNorm2d(2)
        self.bn_b = nn.BatchNorm2d(2)
        self.conv1 = nn.Conv2d(2, 3, 1)
        self.bn_a = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.bn_b(self.conv2(torch.relu(self.bn_a(self.conv1(x)))))


def _hand_bn_term(h: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Independent computation: explicit sums for mean, biased variance and the L2 norms."""
    n = h.shape[0] * h.shape[2] * h.shape[3]
    mean = h.sum(dim=(0, 2, 3)) / n
    var = ((h - mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3)) / n
    return ((mean - bn.running_mean) ** 2).sum().sqrt() + ((var - bn.running_var) ** 2).sum().sqrt()


def _tiny_net() -> _TinyNet:
    torch.manual_seed(0)
    net = _TinyNet().double().eval()
    with torch.no_grad():
        net.bn_a.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        net.bn_a.running_var.copy_(torch.tensor([0.5, 1.5, 2.0]))
        net.bn_b.running_mean.copy_(torch.tensor([0.4, -0.1]))
        net.bn_b.running_var.copy_(torch.tensor([0.7, 1.2]))
        net.bn_unused.running_mean.fill_(100.0)
    return net


def test_bn_statistics_hook_hand_value_first_bn_weighting_and_removal():
    net = _tiny_net()
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    with BNStatisticsHook(net, first_bn_multiplier=10.0) as hook:
        net(torch.randn(3, 2, 4, 5, dtype=torch.float64))  # a previous pass is forgotten
        net(x)
        loss = hook.loss
        names = list(hook.names)
    with torch.no_grad():
        h_a = net.conv1(x)
        h_b = net.conv2(torch.relu(net.bn_a(h_a)))
    expected = 10.0 * _hand_bn_term(h_a, net.bn_a) + _hand_bn_term(h_b, net.bn_b)
    # bn_a fires first even though bn_b is registered first; bn_unused never fires
    assert names == ["bn_a", "bn_b"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    # gradient reaches the images (the inversion parameter)
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # every hook is gone, including the pre-hook on the model
    for module in net.modules():
        assert len(module._forward_hooks) == 0
        assert len(module._forward_pre_hooks) == 0
    # the helper with explicit pairs gives the same number
    pairs = [(h_a, net.bn_a), (h_b, net.bn_b)]
    assert bn_statistics_loss(pairs, first_bn_multiplier=10.0).item() == pytest.approx(
        expected.item(), rel=1e-10
    )


def test_bn_statistics_hook_multiplier_one_and_remove():
    net = _tiny_net()
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    hook = BNStatisticsHook(net, first_bn_multiplier=1.0)
    net(x)
    loss = hook.loss.item()  # read before calling bn_a directly below (that would fire its hook)
    with torch.no_grad():
        h_a = net.conv1(x)
        h_b = net.conv2(torch.relu(net.bn_a(h_a)))
    expected = _hand_bn_term(h_a, net.bn_a) + _hand_bn_term(h_b, net.bn_b)
    assert loss == pytest.approx(expected.item(), rel=1e-10)
    hook.remove()
    hook.reset()
    net(x)
    assert hook.terms == [] and hook.loss.item() == 0.0
    assert all(len(m._forward_hooks) == 0 for m in net.modules())


def test_image_priors_hand_values():
    img = [[1.0, 2.0, 4.0], [0.0, 3.0, 1.0], [2.0, 2.0, 5.0]]
    x = torch.tensor(img).view(1, 1, 3, 3)
    # Differences written out by hand:
    d_h = [-1, -2, -3, 2, 0, -3]  # x[i, j] - x[i, j+1]
    d_v = [1, -1, 3, -2, 1, -4]  # x[i, j] - x[i+1, j]
    d_d1 = [-2, -1, -1, 1]  # x[i+1, j] - x[i, j+1]
    d_d2 = [-2, 1, -2, -2]  # x[i, j] - x[i+1, j+1]
    diffs = [d_h, d_v, d_d1, d_d2]
    tv_l2_hand = sum(math.sqrt(sum(v * v for v in d)) for d in diffs)
    tv_l1_hand = sum(sum(abs(v) for v in d) / len(d) for d in diffs)
    assert tv_l2_hand == pytest.approx(math.sqrt(27) + math.sqrt(32) + math.sqrt(7) + math.sqrt(13))
    tv_l2, tv_l1, l2 = image_priors(x)
    assert tv_l2.item() == pytest.approx(tv_l2_hand, rel=1e-6)
    assert tv_l1.item() == pytest.approx(11 / 6 + 12 / 6 + 5 / 4 + 7 / 4, rel=1e-6)
    assert tv_l1_hand == pytest.approx(11 / 6 + 2 + 5 / 4 + 7 / 4)
    assert l2.item() == pytest.approx(8.0, rel=1e-6)  # sqrt(64)
    # Batch of {x, 2x}: Frobenius norms over the batch scale by sqrt(1 + 4); means by 3/2;
    # L2 is the mean of 8 and 16.
    tv_l2_b, tv_l1_b, l2_b = image_priors(torch.cat([x, 2 * x]))
    assert tv_l2_b.item() == pytest.approx(tv_l2_hand * math.sqrt(5), rel=1e-6)
    assert tv_l1_b.item() == pytest.approx(tv_l1_hand * 1.5, rel=1e-6)
    assert l2_b.item() == pytest.approx(12.0, rel=1e-6)


def _hand_competition(p: list[float], q: list[float]) -> float:
    # NVlabs/DeepInversion's order: M from the unclamped P and Q, then all three clamped
    m = [min(max((a + b) / 2, 0.01), 0.99) for a, b in zip(p, q)]
    p = [min(max(v, 0.01), 0.99) for v in p]
    q = [min(max(v, 0.01), 0.99) for v in q]
    kl_mp = sum(mc * LN(mc / pc) for mc, pc in zip(m, p))
    kl_mq = sum(mc * LN(mc / qc) for mc, qc in zip(m, q))
    return (kl_mp + kl_mq) / 2


def test_competition_loss_hand_value():
    # T = 3: student [0, 0] -> P = (1/2, 1/2); teacher [3 ln 3, 0] -> Q = (3/4, 1/4)
    student = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[3 * LN(3.0), 0.0]], dtype=torch.float64)
    # M = (5/8, 3/8)
    kl_mp = 5 / 8 * LN((5 / 8) / (1 / 2)) + 3 / 8 * LN((3 / 8) / (1 / 2))
    kl_mq = 5 / 8 * LN((5 / 8) / (3 / 4)) + 3 / 8 * LN((3 / 8) / (1 / 4))
    js = (kl_mp + kl_mq) / 2
    assert competition_loss(student, teacher, 3.0).item() == pytest.approx(1 - js, rel=1e-12)
    # Clamping: teacher [30, 0] at T = 3 -> Q ~ (0.99995, 0.00005) -> (0.99, 0.01); batch mean
    students = torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    teachers = torch.tensor([[3 * LN(3.0), 0.0], [30.0, 0.0]], dtype=torch.float64)
    q1 = 1 / (1 + math.exp(-10))
    js2 = _hand_competition([0.5, 0.5], [q1, 1 - q1])
    assert js == pytest.approx(_hand_competition([0.5, 0.5], [0.75, 0.25]))
    got = competition_loss(students, teachers, 3.0).item()
    assert got == pytest.approx(1 - (js + js2) / 2, rel=1e-12)


def test_competition_loss_clamped_probabilities_are_not_renormalised():
    # 3 classes, T = 3: student uniform P = (1/3,)*3; teacher [30, 0, 0] -> Q = softmax([10, 0, 0])
    # ~ (0.99991, 0.000045, 0.000045), clamped to (0.99, 0.01, 0.01) (sum 1.01, kept as is).
    student = torch.zeros(1, 3, dtype=torch.float64)
    teacher = torch.tensor([[30.0, 0.0, 0.0]], dtype=torch.float64)
    z = 1 + 2 * math.exp(-10)
    js = _hand_competition([1 / 3] * 3, [1 / z, math.exp(-10) / z, math.exp(-10) / z])
    assert competition_loss(student, teacher, 3.0).item() == pytest.approx(1 - js, rel=1e-12)


def test_competition_loss_is_one_when_student_equals_teacher():
    logits = torch.randn(4, 5)
    assert competition_loss(logits, logits.clone()).item() == pytest.approx(1.0, abs=1e-7)

"""LSE-LBA pooling against hand values and its mean/max limits."""

from __future__ import annotations

import math

import pytest
import torch

from incseg.models.pooling import LSELBAPool, lse_lba_pool

E = math.exp
LN = math.log


def _logits() -> torch.Tensor:
    # 1 x 2 x 1 x 2: class 0 sees [1, 3], class 1 sees [0, 0]
    return torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]]], dtype=torch.float64)


def test_hand_value_per_class_r():
    s = lse_lba_pool(_logits(), torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert s.shape == (1, 2)
    # s_0 = log((e^1 + e^3) / 2) / 1; s_1 = log((e^0 + e^0) / 2) / 2 = 0
    assert s[0, 0].item() == pytest.approx(LN((E(1) + E(3)) / 2), rel=1e-12)
    assert s[0, 1].item() == pytest.approx(0.0, abs=1e-12)


def test_hand_value_scalar_r():
    s = lse_lba_pool(_logits(), 2.0)
    assert s[0, 0].item() == pytest.approx((LN(E(2) + E(6)) - LN(2)) / 2, rel=1e-12)
    same = lse_lba_pool(_logits(), torch.tensor([2.0, 2.0]))
    assert torch.allclose(s, same)


def test_hand_value_float32_3x3():
    z = [0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 3.0, 1.0, 0.25]
    logits = torch.tensor(z).view(1, 1, 3, 3)
    r = 0.7
    hand = (LN(sum(E(r * v) for v in z)) - LN(9)) / r
    assert lse_lba_pool(logits, r).item() == pytest.approx(hand, rel=1e-6)


def test_limits_mean_and_max():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=gen)
    mean = logits.mean(dim=(2, 3))
    amax = logits.amax(dim=(2, 3))
    # r -> 0: s = mean + r var / 2 + O(r^2) -> mean (float32 must not blow up when dividing by r)
    assert torch.allclose(lse_lba_pool(logits, 1e-4), mean, atol=1e-3)
    assert torch.allclose(lse_lba_pool(logits, 1e-7), mean, atol=1e-5)
    # r -> inf: max - log(HW)/r <= s <= max
    big = lse_lba_pool(logits, 1e3)
    assert torch.all(big <= amax + 1e-6)
    assert torch.allclose(big, amax, atol=math.log(16) / 1e3 + 1e-6)
    # in between it is monotone in r, from mean to max
    previous = mean
    for r in (0.1, 1.0, 10.0, 100.0):
        current = lse_lba_pool(logits, r)
        assert torch.all(current >= previous - 1e-6) and torch.all(current <= amax + 1e-6)
        previous = current


def test_gradient_is_softmax_of_r_z():
    # d s_c / d z_{c,ij} = softmax_ij(r z_c): hand values for class 0 = [1, 3], r = 2
    logits = _logits().requires_grad_(True)
    lse_lba_pool(logits, 2.0).sum().backward()
    w = [E(2) / (E(2) + E(6)), E(6) / (E(2) + E(6))]
    assert logits.grad[0, 0, 0].tolist() == pytest.approx(w, rel=1e-12)
    assert logits.grad[0, 1, 0].tolist() == pytest.approx([0.5, 0.5], rel=1e-12)
    # tiny r: uniform weights 1/HW, finite
    small = torch.randn(1, 2, 3, 3, requires_grad=True)
    lse_lba_pool(small, 1e-5).sum().backward()
    assert torch.allclose(small.grad, torch.full_like(small, 1 / 9), atol=1e-4)


def test_stable_for_large_logits_and_low_precision():
    logits = torch.tensor([[[[1000.0, 990.0], [-1000.0, 0.0]]]])
    s = lse_lba_pool(logits, 5.0)
    assert torch.isfinite(s).all()
    hand = 1000.0 + LN((1 + E(-50.0)) / 4) / 5  # the other terms underflow to 0
    assert s.item() == pytest.approx(hand, rel=1e-6)
    half = lse_lba_pool(torch.randn(1, 2, 3, 3).bfloat16(), 1.0)
    assert half.dtype == torch.float32


def test_bad_r_rejected():
    with pytest.raises(ValueError):
        lse_lba_pool(_logits(), 0.0)
    with pytest.raises(ValueError):
        lse_lba_pool(_logits(), torch.tensor([1.0, 2.0, 3.0]))


def test_module_r_and_beta():
    pool = LSELBAPool(2, r0=1.0, beta_init=0.0)
    # r = r0 + exp(0) = 2
    assert pool.r.tolist() == pytest.approx([2.0, 2.0])
    assert list(pool.parameters()) == [] and "beta" in dict(pool.named_buffers())
    s = pool(_logits().float())
    assert s[0, 0].item() == pytest.approx((LN(E(2) + E(6)) - LN(2)) / 2, rel=1e-6)
    learned = LSELBAPool(2, r0=0.5, beta_init=math.log(1.5), learn_beta=True)
    assert learned.r.tolist() == pytest.approx([2.0, 2.0])
    learned(_logits().float()).sum().backward()
    assert learned.beta.grad is not None and torch.isfinite(learned.beta.grad).all()
    assert learned.beta.grad[0].item() != 0.0
    with pytest.raises(ValueError):
        pool(torch.zeros(1, 3, 2, 2))

"""Kendall's tau-b of the ranking check (experiments/ranking.py) on hand-computed values."""

import math

import pytest

from tests.experiment_scripts import load

rk = load("ranking")


def test_tau_b_without_ties():
    # pairs (0,1) and (0,2) agree, (1,2) disagrees: (2 - 1) / 3
    assert rk.kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert rk.kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert rk.kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0


def test_tau_b_with_a_tie_in_one_side():
    # x ties pair (0,1): it counts in neither sum; the other two agree:
    # 2 / sqrt((3 - 1) * (3 - 0))
    assert rk.kendall_tau_b([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))


def test_tau_b_equals_scipys():
    from scipy.stats import kendalltau
    x = [0.05, 0.06, 0.06, 0.33, 0.26, 0.38, 0.62]
    y = [0.0, 0.0, 0.0, 12.7, 30.5, 60.4, 77.4]
    assert rk.kendall_tau_b(x, y) == pytest.approx(kendalltau(x, y).statistic)


def test_a_constant_side_has_no_tau():
    assert math.isnan(rk.kendall_tau_b([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="paired"):
        rk.kendall_tau_b([1, 2], [1])


def test_the_older_methods_are_one_tie_group_on_15_1():
    """FT .. ILT all sit below 10 on VOC 15-1: any order among them leaves tau unchanged, and
    one of them above MiB costs the pairs it inverts."""
    base = {"FT": 0.05, "EWC": 0.04, "MiB": 0.3, "PLOP": 0.4, "DKD": 0.5, "Joint": 0.6}
    tau, over = rk.against_voc("15-5s", base)
    assert over == ["EWC", "FT", "MiB", "PLOP", "DKD", "Joint"]
    # 15 pairs, 1 tied in the published figures, 14 agree: 14 / sqrt(15 * 14)
    assert tau == pytest.approx(14 / math.sqrt(15 * 14))
    swapped, _ = rk.against_voc("15-5s", {**base, "FT": 0.04, "EWC": 0.05})
    assert swapped == pytest.approx(tau)
    # MiB below PLOP and DKD, as on shapes before: two discordant pairs, 12 concordant
    low, _ = rk.against_voc("15-5s", {**base, "MiB": 0.55})
    assert low == pytest.approx((12 - 2) / math.sqrt(15 * 14))


def test_methods_without_a_published_figure_are_left_out():
    tau, over = rk.against_voc("10-1", {"MiB": 0.3, "MiB-M": 0.9, "FT": 0.99, "PLOP": 0.2,
                                        "DKD": 0.4})
    assert over == ["MiB", "PLOP", "DKD"]
    assert tau == pytest.approx((2 - 1) / 3)
    with pytest.raises(ValueError, match="no published VOC figures for task '15-5'"):
        rk.against_voc("15-5", {"MiB": 0.3})
    assert rk.published_cell("15-5s", "LwF") == "< 10"
    assert rk.published_cell("10-1", "LwF") == ""

"""Segmentation metrics against hand-computed confusion matrices."""

from __future__ import annotations

import pytest
import torch

from incseg.metrics import (
    SegMetric,
    forgetting,
    iou_per_class,
    mean_over_steps,
    pixel_accuracy,
    summarize,
)
from incseg.tasks import get_task

# 1 x 3 x 4, 3 classes; two void pixels (255); class 2 never in the ground truth but predicted.
TARGET = torch.tensor([[[0, 0, 1, 1],
                        [0, 255, 1, 1],
                        [0, 0, 255, 0]]])
PRED = torch.tensor([[[0, 2, 1, 1],
                      [1, 2, 1, 0],
                      [0, 0, 0, 2]]])
# Pairs (gt, pred) without the void pixels:
#   gt 0: preds 0, 2, 1, 0, 0, 2 -> (0,0)=3 (0,1)=1 (0,2)=2
#   gt 1: preds 1, 1, 1, 0       -> (1,0)=1 (1,1)=3
EXPECTED = [[3, 1, 2],
            [1, 3, 0],
            [0, 0, 0]]


def test_confusion_matches_hand_count():
    m = SegMetric(num_classes=3)
    m.update(PRED, TARGET)
    cm = m.compute()
    assert cm.dtype == torch.int64
    assert cm.tolist() == EXPECTED
    assert int(cm.sum()) == 10  # 12 pixels - 2 void


def test_iou_absent_class_is_none_and_false_positives_count():
    ious = iou_per_class(torch.tensor(EXPECTED))
    # class 0: TP 3, FN 1+2, FP 1 (gt 1 predicted 0)  -> 3 / 7
    # class 1: TP 3, FN 1, FP 1 (gt 0 predicted 1)    -> 3 / 5
    assert ious[0] == pytest.approx(3 / 7)
    assert ious[1] == pytest.approx(3 / 5)
    assert ious[2] is None
    assert pixel_accuracy(torch.tensor(EXPECTED)) == pytest.approx(6 / 10)


def test_summary_mean_excludes_absent_class():
    task = get_task("voc", "custom", [[0, 1, 2]])
    s = summarize(torch.tensor(EXPECTED), task, 0)
    assert s["iou"] == {"0": pytest.approx(3 / 7), "1": pytest.approx(3 / 5), "2": None}
    assert s["miou_all"] == pytest.approx((3 / 7 + 3 / 5) / 2)
    assert s["miou_old"] == pytest.approx((3 / 7 + 3 / 5) / 2)
    assert s["miou_new"] is None
    assert s["miou_all_nobg"] == pytest.approx(3 / 5)
    assert s["pixel_accuracy"] == pytest.approx(0.6)
    assert all(isinstance(v, float) for k, v in s.items() if k != "iou" and v is not None)


def test_out_of_range_target_is_skipped():
    m = SegMetric(num_classes=3)
    m.update(torch.tensor([[0, 1, 2, 1]]), torch.tensor([[0, 7, 255, 1]]))
    assert m.compute().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_out_of_range_prediction_raises():
    m = SegMetric(num_classes=3)
    with pytest.raises(ValueError, match="0..2"):
        m.update(torch.tensor([[0, 3]]), torch.tensor([[0, 1]]))


def test_logits_equal_indices():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, generator=g)
    target = torch.randint(0, 3, (2, 5, 6), generator=g)
    target[0, 0, :3] = 255
    a, b = SegMetric(3), SegMetric(3)
    a.update(logits, target)
    b.update(logits.argmax(1), target)
    assert torch.equal(a.compute(), b.compute())
    assert int(a.compute().sum()) == 2 * 5 * 6 - 3


def test_logits_with_void_and_out_of_range_targets_by_hand():
    # 1 x 3 x 2 x 4 logits whose argmax is PRED below; the target holds void (255), a class id
    # one past the last channel (3, e.g. a future class) and a negative value: all skipped.
    pred = torch.tensor([[[0, 1, 2, 2],
                          [1, 0, 2, 1]]])
    target = torch.tensor([[[0, 1, 255, 2],
                            [3, -1, 2, 0]]])
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float() * 2.0 - 0.5
    m = SegMetric(3)
    m.update(logits, target)
    cm = m.compute()
    # counted (gt, pred): (0,0) (1,1) (2,2) (2,2) (0,1)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 2]]


def test_same_matrix_as_torchmetrics_on_the_pixels_both_count():
    # torchmetrics' MulticlassConfusionMatrix cannot skip out-of-range targets (see metrics.py);
    # with those set to 255 by hand the two agree cell for cell.
    from torchmetrics.classification import MulticlassConfusionMatrix

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 7, 9, generator=g)
    target = torch.randint(-2, 8, (3, 7, 9), generator=g)
    target[1, :2] = 255
    ours = SegMetric(5)
    ours.update(logits, target)
    theirs = MulticlassConfusionMatrix(5, ignore_index=255)
    theirs.update(logits, torch.where((target >= 0) & (target < 5), target, 255))
    assert torch.equal(ours.compute(), theirs.compute())
    assert ours.compute().dtype == theirs.compute().dtype == torch.int64


def test_two_updates_equal_one_on_concatenation():
    g = torch.Generator().manual_seed(1)
    p1, t1 = (torch.randint(0, 4, (2, 4, 4), generator=g) for _ in range(2))
    p2, t2 = (torch.randint(0, 4, (3, 4, 4), generator=g) for _ in range(2))
    t2[1, 1, 1] = 255
    acc, once = SegMetric(4), SegMetric(4)
    acc.update(p1, t1)
    acc.update(p2, t2)
    once.update(torch.cat([p1, p2]), torch.cat([t1, t2]))
    assert torch.equal(acc.compute(), once.compute())
    acc.reset()
    assert int(acc.confusion.sum()) == 0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        SegMetric(3).update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3))


def test_summarize_custom_order_maps_channels_to_dataset_ids():
    task = get_task("voc", "custom", [[0, 3, 1], [2]])
    # channels after step 1: 0 -> class 0, 1 -> class 3, 2 -> class 1, 3 -> class 2
    cm = torch.tensor([[4, 0, 0, 0],   # class 0: IoU 4 / (4 + 5 - 4) = 0.8
                       [0, 2, 0, 2],   # class 3: IoU 2 / (4 + 2 - 2) = 0.5
                       [0, 0, 0, 0],   # class 1: absent from the ground truth -> None
                       [1, 0, 1, 2]])  # class 2: IoU 2 / (4 + 4 - 2) = 1/3
    s = summarize(cm, task, 1)
    assert list(s["iou"]) == ["0", "3", "1", "2"]
    assert s["iou"]["0"] == pytest.approx(0.8)
    assert s["iou"]["3"] == pytest.approx(0.5)
    assert s["iou"]["1"] is None
    assert s["iou"]["2"] == pytest.approx(1 / 3)
    assert s["miou_old"] == pytest.approx((0.8 + 0.5) / 2)
    assert s["miou_new"] == pytest.approx(1 / 3)
    assert s["miou_all"] == pytest.approx((0.8 + 0.5 + 1 / 3) / 3)
    assert s["miou_old_nobg"] == pytest.approx(0.5)
    assert s["miou_all_nobg"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert s["pixel_accuracy"] == pytest.approx(8 / 12)


def test_summarize_step0_has_no_new_and_checks_size():
    task = get_task("voc", "custom", [[0, 3, 1], [2]])
    cm = torch.tensor([[2, 0, 0], [0, 1, 1], [0, 1, 1]])
    s = summarize(cm, task, 0)
    # class 0: 1.0; class 3: 1 / (2 + 2 - 1); class 1: 1 / (2 + 2 - 1)
    assert s["iou"] == {"0": 1.0, "3": pytest.approx(1 / 3), "1": pytest.approx(1 / 3)}
    assert s["miou_new"] is None
    assert s["miou_old"] == pytest.approx((1 + 2 / 3) / 3)
    assert s["miou_old_nobg"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="4 classes"):
        summarize(cm, task, 1)


def test_nobg_none_when_only_background_present():
    task = get_task("voc", "custom", [[0, 1], [2]])
    s = summarize(torch.tensor([[5, 1, 0], [0, 0, 0], [0, 0, 0]]), task, 1)
    assert s["miou_all"] == pytest.approx(5 / 6)
    assert s["miou_all_nobg"] is None
    assert s["miou_old_nobg"] is None
    assert s["miou_new"] is None


def test_mean_over_steps_and_forgetting():
    assert mean_over_steps([0.5, None, 0.7]) == pytest.approx(0.6)
    assert mean_over_steps([None]) is None
    by_step = [
        {"0": 0.9, "1": 0.8},
        {"0": 0.7, "1": 0.85, "2": 0.4},
        {"0": 0.6, "1": None, "2": 0.1, "3": 0.5},
    ]
    f = forgetting(by_step)
    assert set(f) == {"0", "2"}  # "1" is None at the end, "3" has no earlier step
    assert f["0"] == pytest.approx(0.3)
    assert f["2"] == pytest.approx(0.3)
    assert forgetting([]) == {}


# ---- hIoU: the suite's convention and DKD's ----------------------------------------------------
# old = {0, 1}, new = {2, 3}; class 3 is absent from the ground truth but predicted twice.
HIOU_CM = [[3, 1, 0, 0],
           [1, 3, 0, 0],
           [0, 0, 2, 2],
           [0, 0, 0, 0]]


def test_dkd_iou_scores_an_absent_class_as_zero():
    from incseg.metrics import dkd_iou_per_class

    # TP / (GT + P - TP - 1e-6): 3 / (4 + 4 - 3), 2 / (4 + 2 - 2), and 0 / (0 + 2 - 0) for the
    # absent class 3; never predicted either, 0 / -1e-6 is 0 too (not -0.0, not NaN)
    iou = dkd_iou_per_class(HIOU_CM)
    assert iou == pytest.approx([3 / 5, 3 / 5, 2 / 4, 0.0], abs=1e-6)
    assert iou_per_class(HIOU_CM)[3] is None  # the suite leaves it out
    # a perfect class: 1 / (1 - 1e-6), a hair above 1 (DKD's epsilon is subtracted)
    unseen = dkd_iou_per_class([[1, 0], [0, 0]])
    assert unseen == [pytest.approx(1 / (1 - 1e-6), rel=1e-12), 0.0]
    assert str(unseen[1]) == "0.0"


def test_hiou_conventions_on_a_hand_made_confusion():
    from incseg.results import HIOU_CONVENTIONS, final_block, step_record

    assert HIOU_CONVENTIONS == ("suite", "dkd")
    task = get_task("voc", "custom", [[0, 1], [2, 3]])
    summary = summarize(HIOU_CM, task, 1)
    # suite: old 0.6, new 0.5 (class 3 left out); dkd: new (0.5 + 0) / 2
    assert (summary["miou_old"], summary["miou_new"]) == pytest.approx((0.6, 0.5))
    assert (summary["dkd_miou_old"], summary["dkd_miou_new"]) == pytest.approx((0.6, 0.25))
    suite = step_record(1, [2, 3], summary)
    dkd = step_record(1, [2, 3], summary, hiou="dkd")
    assert suite["hiou"] == pytest.approx(2 * 0.6 * 0.5 / 1.1, abs=1e-6)
    assert dkd["hiou"] == pytest.approx(2 * 0.6 * 0.25 / 0.85, abs=1e-6)
    assert dkd["miou_new"] == suite["miou_new"]  # only hIoU follows the convention
    assert final_block([dkd])["hiou"] == dkd["hiou"]
    assert final_block([suite])["hiou"] == suite["hiou"]
    with pytest.raises(ValueError, match="hiou='mean' is not one of suite, dkd"):
        step_record(1, [2, 3], summary, hiou="mean")


def test_hiou_of_zero_old_and_new_is_0_for_the_suite_and_nan_for_dkd():
    from incseg.results import step_record

    task = get_task("voc", "custom", [[0, 1], [2, 3]])
    wrong = [[0, 2, 0, 0], [2, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    summary = summarize(wrong, task, 1)
    assert step_record(1, [2, 3], summary)["hiou"] == 0.0
    assert step_record(1, [2, 3], summary, hiou="dkd")["hiou"] is None  # NaN -> null
    # step 0: no new class, no hIoU in either convention
    first = summarize([[3, 1], [1, 3]], task, 0)
    assert first["dkd_miou_new"] is None
    assert step_record(0, [0, 1], first, hiou="dkd")["hiou"] is None


def test_results_json_says_which_hiou_a_run_uses():
    from incseg.config import compose
    from incseg.protocol.state import fingerprint
    from incseg.results import conventions, hiou_convention

    default = compose([])
    assert conventions(default)["hiou"] == "suite" == hiou_convention(default)
    dkd = compose(["eval.hiou=dkd"])
    assert conventions(dkd)["hiou"] == "dkd" == hiou_convention(dkd)
    # the default leaves a run's fingerprint (resume, caches) as it was before the choice
    assert "eval" not in fingerprint(default) and fingerprint(dkd)["eval"] == {"hiou": "dkd"}

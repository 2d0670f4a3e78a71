"""The linear probe of experiments/probe.py on hand-made tensors."""

import pytest
import torch

from tests.experiment_scripts import load

pr = load("probe")


def test_iou_of_a_hand_confusion_matrix():
    # rows: truth, columns: prediction. class 0: tp 3, fn 1, fp 1 -> 3 / 5;
    # class 1: tp 4, fn 2, fp 1 -> 4 / 7; class 2 never in the truth -> left out
    conf = torch.tensor([[3, 1, 0], [1, 4, 1], [0, 0, 0]])
    assert pr.iou(conf) == pytest.approx({0: 3 / 5, 1: 4 / 7})


def test_summary_splits_old_and_new_and_skips_absent_classes():
    per = {0: 0.9, 1: 0.5, 16: 0.2, 20: 0.4}
    s = pr.summary(per)
    assert s["old"] == pytest.approx(0.7)
    assert s["new"] == pytest.approx(0.3)
    assert s["all"] == pytest.approx(0.5)


def test_sample_pixels_takes_at_most_k_of_each_present_class_and_no_void():
    mask = torch.tensor([[[0, 0, 0], [1, 1, 255], [2, 0, 0]]])
    feat = torch.arange(9, dtype=torch.float).view(1, 1, 3, 3)
    xs, ys = pr.sample_pixels(feat, mask, per_class=2, g=torch.Generator().manual_seed(0))
    y = torch.cat(ys)
    assert sorted(y.tolist()) == [0, 0, 1, 1, 2]
    x = torch.cat(xs).squeeze(1)
    # each sampled feature is the value at a pixel of its class
    flat_m, flat_f = mask.flatten(), feat.flatten()
    assert all(flat_m[(flat_f == v).nonzero()[0, 0]] == c for v, c in zip(x, y))


def test_a_separable_feature_is_probed_perfectly():
    """One feature channel per class, the class's channel the largest: the fitted linear head
    reads every pixel right, and the folded standardisation gives the same predictions."""
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 4, 4))
    feat = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 2.0
    feat = feat + 0.1 * torch.randn_like(feat)
    x = feat.permute(0, 2, 3, 1).reshape(-1, 3)
    head = pr.fit_linear(x, labels.flatten(), n_classes=3)
    conf = pr.confusion(head, feat, labels, n_classes=3)
    assert conf.trace() == labels.numel()
    assert pr.iou(conf) == {0: 1.0, 1: 1.0, 2: 1.0}

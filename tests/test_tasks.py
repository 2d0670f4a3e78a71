import numpy as np
import pytest

from incseg.errors import ConfigError
from incseg.tasks import get_task, remap


def test_voc_splits_and_class_sets():
    t = get_task("voc", "15-5")
    assert t.steps == [list(range(16)), [16, 17, 18, 19, 20]]
    assert t.classes_seen(1) == list(range(21))
    assert t.classes_before(1) == list(range(16))
    assert t.classes_added(1) == [16, 17, 18, 19, 20]
    assert t.classes_before(0) == []
    s = get_task("voc", "15-5s")
    assert s.num_steps == 6 and s.classes_added(3) == [18]
    assert s.classes_before(3) == list(range(18))
    assert get_task("voc", "19-1").steps[1] == [20]
    assert get_task("voc", "10-1").num_steps == 11
    assert get_task("voc", "10-5-5").steps[1] == list(range(11, 16))
    assert get_task("shapes", "15-5").steps == t.steps  # shapes shares VOC's ids


def test_alias_reports_canonical_name():
    t = get_task("voc", "15-1")
    assert t.name == "15-5s" and t.steps == get_task("voc", "15-5s").steps


def test_ade_splits():
    assert get_task("ade", "100-50").steps[1] == list(range(101, 151))
    t10 = get_task("ade", "100-10")
    assert t10.num_steps == 6 and t10.steps[-1] == list(range(141, 151))
    assert get_task("ade", "100-5").num_steps == 11
    assert [len(s) for s in get_task("ade", "50").steps] == [51, 50, 50]
    assert get_task("ade", "offline").steps == [list(range(151))]


def test_old_and_new_groups():
    t = get_task("voc", "15-5s")
    assert t.old_classes == list(range(16))  # background + 1-15: the paper's "1-15" is 0-15
    assert t.new_classes == [16, 17, 18, 19, 20]


@pytest.mark.parametrize("steps, words", [
    ([[0, 1, 2], [2, 3]], "appears twice"),
    ([[1, 2], [3]], "must contain the background"),
    ([[1, 0], [3]], "must come first"),
    ([[0, 1], [21]], "outside"),
    ([[0, 1], []], "non-empty"),
    ([[0, 1], ["x"]], "not a class id"),
    ([], "non-empty"),
])
def test_custom_split_validation(steps, words):
    with pytest.raises(ConfigError, match=words):
        get_task("voc", "custom", steps)


def test_unknown_task_and_dataset():
    with pytest.raises(ConfigError, match="unknown task 'bogus'.*15-5s"):
        get_task("voc", "bogus")
    with pytest.raises(ConfigError, match="unknown task '100-50'"):
        get_task("voc", "100-50")  # an ADE split on VOC
    with pytest.raises(ConfigError, match="unknown dataset"):
        get_task("coco", "15-5")


def test_train_lut_mib_rules():
    t = get_task("voc", "15-5")
    lut0 = t.train_lut(0)
    assert lut0[3] == 3 and lut0[17] == 0 and lut0[0] == 0 and lut0[255] == 0
    lut1 = t.train_lut(1)
    assert lut1[16] == 16 and lut1[20] == 20
    assert lut1[5] == 0  # old classes -> background (the background shift)
    assert t.train_lut(1, void_as_background=False)[255] == 255
    assert lut1[21] == 255  # not a class of the dataset


def test_lut_follows_task_order_not_ids():
    t = get_task("voc", "custom", [[0, 3, 1], [2]])
    assert t.classes_seen(1) == [0, 3, 1, 2]
    lut0, lut1 = t.train_lut(0), t.train_lut(1)
    assert (lut0[3], lut0[1], lut0[2]) == (1, 2, 0)
    assert (lut1[2], lut1[3], lut1[1]) == (3, 0, 0)
    test1 = t.test_lut(1)
    assert (test1[0], test1[3], test1[1], test1[2], test1[4]) == (0, 1, 2, 3, 255)


def test_test_lut_unseen_and_void():
    t = get_task("voc", "15-5")
    lut = t.test_lut(0)
    assert lut[3] == 3 and lut[17] == 255 and lut[255] == 255 and lut[0] == 0
    assert t.test_lut(0, unseen_as="background")[17] == 0
    assert t.test_lut(1)[17] == 17
    with pytest.raises(ConfigError, match="unseen_as"):
        t.test_lut(0, unseen_as="drop")


def test_remap_is_one_gather():
    t = get_task("voc", "15-5s")
    rng = np.random.default_rng(0)
    mask = rng.choice(np.r_[np.arange(21), 255].astype(np.uint8), size=(512, 512))
    out = remap(mask, t.train_lut(2))
    assert np.array_equal(out, t.train_lut(2)[mask])
    expected = np.zeros_like(mask)
    expected[mask == 17] = 17
    assert out.dtype == np.uint8 and np.array_equal(out, expected)


def test_joint_keeps_order_and_groups():
    t = get_task("voc", "custom", [[0, 3, 1], [2]])
    j = t.joint()
    assert j.steps == [[0, 3, 1, 2]] and j.num_steps == 1

"""Data and loss conventions: validation never overlaps training (``data.val``), a sweeper is
never fed a test figure, ADE20K's class 0 at test (``data.ade_class0``) and how CE is averaged
(``train.loss_reduction``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import incseg.protocol
import incseg.run
from incseg.config import compose, source_from_cfg
from incseg.data.datamodule import IncrementalDataModule, check_steps, step_selection
from incseg.data.index import scan_labels
from incseg.data.sources import ADESource, ShapesSource, VOCSource, held_out, make_source
from incseg.errors import ConfigError
from incseg.losses import cross_entropy, unbiased_cross_entropy
from incseg.methods import StepContext
from incseg.methods.ft import FineTuning
from incseg.protocol import run_protocol
from incseg.protocol.trainer import make_datamodule, recipe
from incseg.results import conventions, write_results
from incseg.tasks import get_task

from .conftest import TEST, make_voc, write_sample

#: 60 training ids; held_out() keeps these five out of training (a pin of the hash rule)
IDS = [f"img{i:03d}" for i in range(60)]
HELD = {"img000", "img009", "img029", "img032", "img054"}
CLASSES = ([1], [16], [17, 20], [3], [2, 18], [19])
TRAIN = {sid: CLASSES[i % len(CLASSES)] for i, sid in enumerate(IDS)}


def ids(samples) -> list[str]:
    return [s.id for s in samples]


@pytest.fixture
def voc60(tmp_path) -> Path:
    return make_voc(tmp_path / "voc", train=TRAIN, test=TEST)


# ---- data.val: holdout / none / split ------------------------------------------------------
def test_held_out_is_a_fixed_twentieth_chosen_by_id():
    assert {s for s in IDS if held_out(s)} == HELD
    share = sum(held_out(f"x{i}") for i in range(20000)) / 20000
    assert 0.045 < share < 0.055


def test_holdout_ids_never_train_and_none_trains_on_everything(voc60, tmp_path):
    hold, none = VOCSource(voc60, "holdout"), VOCSource(voc60, "none")
    assert VOCSource(voc60).val == "none"  # VOC's default: the literature's setting
    assert set(ids(hold.samples("val"))) == HELD
    assert set(ids(hold.samples("train"))) == set(IDS) - HELD
    assert ids(none.samples("train")) == IDS and none.samples("val") == []
    assert ids(hold.samples("test")) == ids(none.samples("test")) == list(TEST)
    # the list's order does not move an image across (the id alone decides)
    (voc60 / "VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt").write_text(
        "".join(f"{s}\n" for s in reversed(IDS)))
    assert set(ids(hold.samples("val"))) == HELD
    # what every step trains on: the datamodule's selection, for every step of 15-5s
    cache = tmp_path / "cache"
    task = get_task("voc", "15-5s")
    for t in range(task.num_steps):
        dm = IncrementalDataModule(hold, task, t, crop=16, batch_size=2, num_workers=0,
                                   cache_dir=cache, progress=False, val="holdout")
        trained = ids(dm.dataset("train").samples)
        assert trained and not set(trained) & HELD
        assert set(ids(dm.dataset("val").samples)) <= HELD
        full = step_selection(none, task, t, True, cache, progress=False)
        assert len(full["train"]) == len(step_selection(hold, task, t, True, cache,
                                                        progress=False)["train"]) + \
            sum(1 for s in HELD if set(TRAIN[s]) & set(task.classes_added(t)))
        assert full["val"] == []
    # data.val=none: no val loader, so Lightning validates nothing
    dm = IncrementalDataModule(none, task, 1, crop=16, batch_size=2, num_workers=0,
                               cache_dir=cache, progress=False, val="none")
    assert dm.val_dataloader() == [] and len(dm.dataset("train")) == len(
        [s for s in IDS if 16 in TRAIN[s]])
    # per-step counts (python -m incseg.data stats) follow the policy as well
    counts = [s["train_images"] for s in check_steps(hold, task, True, cache, progress=False)]
    assert counts[1] == len([s for s in IDS if 16 in TRAIN[s] and s not in HELD])


def test_one_scan_serves_train_and_holdout_val(voc60, tmp_path):
    cache = tmp_path / "cache"
    hold = VOCSource(voc60, "holdout")
    full = scan_labels(VOCSource(voc60, "none"), "train", cache, progress=False)
    entries = sorted((cache / "index").glob("voc-train-*.json"))
    train = scan_labels(hold, "train", cache, progress=False)
    val = scan_labels(hold, "val", cache, progress=False)
    assert sorted((cache / "index").glob("voc-train-*.json")) == entries  # no second scan
    by_id = dict(zip(IDS, full))
    assert train == [by_id[s] for s in ids(hold.samples("train"))]
    assert val == [by_id[s] for s in ids(hold.samples("val"))]


def _shapes_layout(root: Path) -> Path:
    """The built-in benchmark's layout: train / val / test lists, SegmentationClass masks."""
    base = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / d).mkdir(parents=True, exist_ok=True)
    lists = {"train": IDS, "val": ["v1", "v2"], "test": ["t1", "t2"]}
    for split, names in lists.items():
        for sid in names:
            write_sample(base, "SegmentationClass", sid, TRAIN.get(sid, [1]))
        (base / "ImageSets/Segmentation" / f"{split}.txt").write_text(
            "".join(f"{s}\n" for s in names))
    return root


def test_shapes_keeps_its_own_val_split_and_can_hold_out_too(tmp_path):
    root = _shapes_layout(tmp_path / "shapes")
    own = ShapesSource(root)
    assert own.val == "split"  # data.val means the generated val list there
    assert ids(own.samples("val")) == ["v1", "v2"] and ids(own.samples("train")) == IDS
    hold = ShapesSource(root, "holdout")
    assert set(ids(hold.samples("val"))) == HELD and not set(ids(hold.samples("train"))) & HELD
    assert ShapesSource(root, "none").samples("val") == []
    with pytest.raises(ValueError, match="no validation split of its own"):
        VOCSource(make_voc(tmp_path / "voc"), "split")
    assert compose([]).data.val == "split" and compose(["dataset=voc"]).data.val == "none"
    assert compose(["dataset=ade"]).data.val == "none"


def _ade(root: Path, masks: dict[str, np.ndarray], n_train: int = 40) -> Path:
    """``root/ADEChallengeData2016`` with ``n_train`` training images (classes 1..100) and the
    given validation masks (grey PNGs, ADE's format)."""
    base = root / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    train = {f"ADE_train_{k:08d}": np.full((8, 8), 1 + k % 100, np.uint8)
             for k in range(1, n_train + 1)}
    for sub, items in (("training", train), ("validation", masks)):
        for d in ("images", "annotations"):
            (base / d / sub).mkdir(parents=True, exist_ok=True)
        for sid, mask in items.items():
            img = rng.integers(0, 255, (*mask.shape, 3), dtype=np.uint8)
            Image.fromarray(img).save(base / "images" / sub / f"{sid}.jpg", quality=95)
            Image.fromarray(mask, mode="L").save(base / "annotations" / sub / f"{sid}.png")
    return root


def test_ade_holdout_comes_from_training_never_from_the_test_images(tmp_path):
    root = _ade(tmp_path / "ade", {"ADE_val_00000001": np.full((8, 8), 3, np.uint8)})
    hold, none = ADESource(root, "holdout"), ADESource(root, "none")
    held = {"ADE_train_00000005", "ADE_train_00000029", "ADE_train_00000030"}
    assert set(ids(hold.samples("val"))) == held
    assert not set(ids(hold.samples("train"))) & held
    assert ids(hold.samples("test")) == ["ADE_val_00000001"]  # the test images stay test images
    assert len(none.samples("train")) == 40 and none.samples("val") == []


# ---- ADE20K class 0 at test -------------------------------------------------------------------
HAND = np.array([[0, 1], [7, 120]], np.uint8)


@pytest.mark.parametrize("setting, expected", [("ignore", [[255, 1], [7, 255]]),
                                               ("score", [[0, 1], [7, 255]])])
def test_ade_class0_at_test_on_a_hand_made_mask(tmp_path, setting, expected):
    root = _ade(tmp_path / "ade", {"ADE_val_00000001": HAND})
    over = ["dataset=ade", "task=100-50", f"data.root={root}", "data.test_mode=full",
            f"paths.cache_dir={tmp_path / 'cache'}", "data.num_workers=0"]
    if setting == "score":
        over.append("data.ade_class0=score")
    cfg = compose(over)  # the default is MiB's: class 0 never scored
    task = get_task("ade", "100-50")
    dm = make_datamodule(cfg, source_from_cfg(cfg, progress=False), task, 0, tmp_path / "cache")
    _, mask = dm.dataset("test")[0]
    assert mask.tolist() == expected  # 120 is not seen at step 0: 255 either way (MiB)


def test_ade_class0_ignored_leaves_background_out_of_the_miou():
    from incseg.metrics import summarize

    task = get_task("ade", "100-50")
    cm = np.zeros((101, 101), np.int64)
    cm[1, 1], cm[7, 7], cm[7, 0] = 3, 1, 1  # one class-7 pixel predicted as 0; no 0 in the gt
    s = summarize(cm, task, 0)
    assert s["iou"]["0"] is None and s["miou_all"] == pytest.approx((1.0 + 0.5) / 2)


# ---- what incseg.run returns to a sweeper ---------------------------------------------------
def _fake_results(val_last=0.25):
    steps = [{"step": 0, "classes": [0, 1], "iou": {"0": 0.9, "1": 0.8}, "miou_old": 0.85,
              "miou_new": None, "miou_all": 0.85, "val_miou_all": 0.5},
             {"step": 1, "classes": [2], "iou": {"0": 0.7, "1": 0.6, "2": 0.5},
              "miou_old": 0.65, "miou_new": 0.5, "miou_all": 0.6, "val_miou_all": val_last}]
    return {"dataset": "shapes", "task": "custom", "method": "mib", "overlap": True, "seed": 0,
            "steps": steps, "final": {"old": 0.65, "new": 0.5, "all": 0.6, "avg": 0.725}}


def test_the_sweeper_gets_the_validation_figure_never_a_test_one(tmp_path, monkeypatch):
    fake = _fake_results()
    monkeypatch.setattr(incseg.run, "check_data", lambda cfg: None)
    monkeypatch.setattr(incseg.protocol, "run_protocol", lambda cfg, run_dir: fake)
    cfg = compose(["experiment=smoke", f"paths.cache_dir={tmp_path / 'c'}"])
    value = incseg.run._main(cfg, tmp_path / "run")
    test_figures = {v for k, v in fake["final"].items()} | {
        s[k] for s in fake["steps"] for k in ("miou_old", "miou_new", "miou_all")}
    assert value == 0.25 and value not in test_figures
    assert incseg.run.sweeper_value(_fake_results(None), tuning=False) is None
    with pytest.raises(ConfigError, match="the last step recorded none"):
        incseg.run.sweeper_value(_fake_results(None), tuning=True)


def test_a_real_run_returns_its_holdout_validation(tmp_path):
    cfg = compose(["experiment=smoke", "method=joint", "data.val=holdout", "logger=none",
                   f"paths.cache_dir={tmp_path / 'c'}"])
    res = run_protocol(cfg, tmp_path / "run")
    assert res["conventions"]["val"] == "holdout"
    rec = res["steps"][-1]
    assert rec["val_miou_all"] is not None and rec["val_miou_all"] != rec["miou_all"]
    assert incseg.run.sweeper_value(res, tuning=True) == rec["val_miou_all"]


def test_tuning_sweepers_are_told_apart_from_the_basic_one():
    assert not incseg.run.tunes("hydra._internal.core_plugins.basic_sweeper.BasicSweeper")
    assert not incseg.run.tunes(None)
    assert incseg.run.tunes("hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper")
    tune = compose(["experiment=smoke", "data.val=holdout", "train.val_every=1"])
    incseg.run.check_tuning(tune, "my.Tuner")  # holdout + validation at the last epoch: fine


def test_conventions_recorded_in_results(tmp_path):
    conv = conventions(compose(["dataset=ade"]))
    assert conv == {"val": "none", "loss_reduction": "valid", "void_as_background": True,
                    "unseen_as": "ignore", "ade_class0": "ignore", "hiou": "suite"}
    assert "ade_class0" not in conventions(compose([]))
    header = {"dataset": "shapes", "task": "15-5", "method": "mib", "overlap": True, "seed": 0,
              "conventions": conventions(compose(["data.val=holdout"]))}
    res = write_results(tmp_path, header, _fake_results()["steps"], {})
    assert res["conventions"]["val"] == "holdout"
    assert "conventions: val=holdout, loss_reduction=valid" in (tmp_path / "results.md").read_text()


# ---- how CE is averaged -------------------------------------------------------------------
def _batch():
    """1 x C x 1 x 4 logits; pixels labelled 0, 2, 255 (void), 1."""
    z = torch.zeros(1, 3, 1, 4)
    z[0, 2, 0, 1] = math.log(2.0)  # softmax (1/4, 1/4, 1/2) at the second pixel
    return z, torch.tensor([[[0, 2, 255, 1]]])


def test_ce_reductions_hand_computed():
    z, y = _batch()
    # per pixel: -log(1/3), -log(1/2), void, -log(1/3)
    total = math.log(3) + math.log(2) + math.log(3)
    assert cross_entropy(z, y).item() == pytest.approx(total / 3)
    assert cross_entropy(z, y, reduction="valid").item() == pytest.approx(total / 3)
    assert cross_entropy(z, y, reduction="all").item() == pytest.approx(total / 4)


def test_unbiased_ce_reductions_hand_computed():
    z, y = _batch()
    # num_old = 2: labels 0 and 1 score -log(p0 + p1); label 2 scores -log p2
    total = -math.log(2 / 3) - math.log(1 / 2) - math.log(2 / 3)
    assert unbiased_cross_entropy(z, y, 2).item() == pytest.approx(total / 3)
    assert unbiased_cross_entropy(z, y, 2, reduction="all").item() == pytest.approx(total / 4)
    with pytest.raises(ValueError, match="reduction='mean' is not one of valid, all"):
        cross_entropy(z, y, reduction="mean")


def test_reductions_give_the_same_bits_when_no_pixel_is_ignored():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(2, 5, 7, 9, generator=g), torch.randint(0, 5, (2, 7, 9), generator=g)
    assert torch.equal(cross_entropy(z, y, reduction="valid"), cross_entropy(z, y, reduction="all"))
    assert torch.equal(unbiased_cross_entropy(z, y, 3, reduction="valid"),
                       unbiased_cross_entropy(z, y, 3, reduction="all"))


def test_loss_reduction_reaches_the_teacher_and_the_methods():
    assert recipe(compose([]), 0).loss_reduction == "valid"  # today's numbers by default
    assert recipe(compose(["train.loss_reduction=all"]), 1).loss_reduction == "all"
    z, y = _batch()
    ft = FineTuning()
    ft.setup(StepContext(step=1, num_old=2, num_classes=3, old_model=None, reduction="all"))
    assert ft.classification_loss(z, y).item() == pytest.approx(
        (2 * math.log(3) + math.log(2)) / 4)

    class AllPixels(FineTuning):
        reduction = "valid"  # a method whose reference fixes its mean wins over the run's

    m = AllPixels()
    m.setup(StepContext(step=1, num_old=2, num_classes=3, old_model=None, reduction="all"))
    assert m.classification_loss(z, y).item() == pytest.approx(
        (2 * math.log(3) + math.log(2)) / 3)


# ---- bad input: one line each (docs/errors.md rows 61-66) -----------------------------------
def _dirs(tmp_path: Path) -> list[str]:
    return [f"paths.runs_dir={tmp_path / 'runs'}", f"paths.cache_dir={tmp_path / 'cache'}"]


BAD = [
    pytest.param(["data.val=maybe"], "data.val='maybe' is not valid; use data.val=split or "
                 "data.val=holdout or data.val=none", id="unknown-data-val"),
    pytest.param(["dataset=voc", "data.val=split"], "data.val=split: voc has no validation "
                 "split of its own", id="val-split-without-one"),
    pytest.param(["train.loss_reduction=mean"], "train.loss_reduction='mean' is not valid; use "
                 "train.loss_reduction=valid or train.loss_reduction=all",
                 id="unknown-loss-reduction"),
    pytest.param(["dataset=ade", "task=100-50", "data.ade_class0=maybe"],
                 "data.ade_class0='maybe' is not valid; use data.ade_class0=ignore or "
                 "data.ade_class0=score",
                 id="unknown-ade-class0"),
    pytest.param(["eval.hiou=mean"], "eval.hiou='mean' is not valid; use eval.hiou=suite or "
                 "eval.hiou=dkd", id="unknown-hiou"),
    pytest.param(["data.val=none", "hydra.sweeper._target_=my.Tuner"],
                 "a tuning sweeper optimises the validation mIoU, and data.val=none validates "
                 "nothing", id="tuning-without-validation"),
    pytest.param(["train.val_every=3", "hydra.sweeper._target_=my.Tuner"],
                 "train.val_every=3 skips the last of train.epochs_incremental=1 epochs",
                 id="tuning-skips-the-last-validation"),
]


@pytest.mark.parametrize("args, fragment", BAD)
def test_bad_convention_settings_one_line(tmp_path, monkeypatch, capsys, args, fragment):
    monkeypatch.setattr(sys, "argv", ["incseg.run", "experiment=smoke", *_dirs(tmp_path), *args])
    with pytest.raises(SystemExit) as exc:
        incseg.run.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not (tmp_path / "runs").exists()


def test_make_source_keeps_the_datasets_default(voc60):
    assert make_source("voc", voc60).val == "none"
    with pytest.raises(ValueError, match="val='bogus' is not one of split, holdout, none"):
        make_source("voc", voc60, "bogus")
    with pytest.raises(ValueError, match="differs from the source's validation policy"):
        IncrementalDataModule(make_source("voc", voc60), get_task("voc", "15-5"), 0, val="holdout")


def test_a_missing_sweeper_plugin_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["incseg.run", *_dirs(tmp_path), "hydra/sweeper=nope"])
    with pytest.raises(SystemExit) as exc:
        incseg.run.main()
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: hydra/sweeper=nope needs a Hydra plugin that is not installed; for the Optuna "
        "sweeper: pip install -e '.[optuna]'")


def test_the_tuning_experiment_tunes_on_validation(tmp_path, monkeypatch, capsys):
    """experiment=tune/mib_shapes: Optuna over MiB's kd_weight and lr on shapes' val split;
    without the ``optuna`` extra, one line that says how to install it."""
    try:
        import hydra_plugins.hydra_optuna_sweeper  # noqa: F401
    except ImportError:
        monkeypatch.setattr(sys, "argv", ["incseg.run", "experiment=tune/mib_shapes",
                                          *_dirs(tmp_path)])
        with pytest.raises(SystemExit):
            incseg.run.main()
        assert "pip install -e '.[optuna]'" in capsys.readouterr().err
        return
    cfg = compose(["experiment=tune/mib_shapes"], return_hydra_config=True)
    assert incseg.run.tunes(cfg.hydra.sweeper._target_) and cfg.data.val == "split"
    assert set(cfg.hydra.sweeper.params) == {"method.kd_weight", "train.lr_incremental"}
    incseg.run.check_tuning(cfg, cfg.hydra.sweeper._target_)

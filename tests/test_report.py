"""``python -m incseg.report``: paper-layout tables over seeds, missing runs, plots, overlays."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from incseg.checkpoints import save_model
from incseg.config import compose
from incseg.models import build_model
from incseg.report import (
    CAPTION,
    discover,
    forgetting_step0,
    main,
    make_report,
    old_to_background,
)
from incseg.results import write_results
from incseg.tasks import get_task

#: the ``label`` of each conf/method/*.yaml, as a run records it in its config
LABELS = {"ft": "FT", "lwf": "LwF", "ilt": "ILT", "mib": "MiB", "joint": "Joint"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
       "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
SD = 0.1 / math.sqrt(2)  # sample std (ddof=1) of two values 0.1 apart: 0.0707107
SD2 = 0.04 / math.sqrt(2)  # ... 0.04 apart: 0.0282843

# Final (old, new, all) per (task, method/replay, seed), chosen by hand.
FINALS = {
    ("15-5", "ft", 0): (0.10, 0.30, 0.15), ("15-5", "ft", 1): (0.20, 0.40, 0.25),
    ("15-5", "mib", 0): (0.50, 0.40, 0.52), ("15-5", "mib", 1): (0.60, 0.44, 0.62),
    ("15-5", "mib+deepinversion", 0): (0.60, 0.50, 0.62),
    ("15-5", "mib+deepinversion", 1): (0.70, 0.50, 0.64),
    ("15-5", "joint", 0): (0.70, 0.60, 0.68),
    ("19-1", "ft", 0): (0.05, 0.20, 0.06), ("19-1", "ft", 1): (0.15, 0.20, 0.16),
    ("19-1", "mib", 0): (0.65, 0.30, 0.64), ("19-1", "mib", 1): (0.69, 0.34, 0.68),
}
# IoU of class 1 after step 0 and at the final step, per (method, seed): forgetting 0.6 / 0.4
IOU1 = {("ft", 0): (0.8, 0.2), ("ft", 1): (0.7, 0.3), ("mib", 0): (0.8, 0.7),
        ("mib", 1): (0.7, 0.7), ("mib+deepinversion", 0): (0.8, 0.75),
        ("mib+deepinversion", 1): (0.8, 0.75), ("joint", 0): (0.9, 0.9)}


def _confusion(task) -> dict:
    """Final-step confusion over the seen classes: class 1 has 3 of 4 GT pixels predicted as
    background (0.75), class 2 none of 4 (0.0); other classes have no GT pixels."""
    classes = task.classes_seen(task.num_steps - 1)
    counts = np.zeros((len(classes), len(classes)), dtype=int)
    counts[0, 0] = 10
    counts[classes.index(1), 0], counts[classes.index(1), classes.index(1)] = 3, 1
    counts[classes.index(2), classes.index(2)] = 4
    return {"classes": classes, "counts": counts.tolist()}


def _step(t: int, classes, old, new, all_, iou1, **extra) -> dict:
    return {"step": t, "classes": list(classes), "iou": {"0": 0.9, "1": iou1},
            "miou_old": old, "miou_new": new, "miou_all": all_, **extra}


def write_run(root: Path, task_name: str, method: str, seed: int, finals, iou1,
              confusion: bool = False, n_steps: int | None = None, loss: str = "mse",
              label: str | None = None, joint: bool | None = None) -> Path:
    """A results.json as the protocol writes it (through write_results), with hand values;
    the method's config carries ``label`` (default: LABELS, none for a method not in it) and
    ``joint`` (default: the method is ``joint``)."""
    task = get_task("shapes", task_name)
    method_name, _, replay = method.partition("+")
    replay = replay or "none"
    joint = method_name == "joint" if joint is None else joint
    label = LABELS.get(method_name) if label is None else label
    old, new, all_ = finals
    extra = {"confusion": _confusion(task)} if confusion else {}
    if joint:
        steps = [_step(0, task.classes_seen(task.num_steps - 1), old, new, all_, iou1[1],
                       **extra)]
    else:
        steps = [_step(0, task.steps[0], 0.8, None, 0.8, iou1[0])]
        steps += [_step(t, task.steps[t], 0.5, 0.5, 0.5, 0.5)
                  for t in range(1, (n_steps or task.num_steps) - 1)]
        if (n_steps or task.num_steps) > 1:
            steps.append(_step(len(steps), task.steps[len(steps)], old, new, all_, iou1[1],
                               **extra))
    run_dir = root / "shapes" / task_name / method / f"seed{seed}"
    header = {"dataset": "shapes", "task": task_name, "method": method_name, "overlap": True,
              "seed": seed, "model": "bisenet_r18", "replay": replay}
    config = {"dataset": {"name": "shapes"}, "task": {"name": task_name, "steps": None},
              "method": {"name": method_name, "joint": joint,
                         **({"label": label} if label else {})},
              "replay": {"name": replay, **({"loss": loss} if replay != "none" else {})}}
    write_results(run_dir, header, steps, {"config": config})
    return run_dir


def make_sweep(root: Path, confusion: bool = False) -> Path:
    for (task, method, seed), finals in FINALS.items():
        write_run(root, task, method, seed, finals, IOU1[(method, seed)], confusion=confusion)
    # unfinished: results.json with 3 of 6 steps, and a run with state.json only
    write_run(root, "15-5s", "mib", 0, (0.4, 0.3, 0.38), (0.8, 0.6), n_steps=3)
    pending = root / "shapes" / "19-1" / "mib+deepinversion" / "seed0"
    pending.mkdir(parents=True)
    (pending / "state.json").write_text(json.dumps({"config_hash": "x", "steps": {"0": {}}}))
    # an unreadable results file is listed too, never silently dropped
    broken = root / "shapes" / "15-5" / "lwf" / "seed0"
    broken.mkdir(parents=True)
    (broken / "results.json").write_text("{not json")
    return root


def _csv_rows(path: Path) -> dict[tuple[str, str], dict]:
    with open(path, newline="") as fh:
        return {(r["row"], r["task"]): r for r in csv.DictReader(fh)}


def test_table_cells_are_mean_and_sample_std_over_seeds(tmp_path):
    root = make_sweep(tmp_path / "sweep")
    make_report(root, overlays=False)
    rows = _csv_rows(root / "report" / "table.csv")
    assert set(rows) == {("FT", "15-5"), ("MiB", "15-5"), ("MiB + DI (mse)", "15-5"),
                         ("Joint", "15-5"), ("FT", "19-1"), ("MiB", "19-1")}
    mib = rows[("MiB", "15-5")]
    assert (mib["n"], mib["seeds"]) == ("2", "0 1")
    assert float(mib["old_mean"]) == pytest.approx(0.55)
    assert float(mib["old_std"]) == pytest.approx(SD, abs=1e-6)
    assert float(mib["new_mean"]) == pytest.approx(0.42)
    assert float(mib["new_std"]) == pytest.approx(SD2, abs=1e-6)
    assert float(mib["all_mean"]) == pytest.approx(0.57)
    assert float(mib["all_std"]) == pytest.approx(SD, abs=1e-6)
    di = rows[("MiB + DI (mse)", "15-5")]
    assert (di["replay"], di["replay_loss"]) == ("deepinversion", "mse")
    assert float(di["all_mean"]) == pytest.approx(0.63)
    assert float(di["new_std"]) == 0.0
    joint = rows[("Joint", "15-5")]
    assert (joint["n"], joint["all_mean"], joint["all_std"]) == ("1", "0.68", "")
    ft19 = rows[("FT", "19-1")]
    assert float(ft19["old_mean"]) == pytest.approx(0.10)
    assert float(ft19["new_std"]) == 0.0

    md = (root / "report" / "table.md").read_text()
    # 19-1 comes before 15-5 (the paper's order), then old/new/all/hIoU/n per task
    assert ("| method | 19-1 old | 19-1 new | 19-1 all | 19-1 hIoU | 19-1 n | 15-5 old | "
            "15-5 new | 15-5 all | 15-5 hIoU | 15-5 n |") in md
    # hIoU per seed from its old and new (2 o n / (o + n)), then mean ± std: 19-1 MiB seeds
    # 0.410526 and 0.455534, 15-5 MiB 0.444444 and 0.507692
    assert ("| MiB | 0.670 ± 0.028 | 0.320 ± 0.028 | 0.660 ± 0.028 | 0.433 ± 0.032 | 2 | "
            "0.550 ± 0.071 | 0.420 ± 0.028 | 0.570 ± 0.071 | 0.476 ± 0.045 | 2 |") in md
    assert "| MiB + DI (mse) | - | - | - | - | - | 0.650 ± 0.071 | 0.500 ± 0.000 |" in md
    assert "| Joint | - | - | - | - | - | 0.700 | 0.600 | 0.680 | 0.646 | 1 |" in md
    assert float(mib["hiou_mean"]) == pytest.approx((0.444444 + 0.507692) / 2, abs=1e-6)
    # methods in the order they first appear among the runs, the jointly trained one last
    order = [md.index(f"| {m} |") for m in ("FT", "MiB", "MiB + DI (mse)", "Joint")]
    assert order == sorted(order)
    assert CAPTION in md and "paper's 1-15" in md and "ddof=1" in md
    tex = (root / "report" / "table.tex").read_text()
    assert r"$0.570 \pm 0.071$" in tex and r"\multicolumn{5}{c}{15-5}" in tex
    assert "paper's 1-15" in tex and r"bisenet\_r18" in tex


def test_unfinished_and_unreadable_runs_are_listed_not_averaged(tmp_path):
    root = make_sweep(tmp_path / "sweep")
    runs, missing = discover(root)
    assert len(runs) == len(FINALS)
    reasons = {p.relative_to(root).as_posix(): r for p, r in ((m.path, m.reason)
                                                             for m in missing)}
    assert set(reasons) == {"shapes/15-5s/mib/seed0", "shapes/19-1/mib+deepinversion/seed0",
                            "shapes/15-5/lwf/seed0"}
    assert "3 of 6 steps" in reasons["shapes/15-5s/mib/seed0"]
    assert "no results.json" in reasons["shapes/19-1/mib+deepinversion/seed0"]
    assert "not valid JSON" in reasons["shapes/15-5/lwf/seed0"]
    make_report(root, overlays=False)
    md = (root / "report" / "table.md").read_text()
    section = md[md.index("## Missing or unfinished"):md.index("## Plots")]
    for rel in reasons:
        assert f"`{rel}`" in section
    assert "15-5s" not in md[:md.index("## Missing or unfinished")]  # no column for it
    assert "LwF" not in md[:md.index("## Missing or unfinished")]


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5000, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 100


def test_plots_and_confusion_skipped_without_the_field(tmp_path):
    root = make_sweep(tmp_path / "sweep")
    make_report(root, overlays=False)
    out = root / "report"
    slug = "shapes_bisenet_r18_overlap"
    for kind in ("curves", "heatmap", "forgetting"):
        _assert_png(out / f"{kind}_{slug}.png")
    assert not (out / f"confusion_{slug}.png").exists()
    md = (out / "table.md").read_text()
    plots = md[md.index("## Plots"):]
    assert "confusion: skipped" in plots and "steps[-1].confusion" in plots
    for kind in ("curves", "heatmap", "forgetting"):
        assert f"({kind}_{slug}.png)" in plots
    assert "not drawn (--no-overlays)" in plots


def test_confusion_plot_when_results_have_it(tmp_path):
    root = make_sweep(tmp_path / "sweep", confusion=True)
    make_report(root, overlays=False)
    _assert_png(root / "report" / "confusion_shapes_bisenet_r18_overlap.png")
    md = (root / "report" / "table.md").read_text()
    assert "(confusion_shapes_bisenet_r18_overlap.png)" in md and "confusion: skipped" not in md


def test_forgetting_and_old_to_background_by_hand(tmp_path):
    task = get_task("shapes", "15-5")
    run = write_run(tmp_path, "15-5", "ft", 0, (0.1, 0.3, 0.15), (0.8, 0.2), confusion=True)
    results = json.loads((run / "results.json").read_text())
    # class 0: 0.9 - 0.9; class 1: 0.8 - 0.2; classes 2..15 have no IoU and are left out
    assert forgetting_step0(results, task) == pytest.approx({0: 0.0, 1: 0.6})
    # GT pixels of class 1: 3 of 4 predicted as background; class 2: 0 of 4; others absent
    assert old_to_background(results, task) == {1: 0.75, 2: 0.0}
    del results["steps"][-1]["confusion"]
    assert old_to_background(results, task) is None


def test_replay_grids_are_copied_and_linked(tmp_path):
    root = make_sweep(tmp_path / "sweep")
    grid = root / "shapes" / "15-5" / "mib+deepinversion" / "seed0" / "replay"
    grid.mkdir()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(grid / "step1_classes.png")
    make_report(root, overlays=False)
    copied = list((root / "report" / "replay").glob("*.png"))
    assert [p.name for p in copied] == [
        "shapes_bisenet_r18_overlap_15-5_mib+deepinversion-mse_seed0_step1_classes.png"]
    assert copied[0].read_bytes() == (grid / "step1_classes.png").read_bytes()
    assert f"(replay/{copied[0].name})" in (root / "report" / "table.md").read_text()


def test_cli_prints_table_and_reports_bad_dir(tmp_path):
    root = make_sweep(tmp_path / "sweep")
    proc = subprocess.run([sys.executable, "-m", "incseg.report", str(root), "--no-overlays"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| MiB + DI (mse) |" in proc.stdout and "## Missing or unfinished" in proc.stdout
    assert (root / "report" / "table.md").is_file()
    for bad in ([str(tmp_path / "nowhere")], [str(tmp_path / "sweep" / "shapes" / "15-5" / "ft"
                                                  / "seed0" / "results.json")]):
        proc = subprocess.run([sys.executable, "-m", "incseg.report", *bad],
                              capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 2
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "not a directory" in err[0]


def test_usage_errors_are_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, needle in (([str(empty)], "no results.json"), ([], "usage"),
                         ([str(empty), "--images", "0"], "--images 0")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not (empty / "report").exists()


def test_overlays_from_a_checkpoint_on_real_test_images(tmp_path, voc_root):
    """Overlays rebuild the test split from the run's config and load the final checkpoint;
    a run without checkpoints is skipped with a note, not an error."""
    cfg = compose(["dataset=voc", f"data.root={voc_root}", "task=15-5", "data.crop=24",
                   "data.test_mode=full", f"paths.cache_dir={tmp_path / 'cache'}"])
    config = OmegaConf.to_container(cfg, resolve=True)
    task = get_task("voc", "15-5")
    root = tmp_path / "runs"
    for method in ("ft", "mib"):
        config["method"] = {**config["method"], "name": method, "label": LABELS[method]}
        steps = [{"step": t, "classes": task.steps[t], "iou": {"0": 0.5}, "miou_old": 0.5,
                  "miou_new": None if t == 0 else 0.2, "miou_all": 0.4} for t in range(2)]
        header = {"dataset": "voc", "task": "15-5", "method": method, "overlap": True,
                  "seed": 0, "model": "bisenet_r18", "replay": "none"}
        write_results(root / method, header, steps, {"config": config})
    torch.manual_seed(0)
    save_model(root / "mib" / "checkpoints" / "step1.pt", build_model("bisenet_r18", [16, 5]),
               "bisenet_r18", task.steps, 1)
    make_report(root, overlays=True, n_images=3)
    png = root / "report" / "overlays_voc_bisenet_r18_overlap_15-5.png"
    with Image.open(png) as im:
        assert im.format == "PNG"
        # 3 rows (images) x 3 columns (image | ground truth | MiB) of 2-inch panels at 100 dpi
        assert im.size == (600, 600)
    md = (root / "report" / "table.md").read_text()
    assert f"({png.name})" in md and "FT: no step1.pt" in md


@pytest.mark.slow
def test_report_on_a_real_smoke_run(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "incseg.run", "experiment=smoke", "method=mib",
         f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}", "logger=none"],
        capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "incseg.report", str(run), "--images", "2"],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = json.loads((run / "results.json").read_text())["provenance"]["config"]
    assert f"| {cfg['method'].get('label', 'mib')} |" in proc.stdout  # label: from conf/method
    for name in ("curves", "heatmap", "forgetting", "confusion"):
        _assert_png(run / "report" / f"{name}_shapes_bisenet_r18_overlap.png")
    _assert_png(run / "report" / "overlays_shapes_bisenet_r18_overlap_15-5.png")


def test_runs_that_differ_in_a_setting_become_rows_of_their_own(tmp_path):
    """A tuning sweep (Table 1: lr, batch, augmentation) or a budget sweep (Table 4): the same
    method/task/seed with other settings is a row per setting, averaged over its seeds."""
    root = tmp_path / "tuning"
    for lr, finals in ((0.01, [(0.6, 0.4, 0.55), (0.62, 0.42, 0.57)]),
                       (0.05, [(0.7, 0.5, 0.65), (0.7, 0.5, 0.65)])):
        for seed, f in enumerate(finals):
            run = write_run(root / f"lr{lr}", "15-5", "mib", seed, f, (0.8, 0.6))
            res = json.loads((run / "results.json").read_text())
            res["provenance"]["config"]["train"] = {"lr": lr, "epochs": 3}
            (run / "results.json").write_text(json.dumps(res))
    make_report(root, overlays=False)
    rows = _csv_rows(root / "report" / "table.csv")
    assert set(rows) == {("MiB [lr=0.01]", "15-5"), ("MiB [lr=0.05]", "15-5")}
    assert float(rows[("MiB [lr=0.01]", "15-5")]["all_mean"]) == pytest.approx(0.56)
    assert rows[("MiB [lr=0.05]", "15-5")]["n"] == "2"
    assert "duplicate" not in (root / "report" / "table.md").read_text()


def test_replay_weight_rows_use_the_weight_the_run_trained_with(tmp_path):
    """``replay.weight: null`` is the per-loss default: a run that leaves it null and one that
    sets the same value are one row; another weight is a row of its own. The curvature test's
    setting (replay.check) never splits rows."""
    root = tmp_path / "weights"
    runs = [("dflt", None, 20, (0.6, 0.4, 0.55)), ("one", 1.0, None, (0.62, 0.42, 0.57)),
            ("tenth", 0.1, 20, (0.7, 0.5, 0.65))]
    for seed, (name, weight, check, f) in enumerate(runs):
        run = write_run(root / name, "15-5", "mib+deepinversion", seed, f, (0.8, 0.6))
        res = json.loads((run / "results.json").read_text())
        res["provenance"]["config"]["replay"].update(
            {"weight": weight, "weights": {"mse": 1.0, "kl": 1.0, "ukd": 10.0},
             **({"check": check} if check is not None else {})})
        (run / "results.json").write_text(json.dumps(res))
    make_report(root, overlays=False)
    rows = _csv_rows(root / "report" / "table.csv")
    assert set(rows) == {("MiB + DI (mse) [weight=1.0]", "15-5"),
                         ("MiB + DI (mse) [weight=0.1]", "15-5")}
    assert rows[("MiB + DI (mse) [weight=1.0]", "15-5")]["n"] == "2"
    assert float(rows[("MiB + DI (mse) [weight=1.0]", "15-5")]["all_mean"]) == \
        pytest.approx(0.56)


def test_runs_csv_keeps_the_per_seed_numbers(tmp_path):
    root = make_sweep(tmp_path / "sweep")
    di = root / "shapes" / "15-5" / "mib+deepinversion" / "seed1" / "results.json"
    res = json.loads(di.read_text())
    res["steps"][1]["replay"] = {"images": 15, "sharpness": 512.5, "stability_bound": 271.4286}
    di.write_text(json.dumps(res))
    make_report(root, overlays=False)
    with open(root / "report" / "runs.csv", newline="") as fh:
        lines = list(csv.DictReader(fh))
    assert len(lines) == len(FINALS)  # every finished run, none averaged away
    by_key = {(r["row"], r["task"], r["seed"]): r for r in lines}
    mib = by_key[("MiB", "15-5", "1")]
    assert mib["run"] == "shapes/15-5/mib/seed1"
    assert (float(mib["old"]), float(mib["new"]), float(mib["all"])) == (0.6, 0.44, 0.62)
    assert float(mib["avg"]) == pytest.approx((0.8 + 0.62) / 2)  # mean over steps of all
    assert float(mib["hiou"]) == pytest.approx(2 * 0.6 * 0.44 / 1.04, abs=1e-6)
    assert mib["all_per_step"] == "0.8 0.62" and mib["replay_sharpness_per_step"] == ""
    rep = by_key[("MiB + DI (mse)", "15-5", "1")]
    assert (rep["replay_sharpness_per_step"], rep["replay_stability_bound"]) == ("512.5",
                                                                                "271.4286")
    assert by_key[("FT", "19-1", "0")]["all_per_step"].split()[-1] == "0.06"


def _row_order(md: str) -> list[str]:
    table = md[:md.index("## Missing or unfinished")]
    return [line.split(" | ")[0][2:] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| method |")]


def make_toy_sweep(root: Path) -> Path:
    """Methods the report has no notion of, in directory (discovery) order: toy (labelled Toy
    by one run, unlabelled in a run written before its config had a label), mib, ft; and
    ``offline``, trained jointly (``joint: true``), first on disk."""
    write_run(root / "0", "15-5", "offline", 0, (0.7, 0.6, 0.68), (0.9, 0.9), joint=True)
    write_run(root / "1", "15-5", "toy", 0, (0.3, 0.2, 0.28), (0.8, 0.5), label="Toy")
    write_run(root / "1", "15-5", "toy", 1, (0.4, 0.2, 0.38), (0.8, 0.5))
    write_run(root / "2", "15-5", "mib", 0, (0.5, 0.4, 0.52), (0.8, 0.7))
    write_run(root / "3", "15-5", "ft", 0, (0.1, 0.3, 0.15), (0.8, 0.2))
    return root


def test_rows_come_from_the_runs_labels_and_order(tmp_path):
    """A method unknown to the report is a row like any other, under its config's label, in
    the order the methods first appear among the runs; jointly trained runs go last."""
    root = make_toy_sweep(tmp_path / "toy")
    make_report(root, overlays=False)
    md = (root / "report" / "table.md").read_text()
    assert _row_order(md) == ["Toy", "MiB", "FT", "offline"]
    assert "| Toy | 0.350 ± 0.071 | 0.200 ± 0.000 | 0.330 ± 0.071 | 0.253 ± 0.019 | 2 |" in md
    rows = _csv_rows(root / "report" / "table.csv")
    assert (rows[("Toy", "15-5")]["method"], rows[("Toy", "15-5")]["n"]) == ("toy", "2")
    assert rows[("offline", "15-5")]["n"] == "1"  # one step is all a joint run has
    tex = (root / "report" / "table.tex").read_text()
    assert tex.index("Toy &") < tex.index("MiB &") < tex.index("FT &") < tex.index("offline &")
    with open(root / "report" / "runs.csv", newline="") as fh:
        assert {r["row"] for r in csv.DictReader(fh)} == {"Toy", "MiB", "FT", "offline"}


def test_order_option_puts_the_named_methods_first(tmp_path, capsys):
    root = make_toy_sweep(tmp_path / "toy")
    main([str(root), "--no-overlays", "--order", "ft, offline,mib"])
    assert _row_order(capsys.readouterr().out) == ["FT", "offline", "MiB", "Toy"]
    main([str(root), "--no-overlays", "--order", "mib,nosuch"])  # unknown names: a warning
    assert _row_order(capsys.readouterr().out) == ["MiB", "Toy", "FT", "offline"]
    with pytest.raises(SystemExit) as exc:
        main([str(root), "--order", ","])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--order" in err[0]

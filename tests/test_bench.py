"""The benchmark harness (experiments/bench/run.py) on a tiny configuration, so it cannot rot.

No timing is asserted: on a shared CI machine the figures mean nothing. What is asserted is the
shape of ``bench.json`` (what report tooling and RESULTS.md read), that every ratio came out a
usable number, and that the pieces with a right answer (interpolation, the reference loop's BN
term, the remap check) give it.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "experiments" / "bench"
RATIOS = ("lightning_vs_bare", "loader_vs_train", "lut_vs_naive", "inversion_vs_reference",
          "precision_speedup_128", "step0_cache_sweep_speedup", "adaptive_vs_fixed_cpu",
          "adaptive_vs_fixed_cpu_small")


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("run"), importlib.import_module("reference_inversion")
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.slow  # whole-script runs of minutes on 2 cores: `make slow`
def test_tiny_run_writes_every_ratio_and_the_machine_block(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--tiny", "--out", str(out),
         "--cache", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "bench.json").read_text())
    assert set(doc) == {"machine", "results", "ratios"}
    assert set(doc["ratios"]) == set(RATIOS)
    for key, value in doc["ratios"].items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    m = doc["machine"]
    for key in ("cpu", "cores", "torch", "torch_threads", "device", "lightning"):
        assert m[key] not in (None, ""), key
    assert m["torch"] == torch.__version__ and m["cores"] >= 1
    res = doc["results"]
    assert res["run"]["variant"] == "tiny"
    # the raw figures behind the ratios are there, and they are the ratios' inputs
    tr = res["train"]
    assert doc["ratios"]["lightning_vs_bare"] == pytest.approx(
        tr["lightning_images_per_s"] / tr["bare_images_per_s"])
    assert tr["forward_flops_per_image"] > 0 and 0 < tr["mfu"] and tr["peak_rss_mb"] > 0
    assert tr["train_step_flops_per_image"] > tr["forward_flops_per_image"]
    assert res["precision"]["default"]["variant"] in res["precision"]["images_per_s"]
    assert len(res["inversion"]["ours"]) == 2 and res["inversion"]["reference"]["seconds"] > 0
    assert res["sweep"]["without_cache_s"] > 0 and res["sweep"]["with_cache_s"] > 0
    for preset, a in res["adaptive"]["presets"].items():
        assert doc["ratios"][f"adaptive_vs_fixed_{preset}"] == pytest.approx(
            a["fixed"]["seconds"] / a["adaptive"]["seconds"])
        # tiny: 2 + 2 iterations, fewer than the rule's two windows, so every image runs both
        assert a["adaptive"]["iterations"]["max"] == a["fixed"]["iterations"]["max"] == 4
        assert a["adaptive"]["images"] == a["fixed"]["images"] == 2 * 2  # classes x per class
    # the paper estimate: our preset does half the iterations at a quarter of the pixels
    est = res["inversion"]["paper_estimate"]
    f = est["flops_per_image_iteration"]
    assert est["ours_flops"] / est["paper_loop_flops"] == pytest.approx(
        (f["256"] + f["512"]) / (2 * f["512"]))
    assert est["paper_implied_t4_flops_per_s"] == pytest.approx(
        est["paper_loop_flops"] / (150 * 3600))
    assert 0 < res["inversion"]["cpu"]["fraction_of_peak"]
    assert "T4-hours" in proc.stdout
    # the table goes to stdout, progress to stderr
    for key in RATIOS:
        assert key in proc.stdout
    assert "[bench" in proc.stderr and "[bench" not in proc.stdout


def test_time_to_reach_interpolates_between_budgets(bench_modules):
    run, _ = bench_modules
    points = [(10.0, 0.2), (20.0, 0.6), (40.0, 0.9)]
    assert run.time_to_reach(points, 0.4) == (pytest.approx(15.0), True)
    assert run.time_to_reach(points, 0.6) == (pytest.approx(20.0), True)
    assert run.time_to_reach(points, 0.1) == (10.0, True)  # the first budget: an upper bound
    assert run.time_to_reach(points, 0.95) == (40.0, False)


def test_reference_bn_term_is_the_suites_formula(bench_modules):
    """The reference loop is written independently of incseg.replay; its BN regulariser
    must still be the same quantity, or the benchmark compares two different objectives."""
    from incseg.losses.inversion import BNStatisticsHook
    from incseg.models import build_model

    _, ref = bench_modules
    torch.manual_seed(0)
    model = build_model("bisenet_r18", [3]).eval()
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 32, 32)
    hooks = ref._BNHooks(model)
    with torch.no_grad():
        model(x)
    ours_ref = hooks.take(10.0)
    hooks.remove()
    with BNStatisticsHook(model, 10.0) as suite, torch.no_grad():
        model(x)
        expected = suite.loss
    assert float(ours_ref) == pytest.approx(float(expected), rel=1e-5)


def test_reference_images_stay_in_the_pixel_range(bench_modules):
    from incseg.models import build_model
    from incseg.replay import pixel_range

    _, ref = bench_modules
    torch.manual_seed(0)
    teacher = build_model("bisenet_r18", [3]).eval()
    st = ref.ReferenceSettings(iterations=2, jitter=2, lr=5.0)  # a large step hits the clamp
    images, targets, seconds = ref.reference_inversion(teacher, [1, 2], 2, 32, st)
    assert images.shape == (4, 3, 32, 32) and targets == [1, 1, 2, 2] and seconds > 0
    low, high = pixel_range()
    assert bool((images >= low - 1e-6).all()) and bool((images <= high + 1e-6).all())
    assert not teacher.training and all(p.requires_grad for p in teacher.parameters())


def test_remap_bench_checks_both_ways_agree(bench_modules):
    import remap

    figures = remap.main(size=32, n_masks=1, repeats=1, number=1, naive_number=1)
    assert figures["lut_ms"] > 0 and figures["naive_ms"] > 0 and figures["mask_px"] == 32


def test_inversion_iteration_flops_is_forward_plus_the_image_gradient(bench_modules):
    """A 1x1 conv 3 -> 4 on an 8x8 image: forward 2*3*4*64 = 1536 FLOPs; the backward to the
    image (weights frozen: no weight gradient) costs the same again; x4 at 16 px."""
    run, _ = bench_modules

    class Out:
        def __init__(self, logits):
            self.logits = logits

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1, bias=False)

        def forward(self, x):
            return Out(self.conv(x))

    net = Net()
    assert run.inversion_iteration_flops(net, 8) == 2 * 1536
    assert run.inversion_iteration_flops(net, 16, at=8) == 4 * 2 * 1536
    assert all(p.requires_grad for p in net.parameters())  # a copy was frozen, not the model


@pytest.mark.slow
def test_methods_bench_tiny_times_each_method_against_mib(tmp_path):
    """experiments/bench/methods.py at smoke scale: every entry timed, MiB's ratio 1, PLOP's
    pass before the step measured (and nobody else's), the step = pass + epochs x batches x
    iteration."""
    out = tmp_path / "methods.json"
    root = BENCH.parent.parent
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, str(BENCH / "methods.py"), "--tiny", "--repeats", "1", "--out",
         str(out), "--methods", "mib", "plop", "mib-M"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"mib", "plop", "mib-M"}
    assert res["mib"]["step_vs_mib"] == 1.0
    assert res["plop"]["pass_s"] > 0.01  # the base class's no-op is timed too: microseconds
    assert res["mib"]["pass_s"] < 1e-3 and res["mib-M"]["pass_s"] < 1e-3
    for r in res.values():
        assert r["iteration_s"] > 0 and r["batches"] >= 3
        assert r["step_s"] > r["pass_s"]
    assert "| plop |" in proc.stdout


@pytest.mark.slow
def test_replay_cost_bench_tiny_counts_what_each_replay_keeps(tmp_path):
    """experiments/bench/replay_cost.py at smoke scale: STAR keeps (2D + 3) x 4 bytes per old
    class plus the background count, its -M and +DI entries add the memory's files and the
    set's PNGs on top; a DeepInversion set is made once (a one-off cost the plain method does
    not have), and each entry's added time is measured against the method alone."""
    out = tmp_path / "replay.json"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(BENCH.parent.parent)}
    proc = subprocess.run(
        [sys.executable, str(BENCH / "replay_cost.py"), "--tiny", "--repeats", "1", "--out",
         str(out), "--entries", "star", "star+DI", "star-M", "mib"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    star, di, mem, mib = res["star"], res["star+DI"], res["star-M"], res["mib"]
    k = star["old_classes"]
    dims = int(star["state"].split("prototypes [")[1].split("]")[0].split(", ")[1])
    assert star["state_bytes"] == (2 * dims + 3) * 4 * k + 4 == star["kept_bytes"]
    assert mib["kept_bytes"] == 0 and star["set_bytes"] == star["memory_bytes"] == 0
    assert di["set_images"] > 0 and di["kept_bytes"] == di["state_bytes"] + di["set_bytes"]
    assert mem["memory_images"] == 20 and mem["kept_bytes"] > star["kept_bytes"]
    assert di["making_s"] > 0 and di["first_build_s"] > di["build_s"]
    assert star["pass_s"] > 0.01 and star["end_s"] > 0.01 and mib["pass_s"] < 1e-3
    assert star["added_s"] == 0 and "added_s" in di and "step_vs_plain" in mem
    assert "| star+DI |" in proc.stdout

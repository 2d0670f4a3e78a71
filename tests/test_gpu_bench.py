"""The GPU check (experiments/bench/gpu.py) in its --tiny CPU mode, its one line without a GPU
(docs/errors.md row 72), the workload arithmetic, and the model timing (models.py --tiny).

No speed is asserted: the figures of a shared machine mean nothing. What is asserted is the
file's shape, that every figure came out a usable number, and the arithmetic with a right
answer.
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

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "experiments" / "bench"
# the checkout's incseg first (a worktree's, not another editable install's)
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def script(name: str, *args: str, tmp_path: Path, timeout: int = 240):
    return subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV, cwd=tmp_path)


def finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.slow  # whole-script runs of minutes on 2 cores: `make slow`
def test_tiny_gpu_check_runs_on_the_cpu_and_writes_every_figure(tmp_path):
    proc = script("gpu.py", "--tiny", "--out", str(tmp_path / "out"), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "gpu_bench.json").read_text())
    assert set(doc) == {"machine", "results"} and doc["machine"]["device"] == "cpu"
    res = doc["results"]
    assert res["run"]["variant"] == "tiny"
    train = res["train"]
    assert train["auto"]["precision"] == "32-true"  # the CPU rule below 128 px
    assert set(train["models"]) == {"bisenet_r18", "deeplabv3_r50"}
    for m in train["models"].values():
        assert set(m["variants"]) == {"fp32", "fp32_channels_last", "bf16-mixed",
                                      "bf16-mixed_channels_last"}
        for row in m["variants"].values():
            assert finite(row["images_per_s"]) and finite(row["eval_images_per_s"])
            assert row["peak_memory_mib"] is None  # a CUDA figure only
        assert m["fastest"] in m["variants"] and m["auto"] == "fp32"
        fastest = m["variants"][m["fastest"]]["images_per_s"]
        assert m["auto_vs_fastest"] == pytest.approx(m["variants"]["fp32"]["images_per_s"]
                                                     / fastest)
        assert 0 < m["auto_vs_fastest"] <= 1
    assert train["models"]["deeplabv3_r50"]["parameters"] == 39_048_533  # 21 outputs
    mib = res["mib"]
    assert finite(mib["lightning_images_per_s"]) and finite(mib["bare_images_per_s"])
    assert mib["lightning_vs_bare"] == pytest.approx(mib["lightning_images_per_s"]
                                                     / mib["bare_images_per_s"])
    inv = res["inversion"]
    assert inv["settings"] == {"batch_size": 4, "image_size": 32, "iterations_low": 10000,
                               "iterations_full": 10000, "precision": "32"}
    for label in ("teacher", "teacher_student"):
        r = inv[label]
        low, full = r["iterations_per_s_low"], r["iterations_per_s_full"]
        assert finite(low) and finite(full)
        assert r["batches"] == 120  # 15 x 32 images in batches of 4
        assert r["ours_gpu_hours"] == pytest.approx(120 * (10000 / low + 10000 / full) / 3600)
        assert r["paper_loop_gpu_hours"] == pytest.approx(120 * 20000 / full / 3600)
    assert "DeepInversion (teacher_student)" in proc.stdout
    ad = res["adaptive"]
    for label in ("teacher", "teacher_student"):
        r = ad[label]
        assert r["batch"] == 3 and finite(r["image_iterations_per_s_full"])
        assert r["gpu_hours_at_max"] == pytest.approx(480 * (
            10000 / r["image_iterations_per_s_low"]
            + 10000 / r["image_iterations_per_s_full"]) / 3600)
    assert "adaptive budget (teacher_student)" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    proc = script("gpu.py", "--out", str(tmp_path / "out"), tmp_path=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: experiments/bench/gpu.py measures a GPU and torch sees none "
        "(torch.cuda.is_available() is False); run it on a GPU machine, or with --tiny to "
        "check the script on the CPU")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--stage-fractions", "2,0"], "--stage-fractions 2,0: give two numbers in (0, 1], the mean "
                                   "iterations per image over each stage's maximum, e.g. "
                                   "--stage-fractions 0.2,0.3"),
    (["--from-bench", "missing.json"], "--from-bench missing.json: no adaptive benchmark of the "
                                       "cpu preset there (FileNotFoundError); run "
                                       "experiments/bench/run.py --only adaptive first and pass "
                                       "its bench.json"),
    (["--parts", "inversion,speed"], "--parts inversion,speed: unknown part(s) speed; choose "
                                     "from inversion, adaptive, mib, train"),
], ids=["stage-fractions", "from-bench", "parts"])
def test_bad_adaptive_arguments_are_one_line(tmp_path, monkeypatch, capsys, args, message):
    sys.path.insert(0, str(BENCH))
    try:
        gpu = importlib.import_module("gpu")
    finally:
        sys.path.remove(str(BENCH))
    monkeypatch.chdir(tmp_path)  # missing.json is looked for here
    assert gpu.main([*args, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_paper_workload_hours_by_hand():
    """15 classes x 32 images in batches of 32 = 15 batches; 10k iterations at 2 it/s and 10k at
    1 it/s: 15 x 15,000 s = 62.5 h; the paper's loop, 20k at 1 it/s: 83.3 h."""
    from incseg.replay import InversionSettings

    sys.path.insert(0, str(BENCH))
    try:
        gpu = importlib.import_module("gpu")
    finally:
        sys.path.remove(str(BENCH))
    st = InversionSettings.from_dict({"n_per_class": 32, "batch_size": 32, "image_size": 512,
                                      "iterations_low": 10000, "iterations_full": 10000})
    hours = gpu.workload_hours(st, low_its=2.0, full_its=1.0)
    assert hours == {"batches": 15, "ours_gpu_hours": pytest.approx(62.5),
                     "paper_loop_gpu_hours": pytest.approx(250 / 3)}


def test_adaptive_workload_hours_by_hand(tmp_path):
    """480 images; at fractions 0.5 / 0.25 of 10k + 10k iterations, 2 and 1 image-it/s:
    480 x (2500 + 2500) s = 666.7 h; at the maximum 480 x (5000 + 10000) s = 2000 h. The
    fractions from a bench.json: mean 75 of 300 iterations = 0.25 for both stages."""
    from incseg.replay import InversionSettings

    sys.path.insert(0, str(BENCH))
    try:
        gpu = importlib.import_module("gpu")
    finally:
        sys.path.remove(str(BENCH))
    st = InversionSettings.from_dict({"n_per_class": 32, "batch_size": 32, "image_size": 512,
                                      "iterations_low": 10000, "iterations_full": 10000})
    assert gpu.adaptive_hours(st, 2.0, 1.0, (0.5, 0.25)) == pytest.approx(2000 / 3)
    assert gpu.adaptive_hours(st, 2.0, 1.0) == pytest.approx(2000)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"results": {"adaptive": {"presets": {"cpu": {
        "max_iterations": [200, 100], "adaptive": {"iterations": {"mean": 75.0}}}}}}}))
    assert gpu.fractions_from_bench(bench) == (0.25, 0.25)


@pytest.mark.slow  # whole-script runs of minutes on 2 cores: `make slow`
def test_tiny_model_timing_writes_counts_and_ratios(tmp_path):
    out = tmp_path / "models.json"
    proc = script("models.py", "--tiny", "--models", "bisenet_r18,deeplabv3_r50", "--out",
                  str(out), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    r18, dl = doc["models"]["bisenet_r18"], doc["models"]["deeplabv3_r50"]
    assert dl["parameters"] == 39_047_248 and r18["parameters"] > 0
    assert r18["vs_bisenet_r18"] == {"step_s": 1.0, "step_cpu_s": 1.0, "parameters": 1.0,
                                     "macs_at_crop": 1.0}
    assert dl["vs_bisenet_r18"]["parameters"] == pytest.approx(39_047_248 / r18["parameters"])
    # DeepLab's MACs grow with the pixel count: 512 px is 256 x the 32 px of --tiny
    assert dl["macs_at_512"] == pytest.approx(256 * dl["macs_at_crop"], rel=0.02)
    assert finite(dl["step_s"]) and finite(dl["step_cpu_s"])
    assert doc["machine"]["torch"] == torch.__version__

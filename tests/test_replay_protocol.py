"""Replay in the protocol: every incremental step gets a replay set from model t-1, recorded in
results.json; the cached sets are reused by a second run; the controls run the same path."""

from __future__ import annotations

import pytest

from incseg.config import compose
from incseg.protocol import run_protocol

TINY = ["experiment=smoke", "logger=none", "inversion.n_per_class=1",
        "inversion.iterations_low=2", "inversion.iterations_full=2", "inversion.batch_size=8",
        "dataset.generator.n_train=200"]


def cfg(cache, *extra):
    return compose([*TINY, f"paths.cache_dir={cache}", *extra])


def test_replay_at_every_step_of_15_5s_and_cache_reuse(tmp_path, caplog):
    caplog.set_level("INFO")
    cache = tmp_path / "cache"
    res = run_protocol(cfg(cache, "task=15-5s", "replay=deepinversion", "replay.verifier=none"),
                       tmp_path / "a")
    assert "replay" not in res["steps"][0]
    for t, step in enumerate(res["steps"][1:], start=1):
        rep = step["replay"]
        assert rep["images"] == 15 + t - 1  # one image per old foreground class of model t-1
        assert 0.0 <= rep["teacher_accuracy"] <= 1.0 and rep["verifier_accuracy"] is None
        # the curvature test ran at the start of the step: smoke's lr_incremental 0.001,
        # Nesterov momentum 0.9 -> 2 * 1.9 / 2.8 / 0.001
        assert rep["sharpness"] > 0
        assert rep["stability_bound"] == pytest.approx(1357.1429, rel=1e-6)
    assert (tmp_path / "a" / "replay" / "step5_classes.png").exists()
    caplog.clear()
    with caplog.at_level("INFO"):
        again = run_protocol(cfg(cache, "task=15-5s", "replay=deepinversion",
                                 "replay.verifier=none"), tmp_path / "b")
    assert "generating batch" not in caplog.text  # every set came from the cache
    assert caplog.text.count("replay set cache hit") == 5  # one per incremental step
    assert "step-0 cache hit" in caplog.text
    assert [s["replay"]["path"] for s in again["steps"][1:]] == [
        s["replay"]["path"] for s in res["steps"][1:]]


@pytest.mark.parametrize("kind", ["noise", "exemplars"])
def test_replay_controls(tmp_path, kind):
    res = run_protocol(cfg(tmp_path / "cache", f"replay={kind}", "replay.verifier=none",
                           "replay.loss=kl"), tmp_path / kind)
    assert res["replay"] == kind
    assert res["steps"][1]["replay"]["images"] == 15


def test_replay_stability_script_replays_a_step_under_variants(tmp_path):
    """experiments/replay_stability.py rebuilds step 1 of a finished run: at iteration 0 the
    student equals its teacher, so the weighted replay term and its gradient scale exactly with
    replay.weight, and the curvature figure with them."""
    import importlib
    import json
    import sys
    from pathlib import Path

    run = tmp_path / "run"
    run_protocol(cfg(tmp_path / "cache", "replay=noise", "replay.verifier=none"), run)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    try:
        script = importlib.import_module("replay_stability")
    finally:
        sys.path.pop(0)
    out, png = tmp_path / "stab.json", tmp_path / "stab.png"
    assert script.main([str(run), "--step", "1", "--iters", "2", "--sharpness", "5",
                        "--variants", "replay.weight=1", "replay.weight=0.1", "--out", str(out),
                        "--plot", str(png)]) == 0
    full, tenth = json.loads(out.read_text())["variants"]
    assert tenth["overrides"] == ["replay.weight=0.1"]
    a, b = full["records"][0], tenth["records"][0]
    assert a["seg"] == pytest.approx(b["seg"], rel=1e-6)  # same batch, same weights
    assert b["replay"] == pytest.approx(0.1 * a["replay"], rel=1e-4)
    assert b["grad_replay"] == pytest.approx(0.1 * a["grad_replay"], rel=1e-4)
    assert tenth["replay_sharpness"] == pytest.approx(0.1 * full["replay_sharpness"], rel=1e-3)
    assert full["stability_bound"] == pytest.approx(1357.1429, rel=1e-6)
    assert len(full["records"]) == 2 and png.stat().st_size > 0

"""experiments/replay_sets.py: the cost of a run's replay sets, read back from its files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("replay_sets_for_test",
                                                  ROOT / "experiments" / "replay_sets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_P = "[2026-12-06 {}][incseg.replay][INFO] - replay set "
LOG = "\n".join([
    _P.format("13:52:00,516") + "aaaa: generating batches 1, 2 of 2 (adaptive budget)",
    _P.format("13:54:16,016") + "/c/replay/aaaa written (4 images, teacher accuracy 1.000)",
    _P.format("13:57:48,559") + "bbbb: generating batch 1/2",
    _P.format("13:58:00,000") + "bbbb: generating batch 2/2",
    _P.format("13:58:48,559") + "/c/replay/bbbb written (4 images, teacher accuracy 1.000)",
]) + "\n"


def test_generation_seconds_run_from_the_first_generating_line_to_written():
    got = _script().generation_seconds(LOG)
    assert got == {"aaaa": pytest.approx(135.5), "bbbb": pytest.approx(60.0)}


def _run(tmp_path: Path, log: str) -> Path:
    cache = tmp_path / "cache" / "replay"
    for key, its in (("aaaa", [3, 5, 9, 4]), ("bbbb", None)):
        images = [{"index": i} if its is None else {"index": i, "iterations": n}
                  for i, n in enumerate(its or [0] * 4)]
        (cache / key).mkdir(parents=True)
        (cache / key / "manifest.json").write_text(json.dumps({
            "count": 4, "teacher_accuracy": 1.0, "images": images,
            "settings": {"iterations_low": 6, "iterations_full": 4}}))
    run = tmp_path / "run"
    run.mkdir()
    steps = [{"step": 0}, {"step": 1, "replay": {"path": str(cache / "aaaa" / "images")}},
             {"step": 2, "replay": {"path": str(cache / "bbbb" / "images")}}]
    (run / "results.json").write_text(json.dumps({
        "task": "15-5s", "seed": 1, "steps": steps,
        "provenance": {"config": {"inversion": {"budget": "adaptive"}}, "torch_threads": 1}}))
    (run / "run.log").write_text(log)
    return run


def test_a_set_records_its_images_iterations_and_seconds(tmp_path):
    recs = _script().sets_of(_run(tmp_path, LOG))
    assert [r["step"] for r in recs] == [1, 2]
    first, second = recs
    assert first["iterations"] == {"median": 4.5, "min": 3, "max": 9, "mean": 5.25}
    assert first["seconds"] == pytest.approx(135.5) and first["budget"] == "adaptive"
    # no per-image count in the manifest: every image had the fixed budget, 6 + 4
    assert second["iterations"]["median"] == second["iterations"]["max"] == 10


def test_a_set_found_in_the_cache_has_no_generation_time(tmp_path):
    recs = _script().sets_of(_run(tmp_path, LOG.splitlines()[0] + "\n"))
    assert [r["seconds"] for r in recs] == [None, None]

"""Kill a protocol run during step 1 (SIGKILL), rerun the same command: same final numbers as an
uninterrupted run with the same seed, and step 0 is not retrained. With replay too: the replay
set comes from the cache, and the curvature test taken at the start of the step (it is not
repeated mid-step) travels with the epoch checkpoint into results.json. With a labelled memory
too (half-and-half batches with loader workers, and concatenated)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

ARGS = ["experiment=smoke", "logger=none", "train.epochs_incremental=4",
        "protocol.step0_cache=false"]


def _env(tmp_path):
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled",
               INCSEG_CACHE=str(tmp_path / "cache"))
    return env


def _cmd(run_dir, extra=()):
    return [sys.executable, "-m", "incseg.run", *ARGS, *extra, f"hydra.run.dir={run_dir}"]


@pytest.mark.parametrize("extra", [
    (), ("replay=deepinversion", "inversion.n_per_class=1"),
    # with loader workers, resumed from an epoch checkpoint of step 1 (prefetching workers
    # once trained the resumed epoch on epoch 0's order)
    ("data.num_workers=2",),
    ("replay=deepinversion", "inversion.n_per_class=1", "data.num_workers=2"),
    # a labelled memory: its half-and-half batches follow the epoch too; the stored choice is
    # read back, not selected again
    # (lr_incremental 10x the preset's: an epoch trained on the wrong batches ends elsewhere)
    ("memory.size=8", "data.num_workers=2", "train.lr_incremental=0.01"),
    ("memory.size=8", "memory.mix=concat", "train.lr_incremental=0.01"),
], ids=["no-replay", "replay", "no-replay-workers", "replay-workers", "memory-half-workers",
        "memory-concat"])
def test_kill_during_step1_then_resume(tmp_path, extra):
    env = _env(tmp_path)
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_cmd(ref_dir, extra), env=env, check=True, capture_output=True, timeout=900)
    reference = json.loads((ref_dir / "results.json").read_text())

    proc = subprocess.Popen(_cmd(run_dir, extra), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = run_dir / "checkpoints" / "step1-last.ckpt"
    deadline = time.time() + 600
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), "the run never reached an epoch checkpoint of step 1"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "results.json").exists()

    rerun = subprocess.run(_cmd(run_dir, extra), env=env, capture_output=True, text=True,
                           timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "step 0 already finished: skipped" in rerun.stderr
    assert "step1: resuming from the epoch checkpoint" in rerun.stderr
    resumed = json.loads((run_dir / "results.json").read_text())

    def numbers(res):  # everything but the wall times
        return [{k: v for k, v in s.items() if k != "wall_time_s"} for s in res["steps"]]

    assert numbers(resumed) == numbers(reference)
    assert resumed["final"] == reference["final"]
    if any(e.startswith("memory.") for e in extra):
        assert resumed["steps"][1]["memory"] == reference["steps"][1]["memory"]
    if any(e.startswith("replay=") for e in extra):  # the replay record, curvature figures
        # included, survived the kill
        replay = resumed["steps"][1]["replay"]
        assert replay["images"] > 0 and replay["sharpness"] > 0
        assert "replay set cache hit" in rerun.stderr

"""Exact resume with loader workers, and Ctrl-C: the run stops with one line and exit status
130 right after the first epoch checkpoint of step 1; rerunning the same command resumes from
that checkpoint and ends with the uninterrupted run's numbers (tiny sizes; the SIGKILL
variants, with and without replay, are in test_resume_slow.py and experiments/kill_resume.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# lr_incremental 10x the smoke preset's, so a step that trains an epoch on the wrong order of
# images ends with other numbers (at the preset's lr the IoUs agree to 6 decimals regardless)
ARGS = ["experiment=smoke", "task=15-5", "logger=none", "train.epochs_incremental=2",
        "train.lr_incremental=0.01", "data.num_workers=2"]


def _run(tmp_path, run_dir, fault=None):
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled",
               OMP_NUM_THREADS="1", INCSEG_CACHE=str(tmp_path / "cache"))
    env.pop("INCSEG_FAULT", None)
    if fault:
        env["INCSEG_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "incseg.run", *ARGS,
                           f"hydra.run.dir={run_dir}"], env=env, capture_output=True, text=True,
                          timeout=600)


def _numbers(run_dir):
    res = json.loads((run_dir / "results.json").read_text())
    return [{k: v for k, v in s.items() if k not in ("wall_time_s", "step0_cache")}
             for s in res["steps"]], \
        res["final"]


def test_ctrl_c_is_one_line_and_a_rerun_resumes_exactly(tmp_path):
    reference = _run(tmp_path, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]

    run_dir = tmp_path / "interrupted"
    stopped = _run(tmp_path, run_dir, fault="interrupt-after-write:step1-last.ckpt")
    assert stopped.returncode == 130
    last = [ln for ln in stopped.stderr.splitlines() if ln.strip()][-1]
    assert last == ("interrupted in step 1, epoch 0; rerun the same command to resume from the "
                    "last finished epoch")
    assert "Traceback" not in stopped.stderr
    assert (run_dir / "checkpoints" / "step1-last.ckpt").exists()
    assert not (run_dir / "results.json").exists()
    assert not list(run_dir.rglob("*.tmp*"))  # nothing half-written

    rerun = _run(tmp_path, run_dir)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "step1: resuming from the epoch checkpoint" in rerun.stderr
    assert _numbers(run_dir) == _numbers(tmp_path / "reference")

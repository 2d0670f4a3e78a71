"""A DDP job whose rank 0 dies never hangs: trainer=ddp on 2 CPU processes, rank 0 killed while
rank 1 waits for the replay set; rank 1 ends with its one line within the heartbeat grace, no
process is left, and the rerun finishes with the numbers of an uninterrupted run."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, prctl")]

GRACE_S, BEAT_S = 8, 1
#: the last poll (2 s) after the grace, then the interpreter's exit
MARGIN_S = 12
OVERRIDES = ["experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
             "logger=none", "replay=deepinversion", "replay.verifier=none"]
PR_SET_CHILD_SUBREAPER = 36


def numbers(res: dict) -> dict:
    """What a rerun must reproduce: per-step IoUs and mIoUs, and the final block."""
    volatile = {"wall_time_s", "step0_cache", "replay"}
    return {"steps": [{k: v for k, v in s.items() if k not in volatile} for s in res["steps"]],
            "final": res["final"]}


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line holds ``text`` (zombies have none)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_rank1_waiting_for_a_killed_rank0_exits_with_its_line_and_the_rerun_resumes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1",
               WANDB_MODE="disabled", INCSEG_WAIT_GRACE_S=str(GRACE_S),
               INCSEG_HEARTBEAT_S=str(BEAT_S))

    def cmd(name: str) -> list[str]:
        return [sys.executable, "-m", "incseg.run", *OVERRIDES,
                f"hydra.run.dir={tmp_path / name / 'run'}",
                f"paths.cache_dir={tmp_path / name / 'cache'}"]

    ref = subprocess.run(cmd("ref"), env=env, capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]

    # Rank 0 stalls, alive, right after its batch of the replay set (as in a long generation):
    # its heartbeat goes on. Rank 1 (Lightning's child of rank 0) made its batch and waits for
    # rank 0's manifest. This process adopts rank 1 once rank 0 is gone (a subreaper), so that
    # it can read rank 1's exit status.
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    log = tmp_path / "killed.log"
    try:
        with open(log, "w") as fh:
            rank0 = subprocess.Popen(cmd("run"), env=dict(env, INCSEG_FAULT=(
                "stall-after-write:batch_0.json")), stdout=fh, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: "waiting for rank 0 to write it on rank 1 of 2" in log.read_text()
                       and any((tmp_path / "run" / "cache" / "replay").glob(".*/batch_0.json")),
                       600, "rank 1 to wait and rank 0 to stall")
            (rank1,) = children(rank0.pid)
            time.sleep(2 * GRACE_S)  # a live rank 0 is waited for beyond the grace
            assert rank0.poll() is None and Path(f"/proc/{rank1}").exists()
            assert "rank 1 of 2: still waiting" in log.read_text()
            rank0.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            rank0.wait()
            line_s = status = None
            while status is None:  # when rank 1 says it, and when it has exited
                if line_s is None and "error: rank 1" in log.read_text():
                    line_s = time.monotonic() - killed
                pid, st = os.waitpid(rank1, os.WNOHANG)
                if pid:
                    status, exit_s = st, time.monotonic() - killed
                time.sleep(0.1)
            assert time.monotonic() - killed < 600
        finally:
            if rank0.poll() is None:
                rank0.kill()
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    out = log.read_text()
    print(f"rank 1 said it {line_s:.1f} s and exited {exit_s:.1f} s after rank 0 was killed "
          f"(grace {GRACE_S} s, heartbeat every {BEAT_S} s)")
    assert os.waitstatus_to_exitcode(status) == 2, out[-3000:]
    assert GRACE_S <= exit_s <= GRACE_S + MARGIN_S, out[-3000:]
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out[-3000:]
    assert "Traceback" not in out
    assert errors[0].startswith("error: rank 1 of 2 waited ")
    assert " s for rank 0 to write " in errors[0]
    assert errors[0].split(" to write ")[1].split(",")[0].endswith("/manifest.json")
    assert ".rank0.heartbeat has not changed for" in errors[0]
    assert "rerun the same command to resume" in errors[0]
    assert processes_mentioning(str(tmp_path)) == []  # nothing left behind

    rerun = subprocess.run(cmd("run"), env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # both ranks' batches survived the kill: the rerun merges them, making none again
    assert "generating batch" not in rerun.stderr
    assert "step 0 already finished: skipped" in rerun.stderr
    got = json.loads((tmp_path / "run" / "run" / "results.json").read_text())
    want = json.loads((tmp_path / "ref" / "run" / "results.json").read_text())
    assert numbers(got) == numbers(want)
    assert processes_mentioning(str(tmp_path)) == []

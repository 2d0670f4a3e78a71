"""Kill anywhere, resume exactly (experiments/kill_resume.py): SIGKILL at random moments, while
files are being written, and damaged files between runs; every rerun ends with the numbers of
an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "kill_resume.py"


def test_kill_anywhere_then_resume_gives_identical_results(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--kills", "4", "--seed", "1",
                           "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["failures"] == []
    assert summary["phases"]["random"]["identical"]
    assert all(w["killed"] and w["identical"] for w in summary["phases"]["writes"].values())
    assert all(d["reported"] and d["identical"] for d in summary["phases"]["damaged"].values())
    workers = summary["phases"]["workers"]
    assert set(workers) == {"kill", "interrupt"}
    assert all(w["stopped"] and w["identical"] for w in workers.values())
    assert summary["kills_survived"] >= 6

"""Kill a run after an epoch checkpoint of step 1, as ``kill -9`` would, and compare reruns with
the uninterrupted run: shared by the slow resume tests of the methods that carry state."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from incseg import faults


class Killed(Exception):
    pass


def kill_after_step1_epoch(monkeypatch, kill_at: int, run: Callable[[], object]) -> None:
    """``run()`` is stopped right after the ``kill_at``-th write of step 1's epoch checkpoint
    (1: mid-step; the step's last epoch: the rerun's fit has nothing left to train)."""
    writes = []

    def die(path):
        if "step1-last.ckpt" in str(path):
            writes.append(path)
            if len(writes) == kill_at:
                raise Killed

    monkeypatch.setattr(faults, "after_write", die)
    try:
        with pytest.raises(Killed):
            run()
    finally:
        monkeypatch.undo()


def step_numbers(results: dict) -> list[dict]:
    """Every per-step figure but the wall time and whether step 0 came from the cache (the
    reference trains the step 0 that a cut run finds cached)."""
    return [{k: v for k, v in s.items() if k not in ("wall_time_s", "step0_cache")}
            for s in results["steps"]]

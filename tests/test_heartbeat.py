"""Waits between processes end when the writer is gone: heartbeat files and their staleness,
without processes (a fake clock whose sleep advances it)."""

from __future__ import annotations

import logging
import os
import time

import pytest

from incseg.errors import ConfigError, PeerLost
from incseg.heartbeat import Heartbeat, HeartbeatWatch, heartbeat_interval, wait_for, wait_grace


class Clock:
    """Monotonic time that only moves when someone sleeps; ``on_sleep`` runs at every sleep
    (what the other process does meanwhile)."""

    def __init__(self, on_sleep=None):
        self.now, self.on_sleep, self.sleeps = 1000.0, on_sleep, 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s
        self.sleeps += 1
        if self.on_sleep:
            self.on_sleep(self)


def test_watch_counts_silence_from_the_last_change_it_saw(tmp_path):
    hb = Heartbeat(tmp_path / "x.heartbeat", interval=1)
    clock = Clock()
    hb.beat()
    watch = HeartbeatWatch(hb.path, clock)
    clock.now += 7
    assert watch.silent_for() == 7  # unchanged since the watch started
    hb.beat()  # a new file renamed into place: a change, whatever the mtime resolution
    assert watch.silent_for() == 0
    clock.now += 3
    assert watch.silent_for() == 3
    hb.path.unlink()  # the writer finished and removed it: also a change
    assert watch.silent_for() == 0
    clock.now += 2.5
    assert watch.silent_for() == 2.5


def test_a_stale_file_from_a_killed_run_is_silence_from_the_start_of_the_wait(tmp_path):
    """An old heartbeat left behind (mtime an hour ago) does not end a wait at once: the waiter
    judges by its own clock, so clock skew between nodes and leftovers do not matter."""
    path = tmp_path / "old.heartbeat"
    path.write_text("node1 123 5 0\n")
    old = time.time() - 3600
    os.utime(path, (old, old))
    clock = Clock()
    polls = []
    with pytest.raises(PeerLost):
        wait_for(lambda: polls.append(clock.now) and None, waiter="rank 1 of 2",
                 target=tmp_path / "manifest.json", writers=lambda: {"rank 0": path},
                 grace=30, poll=2, clock=clock, sleep=clock.sleep)
    # given up after 30 s of the waiter's time (the first look past the grace), not at once
    assert 30 < polls[-1] - polls[0] <= 34


def test_wait_gives_up_with_one_line_naming_the_waiter_the_writer_and_the_file(tmp_path):
    clock = Clock()
    target = tmp_path / "replay" / "abc" / "manifest.json"
    with pytest.raises(PeerLost) as err:
        wait_for(lambda: None, waiter="rank 1 of 2", target=target,
                 writers=lambda: {"rank 0": tmp_path / ".abc.rank0.heartbeat"},
                 grace=10, poll=1, clock=clock, sleep=clock.sleep)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("rank 1 of 2 waited 11 s for rank 0 to write " + str(target))
    assert (".abc.rank0.heartbeat has not changed for 11 s, longer than the grace of 10 s "
            "(INCSEG_WAIT_GRACE_S): rank 0 is gone") in msg
    assert "rerun the same command to resume" in msg
    assert clock.now - 1000 == 11  # one poll past the grace


def test_a_live_writer_is_waited_for_however_long_it_takes(tmp_path):
    """A writer that keeps beating is never given up on, even after 50 graces; the wait
    returns what it waited for once it is there."""
    hb = Heartbeat(tmp_path / "w.heartbeat", interval=5)

    def writer(clock):
        if clock.sleeps % 3 == 0:  # a beat every 3 polls of 2 s: every 6 s < grace 10 s
            hb.beat()

    clock = Clock(writer)
    done_at = 1000 + 500
    got = wait_for(lambda: "manifest" if clock.now >= done_at else None, waiter="rank 1",
                   target="m.json", writers=lambda: {"rank 0": hb.path}, grace=10, poll=2,
                   clock=clock, sleep=clock.sleep)
    assert got == "manifest" and clock.now == done_at


def test_a_writer_that_finishes_at_the_last_moment_is_not_taken_for_dead(tmp_path):
    """The silence is past the grace, but what was waited for has appeared meanwhile: the
    wait looks once more before giving up and returns it."""
    clock = Clock()
    looks = []

    def check():
        looks.append(clock.now)
        # appears right after the look that finds the silence past the grace (at 1011 s)
        return "there" if looks[-2:] == [1011, 1011] else None

    got = wait_for(check, waiter="rank 0", target="batch_1.json",
                   writers=lambda: {"rank 1": tmp_path / "r1.heartbeat"}, grace=10, poll=1,
                   clock=clock, sleep=clock.sleep)
    assert got == "there" and looks[-1] == looks[-2] == 1011


def test_only_the_writers_still_awaited_are_judged(tmp_path):
    """Rank 0 waits for batches of ranks 1 and 2; rank 2 delivered and stopped beating, rank 1
    keeps beating: rank 2's silence is no reason to give up, rank 1's would be."""
    hb1 = Heartbeat(tmp_path / "r1.heartbeat")
    pending = {"rank 1", "rank 2"}

    def others(clock):
        hb1.beat()
        if clock.now > 1004:
            pending.discard("rank 2")

    clock = Clock(others)
    paths = {"rank 1": hb1.path, "rank 2": tmp_path / "r2.heartbeat"}
    got = wait_for(lambda: "all" if clock.now >= 1100 else None, waiter="rank 0 of 3",
                   target="batches", writers=lambda: {n: paths[n] for n in sorted(pending)},
                   grace=10, poll=2, clock=clock, sleep=clock.sleep)
    assert got == "all"
    clock = Clock()  # rank 1 silent now: named in the line
    with pytest.raises(PeerLost, match=r"^rank 0 of 3 waited \d+ s for rank 1 to write batches"):
        wait_for(lambda: None, waiter="rank 0 of 3", target="batches",
                 writers=lambda: {"rank 1": paths["rank 1"]}, grace=10, poll=2, clock=clock,
                 sleep=clock.sleep)


def test_waiting_says_what_it_waits_for_while_it_waits(tmp_path, caplog):
    hb = Heartbeat(tmp_path / "w.heartbeat")
    clock = Clock(lambda c: hb.beat())
    with caplog.at_level(logging.INFO, logger="incseg.heartbeat"):
        wait_for(lambda: 1 if clock.now >= 1100 else None, waiter="rank 1 of 2",
                 target="/c/replay/k/manifest.json", writers=lambda: {"rank 0": hb.path},
                 grace=60, poll=2, clock=clock, sleep=clock.sleep)
    lines = [r.getMessage() for r in caplog.records]
    # every 30 s (half the grace) over 100 s: at 30, 60, 90
    assert len(lines) == 3
    assert lines[0] == ("rank 1 of 2: still waiting (30 s) for rank 0 to write "
                        "/c/replay/k/manifest.json; last heartbeat 0 s ago")


def test_heartbeat_thread_refreshes_the_file_and_removes_it_at_the_end(tmp_path):
    path = tmp_path / "sub" / "x.heartbeat"
    with Heartbeat(path, interval=0.02) as hb:
        assert path.is_file()  # the first beat is there before the work starts
        first = path.stat().st_ino, path.read_text()
        deadline = time.monotonic() + 10
        while (path.stat().st_ino, path.read_text()) == first and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (path.stat().st_ino, path.read_text()) != first
        assert path.read_text().split()[1] == str(os.getpid())
    assert not path.exists() and hb._thread is not None and not hb._thread.is_alive()
    with pytest.raises(RuntimeError), Heartbeat(path, interval=0.02):  # removed on an error too
        raise RuntimeError("work failed")
    assert not path.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == []  # no temporary file left


def test_grace_and_interval_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("INCSEG_WAIT_GRACE_S", raising=False)
    monkeypatch.delenv("INCSEG_HEARTBEAT_S", raising=False)
    assert wait_grace() == 300 and heartbeat_interval() == 10
    monkeypatch.setenv("INCSEG_WAIT_GRACE_S", "7.5")
    monkeypatch.setenv("INCSEG_HEARTBEAT_S", "1")
    assert wait_grace() == 7.5 and heartbeat_interval() == 1
    for bad in ("soon", "0", "-3", "inf", "nan"):
        monkeypatch.setenv("INCSEG_WAIT_GRACE_S", bad)
        with pytest.raises(ConfigError, match=r"^INCSEG_WAIT_GRACE_S=.* is not a positive number "
                                              r"of seconds; unset it \(default 300\)"):
            wait_grace()

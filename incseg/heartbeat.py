"""Waits between processes that end when the process they wait for is gone.

Under DDP the ranks hand a replay set and its batches over through files, not at a collective:
one rank's share can take hours at the paper's scale, longer than a process group's timeout. A
plain poll for such a file waits forever once its writer has died (killed for memory, a
preempted node) and keeps its GPU. So the writer refreshes a heartbeat file while it works
(:class:`Heartbeat`), and a waiter (:func:`wait_for`) gives up with one line naming itself and
the file it waited for when no heartbeat has changed for a grace period.

"Changed" is judged by the waiter's own monotonic clock on the file's ``stat`` (each beat
replaces the file, so its inode and mtime change), never by comparing a timestamp written on
another node with the local clock: clocks of cluster nodes differ. The grace must cover the
shared filesystem's attribute caching (NFS caches a file's attributes up to 60 s by default);
the default of 300 s does, and is set with ``INCSEG_WAIT_GRACE_S`` (``INCSEG_HEARTBEAT_S``: the
beat interval, 10 s). torch elastic's dynamic rendezvous judges its nodes the same way (a
keep-alive each node refreshes, a node dead once its keep-alive is older than a timeout):
liveness is a signal the live process keeps sending, not a deadline on the work.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from incseg.errors import ConfigError, PeerLost

__all__ = ["Heartbeat", "HeartbeatWatch", "heartbeat_interval", "wait_for", "wait_grace"]

log = logging.getLogger("incseg.heartbeat")

GRACE_ENV, GRACE_DEFAULT_S = "INCSEG_WAIT_GRACE_S", 300.0
BEAT_ENV, BEAT_DEFAULT_S = "INCSEG_HEARTBEAT_S", 10.0
#: seconds between two looks at the files another process writes
POLL_S = 2.0
#: longest gap between two "still waiting" lines
LOG_EVERY_S = 60.0

T = TypeVar("T")


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{env}={raw!r} is not a positive number of seconds; unset it (default "
                          f"{default:g}) or pass e.g. {env}={default:g}")
    return value


def wait_grace() -> float:
    """Seconds without a changed heartbeat after which a waiter gives up
    (``INCSEG_WAIT_GRACE_S``)."""
    return _seconds(GRACE_ENV, GRACE_DEFAULT_S)


def heartbeat_interval() -> float:
    """Seconds between two beats of a writer (``INCSEG_HEARTBEAT_S``)."""
    return _seconds(BEAT_ENV, BEAT_DEFAULT_S)


class Heartbeat:
    """``with Heartbeat(path):`` replaces ``path`` every ``interval`` seconds from a daemon thread
    while the block runs, and removes it at the end (an exception included; a killed process
    leaves it behind, unchanging, which is what a waiter detects). The first beat is written
    before the block starts. A beat that cannot be written (a full disk) is logged once and
    retried: the work goes on, and a waiter that stops seeing beats gives up with its line."""

    def __init__(self, path: str | os.PathLike, interval: float | None = None):
        self.path = Path(path)
        self.interval = heartbeat_interval() if interval is None else float(interval)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._count = 0
        self._warned = False

    def beat(self) -> None:
        """Write one beat: a new file renamed into place (a new inode: a waiter sees a change
        even where mtime has a coarse resolution)."""
        self._count += 1
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(f"{socket.gethostname()} {os.getpid()} {self._count} "
                           f"{time.time():.1f}\n")
            os.replace(tmp, self.path)
        except OSError as err:
            if not self._warned:
                log.warning("cannot write the heartbeat %s (%s); processes waiting on it may "
                            "give up", self.path, err)
                self._warned = True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat {self.path.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.path.unlink(missing_ok=True)
        self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp").unlink(missing_ok=True)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class HeartbeatWatch:
    """A waiter's view of one heartbeat file: how long ago (by the waiter's clock) it last saw
    the file change. A file that never changes, a missing one included, counts as silent from
    the moment the watch started: a writer that died before its first beat, or the file a
    killed earlier run left behind, are both silence."""

    def __init__(self, path: str | os.PathLike, clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self._clock = clock
        self._sig = _signature(self.path)
        self._changed = clock()

    def silent_for(self) -> float:
        """Seconds since the last change seen (looks at the file now)."""
        now, sig = self._clock(), _signature(self.path)
        if sig != self._sig:
            self._sig, self._changed = sig, now
        return now - self._changed


def wait_for(check: Callable[[], T | None], *, waiter: str, target: str | os.PathLike,
             writers: Callable[[], Mapping[str, str | os.PathLike]], grace: float | None = None,
             poll: float = POLL_S, log_every: float | None = None,
             clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep) -> T:
    """Poll ``check()`` until it returns something other than None, and return that.

    Args:
        check: looks at the files once; None while what is waited for is not there.
        waiter: who waits, for the messages ("rank 1 of 2").
        target: the file waited for, for the messages.
        writers: the processes still awaited, now: name ("rank 0") -> its heartbeat file.
        grace: seconds a writer's heartbeat may stay unchanged (default :func:`wait_grace`).
        poll, log_every: seconds between two looks, and at most between two "still waiting"
            lines (default: the shorter of 60 s and half the grace).

    Raises:
        PeerLost: a writer's heartbeat has not changed for ``grace`` seconds (checked once more
            before giving up, so a writer that finished meanwhile is not mistaken for a dead one).
    """
    grace = wait_grace() if grace is None else float(grace)
    log_every = min(LOG_EVERY_S, grace / 2) if log_every is None else float(log_every)
    watches: dict[Path, HeartbeatWatch] = {}
    start = last_log = clock()
    while True:
        found = check()
        if found is not None:
            return found
        silent = {}
        for name, hb in writers().items():
            hb = Path(hb)
            if hb not in watches:
                watches[hb] = HeartbeatWatch(hb, clock)
            silent[name] = (hb, watches[hb].silent_for())
        dead = {n: (hb, s) for n, (hb, s) in silent.items() if s > grace}
        if dead:
            found = check()
            if found is not None:
                return found
            name, (hb, s) = next(iter(dead.items()))
            raise PeerLost(
                f"{waiter} waited {clock() - start:.0f} s for {name} to write {target}, and "
                f"{name}'s heartbeat {hb} has not changed for {math.ceil(s)} s, longer than the "
                f"grace of {grace:g} s ({GRACE_ENV}): {name} is gone (killed, out of memory or "
                "a lost node); stop the job's other processes if any are left and rerun the "
                "same command to resume")
        now = clock()
        if now - last_log >= log_every:
            last_log = now
            log.info("%s: still waiting (%.0f s) for %s to write %s; last heartbeat %s",
                     waiter, now - start, ", ".join(silent) or "another process", target,
                     ", ".join(f"{s:.0f} s ago" for _, s in silent.values()) or "-")
        sleep(poll)

"""Hooks around every atomic write, for checks that need to see or break them.

``INCSEG_FAULT=kill-before-rename:<substring>``: the process SIGKILLs itself when a file whose
path contains ``<substring>`` has been written to its temporary name but not yet renamed into
place — the worst moment to die (experiments/kill_resume.py);
``INCSEG_FAULT=kill-after-write:<substring>``: right after such a file is in place (the first
epoch checkpoint of a step, say: a resume from it must give the uninterrupted numbers);
``interrupt-after-write:<substring>`` sends SIGINT instead, as Ctrl-C would;
``stall-after-write:<substring>`` makes the writing thread sleep for good (its other threads,
a heartbeat among them, go on): a process that is alive but slow, as one making a long share of
a replay set, which a test can then kill at the moment it chooses.
``INCSEG_WRITE_LOG=<file>``:
every completed atomic write appends ``<rank> <path>`` to ``<file>``, so a test can prove that
under DDP only rank 0 writes. Both are off unless the variable is set.
"""

from __future__ import annotations

import os
import signal
import time


def before_rename(path: os.PathLike | str) -> None:
    spec = os.environ.get("INCSEG_FAULT", "")
    kind, _, target = spec.partition(":")
    if kind == "kill-before-rename" and target and target in str(path):
        os.kill(os.getpid(), signal.SIGKILL)


def after_write(path: os.PathLike | str) -> None:
    kind, _, target = os.environ.get("INCSEG_FAULT", "").partition(":")
    if target and target in str(path):
        if kind == "kill-after-write":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "interrupt-after-write":
            # as Ctrl-C in a terminal: a process started in the background (nohup, `cmd &`, some
            # CI runners) inherits SIGINT ignored, and Python then installs no handler for it
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.kill(os.getpid(), signal.SIGINT)
        elif kind == "stall-after-write":
            while True:
                time.sleep(3600)
    log = os.environ.get("INCSEG_WRITE_LOG")
    if log:
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
        with open(log, "a") as fh:
            fh.write(f"{rank} {path}\n")

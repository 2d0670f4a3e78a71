"""User-facing errors.

Everything the user can cause (a bad override, a broken dataset, a foreign checkpoint, a full
disk) raises a subclass of :class:`IncsegError` with a message of one line that names the
problem and the fix. The command-line entry points catch these, print ``error: <message>`` on
stderr and exit with status 2 — no traceback, nothing half-written left behind.
"""

from __future__ import annotations

import re


class IncsegError(Exception):
    """A problem the user can fix; its message is one line: what is wrong and how to fix it."""


class ConfigError(IncsegError):
    """An invalid configuration value or combination of values."""


class DataError(IncsegError):
    """A dataset that is missing, malformed, or inconsistent with the configuration."""


class CheckpointError(IncsegError):
    """A checkpoint or cache entry that is missing, truncated, foreign or incompatible.

    ``reason`` says what is wrong with the file without the fix: where the suite repairs the
    file itself (a cache entry retrained), the user is told the reason and what happens now,
    not the advice to delete it and rerun that the error line gives."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


class StorageError(IncsegError):
    """A file or folder that cannot be written: no permission, a read-only or full disk."""


class TrainingError(IncsegError):
    """Training cannot go on (a non-finite loss or weights); the last good checkpoint is kept."""


class PeerLost(IncsegError):
    """Another process of the job, whose file this one waited for, is gone (killed, out of
    memory, a lost node): finished steps and replay batches are on disk, a rerun resumes."""


class Interrupted(IncsegError):
    """The user pressed Ctrl-C: finished epochs are on disk, a rerun resumes from them. Exit
    status 130, the shell's convention for a process ended by SIGINT."""

    exit_code = 130


# torch's DataLoader re-raises an exception from a worker process as
#   ExcType("Caught ExcType in DataLoader worker process 0.\nOriginal Traceback ...\n
#            incseg.errors.DataError: <message>")
# so the user's one line is the last line of the embedded traceback, minus the type prefix.
_WORKER_TRACEBACK = re.compile(r"^Caught \w+ in DataLoader worker process", re.MULTILINE)
_TYPE_PREFIX = re.compile(r"^(?:[\w.]+\.)?\w+(?:Error|Exception): ")


def user_message(err: BaseException) -> str:
    """The one-line message of ``err``: unwrapped from a DataLoader worker's traceback, with
    every run of whitespace (newlines included) collapsed to one space."""
    msg = str(err)
    if _WORKER_TRACEBACK.search(msg):
        last = [ln for ln in msg.strip().splitlines() if ln.strip()][-1].strip()
        msg = _TYPE_PREFIX.sub("", last)
    return " ".join(msg.split())

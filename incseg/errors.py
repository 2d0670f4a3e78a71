"""User-facing errors.

Everything the user can cause (a bad override, a broken dataset, a foreign checkpoint) raises a
subclass of :class:`IncsegError` with a message of one line that names the problem and the fix.
The command-line entry points catch these, print ``error: <message>`` on stderr and exit with
status 2 — no traceback, nothing half-written left behind.
"""


class IncsegError(Exception):
    """A problem the user can fix; its message is one line: what is wrong and how to fix it."""


class ConfigError(IncsegError):
    """An invalid configuration value or combination of values."""


class DataError(IncsegError):
    """A dataset that is missing, malformed, or inconsistent with the configuration."""


class CheckpointError(IncsegError):
    """A checkpoint or cache entry that is missing, truncated, foreign or incompatible."""

"""Shared command-line behaviour: user errors end with one line on stderr and exit status 2."""

from __future__ import annotations

import functools
import sys

from incseg.errors import IncsegError

EXIT_USER_ERROR = 2


def report_errors(fn):
    """Turn an :class:`IncsegError` into ``error: <one line>`` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except IncsegError as err:
            msg = " ".join(str(err).split())  # always one line
            print(f"error: {msg}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USER_ERROR) from None

    return wrapper

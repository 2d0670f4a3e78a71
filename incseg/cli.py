"""Shared command-line behaviour: user errors end with one line on stderr and exit status 2."""

from __future__ import annotations

import functools
import sys

from incseg.errors import IncsegError, Interrupted, user_message

EXIT_USER_ERROR = 2
INTERRUPTED = ("interrupted; rerun the same command to resume (finished steps, epochs and "
               "cache entries are kept)")


def report_errors(fn):
    """Turn an :class:`IncsegError` into ``error: <one line>`` on stderr and exit code 2.

    A storage ``OSError`` raised by code that is not ours (Lightning's CSV logger, W&B, Hydra's
    own files) on a full disk or an unwritable folder is reported the same way: it is the
    user's disk, not a bug. Any other exception keeps its traceback — that one *is* a bug.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        code = EXIT_USER_ERROR
        try:
            return fn(*args, **kwargs)
        except Interrupted as err:
            print(user_message(err), file=sys.stderr, flush=True)
            raise SystemExit(err.exit_code) from None
        except KeyboardInterrupt:  # Ctrl-C outside training (a scan, generation, evaluation)
            print(INTERRUPTED, file=sys.stderr, flush=True)
            raise SystemExit(Interrupted.exit_code) from None
        except IncsegError as err:
            msg = user_message(err)
        except OSError as err:
            from incseg.io import is_storage_error, storage_error

            if not is_storage_error(err):
                raise
            msg = user_message(storage_error(err))
        print(f"error: {msg}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None

    return wrapper

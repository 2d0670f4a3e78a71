"""Shared command-line behaviour: user errors end with one line on stderr and exit status 2;
``-h`` / ``--help`` prints the command's help on stdout and exits 0.
"""

from __future__ import annotations

import functools
import sys
import textwrap
from collections.abc import Sequence

from incseg.errors import IncsegError, Interrupted, user_message

EXIT_USER_ERROR = 2
HELP_FLAGS = ("-h", "--help")
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


def wants_help(argv: Sequence[str]) -> bool:
    """Whether ``-h`` or ``--help`` is among the arguments (anywhere, as in most tools)."""
    return any(a in HELP_FLAGS for a in argv)


def help_text(usage: str, about: str, sections: Sequence[tuple[str, Sequence[tuple[str, str]]]],
              examples: Sequence[str], width: int = 100) -> str:
    """A command's ``--help``: its usage line, what it does, one table per section (a command's
    subcommands, its arguments: ``(name, what it is)`` rows) and examples. Each entry point
    builds its rows from the table it dispatches on, so a new subcommand or key shows up in
    the help without an edit here."""
    out = [f"usage: {usage}", "", textwrap.fill(about, width), ""]
    for title, rows in sections:
        out.append(f"{title}:")
        pad = max((len(name) for name, _ in rows), default=0) + 4
        for name, what in rows:
            lines = textwrap.wrap(what, width - pad) or [""]
            out.append(f"  {name.ljust(pad - 2)}{lines[0]}")
            out.extend(" " * pad + line for line in lines[1:])
        out.append("")
    out.append("examples:")
    out.extend(f"  {e}" for e in examples)
    return "\n".join(out)

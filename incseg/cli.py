"""Shared command-line behaviour: user errors end with one line on stderr and exit status 2;
``-h`` / ``--help`` prints the command's help on stdout and exits 0.
"""

from __future__ import annotations

import functools
import re
import sys
import textwrap
import unicodedata
from collections.abc import Sequence

from incseg.errors import ConfigError, IncsegError, Interrupted, user_message

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
# Hydra's override grammar (hydra/grammar/OverrideLexer.g4) takes only ASCII letters in an
# unquoted value, so `data.root=/home/jürgen/voc` fails to parse, while the quoted form
# `data.root="/home/jürgen/voc"` is the same string. A value is quoted for the user only when
# that cannot change its meaning: a plain `key=value` whose value holds nothing but characters
# the grammar takes unquoted ([A-Za-z0-9_/.+%*@?|:-] and inner spaces) and non-ASCII letters,
# digits and marks. `$` (an interpolation), `\` (an escape), quotes, and `,()[]{}=` (sweeps,
# lists, functions) keep the value as typed; if it has a non-ASCII character outside quotes
# then, the user gets the quoted form to type instead of Hydra's lexer error.
_KEY = re.compile(r"^([+~]{0,2}[A-Za-z_$][\w$.\-/@:]*)=(.*)$", re.ASCII)
_UNQUOTED_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                         "_/.+-%*@?|: ")


def _plain_non_ascii(ch: str) -> bool:
    return ord(ch) > 127 and unicodedata.category(ch)[0] in "LMN"


def _outside_quotes(value: str) -> str | None:
    """The first non-ASCII character of ``value`` outside '...' or "..." (None: none)."""
    quote, escaped = None, False
    for ch in value:
        if escaped and (quote or ord(ch) < 128):  # Hydra escapes only ASCII characters
            escaped = False
        elif ch == "\\":
            escaped = True
        elif quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ord(ch) > 127:
            return ch
    return None


def quote_override(arg: str) -> str:
    """``arg`` with its value in double quotes when only that makes Hydra accept it (a non-ASCII
    letter in a plain value), else ``arg`` unchanged; raises ConfigError (one line: the key and
    the quoted form to type) for a value with a non-ASCII character that cannot safely be
    quoted here."""
    found = _KEY.match(arg)
    if not found or not any(ord(ch) > 127 for ch in arg):
        return arg
    key, value = found.groups()
    ch = _outside_quotes(value)
    if ch is None:
        return arg  # quoted already
    if (value == value.strip() and value
            and all(c in _UNQUOTED_OK or _plain_non_ascii(c) for c in value)):
        return f'{key}="{value}"'
    if not re.search(r"""["'\\$()\[\]{}=]""", value):
        # a sweep over plain values: each one quoted
        quoted = ",".join(f'"{v.strip()}"' for v in value.split(","))
        hint = f"""quote it: '{key}={quoted}'"""
    else:
        hint = ("put each value that has such a character in double quotes (Hydra's override "
                "grammar: https://hydra.cc/docs/advanced/override_grammar/basic/)")
    raise ConfigError(f"the override {arg} has a non-ASCII character ({ch!r}) outside quotes, "
                      f"which Hydra's override grammar does not accept; {hint}")


def quote_overrides(argv: Sequence[str]) -> list[str]:
    """:func:`quote_override` of every command-line override (``--flags`` untouched)."""
    return [a if a.startswith("-") else quote_override(a) for a in argv]

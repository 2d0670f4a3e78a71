"""``--help`` on every entry point: what it does, its arguments, an example, exit status 0, on
stdout; a call without the arguments it needs stays a one-line error with exit status 2."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from incseg.cli import help_text, wants_help
from incseg.config import GROUPS

ROOT = Path(__file__).resolve().parent.parent


@functools.cache  # each command runs once per session: they read nothing a test changes
def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("module", "flag"), [
    ("incseg.run", "--help"), ("incseg.data", "--help"), ("incseg.report", "--help"),
    ("incseg.predict", "--help"), ("incseg.predict", "-h")])
def test_help_exits_0_with_usage_and_an_example(module, flag):
    out = _run(module, flag)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:") and "error" not in out.stderr
    assert f"python -m {module} " in out.stdout.split("xamples", 1)[1]  # an example to copy


def test_run_help_is_the_suites_usage_with_every_config_group():
    text = _run("incseg.run", "--help").stdout
    assert "class-incremental" in text and "Powered by Hydra" not in text
    listed = {line.split(":", 1)[0] for line in text.splitlines() if ":" in line}
    assert set(GROUPS) - {"experiment"} <= listed and "experiment/cpu" in listed
    assert "mib" in next(ln for ln in text.splitlines() if ln.startswith("method:"))


def test_data_help_lists_every_subcommand_and_data_without_one_is_a_one_line_error():
    from incseg.data.__main__ import COMMANDS

    text = _run("incseg.data", "--help").stdout
    rows = text.split("commands:", 1)[1].split("\n\n", 1)[0]
    assert [ln.split()[0] for ln in rows.splitlines() if ln.startswith("  ") and ln[2] != " "] \
        == list(COMMANDS)
    bare = _run("incseg.data")
    assert bare.returncode == 2 and bare.stdout == ""
    assert bare.stderr.count("\n") == 1 and "--help" in bare.stderr


def test_predict_help_lists_every_key_and_a_stray_word_is_still_an_error():
    from incseg.predict import KEYS

    text = _run("incseg.predict", "--help").stdout
    for key in KEYS:
        assert f"\n  {key} " in text
    stray = _run("incseg.predict", "help")
    assert stray.returncode == 2 and "is not key=value" in stray.stderr


def test_help_text_wraps_rows_under_their_description():
    text = help_text("tool X", "Does a thing.", [("keys", [("a", "word " * 30), ("bb", "x")])],
                     ["tool a=1"], width=40)
    lines = text.splitlines()
    assert lines[:3] == ["usage: tool X", "", "Does a thing."]
    a = lines.index("keys:") + 1
    assert lines[a].startswith("  a   word") and all(len(ln) <= 40 for ln in lines)
    assert lines[a + 1].startswith(" " * 6 + "word")  # continuation under the text column
    assert "  bb  x" in lines and lines[-2:] == ["examples:", "  tool a=1"]


def test_wants_help_matches_the_flags_only():
    assert wants_help(["stats", "--help"]) and wants_help(["-h"])
    assert not wants_help(["help"]) and not wants_help(["data.root=--help-dir"])

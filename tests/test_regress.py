"""experiments/regress.py's comparison: a changed or lost number fails, an added figure does not."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("regress", ROOT / "experiments" / "regress.py")
regress = importlib.util.module_from_spec(spec)
spec.loader.exec_module(regress)


def _record(final: dict, iou=(0.5, 0.25)) -> dict:
    return {"cpu": "AMD EPYC 7B13", "threads": 1, "commit": "abc", "dirty": False,
            "cases": {"mib-15-5s": {"final": final, "steps": [
                {"step": 0, "classes": [0, 1], "iou": list(iou), "miou_all": 0.375}]}}}


def test_identical_records_pass(capsys):
    a = _record({"old": 0.5, "new": 0.25, "all": 0.375})
    assert regress.compare(a, copy.deepcopy(a)) == 0
    assert "1 identical, 0 different" in capsys.readouterr().out


def test_a_changed_last_digit_fails(capsys):
    a = _record({"old": 0.5, "new": 0.25, "all": 0.375})
    b = _record({"old": 0.5, "new": 0.25, "all": 0.375}, iou=(0.5, 0.250001))
    assert regress.compare(a, b) == 1
    out = capsys.readouterr().out
    assert ".steps[0].iou[1]: 0.25 before, 0.250001 after" in out


def test_an_added_figure_is_not_a_difference_but_a_lost_one_is(capsys):
    a = _record({"old": 0.5, "new": 0.25, "all": 0.375})
    b = _record({"old": 0.5, "new": 0.25, "all": 0.375, "hiou": 0.333})
    assert regress.compare(a, b) == 0
    assert "identical (added since: .final.hiou)" in capsys.readouterr().out
    assert regress.compare(b, a) == 1
    assert ".final.hiou: only in before" in capsys.readouterr().out


def test_cpu_slug():
    assert regress.cpu_slug("AMD EPYC 7B13") == "amd-epyc"
    assert regress.cpu_slug("AMD EPYC (family 25, model 17)") == "amd-epyc"
    assert regress.cpu_slug("Intel(R) Xeon(R) CPU @ 2.20GHz") == "intel-xeon"

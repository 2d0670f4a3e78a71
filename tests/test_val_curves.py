"""experiments/val_curves.py: the val curve of step 0 / Joint read from a run's CSV log."""

import json

import pytest

from tests.experiment_scripts import load

vc = load("val_curves")

# A Lightning CSV log: training rows without val, one val row per epoch, a test row at the end.
CSV = """epoch,step,test/miou_all,train/loss,val/miou_all
0,9,,2.5,
0,19,,,0.1834567
1,29,,1.9,
1,39,,,0.25
1,39,0.3,,
"""


def _run(tmp_path, name, method, stage):
    d = tmp_path / name / "seed0"
    (d / "logs" / stage).mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"method": method}))
    (d / "logs" / stage / "metrics.csv").write_text(CSV)
    return d


def test_read_curve_takes_one_value_per_val_row_in_order(tmp_path):
    f = tmp_path / "m.csv"
    f.write_text(CSV)
    assert vc.read_curve(f) == [0.183457, 0.25]


def test_collect_maps_methods_to_their_stage_and_skips_a_cached_step0(tmp_path, capsys):
    a = _run(tmp_path, "mib", "mib", "step0")
    b = _run(tmp_path, "joint", "joint", "joint")
    c = tmp_path / "dkd" / "seed0"
    (c / "logs" / "step1").mkdir(parents=True)           # step 0 came from the cache
    (c / "results.json").write_text(json.dumps({"method": "dkd"}))
    out = vc.collect([a, b, c])
    assert out == {"mib": {"step0": [0.183457, 0.25]}, "joint": {"joint": [0.183457, 0.25]}}
    assert "skipped" in capsys.readouterr().err


def test_a_folder_without_results_is_refused_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no results.json"):
        vc.collect([tmp_path])

"""Run outputs: results.json schema, csv rows, markdown, terminal table, loading."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from incseg.errors import DataError
from incseg.metrics import summarize
from incseg.results import final_block, format_table, load_results, step_record, write_results
from incseg.tasks import get_task

TASK = get_task("voc", "custom", [[0, 3, 1], [2]])
# step 0: channels (0, 3, 1); class 0 IoU 1, class 3 IoU 1/3, class 1 IoU 1/3 -> all 5/9
CM0 = torch.tensor([[2, 0, 0], [0, 1, 1], [0, 1, 1]])
# step 1: channels (0, 3, 1, 2); IoUs 0.8, 0.5, None, 1/3 -> old 0.65, new 1/3, all 49/90
CM1 = torch.tensor([[4, 0, 0, 0], [0, 2, 0, 2], [0, 0, 0, 0], [1, 0, 1, 2]])
HEADER = {"dataset": "voc", "task": "custom", "method": "mib", "overlap": True, "seed": 0}


def _steps():
    return [
        step_record(0, TASK.classes_added(0), summarize(CM0, TASK, 0), wall_time_s=1.5),
        step_record(1, TASK.classes_added(1), summarize(CM1, TASK, 1), replay="none"),
    ]


def test_step_record_keys_and_rounding():
    rec = _steps()[0]
    assert list(rec)[:8] == ["step", "classes", "iou", "miou_old", "miou_new", "miou_all",
                             "miou_old_nobg", "miou_all_nobg"]
    assert rec["classes"] == [0, 3, 1]
    assert rec["iou"] == {"0": 1.0, "3": 0.333333, "1": 0.333333}
    assert rec["miou_new"] is None
    assert rec["miou_all"] == round(5 / 9, 6)
    assert rec["wall_time_s"] == 1.5


def test_final_block_hand_computed():
    steps = _steps()
    final = final_block(steps)
    assert final["old"] == pytest.approx(0.65)
    assert final["new"] == pytest.approx(1 / 3, abs=1e-6)
    assert final["all"] == pytest.approx(49 / 90, abs=1e-6)
    assert final["avg"] == pytest.approx((5 / 9 + 49 / 90) / 2, abs=1e-6)
    assert final["hiou"] == pytest.approx(1.3 / 2.95, abs=1e-6)  # 2 (.65)(1/3) / (.65 + 1/3)
    assert steps[0]["hiou"] is None  # no new class at step 0
    # avg skips a step without an mIoU
    fake = [{"miou_old": 0.4, "miou_new": None, "miou_all": 0.4},
            {"miou_old": None, "miou_new": None, "miou_all": None},
            {"miou_old": 0.2, "miou_new": 0.1, "miou_all": 0.15}]
    assert final_block(fake) == {"old": 0.2, "new": 0.1, "all": 0.15, "avg": 0.275,
                                 "hiou": round(2 * 0.2 * 0.1 / 0.3, 6)}
    with pytest.raises(ValueError):
        final_block([])


def test_write_results_json_schema(tmp_path):
    res = write_results(tmp_path, HEADER, _steps(), {"git": "abc", "device": "cpu"})
    data = json.loads((tmp_path / "results.json").read_text())
    assert data == res
    for key in ("dataset", "task", "method", "overlap", "seed", "steps", "final", "provenance"):
        assert key in data
    assert list(data)[:5] == list(HEADER)
    assert data["provenance"] == {"git": "abc", "device": "cpu"}
    s0, s1 = data["steps"]
    for rec in (s0, s1):
        for key in ("step", "classes", "iou", "miou_old", "miou_new", "miou_all"):
            assert key in rec
    assert s0["miou_new"] is None
    assert s1["classes"] == [2]
    assert s1["iou"] == {"0": 0.8, "3": 0.5, "1": None, "2": 0.333333}
    assert s1["miou_old"] == 0.65
    assert s1["miou_all"] == 0.544444
    assert s1["replay"] == "none"
    assert data["final"] == {"old": 0.65, "new": 0.333333, "all": 0.544444,
                             "avg": round((5 / 9 + 49 / 90) / 2, 6), "hiou": 0.440678}
    assert s1["hiou"] == 0.440678 and s0["hiou"] is None
    assert '"1": null' in (tmp_path / "results.json").read_text()


def test_write_results_csv_rows(tmp_path):
    write_results(tmp_path, HEADER, _steps(), {})
    with open(tmp_path / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["step", "class", "iou"]
    table = {(r["step"], r["class"]): r["iou"] for r in rows}
    assert table[("0", "0")] == "1.0"
    assert table[("1", "3")] == "0.5"
    assert table[("1", "1")] == ""  # null IoU
    assert ("0", "2") not in table  # class 2 not seen at step 0
    assert table[("0", "miou_new")] == ""
    assert float(table[("1", "miou_all")]) == 0.544444
    assert float(table[("0", "avg")]) == round(5 / 9, 6)
    assert float(table[("1", "avg")]) == pytest.approx((5 / 9 + 49 / 90) / 2, abs=1e-6)
    assert float(table[("1", "hiou")]) == 0.440678 and table[("0", "hiou")] == ""
    # 3 + 4 class rows, 7 summary rows per step
    assert len(rows) == 3 + 4 + 2 * 7


def test_write_results_markdown(tmp_path):
    write_results(tmp_path, HEADER, _steps(), {})
    md = (tmp_path / "results.md").read_text()
    assert "old = background + step-0 classes, new = classes added after step 0" in md
    assert "mIoU averages classes present in the ground truth (MiB); IoU in [0,1]" in md
    assert "| 1 | 2 | 0.6500 | 0.3333 | 0.5444 |" in md
    assert "| 0 | 0 3 1 | 0.5556 | - | 0.5556 |" in md
    assert "| step 0 | step 1 |" in md
    assert "| 1 | 0.3333 | - |" in md  # class 1: IoU at step 0, absent from the gt at step 1
    assert "| 2 | - | 0.3333 |" in md  # class 2: not seen at step 0


def test_write_results_rejects_incomplete_header(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        write_results(tmp_path, {k: v for k, v in HEADER.items() if k != "seed"}, _steps(), {})
    assert not (tmp_path / "results.json").exists()


def test_format_table():
    res = {**HEADER, "dataset": "shapes", "task": "15-5",
           "steps": [{"step": 0, "miou_old": 0.812, "miou_new": None, "miou_all": 0.812},
                     {"step": 1, "miou_old": 0.701, "miou_new": 0.455, "miou_all": 0.642}],
           "final": {"old": 0.701, "new": 0.455, "all": 0.642, "avg": 0.727}}
    assert format_table(res) == (  # hiou computed from old and new when the file lacks it
        " shapes 15-5 mib seed0 | old   new   all   avg   hiou\n"
        " step 0                | 0.812   -   0.812\n"
        " step 1                | 0.701 0.455 0.642\n"
        " final                 | 0.701 0.455 0.642 0.727 0.552"
    )
    assert format_table({**res, "replay": "deepinversion"}).startswith(
        " shapes 15-5 mib+deepinversion seed0 | old")


def test_load_results_roundtrip_and_errors(tmp_path):
    res = write_results(tmp_path, HEADER, _steps(), {})
    assert load_results(tmp_path / "results.json") == res
    assert load_results(tmp_path) == res  # a run directory works too

    broken = json.loads((tmp_path / "results.json").read_text())
    del broken["steps"][1]["miou_all"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(broken))
    with pytest.raises(DataError) as exc:
        load_results(bad)
    msg = str(exc.value)
    assert "bad.json" in msg and "steps[1].miou_all" in msg and "\n" not in msg

    del broken["final"]
    bad.write_text(json.dumps(broken))
    with pytest.raises(DataError, match="'final'"):
        load_results(bad)

    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_results(bad)
    with pytest.raises(DataError, match="no such results file"):
        load_results(tmp_path / "missing.json")

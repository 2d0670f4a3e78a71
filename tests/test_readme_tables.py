"""The READMEs' result tables are the result files' figures (experiments/tables.py).

A table between ``<!-- table:NAME -->`` markers must equal what the script derives from
``experiments/results/``; a figure typed into one, or a result file changed without
regenerating, fails here.
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tables():
    spec = importlib.util.spec_from_file_location("tables", ROOT / "experiments" / "tables.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tables"] = mod  # its dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


tables = _tables()


READMES = ["README.md", "experiments/README.md", "experiments/diagnosis.md",
           "docs/inversion_speed.md"]


def test_the_readmes_are_the_scripts():
    assert [p.relative_to(ROOT).as_posix() for p in tables.READMES] == READMES


@pytest.mark.parametrize("readme", READMES)
def test_every_readme_table_equals_the_result_files(readme):
    text = (ROOT / readme).read_text()
    assert tables.BLOCK.search(text), f"{readme} has no generated table"
    assert tables.stale(text) == []


def test_every_table_is_used_once():
    text = "".join((ROOT / p).read_text() for p in READMES)
    names = [m.group(2) for m in tables.BLOCK.finditer(text)]
    assert sorted(names) == sorted(tables.TABLES)


def test_a_changed_figure_fails(tmp_path):
    """Edit one figure of a copy of the README table: the check names that table."""
    text = (ROOT / "README.md").read_text()
    block = next(m.group(0) for m in tables.BLOCK.finditer(text)
                 if m.group(2) == "readme_replay")
    assert "0.526 ± 0.009" in block  # MiB + DI (kl), 15-5s all: the 3-seed mean of runs.csv
    changed = text.replace(block, block.replace("0.526 ± 0.009", "0.536 ± 0.009"))
    copy = tmp_path / "README.md"
    copy.write_text(changed)
    assert tables.stale(copy.read_text()) == ["readme_replay"]
    assert tables.fill(copy.read_text()) == text  # regenerating restores the file's figure


def test_a_cell_is_the_mean_and_sample_std_of_its_runs():
    # MiB + DI (kl) on 15-5s, all-mIoU of seeds 0 / 1 / 2 in runs.csv: 0.517972, 0.536122,
    # 0.525112; by hand: mean 0.526402, deviations -0.008430 / 0.009720 / -0.001290, sample
    # variance (7.107e-5 + 9.448e-5 + 0.166e-5) / 2 = 8.36e-5, std 0.00914
    sel = tables.Sel(tables.TABLE3, "15-5s", row="MiB + DI (kl)")
    assert [r["seed"] for r in sel.runs()] == ["0", "1", "2"]
    assert tables.cell(sel, "all") == "0.526 ± 0.009"
    assert tables.seeds(sel) == "0,1,2"


def test_hiou_is_the_harmonic_mean_of_old_and_new():
    assert tables.hiou(0.6, 0.3) == pytest.approx(2 * 0.6 * 0.3 / 0.9)  # 0.4
    assert tables.hiou(0.0, 0.0) == 0.0
    # a runs.csv without a hiou column: derived per run from old and new
    assert tables.metric({"old": "0.5", "new": "0.25", "hiou": ""}, "hiou") == pytest.approx(1 / 3)


def _two_step_run():
    """Step 0: background and class 1; step 1 teaches class 2. Step 1's test confusion (rows
    truth, columns prediction; classes 0, 1, 2): class 2's 10 pixels go 6 right, 3 to the
    background, 1 to class 1; 4 background pixels and 2 of class 1's are predicted as 2."""
    return {"steps": [
        {"classes": [0, 1], "iou": {"0": 0.9, "1": 0.5}, "miou_all": 0.7, "miou_old": 0.7},
        {"classes": [2], "iou": {"0": 0.8, "1": 0.3, "2": 0.4},
         "confusion": {"classes": [0, 1, 2],
                       "counts": [[90, 6, 4], [5, 13, 2], [3, 1, 6]]}}],
        "final": {"old": 0.55}}


def test_learned_and_kept_reads_step_0_the_old_share_and_the_new_class_by_step():
    run = _two_step_run()
    step0, kept, at_step, at_end = tables._learned_and_kept(run)
    assert (step0, at_step, at_end) == (0.7, 0.4, 0.4)  # one new class, taught at the last step
    assert kept == pytest.approx(0.55 / 0.7)


def test_new_at_step_splits_a_new_class_s_pixels_and_its_predictions():
    right, as_bg, as_old, precision, from_bg = tables._new_at_step(_two_step_run())
    assert (right, as_bg, as_old) == pytest.approx((6 / 10, 3 / 10, 1 / 10))
    # predicted as class 2: 4 + 2 + 6 = 12 pixels, 6 of them right, 4 background
    assert (precision, from_bg) == pytest.approx((6 / 12, 4 / 12))


def test_an_unknown_table_name_is_one_line():
    with pytest.raises(SystemExit, match=r"unknown table 'nope'"):
        tables.fill("<!-- table:nope -->\n<!-- /table -->")


def test_check_mode_exits_1_on_a_stale_table(tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- table:table3_weight -->\n| stale |\n<!-- /table -->\n")
    monkeypatch.setattr(tables, "READMES", (readme,))
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    assert tables.main(["--check"]) == 1
    assert "table 'table3_weight' differs" in capsys.readouterr().out
    assert tables.main([]) == 0 and re.search(r"DI \(kl\) \| 0\.569", readme.read_text())
    assert tables.main(["--check"]) == 0


def test_a_task_with_one_published_method_gets_no_rank_row(tmp_path, monkeypatch):
    """Kendall's tau needs two methods with a published figure: a task whose folder holds only
    Joint (its 15-5s scoring of the 10-1 Joint models) shows Joint's row and no 'nan' tau."""
    import shutil

    real = tables.RESULTS / tables.SEGMENTATION_AMD2 / "per_run" / "shapes"
    for task, method in (("15-5s", "joint"), ("10-1", "mib"), ("10-1", "dkd")):
        run = tmp_path / "one_joint" / "per_run" / "shapes" / task / method / "seed0"
        run.mkdir(parents=True)
        shutil.copy(real / task / method / "seed0" / "results.json", run)
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    rows = [ln.split(" | ")[:2]
            for ln in tables.pretrained_methods("one_joint").splitlines()[2:]]
    assert ["| 15-5s", "Joint"] in rows and ["| 10-1", "MiB"] in rows
    taus = [task for task, label in rows if label.startswith("Kendall")]
    assert taus == ["| 10-1"]


def test_old_pixels_at_end_splits_the_old_classes_pixels_by_prediction():
    # step 1's confusion: class 1's 20 pixels go 13 right, 5 to the background, 2 to class 2
    shares = tables._old_pixels_at_end(_two_step_run(), [1])
    assert shares == pytest.approx({"kept": 13 / 20, 0: 5 / 20, 2: 2 / 20})
    assert tables._pair_share(_two_step_run(), 1, 2) == pytest.approx(2 / 20)


def test_takeover_tables_average_the_seeds_and_keep_joint_s_confused_pairs(tmp_path,
                                                                            monkeypatch):
    """Two DKD seeds and one Joint run of a two-step task: the class-2 row is the mean of the
    seeds' shares, and the (1 -> 2) pair is listed because Joint confuses it at 0.25 >= 0.1."""
    def run(seed, row1):
        r = _two_step_run()
        r["seed"] = seed
        r["steps"][1]["confusion"]["counts"][1] = row1
        r["provenance"] = {"config": {"dataset": {"generator": {"classes": "shapes"}}}}
        return r
    for method, seed, row1 in (("dkd", 0, [5, 13, 2]), ("dkd", 1, [5, 11, 4]),
                               ("joint", 0, [0, 15, 5])):
        d = tmp_path / "f" / "per_run" / "shapes" / "2-1" / method / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(run(seed, row1)))
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    shares, pairs = tables.pretrained_takeover.__wrapped__("f", ("2-1",))
    rows = {ln.split(" | ")[2]: ln.split(" | ")[3:5] for ln in shares.splitlines()[2:]}
    assert rows["seeds"] == ["0", "0,1"]                        # Joint, DKD
    assert rows["square"] == ["0.250", "0.150"]                 # class 2; DKD (0.1 + 0.2) / 2
    assert rows["kept"] == ["0.750", "0.600"]
    assert pairs.splitlines()[2].split(" | ")[1:4] == ["circle (1) → square (2)", "0.250",
                                                       "0.150"]

"""Every cpu experiment (conf/experiment/cpu/*.yaml) runs to completion as a Hydra multirun at
a tiny scale, and `incseg.report` turns its sweep directory into a table with a row per variant.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from incseg.config import CONF_DIR

pytestmark = pytest.mark.slow

TINY = ["dataset.generator.size=32", "dataset.generator.n_train=160",
        "dataset.generator.n_val=24", "dataset.generator.n_test=48", "data.crop=32",
        "data.batch_size=4", "data.num_workers=0", "train.epochs=1",
        "train.epochs_incremental=1", "inversion.n_per_class=1", "inversion.image_size=32",
        "++replay.verifier=none"]



def _label(method: str) -> str:
    """A method's row label in the report: its config's ``label``, else its name."""
    cfg = OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml")
    return str(cfg.get("label") or method)


MIB = _label("mib")
#: experiment -> (extra overrides, expected table rows (label, task))
CASES = {
    "cpu/table2": ([], {(_label(m), t) for m in ("ft", "lwf", "ilt", "mib", "joint")
                        for t in ("15-5", "15-5s")}),
    "cpu/table3": (["inversion.iterations_low=20", "inversion.iterations_full=10"],
                   {(f"{MIB} + DI ({loss})", "15-5") for loss in ("mse", "kl", "ukd")}),
    "cpu/table4": ([], {(f"{MIB} + DI (mse) [iterations_full=50 iterations_low=100]", "15-5"),
                        (f"{MIB} + DI (mse) [iterations_full=100 iterations_low=200]", "15-5")}),
}


def _run(args, tmp_path, timeout=1500):
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled",
               INCSEG_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_experiment_runs_and_reports(tmp_path, name):
    extra, rows = CASES[name]
    sweep = tmp_path / "sweep"
    _run(["incseg.run", f"experiment={name}", *TINY, *extra, f"paths.runs_dir={sweep}"],
         tmp_path)
    if name == "cpu/table2":  # step 0 is trained once per seed for the 24 incremental runs
        logs = "".join(p.read_text() for p in sweep.rglob("run.log"))
        assert logs.count("step-0 cache miss") == 3
        assert logs.count("step-0 cache hit") == 21
    _run(["incseg.report", str(sweep), "--no-overlays"], tmp_path)
    with open(sweep / "report" / "table.csv", newline="") as fh:
        got = {(r["row"], r["task"]) for r in csv.DictReader(fh)}
    assert got == rows
    assert "None: every run found" in (sweep / "report" / "table.md").read_text()


def test_cpu_table1_and_controls_run(tmp_path):
    sweep = tmp_path / "sweep"
    swept = [o for o in TINY if not o.startswith("data.batch_size=")]  # table 1 sweeps it
    _run(["incseg.run", "experiment=cpu/table1", *swept, f"paths.runs_dir={sweep}"], tmp_path)
    assert len(list(sweep.rglob("results.json"))) == 32  # 2 x 2 x 2 x 2 x 2 settings
    assert not (sweep / "shapes").exists()  # no stray single-run folder
    _run(["incseg.run", "experiment=cpu/table3_controls", *TINY, "hydra.sweeper.params.seed=0",
          f"paths.runs_dir={sweep}/controls"], tmp_path)
    assert len(list((sweep / "controls").rglob("results.json"))) == 6  # 2 tasks x 3 replays
    _run(["incseg.report", str(sweep), "--no-overlays"], tmp_path)
    with open(sweep / "report" / "table.csv", newline="") as fh:
        labels = {r["row"] for r in csv.DictReader(fh)}
    assert {MIB, f"{MIB} + noise (mse)", f"{MIB} + exemplars (mse)"} <= labels
    assert sum(label.startswith(f"{_label('joint')} [") for label in labels) == 16  # r18, r50

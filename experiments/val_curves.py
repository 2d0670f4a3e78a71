"""The validation curve of step 0 and Joint: val mIoU after every epoch, from run folders.

    python experiments/val_curves.py RUN_DIR [RUN_DIR ...] --out FILE

Each RUN_DIR is one run's seed folder (``runs/<dataset>/<task>/<name>/seed<N>``, holding its
``results.json`` and the CSV logger's ``logs/<stage>/metrics.csv``; ``logger=csv``). The file
written maps each run's method to the val mIoU of its step-0 model (``step0``) or of Joint's
(``joint``) after each epoch, in order; a run whose step 0 came from the cache has no step-0
log and is skipped with a line saying so.

Why: the poly schedule brings the lr to zero at the last epoch, so a curve that flattens at its
end says the schedule ended, not that the model converged. Two runs of the same recipe with
different epoch counts answer it: if the longer one ends clearly higher, the shorter one's step
0 was not at its plateau, and an incremental step then also keeps training what step 0 left
unfinished (which rewards the most plastic method, unlike VOC, where step 0 starts from ImageNet
weights and is trained to its plateau).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from incseg.io import atomic_write_json

STAGES = ("step0", "joint")


def read_curve(metrics_csv: Path, key: str = "val/miou_all") -> list[float]:
    """The values of ``key`` in a Lightning CSV log, one per row that has it (one per epoch)."""
    with open(metrics_csv, newline="") as f:
        return [round(float(r[key]), 6) for r in csv.DictReader(f) if r.get(key)]


def collect(run_dirs: list[Path]) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    for d in run_dirs:
        res = d / "results.json"
        if not res.is_file():
            raise SystemExit(f"error: {d} has no results.json: pass a run's seed folder "
                             "(runs/<dataset>/<task>/<name>/seed<N>)")
        method = json.loads(res.read_text())["method"]
        for stage in STAGES:
            log = d / "logs" / stage / "metrics.csv"
            if log.is_file():
                curve = read_curve(log)
                if curve:
                    out.setdefault(method, {})[stage] = curve
                    break
        else:
            print(f"{d}: no step-0 or Joint log with val mIoU (step 0 from the cache?), "
                  "skipped", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Val mIoU per epoch of step 0 / Joint, from runs.")
    ap.add_argument("runs", nargs="+", type=Path, help="run seed folders")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    curves = collect(args.runs)
    if not curves:
        raise SystemExit("error: no curve found in the given run folders")
    atomic_write_json(args.out, curves)
    for m, c in curves.items():
        for stage, v in c.items():
            print(f"{m} {stage}: " + " ".join(f"{x:.3f}" for x in v))
    return 0


if __name__ == "__main__":
    sys.exit(main())

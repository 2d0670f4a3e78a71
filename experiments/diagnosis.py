"""Why a method ranks where it does on ``shapes`` 15-5s: the diagnosis tables, from run files.

    python experiments/diagnosis.py RESULTS_DIR [--out FILE]

RESULTS_DIR holds one folder per condition (``<condition>/<method>/results.json``, a 15-5s run
each). For every condition and method it writes the final old / new / all mIoU and, from the
per-step IoUs and the test confusion matrices the runs record, the evidence behind them:

- each new class's IoU at the step that taught it and at the last step (learned, then kept?);
- where a new class's pixels go at the last step: itself, background, its texture twin (the
  same shape with the other texture, ``shapes``' nearest class) or another class;
- where the old classes' pixels go: kept, background, taken over by a new class.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METHOD_ORDER = ("mib", "plop", "dkd", "joint")


def twin(c: int) -> int:
    """The class with the same shape and the other texture (ids 2s+1 solid, 2s+2 striped)."""
    return c + 1 if c % 2 else c - 1


def load(folder: Path) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for f in sorted(folder.glob("*/*/results.json")):
        out.setdefault(f.parent.parent.name, {})[f.parent.name] = json.loads(f.read_text())
    return out


def _confusion(step: dict) -> tuple[list[int], list[list[int]]]:
    conf = step["confusion"]
    return conf["classes"], conf["counts"]


def where(step: dict, cls: list[int], old: set[int], new: set[int]) -> dict[str, float]:
    """Fractions of the ground-truth pixels of ``cls`` predicted as: the class itself, background,
    the twin, another old class, another new class."""
    classes, counts = _confusion(step)
    idx = {c: i for i, c in enumerate(classes)}
    tot = {"self": 0, "background": 0, "twin": 0, "old": 0, "new": 0}
    n = 0
    for c in cls:
        if c not in idx:
            continue
        row = counts[idx[c]]
        for p, k in zip(classes, row):
            if p == c:
                tot["self"] += k
            elif p == 0:
                tot["background"] += k
            elif p == twin(c):
                tot["twin"] += k
            elif p in old:
                tot["old"] += k
            elif p in new:
                tot["new"] += k
        n += sum(row)
    return {k: v / n if n else float("nan") for k, v in tot.items()}


def summarise(run: dict) -> dict:
    steps = run["steps"]
    final = steps[-1]
    first = [int(c) for c in steps[0]["classes"]] if isinstance(steps[0]["classes"], list) \
        else json.loads(steps[0]["classes"])
    old = {c for c in first if c}
    new_by_step = {}
    for s in steps[1:]:
        cl = s["classes"] if isinstance(s["classes"], list) else json.loads(s["classes"])
        for c in cl:
            new_by_step[int(c)] = s["step"]
    new = set(new_by_step)
    if not new:  # Joint: one step; its "new" classes are the incremental tasks' ones
        new = {c for c in range(16, 21)}
        old = {c for c in range(1, 16)}
    per_new = {}
    for c in sorted(new):
        learned = next((s for s in steps if s["step"] == new_by_step.get(c)), final)
        per_new[c] = {"learned": learned["iou"].get(str(c)), "final": final["iou"].get(str(c))}
    return {
        "old": final["miou_old"], "new": final["miou_new"], "all": final["miou_all"],
        "step0_old": steps[0]["miou_all"],
        "per_new": per_new,
        "new_go": where(final, sorted(new), old, new),
        "old_go": where(final, sorted(old), old, new),
    }


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def report(data: dict[str, dict[str, dict]], labels: dict[str, str] | None = None) -> str:
    labels = labels or {}
    lines = ["| condition | method | step 0 all | old | new | all | new classes' IoU when learned "
             "-> at the end (16..20) |",
             "|---|---|---:|---:|---:|---:|---|"]
    go = ["| condition | method | new px: self | bg | twin | other old | other new | old px: "
          "self | bg | new |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cond, runs in data.items():
        for m in sorted(runs, key=lambda k: METHOD_ORDER.index(k) if k in METHOD_ORDER else 99):
            s = summarise(runs[m])
            trail = " ".join(f"{fmt(v['learned'])}->{fmt(v['final'])}" for v in
                             s["per_new"].values())
            lines.append(f"| {labels.get(cond, cond)} | {m} | {fmt(s['step0_old'])} | "
                         f"{fmt(s['old'])} | {fmt(s['new'])} | {fmt(s['all'])} | {trail} |")
            n, o = s["new_go"], s["old_go"]
            go.append(f"| {labels.get(cond, cond)} | {m} | {n['self']:.2f} | "
                      f"{n['background']:.2f} | {n['twin']:.2f} | {n['old']:.2f} | "
                      f"{n['new']:.2f} | {o['self']:.2f} | {o['background']:.2f} | "
                      f"{o['new']:.2f} |")
    return "\n".join(lines) + "\n\n" + "\n".join(go) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    data = load(args.results)
    if not data:
        print(f"error: no <condition>/<method>/results.json under {args.results}",
              file=sys.stderr)
        return 2
    text = report(data)
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

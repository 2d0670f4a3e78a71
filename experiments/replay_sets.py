"""What each run's DeepInversion replay sets cost: images, iterations per image, wall time.

    python experiments/replay_sets.py RUN_DIR [RUN_DIR ...] --out FILE

``results.json`` keeps a step's replay set by its path only. This reads, for every finished run
under the given folders, each step's set manifest in the cache (``<cache>/replay/<key>/
manifest.json``: the iterations every image took) and the run's own ``run.log`` (the wall time
from "generating" to "written"), and writes one JSON list, a record per (run, step), to keep
beside the runs' ``results.json`` when they are committed. A set that was already in the cache
when the run started has no generation time (``seconds`` null).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from datetime import datetime
from pathlib import Path

_STAMP = r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\]"
_START = re.compile(_STAMP + r".*replay set (\w+): generating")
_DONE = re.compile(_STAMP + r".*replay set (\S+) written")


def _time(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")


def generation_seconds(log: str) -> dict[str, float]:
    """Seconds from a set's first "generating" line to its "written" line, by set key."""
    start: dict[str, datetime] = {}
    out: dict[str, float] = {}
    for line in log.splitlines():
        if m := _START.search(line):
            start.setdefault(m.group(2), _time(m.group(1)))
        elif (m := _DONE.search(line)) and (key := Path(m.group(2)).name) in start:
            out[key] = (_time(m.group(1)) - start[key]).total_seconds()
    return out


def sets_of(run: Path) -> list[dict]:
    res = json.loads((run / "results.json").read_text())
    cfg = res["provenance"]["config"]
    log = (run / "run.log").read_text() if (run / "run.log").is_file() else ""
    seconds = generation_seconds(log)
    out = []
    for step in res["steps"]:
        rep = step.get("replay") or {}
        if not rep.get("path"):
            continue
        folder = Path(rep["path"]).parent
        man = json.loads((folder / "manifest.json").read_text())
        its = [int(im["iterations"]) for im in man["images"] if "iterations" in im]
        if not its:  # a fixed-budget set: every image got the whole budget
            s = man["settings"]
            its = [int(s["iterations_low"]) + int(s["iterations_full"])] * int(man["count"])
        out.append({
            "task": res["task"], "seed": res["seed"], "step": step["step"],
            "budget": cfg["inversion"].get("budget", "fixed"), "key": folder.name,
            "images": int(man["count"]), "teacher_accuracy": man.get("teacher_accuracy"),
            "iterations": {"median": statistics.median(its), "min": min(its), "max": max(its),
                           "mean": sum(its) / len(its)},
            "seconds": seconds.get(folder.name),
            "torch_threads": res["provenance"].get("torch_threads"),
        })
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="folders searched for results.json")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    records = [r for root in args.runs for f in sorted(root.rglob("results.json"))
               for r in sets_of(f.parent)]
    if not records:
        print(f"error: no finished run with a replay set under {', '.join(map(str, args.runs))}",
              file=sys.stderr)
        return 2
    records.sort(key=lambda r: (r["task"], r["budget"], r["seed"], r["step"]))
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"{len(records)} sets -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

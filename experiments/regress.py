"""Refactors keep the numbers: record the smoke protocol's results, then compare after a change.

    python experiments/regress.py record before.json          # on the commit before the change
    python experiments/regress.py compare before.json         # after it: exit 1 on any difference
    python experiments/regress.py record out.json --only mib-15-5s default
    python experiments/regress.py compare before.json --after after.json   # two records

Each case is one ``python -m incseg.run`` in a fresh process with one torch thread
(``OMP_NUM_THREADS=1``: numbers agree to the last digit only on the same CPU kind and thread
count), a run directory and a cache directory of its own invocation (so every record trains
step 0 and generates its replay sets the same way). What is compared is everything a
``results.json`` reports: per step old / new / all mIoU and every class IoU, the final block,
and the replay set's size and teacher accuracy. Wall times are kept but never compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SMOKE = ["experiment=smoke", "task=15-5s"]
#: name -> overrides; the issue's list: every method on smoke 15-5s, MiB with each replay
#: distance and control, and the default job as a user types it
CASES: dict[str, list[str]] = {
    **{f"{m}-15-5s": [*SMOKE, f"method={m}"] for m in ("ft", "lwf", "ilt", "mib", "joint")},
    **{f"mib+di-{d}-15-5s": [*SMOKE, "method=mib", "replay=deepinversion", f"replay.loss={d}"]
       for d in ("mse", "kl", "ukd")},
    "mib+noise-15-5s": [*SMOKE, "method=mib", "replay=noise"],
    "mib+exemplars-15-5s": [*SMOKE, "method=mib", "replay=exemplars"],
    "default": [],
}


def cpu_name() -> str:
    """The CPU with its family and model (``AMD EPYC (family 25, model 17)``): a VM's model name
    alone can hide two generations whose last digits differ."""
    from incseg.precision import cpu_model

    return cpu_model() or platform.machine()


def cpu_slug(name: str) -> str:
    """``AMD EPYC 7B13`` -> ``amd-epyc``: the CPU kind in a record's file name."""
    words = [w for w in name.replace("(R)", "").replace("(TM)", "").lower().split() if w.isalpha()]
    return "-".join(words[:2]) or "cpu"


def numbers(results: dict) -> dict:
    """What must not change: the scores and the replay figures, not wall times or paths."""
    steps = []
    for s in results["steps"]:
        rec = {k: s.get(k) for k in ("step", "classes", "iou", "miou_old", "miou_new", "miou_all")}
        replay = s.get("replay")
        if replay:
            rec["replay"] = {k: replay.get(k) for k in ("images", "teacher_accuracy",
                                                        "verifier_accuracy")}
        steps.append(rec)
    return {"final": results["final"], "steps": steps}


def run_case(name: str, overrides: list[str], work: Path, threads: int) -> dict:
    runs, cache = work / "runs", work / "cache"
    argv = [sys.executable, "-m", "incseg.run", *overrides, f"paths.runs_dir={runs / name}",
            f"paths.cache_dir={cache}", "trainer.progress_bar=false"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"case {name} failed (exit {proc.returncode}):\n{tail}")
    found = sorted((runs / name).rglob("results.json"))
    if len(found) != 1:
        raise SystemExit(f"case {name}: expected one results.json under {runs / name}, "
                         f"found {len(found)}")
    results = json.loads(found[0].read_text())
    return {"overrides": overrides, "wall_s": wall, **numbers(results)}


def record(names: list[str], threads: int, work: Path) -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "incseg"],
                                cwd=ROOT, capture_output=True, text=True).stdout.strip())
    out = {"cpu": cpu_name(), "threads": threads, "commit": commit, "dirty": dirty,
           "cases": {}}
    for name in names:
        print(f"[regress] {name}: {' '.join(CASES[name]) or '(default job)'}", file=sys.stderr,
              flush=True)
        out["cases"][name] = run_case(name, CASES[name], work, threads)
        c = out["cases"][name]
        print(f"[regress] {name}: final {c['final']} ({c['wall_s']} s)", file=sys.stderr,
              flush=True)
    return out


def differences(a, b, path: str = "") -> list[str]:
    """Every leaf where ``a`` and ``b`` differ (exact comparison: same digits or not). A key only
    in ``b`` is a figure the suite added since (e.g. ``final.hiou``), not a changed number: it
    is reported by :func:`added`, not here."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in b:
                out.append(f"{path}.{k}: only in before")
            elif k not in a:
                continue
            else:
                out.extend(differences(a[k], b[k], f"{path}.{k}"))
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} entries before, {len(b)} after"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} before, {b!r} after"]


def added(a, b, path: str = "") -> list[str]:
    """Keys of ``b`` that ``a`` does not have (dicts, recursively; lists entry by entry)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [x for k in sorted(b, key=str) for x in
                ([f"{path}.{k}"] if k not in a else added(a[k], b[k], f"{path}.{k}"))]
    if isinstance(a, list) and isinstance(b, list):
        return [x for i, (u, v) in enumerate(zip(a, b)) for x in added(u, v, f"{path}[{i}]")]
    return []


def compare(before: dict, after: dict) -> int:
    if before["cpu"] != after["cpu"] or before["threads"] != after["threads"]:
        print(f"warning: recorded on {before['cpu']} with {before['threads']} threads, now "
              f"{after['cpu']} with {after['threads']}: the last digits may differ",
              file=sys.stderr)
    bad = 0
    print(f"{'case':<22} {'final all (before)':>18} {'final all (after)':>18}  verdict")
    for name, b in before["cases"].items():
        a = after["cases"].get(name)
        if a is None:
            continue
        diffs = differences({k: b[k] for k in ("final", "steps")},
                            {k: a[k] for k in ("final", "steps")})
        bad += bool(diffs)
        new = added({k: b[k] for k in ("final", "steps")}, {k: a[k] for k in ("final", "steps")})
        note = f" (added since: {', '.join(new)})" if new else ""
        print(f"{name:<22} {b['final']['all']!s:>18} {a['final']['all']!s:>18}  "
              f"{'identical' if not diffs else f'{len(diffs)} differences'}{note}")
        for d in diffs[:10]:
            print(f"    {d}")
    print(f"{len(after['cases']) - bad} identical, {bad} different")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("record", "compare"))
    p.add_argument("file", type=Path, help="record: where to write; compare: the earlier record")
    p.add_argument("--only", nargs="+", choices=sorted(CASES), help="a subset of the cases")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=None,
                   help="run and cache directories (default: a temporary one, removed after)")
    p.add_argument("--save", type=Path, default=None,
                   help="compare: where to write the new record (default: beside FILE, named "
                        "<commit>_<cpu>_<threads>thread.json; a compare run is never lost)")
    p.add_argument("--after", type=Path, default=None,
                   help="compare: an existing record instead of running the cases now")
    args = p.parse_args(argv)

    before = json.loads(args.file.read_text()) if args.mode == "compare" else None
    if before is not None and args.after is not None:
        return compare(before, json.loads(args.after.read_text()))
    names = args.only or (list(before["cases"]) if before else list(CASES))
    with tempfile.TemporaryDirectory(prefix="incseg-regress-") as tmp:
        work = args.work or Path(tmp)
        now = record(names, args.threads, work)
    if args.mode == "record":
        from incseg.io import atomic_write_json

        atomic_write_json(args.file, now)
        print(f"recorded {len(names)} cases in {args.file}")
        return 0
    from incseg.io import atomic_write_json

    save = args.save or args.file.with_name(
        f"{now['commit'][:7]}{'-dirty' if now['dirty'] else ''}_{cpu_slug(now['cpu'])}_"
        f"{now['threads']}thread.json")
    atomic_write_json(save, now)
    print(f"new record: {save}", file=sys.stderr)
    return compare(before, now)


if __name__ == "__main__":
    sys.exit(main())

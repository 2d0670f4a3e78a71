"""Kill a protocol run anywhere, rerun the same command, and check the numbers are unchanged.

    python experiments/kill_resume.py [--kills 6] [--seed 0] [--workdir DIR] [-- OVERRIDES...]

1. A reference run (its own cache) gives the numbers an uninterrupted run produces.
2. Random kills: the same command in a second run directory (fresh cache) is SIGKILLed at
   ``--kills`` random moments (each a uniform time within the reference's duration, drawn
   from ``--seed``); after each kill the command is simply started again. The kills land
   inside step 0, between steps, inside later steps and during replay generation.
3. Kills while a file is being written: ``INCSEG_FAULT=kill-before-rename:<name>`` makes the
   process SIGKILL itself after a checkpoint / cache entry / manifest / results file has been
   fully written to its temporary name but before it is renamed into place, for each kind of
   file in turn (incseg.io.atomic_path).
4. With two loader workers: killed, and interrupted (Ctrl-C), right after the first epoch
   checkpoint of step 1 is in place; the rerun resumes from that checkpoint.
5. Damaged files: a cached step-0 model, an epoch checkpoint and a replay manifest are
   truncated or replaced by a foreign file between runs; the rerun must report and rebuild
   them, never load them.
Every rerun must finish with a ``results.json`` whose per-step numbers and final block equal
the reference's. Prints one JSON summary on stdout; exit 1 when any rerun differs.

The default command is a 3-step task with DeepInversion replay on the tiny `shapes`
(experiment=smoke task=10-5-5 method=mib replay=deepinversion), about 20-40 s per run here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = ["experiment=smoke", "task=10-5-5", "method=mib", "replay=deepinversion",
           "logger=none", "replay.verifier=none", "train.epochs_incremental=2"]
WRITES = ["step0/", "-last.ckpt", "manifest.json", "checkpoints/step1.pt", "state.json",
          "results.json"]


def numbers(res: dict) -> dict:
    """What must not change across kills: per-step IoUs and mIoUs, and the final block."""
    volatile = {"wall_time_s", "step0_cache", "replay"}
    steps = [{k: v for k, v in s.items() if k not in volatile} for s in res["steps"]]
    replay = [(s.get("replay") or {}).get("images") for s in res["steps"]]
    return {"steps": steps, "final": res["final"], "replay_images": replay}


class Runner:
    def __init__(self, overrides: list[str], workdir: Path):
        self.overrides, self.workdir = overrides, workdir
        self.env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled")

    def cmd(self, run_dir: Path, cache: Path, extra: tuple[str, ...] = ()) -> list[str]:
        return [sys.executable, "-m", "incseg.run", *self.overrides, *extra,
                f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}"]

    def run(self, run_dir: Path, cache: Path, kill_after: float | None = None,
            fault: str | None = None, log_name: str = "run",
            extra: tuple[str, ...] = ()) -> tuple[int, float]:
        """Run the command; SIGKILL it after ``kill_after`` s. Returns (exit code, seconds)."""
        env = dict(self.env, **({"INCSEG_FAULT": fault} if fault else {}))
        log = (self.workdir / "logs" / f"{log_name}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(log, "w") as fh:
            proc = subprocess.Popen(self.cmd(run_dir, cache, extra), env=env, stdout=fh,
                                    stderr=fh)
            try:
                proc.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        return proc.returncode, time.perf_counter() - start

    def finish(self, run_dir: Path, cache: Path, name: str, extra: tuple[str, ...] = ()) -> dict:
        code, _ = self.run(run_dir, cache, log_name=name, extra=extra)
        if code != 0:
            raise SystemExit(f"error: the rerun {name} failed (exit {code}); see "
                             f"{self.workdir / 'logs' / (name + '.log')}")
        return json.loads((run_dir / "results.json").read_text())


def damage(path: Path, how: str) -> bool:
    if not path.exists():
        return False
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: max(1, len(data) // 3)])
    else:  # a foreign file in its place
        path.write_bytes(b"not an incseg file\n")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=6, help="random kills in phase 2")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--phases", default="random,writes,workers,damaged",
                    help="comma-separated subset of random,writes,damaged")
    ap.add_argument("--writes", default=",".join(WRITES),
                    help="comma-separated file names for the kill-while-writing phase")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (default: %(default)s)",
                    default=DEFAULT)
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="incseg-kill-"))
    workdir.mkdir(parents=True, exist_ok=True)
    r = Runner(list(args.overrides), workdir)
    rng = random.Random(args.seed)
    summary: dict = {"command": r.cmd(Path("RUN"), Path("CACHE")), "phases": {}}

    print("reference run ...", file=sys.stderr)
    t0 = time.perf_counter()
    reference = numbers(r.finish(workdir / "reference", workdir / "cache-ref", "reference"))
    ref_time = time.perf_counter() - t0
    summary["reference_seconds"] = round(ref_time, 1)
    failures = []

    phases = set(args.phases.split(","))
    # 2. random moments
    run_dir, cache = workdir / "random", workdir / "cache-random"
    kills = []
    for k in range(args.kills if "random" in phases else 0):
        t = rng.uniform(1.0, ref_time)
        code, took = r.run(run_dir, cache, kill_after=t, log_name=f"random-{k}")
        kills.append({"after_s": round(t, 1), "killed": code == -signal.SIGKILL,
                      "steps_done": _steps_done(run_dir)})
        print(f"kill {k + 1}/{args.kills} after {t:.1f} s: "
              f"{'killed' if code == -signal.SIGKILL else f'finished (exit {code})'}",
              file=sys.stderr)
    if "random" in phases:
        same = numbers(r.finish(run_dir, cache, "random-final")) == reference
        summary["phases"]["random"] = {"kills": kills, "identical": same}
        failures += [] if same else ["random"]

    # 3. kills while a file is being written (self-inflicted SIGKILL before the rename)
    writes = {}
    for i, target in enumerate(args.writes.split(",") if "writes" in phases else []):
        run_dir, cache = workdir / f"write-{i}", workdir / f"cache-write-{i}"
        code, _ = r.run(run_dir, cache, fault=f"kill-before-rename:{target}",
                        log_name=f"write-{i}")
        killed = code == -signal.SIGKILL
        same = numbers(r.finish(run_dir, cache, f"write-{i}-final")) == reference
        writes[target] = {"killed": killed, "identical": same}
        print(f"kill while writing {target}: killed={killed} identical={same}", file=sys.stderr)
        failures += [] if (same and killed) else [f"write {target}"]
    summary["phases"]["writes"] = writes

    # 3b. with loader workers: killed (SIGKILL) or interrupted (SIGINT, Ctrl-C) right after the
    # first epoch checkpoint of step 1 is in place, then resumed from it
    resumed = {}
    workers = ("data.num_workers=2",)
    for how in (("kill", "interrupt") if "workers" in phases else ()):
        run_dir, cache = workdir / f"workers-{how}", workdir / f"cache-workers-{how}"
        code, _ = r.run(run_dir, cache, fault=f"{how}-after-write:step1-last.ckpt",
                        log_name=f"workers-{how}", extra=workers)
        stopped = code == (-signal.SIGKILL if how == "kill" else 130)
        same = numbers(r.finish(run_dir, cache, f"workers-{how}-final", workers)) == reference
        resumed[how] = {"stopped": stopped, "exit": code, "identical": same}
        print(f"{how} after step1's first epoch checkpoint, 2 loader workers: exit {code}, "
              f"identical={same}", file=sys.stderr)
        failures += [] if (same and stopped) else [f"workers {how}"]
    summary["phases"]["workers"] = resumed

    # 4. truncated and foreign files between runs
    damaged = {}
    run_dir, cache = workdir / "damaged", workdir / "cache-damaged"
    if "damaged" in phases:
        r.run(run_dir, cache, log_name="damaged-0")  # complete run: caches filled
    # (name, file to damage, how, first step whose work must read it again)
    cases = [("step-0 cache entry", lambda: next(iter((cache / "step0").glob("*.pt")), None),
              "truncate", 0),
             ("replay manifest", lambda: next(iter(cache.glob("replay/*/manifest.json")), None),
              "foreign", 1),
             ("step-1 model", lambda: run_dir / "checkpoints" / "step1.pt", "truncate", 2)]
    for name, find, how, redo in (cases if "damaged" in phases else []):
        path = find()
        ok = path is not None and damage(path, how)
        # mark the steps from `redo` on unfinished, so the rerun has to read the damaged file
        state = json.loads((run_dir / "state.json").read_text())
        state["steps"] = {k: v for k, v in state["steps"].items() if int(k) < redo}
        (run_dir / "state.json").write_text(json.dumps(state))
        (run_dir / "results.json").unlink(missing_ok=True)
        res = r.finish(run_dir, cache, f"damaged-{name.replace(' ', '_')}")
        log_text = (workdir / "logs" / f"damaged-{name.replace(' ', '_')}.log").read_text()
        reported = any(w in log_text for w in ("unreadable", "truncated", "not an incseg",
                                               "unusable", "corrupt", "invalid", "foreign"))
        same = numbers(res) == reference
        damaged[name] = {"damaged": ok, "reported": reported, "identical": same}
        print(f"{how} {name}: reported={reported} identical={same}", file=sys.stderr)
        failures += [] if (ok and reported and same) else [f"damaged {name}"]
    summary["phases"]["damaged"] = damaged

    summary["failures"] = failures
    summary["kills_survived"] = (sum(k["killed"] for k in kills)
                                 + sum(w["killed"] for w in writes.values()))
    print(json.dumps(summary, indent=1))
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failures else 0


def _steps_done(run_dir: Path) -> list[int]:
    try:
        return sorted(int(k) for k in json.loads((run_dir / "state.json").read_text())["steps"])
    except (OSError, ValueError, KeyError):
        return []


if __name__ == "__main__":
    sys.exit(main())

"""The methods side by side: the wall time of one incremental step against MiB's, same data.

    OMP_NUM_THREADS=1 python experiments/bench/methods.py --out experiments/results/bench/FILE.json
    python experiments/bench/methods.py --tiny --out FILE.json    # seconds: the script itself

Per method the protocol's own pieces build step 1 of 15-5 on ``shapes`` (the step's real
DataModule, the method's student as ``build_student`` makes it, the method's state handed over
from its own step 0, which is trained for ``--step0-epochs`` in a cache of this run: the time
of a step does not depend on how good step 0 is). Each repeat fits every method for one epoch
in the suite's Trainer, the methods taking turns (the order rotates each repeat); the figures
are medians over repeats:

- ``pass_s``: the method's pass over the step's data before training (PLOP's entropy
  thresholds; 0 for the others), timed around ``Method.on_step_start``;
- ``iteration_s``: one training iteration (after two warm-up batches), the frozen previous
  model's forward, the method's terms and hooks (EWC / PI / RW's importance update) included;
- ``step_s``: ``pass_s + epochs_incremental x batches x iteration_s``, the whole step as the
  recipe runs it (evaluation excluded; it is the same for every method);
- apart, not in ``step_s``: ``build_s``, building the step (old model, data), and ``end_s``,
  the method's pass after its fit (``Method.on_fit_end``).

``-M`` entries (``mib-M``) run with a labelled memory of ``--memory`` images (SSUL's half
batches: the same number of iterations and images per batch as without it). Threads are not
set here: run it on an idle machine with the ``OMP_NUM_THREADS`` you train with (recorded).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run.py: the harness's StepTimer

from run import StepTimer  # noqa: E402

from incseg.checkpoints import save_model
from incseg.config import compose, source_from_cfg, task_from_cfg
from incseg.io import atomic_write_json
from incseg.protocol.loop import build_student, run_step
from incseg.protocol.trainer import EpochCheckpoint, Stage, make_trainer

METHODS = ("ft", "lwf", "lwf_mc", "ilt", "ewc", "pi", "rw", "mib", "plop", "dkd", "mib-M",
           "plop-M")
#: ``--tiny``: the smoke scale, for the tests
TINY = ("experiment=smoke",)


def config(entry: str, args, cache: Path):
    method, memory = (entry[:-2], True) if entry.endswith("-M") else (entry, False)
    over = [f"method={method}", f"task={args.task}", "logger=none", "trainer.progress_bar=false",
            "data.num_workers=0", f"paths.cache_dir={cache}", f"train.epochs={args.step0_epochs}",
            f"seed={args.seed}",
            # MiB's incremental lr: EWC / PI / RW at MiB's weights are stable at it (at the
            # shapes recipe's 0.005 their penalty is refused); an iteration's time does not
            # depend on the lr
            "train.lr_incremental=0.001"]
    if memory:
        over.append(f"memory.size={args.memory}")
    return compose([*(TINY if args.tiny else ()), *over])


def prepare(entry: str, cfg, cache: Path, work: Path):
    """Step 0 of ``entry`` (from the bench's cache when another entry trained it) saved in its
    run directory as the protocol saves it; returns (cfg, source, task, run_dir)."""
    source, task = source_from_cfg(cfg, progress=False), task_from_cfg(cfg)
    run_dir = work / entry
    out = run_step(cfg, run_dir, cache, source, task, 0)
    extra = dict(source.class_info() or {})
    if out.method_state:
        extra["method_state"] = out.method_state
    if out.module.prediction != "argmax":
        extra["prediction"] = out.module.prediction
    save_model(run_dir / "checkpoints" / "step0.pt", out.module.model, cfg.model,
               out.trained_task.steps, 0, extra=extra or None)
    return cfg, source, task, run_dir


def _timed(method, hook: str, timed: dict, key: str) -> None:
    """Wrap ``method.<hook>`` so that its wall time lands in ``timed[key]``."""
    inner = getattr(method, hook)

    def wrapper(*a, **k):
        t = time.perf_counter()
        inner(*a, **k)
        timed[key] = time.perf_counter() - t

    setattr(method, hook, wrapper)


def time_step(cfg, source, task, run_dir: Path, cache: Path, warmup: int,
              batches: int | None = None) -> dict:
    """One epoch of step 1 (``batches``: only that many after the warm-up): the pass before it,
    the per-iteration time after warm-up, and, apart, the building of the step (old model,
    data, the replay set or memory it reads) and the method's pass after its fit."""
    t = time.perf_counter()
    student = build_student(cfg, run_dir, cache, source, task, 1)
    timed = {"build_s": time.perf_counter() - t, "pass_s": 0.0, "end_s": 0.0}
    method = student.module.method
    _timed(method, "on_step_start", timed, "pass_s")
    _timed(method, "on_fit_end", timed, "end_s")
    trainer = make_trainer(cfg, Stage(run_dir, "bench", 1, "student", cfg), 1)
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, EpochCheckpoint)]
    timer = StepTimer(warmup)
    trainer.callbacks.append(timer)
    trainer.limit_val_batches = 0
    if batches:
        trainer.limit_train_batches = warmup + batches
    trainer.fit(student.module, datamodule=student.datamodule)
    if timer.start is None or not timer.steps:
        raise SystemExit(f"{cfg.method.name}: the epoch ended before its timed batches; the "
                         f"step has {trainer.num_training_batches} batches, warm-up {warmup}")
    # a limited epoch still reports the whole step's batches (``step_s`` is the whole step)
    batches = (len(student.datamodule.train_dataloader()) if batches
               else int(trainer.num_training_batches))
    it = (timer.end - timer.start) / timer.steps
    return {**timed, "iteration_s": it, "batches": batches,
            "step_s": timed["pass_s"] + int(cfg.train.epochs_incremental) * batches * it}


def run(args) -> dict:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="incseg-bench-methods-") as tmp:
        work = Path(tmp)
        cache = args.cache or work / "cache"
        prepared = {}
        for entry in args.methods:
            print(f"[bench] {entry}: step 0", file=sys.stderr, flush=True)
            prepared[entry] = prepare(entry, config(entry, args, cache), cache, work)
        times: dict[str, list[dict]] = {e: [] for e in args.methods}
        for r in range(args.repeats):
            order = args.methods[r % len(args.methods):] + args.methods[:r % len(args.methods)]
            for entry in order:
                cfg, source, task, run_dir = prepared[entry]
                times[entry].append(time_step(cfg, source, task, run_dir, cache, args.warmup))
                t = times[entry][-1]
                print(f"[bench] repeat {r} {entry}: iteration {t['iteration_s']:.3f} s, pass "
                      f"{t['pass_s']:.2f} s", file=sys.stderr, flush=True)
    results = {e: {k: statistics.median(t[k] for t in ts) for k in ts[0]}
               for e, ts in times.items()}
    ref = results.get("mib")
    for r in results.values():
        r["batches"] = int(r["batches"])
        if ref:
            r["step_vs_mib"] = r["step_s"] / ref["step_s"]
            r["iteration_vs_mib"] = r["iteration_s"] / ref["iteration_s"]
    return {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                        "task": args.task, "step": 1, "repeats": args.repeats,
                        "step0_epochs": args.step0_epochs, "tiny": args.tiny},
            "results": results}


def table(out: dict) -> str:
    rows = ["| method | pass before the step (s) | iteration (s) | step (s) | step / MiB's |",
            "|---|---:|---:|---:|---:|"]
    for e, r in out["results"].items():
        ratio = f"{r['step_vs_mib']:.2f}" if "step_vs_mib" in r else "-"
        rows.append(f"| {e} | {r['pass_s']:.2f} | {r['iteration_s']:.3f} | {r['step_s']:.1f} "
                    f"| {ratio} |")
    return "\n".join(rows)


def step_bench_arguments(p: argparse.ArgumentParser, task: str, repeats: int) -> None:
    """The options of a bench that times step 1 of ``task`` per entry (this one and
    replay_cost.py)."""
    p.add_argument("--out", type=Path, required=True, help="the figures (JSON, atomic)")
    p.add_argument("--task", default=task)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory", type=int, default=100, help="images of the -M entries' memory")
    p.add_argument("--step0-epochs", type=int, default=1)
    p.add_argument("--cache", type=Path, default=None, help="default: a temporary one")
    p.add_argument("--tiny", action="store_true", help="smoke scale: the script itself")


def write_and_print(path: Path, out: dict, table) -> int:
    """The figures to ``path`` (atomic), their table to stdout."""
    atomic_write_json(path, out)
    print(table(out))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    step_bench_arguments(p, "15-5", 3)
    args = p.parse_args(argv)
    if args.tiny:
        args.memory = min(args.memory, 20)
    return write_and_print(args.out, run(args), table)


if __name__ == "__main__":
    sys.exit(main())

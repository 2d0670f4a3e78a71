"""What each kind of replay keeps of the old classes and what it adds to a step, side by side:
STAR's prototypes (feature replay), a DeepInversion set (image replay, no data kept), a labelled
memory of real images.

    OMP_NUM_THREADS=1 python experiments/bench/replay_cost.py \\
        --out experiments/results/bench/FILE.json dataset.generator.classes=shapes \\
        dataset.pretrained=segmentation
    python experiments/bench/replay_cost.py --tiny --out FILE.json    # seconds: the script itself

Entries: a method alone (``dkd``, ``star``, ``mib``), with DeepInversion replay (``+DI``:
``replay=deepinversion``, the ``--inversion`` preset, ``replay.loss=kl``) or with a labelled
memory of ``--memory`` images (``-M``), at step 1 of ``--task``; each method's step 0 is trained
for ``--step0-epochs`` (what a step keeps and costs does not depend on how good step 0 is).
Per entry:

- ``kept_bytes``: what the step holds of the old classes besides the old model, the sum of
  ``state_bytes`` (the tensors of the method's hand-over: STAR's statistics), ``set_bytes`` (the
  DeepInversion set's PNG images and masks, as the cache stores them) and ``memory_bytes`` (the
  memory's images and label maps, the dataset's own files); ``kept_bytes_per_class`` divides it
  by the old foreground classes;
- ``making_s``: the one-off work before the step's training that the plain method does not do:
  the first build of the step (the replay set generated) minus a build that finds it cached;
- ``pass_s`` / ``end_s``: the method's passes over the step's data before and after the fit
  (STAR: counting the old predictions; its statistics for the next step);
- ``iteration_s``: one training iteration after warm-up (medians over ``--repeats``);
- ``step_s``: making + passes + ``epochs_incremental x batches x iteration_s``, evaluation
  excluded; ``added_s`` / ``step_vs_plain``: against the same method alone.

Threads are not set here: run it on an idle machine with the ``OMP_NUM_THREADS`` you train with.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # methods.py: prepare, time_step

from methods import (  # noqa: E402
    TINY,
    prepare,
    step_bench_arguments,
    time_step,
    write_and_print,
)

from incseg.config import compose  # noqa: E402
from incseg.precision import cpu_model  # noqa: E402
from incseg.protocol.loop import build_student  # noqa: E402

ENTRIES = ("dkd", "dkd+DI", "dkd-M", "star", "star+DI", "star-M", "mib", "mib+DI", "mib-M")


def parse(entry: str) -> tuple[str, str | None]:
    """``star+DI`` -> (``star``, ``DI``); ``mib-M`` -> (``mib``, ``M``); ``dkd`` -> (``dkd``,
    None)."""
    for sep, kind in (("+DI", "DI"), ("-M", "M")):
        if entry.endswith(sep):
            return entry[:-len(sep)], kind
    return entry, None


def config(entry: str, args, cache: Path):
    method, kind = parse(entry)
    over = [f"method={method}", f"task={args.task}", "logger=none", "trainer.progress_bar=false",
            "data.num_workers=0", f"paths.cache_dir={cache}", f"train.epochs={args.step0_epochs}",
            f"seed={args.seed}", *args.overrides]
    if kind == "DI":
        over += ["replay=deepinversion", "replay.loss=kl",
                 *([f"inversion={args.inversion}"] if args.inversion else [])]
    if kind == "M":
        over.append(f"memory.size={args.memory}")
    return compose([*(TINY if args.tiny else ()), *over])


def _files_bytes(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def kept(student, run_dir: Path) -> dict:
    """What step 1 of this entry (``student``, as ``build_student`` made it) holds of the old
    classes besides the old model, in bytes: ``state_bytes`` (the method's hand-over),
    ``set_bytes`` (the replay set), ``memory_bytes`` (the labelled memory), and ``kept_bytes``
    their sum (STAR + DI keeps both replays)."""
    state = torch.load(run_dir / "checkpoints" / "step0.pt", weights_only=True)
    tensors = {k: v for k, v in (state.get("method_state") or {}).items()
               if isinstance(v, torch.Tensor)}
    out = {"state_bytes": sum(v.numel() * v.element_size() for v in tensors.values()),
           "state": ", ".join(f"{k} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}"
                              for k, v in tensors.items()),
           "set_bytes": 0, "set_images": 0, "memory_bytes": 0, "memory_images": 0}
    if student.replay is not None:  # PNG images and masks, as the cache stores them
        rs = student.replay.dataset.replay_set
        out.update(set_bytes=_files_bytes(rs.image_files) + _files_bytes(rs.mask_files),
                   set_images=len(rs))
    if student.memory is not None:  # the dataset's own image and label files
        samples = student.memory.samples
        out.update(memory_bytes=_files_bytes([s.image for s in samples]
                                             + [s.mask for s in samples]),
                   memory_images=len(samples))
    out["kept_bytes"] = out["state_bytes"] + out["set_bytes"] + out["memory_bytes"]
    return out


def run(args) -> dict:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="incseg-bench-replay-") as tmp:
        work = Path(tmp)
        cache = args.cache or work / "cache"
        prepared, results = {}, {}
        for entry in args.entries:
            print(f"[bench] {entry}: step 0", file=sys.stderr, flush=True)
            prepared[entry] = prepare(entry, config(entry, args, cache), cache, work)
        for entry in args.entries:  # the first build makes what the step replays from
            cfg, source, task, run_dir = prepared[entry]
            t = time.perf_counter()
            student = build_student(cfg, run_dir, cache, source, task, 1)
            first = time.perf_counter() - t
            res = results[entry] = {"first_build_s": first, **kept(student, run_dir)}
            res["old_classes"] = old = len(task.classes_before(1)) - 1
            res["kept_bytes_per_class"] = res["kept_bytes"] / old
            print(f"[bench] {entry}: first build {first:.1f} s, keeps {res['kept_bytes']} bytes",
                  file=sys.stderr, flush=True)
        times: dict[str, list[dict]] = {e: [] for e in args.entries}
        for r in range(args.repeats):
            k = r % len(args.entries)
            for entry in args.entries[k:] + args.entries[:k]:
                cfg, source, task, run_dir = prepared[entry]
                times[entry].append(time_step(cfg, source, task, run_dir, cache, args.warmup,
                                              args.batches))
                t = times[entry][-1]
                print(f"[bench] repeat {r} {entry}: iteration {t['iteration_s']:.3f} s, passes "
                      f"{t['pass_s']:.2f} + {t['end_s']:.2f} s", file=sys.stderr, flush=True)
    for entry, ts in times.items():
        res, epochs = results[entry], int(prepared[entry][0].train.epochs_incremental)
        res.update({k: statistics.median(t[k] for t in ts) for k in ts[0]})
        res["batches"] = int(res["batches"])
        res["making_s"] = max(res["first_build_s"] - res["build_s"], 0.0)
        res["step_s"] = (res["making_s"] + res["pass_s"] + res["end_s"]
                         + epochs * res["batches"] * res["iteration_s"])
    for entry, res in results.items():
        plain = results.get(parse(entry)[0])
        if plain:
            res["added_s"] = res["step_s"] - plain["step_s"]
            res["step_vs_plain"] = res["step_s"] / plain["step_s"]
    return {"machine": {"platform": platform.platform(), "cpu": cpu_model(),
                        "cpus": os.cpu_count(),
                        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                        "torch_threads": torch.get_num_threads(), "task": args.task, "step": 1,
                        "repeats": args.repeats, "step0_epochs": args.step0_epochs,
                        "timed_batches": args.batches, "memory": args.memory,
                        "inversion": args.inversion, "overrides": args.overrides,
                        "tiny": args.tiny},
            "results": results}


def table(out: dict) -> str:
    rows = ["| entry | kept per old class (bytes) | making (s) | passes (s) | iteration (s) "
            "| step (s) | added to the step (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for e, r in out["results"].items():
        added = f"{r['added_s']:+.1f}" if "added_s" in r else "-"
        rows.append(f"| {e} | {r['kept_bytes_per_class']:,.0f} | {r['making_s']:.1f} "
                    f"| {r['pass_s'] + r['end_s']:.1f} | {r['iteration_s']:.3f} "
                    f"| {r['step_s']:.1f} | {added} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", nargs="+", default=list(ENTRIES))
    step_bench_arguments(p, "15-5s", 2)
    p.add_argument("--batches", type=int, default=None,
                   help="time this many iterations per repeat (default: the whole epoch)")
    p.add_argument("--inversion", default=None,
                   help="the +DI entries' inversion preset (default: cpu; --tiny: smoke's)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every entry")
    args = p.parse_args(argv)
    if args.tiny:
        args.memory = min(args.memory, 20)
    elif args.inversion is None:
        args.inversion = "cpu"
    return write_and_print(args.out, run(args), table)


if __name__ == "__main__":
    sys.exit(main())

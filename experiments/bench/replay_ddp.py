"""One replay set made by one process, then by N processes sharing its batches (as DDP ranks do).

    python experiments/bench/replay_ddp.py                      # 2 processes, 1 thread each
    python experiments/bench/replay_ddp.py --processes 2 --threads 1 --image-size 64 \
        --iterations 40 --n-per-class 4 --batch-size 8

The teacher is a randomly initialised BiSeNet-R18 (seeded: the same in every process; the
speed of an iteration does not depend on the weights). Each process makes the batches k with
k % N == rank into one cache folder, rank 0 merges them (``ensure_replay_set(rank=,
world_size=)``, no process group needed); the one-process run makes all of them. The figure is
the wall time of each (process start and imports excluded: the clock starts when every process
is ready; the sharded set is complete when rank 0 has written its manifest) and their ratio; the
two sets must be the same to the byte, or the script fails. Rank 0 looks for the other ranks'
batches every ``incseg.replay.fill.POLL_S`` seconds, so tiny sets measure mostly that wait.
Run it from the repository root with ``PYTHONPATH=.`` to time this checkout's code.
Run it with the machine otherwise idle: the processes share the cores with everything else.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from incseg.io import file_sha256
from incseg.models import build_model
from incseg.replay import InversionSettings, ensure_replay_set


def _teacher(classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("bisenet_r18", [classes]).eval()


def _make(cache: str, args, rank: int, world: int) -> dict:
    settings = InversionSettings(n_per_class=args.n_per_class, batch_size=args.batch_size,
                                 image_size=args.image_size, iterations_low=args.iterations // 2,
                                 iterations_full=args.iterations - args.iterations // 2)
    rs = ensure_replay_set(cache, _teacher(args.classes + 1), list(range(1, args.classes + 1)),
                           settings, progress=False, rank=rank, world_size=world)
    return {"key": rs.key, "files": {str(f.relative_to(rs.path)): file_sha256(f)
                                     for f in sorted(rs.image_files + rs.mask_files)}}


def _rank(rank: int, world: int, cache: str, args, start, out: str) -> None:
    torch.set_num_threads(args.threads)
    _teacher(args.classes + 1)  # warm: the first build pays for lazy imports
    start.wait()  # every process ready: the clock starts now
    t0 = time.perf_counter()
    made = _make(cache, args, rank, world)
    Path(f"{out}.{rank}").write_text(json.dumps({**made, "seconds": time.perf_counter() - t0}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--classes", type=int, default=4, help="old foreground classes")
    ap.add_argument("--n-per-class", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=40, help="half at half resolution")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.set_num_threads(args.threads)
        _teacher(args.classes + 1)
        t0 = time.perf_counter()
        one = _make(str(tmp / "one"), args, 0, 1)
        one_s = time.perf_counter() - t0
        ctx = mp.get_context("spawn")
        start = ctx.Barrier(args.processes)
        procs = [ctx.Process(target=_rank, args=(r, args.processes, str(tmp / "many"), args,
                                                  start, str(tmp / "out")))
                 for r in range(args.processes)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            print("a generating process failed", file=sys.stderr)
            return 1
        many = [json.loads(Path(f"{tmp / 'out'}.{r}").read_text())
                for r in range(args.processes)]
    many_s = many[0]["seconds"]  # the set is complete when rank 0 has written its manifest
    same = all({k: m[k] for k in ("key", "files")} == one for m in many)
    batches = -(-args.classes * args.n_per_class // args.batch_size)
    print(json.dumps({
        "batches": batches, "processes": args.processes, "threads_per_process": args.threads,
        "one_process_s": round(one_s, 2), "sharded_s": round(many_s, 2),
        "speedup": round(one_s / many_s, 2), "identical": same,
    }))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())

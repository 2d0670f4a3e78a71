"""The models side by side on this machine: parameters, MACs and a training step's time.

    OMP_NUM_THREADS=1 python experiments/bench/models.py --out experiments/results/bench/FILE.json
    python experiments/bench/models.py --tiny --out FILE.json   # seconds: the script itself

One process builds every model (random weights, 16 outputs: step 0 of 15-5), then times bare
training steps (forward, the suite's CE on every head, backward, SGD Nesterov) on the same
pre-made batches, the models taking turns in each repeat; the median over repeats is reported,
with the ratios to the first model. MACs are counted on the meta device (no arithmetic runs)
at the timed crop and at 512 px. Threads are not set here: run it on an idle machine with the
``OMP_NUM_THREADS`` you want (recorded in the file). The table goes to stdout, the figures to
``--out`` (written atomically).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from incseg.io import atomic_write_json  # noqa: E402
from incseg.losses import bisenet_loss, cross_entropy  # noqa: E402
from incseg.models import build_model  # noqa: E402

MODELS = ("bisenet_r18", "bisenet_r50", "deeplabv3_r50")
CLASSES = 16


def macs(name: str, size: int) -> int:
    """Multiply-accumulates of one forward pass of one image at ``size`` px (FLOPs / 2)."""
    with torch.device("meta"):
        model = build_model(name, [CLASSES], None).eval()
        x = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def step_seconds(model, x, y, opt) -> tuple[float, float]:
    """(wall, CPU) seconds of one training step. With one thread the process's CPU time is
    the step's own work, which other processes on a shared machine stretch far less than the
    wall time (they take turns on the cores)."""
    t, c = time.perf_counter(), time.process_time()
    out = model(x)
    loss = bisenet_loss(out.logits, out.aux, y, cross_entropy)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t, time.process_time() - c


def run(models, crop: int, batch: int, warmup: int, steps: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, crop, crop, generator=g)
    y = torch.randint(0, CLASSES, (batch, crop, crop), generator=g)
    built = {}
    for name in models:
        torch.manual_seed(0)
        model = build_model(name, [CLASSES], None).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True,
                              weight_decay=1e-4)
        for _ in range(warmup):
            step_seconds(model, x, y, opt)
        built[name] = (model, opt)
    times = {name: [] for name in models}
    cpu = {name: [] for name in models}
    for r in range(repeats):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            model, opt = built[name]
            walls, cpus = zip(*(step_seconds(model, x, y, opt) for _ in range(steps)))
            times[name].append(sum(walls) / steps)
            cpu[name].append(sum(cpus) / steps)
        print(f"[models] repeat {r + 1}/{repeats}: "
              + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms ({cpu[n][-1] * 1e3:.0f} ms CPU)"
                          for n in models), file=sys.stderr)
    first = models[0]
    rows = {}
    for name in models:
        params = sum(p.numel() for p in built[name][0].parameters())
        rows[name] = {"parameters": params, "step_s": statistics.median(times[name]),
                      "runs_s": times[name], "step_cpu_s": statistics.median(cpu[name]),
                      "runs_cpu_s": cpu[name], "macs_at_crop": macs(name, crop),
                      "macs_at_512": macs(name, 512)}
    base = rows[first]
    for row in rows.values():
        row["vs_" + first] = {k: row[k] / base[k] for k in ("step_s", "step_cpu_s",
                                                           "parameters", "macs_at_crop")}
    return {"crop": crop, "batch": batch, "warmup": warmup, "steps": steps, "repeats": repeats,
            "classes": CLASSES, "models": rows}


def table(doc: dict) -> str:
    first = next(iter(doc["models"]))
    lines = [f"training step at {doc['crop']} px, batch {doc['batch']} "
             f"(median of {doc['repeats']} x {doc['steps']} steps); ratios to {first}",
             f"{'model':<16}{'params':>12}{'GMACs@512':>11}{'step ms':>10}{'CPU ms':>9}"
             f"{'x step':>8}{'x CPU':>7}{'x params':>10}{'x MACs':>8}"]
    for name, r in doc["models"].items():
        v = r["vs_" + first]
        lines.append(f"{name:<16}{r['parameters']:>12,}{r['macs_at_512'] / 1e9:>11.1f}"
                     f"{r['step_s'] * 1e3:>10.1f}{r['step_cpu_s'] * 1e3:>9.1f}"
                     f"{v['step_s']:>8.2f}{v['step_cpu_s']:>7.2f}{v['parameters']:>10.2f}"
                     f"{v['macs_at_crop']:>8.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="the JSON file to write")
    ap.add_argument("--tiny", action="store_true", help="32 px, batch 2, one step")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    sizes = (32, 2, 1, 1, 1) if args.tiny else (args.crop, args.batch, 2, args.steps,
                                                args.repeats)
    load_before = os.getloadavg()
    doc = run(models, *sizes)
    # other processes on the machine stretch the steps unevenly: the load says how idle it was
    doc["load_average_1_5_15min"] = {"before": load_before, "after": os.getloadavg()}
    import run as bench  # the machine block of the benchmark harness (run.py)

    doc["machine"] = bench.machine_info()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, doc)
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())

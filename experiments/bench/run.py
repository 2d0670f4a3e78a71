"""incseg's benchmarks, side by side in one process (issue 7).

    python experiments/bench/run.py --quick --out DIR     # < 10 min on a 2-core CPU
    python experiments/bench/run.py --out DIR             # more repeats, a bigger sweep
    python experiments/bench/run.py --tiny --out DIR      # seconds: the harness itself (tests)
    python experiments/bench/run.py --quick --only adaptive --out DIR  # one benchmark

Each benchmark puts the suite's way of doing something beside a plain alternative, on the same
machine, in the same process, alternating the two, and reports medians over repeats. Progress
lines go to stderr, the table to stdout, every figure to ``DIR/bench.json``
(``{"machine", "results", "ratios"}``, written atomically). What each benchmark compares and
how: ``experiments/bench/RESULTS.md``. Threads are not set here: run it with the machine idle and
``OMP_NUM_THREADS`` as you train (the machine block records both).

``--cache DIR`` is where the real ``shapes`` dataset and the inversion benchmark's teacher and
verifier live (default: the suite's cache, ``paths.cache_dir``); the sweep benchmark always uses
a temporary cache, so the step-0 cache starts cold.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import logging
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # remap.py, reference_inversion.py

import lightning as L  # noqa: E402
import remap as remap_bench  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from reference_inversion import ReferenceSettings, reference_inversion  # noqa: E402

from incseg.checkpoints import EpochCheckpoint, load_model, save_model  # noqa: E402
from incseg.config import cache_dir_from_cfg, compose, source_from_cfg  # noqa: E402
from incseg.errors import CheckpointError  # noqa: E402
from incseg.io import atomic_write_json, content_key  # noqa: E402
from incseg.methods import build_method  # noqa: E402
from incseg.models import build_model  # noqa: E402
from incseg.precision import cpu_has_native_bf16, training_format  # noqa: E402
from incseg.protocol import make_datamodule, make_trainer, recipe, run_protocol  # noqa: E402
from incseg.protocol.trainer import Stage, quiet_lightning  # noqa: E402
from incseg.systems import StudentModule, TeacherModule  # noqa: E402
from incseg.tasks import get_task  # noqa: E402

#: what each ratio should reach on the reference 2-core CPU (issue 7)
TARGETS = {
    "lightning_vs_bare": 0.95,
    "loader_vs_train": 3.0,
    "lut_vs_naive": 20.0,
    "inversion_vs_reference": 2.0,
    "precision_speedup_128": 1.4,
    "step0_cache_sweep_speedup": 1.5,
    # the adaptive inversion budget against the fixed one, per preset: at most a third of the
    # time, at a verifier accuracy no lower than the fixed budget's (both are checked)
    "adaptive_vs_fixed_cpu": 3.0,
    "adaptive_vs_fixed_cpu_small": 3.0,
}
BENCHMARKS = ("train", "loader", "remap", "inversion", "precision", "sweep", "adaptive")


@dataclass(frozen=True)
class Sizes:
    """How big each benchmark is. ``repeats``: alternating repeats whose median is reported."""

    name: str
    repeats: int = 3
    # training step (StudentModule, MiB, 15-5 step 1)
    batch: int = 16
    crop: int = 64
    warmup: int = 3
    steps: int = 10
    eval_batches: int = 5
    matmul_n: int = 2048
    # loader
    loader_warm: int = 10
    loader_batches: int = 30
    # label remapping
    mask_px: int = 512
    n_masks: int = 4
    remap_repeats: int = 7
    lut_number: int = 50
    naive_number: int = 5
    # inversion: teacher and verifier know classes 0..inv_classes
    inv_classes: int = 4
    inv_per_class: int = 4
    inv_image_size: int | None = None        # None: the cpu settings' image size
    inv_iterations: tuple[int, int] | None = None  # None: the cpu settings' (low, full)
    inv_budgets: tuple[float, ...] = (0.25, 0.5, 1.0)
    inv_repeats: int = 1
    est_size: int = 512                      # FLOPs of the paper's generator counted at this size
    # adaptive vs fixed inversion budget: the presets' own sets (classes 1..inv_classes)
    adapt_presets: tuple[str, ...] = ("cpu", "cpu_small")
    adapt_repeats: int = 1
    adapt_batch: int | str = "auto"          # the adaptive budget's images per batch
    adapt_per_class: int | None = None       # None: the preset's n_per_class
    model_steps: int = 120                   # SGD steps of the teacher and of the verifier
    # precision at 128 px
    prec_crop: int = 128
    prec_batch: int = 16
    prec_warmup: int = 2
    prec_steps: int = 6
    prec_repeats: int = 2
    # step-0 cache sweep (experiment=smoke data)
    sweep_methods: tuple[str, ...] = ("ft", "lwf", "mib")
    sweep_tasks: tuple[str, ...] = ("15-5",)
    # the shapes recipe's epochs, so step 0's share of a run's time is the real sweep's
    sweep_overrides: tuple[str, ...] = ("train.epochs=7", "train.epochs_incremental=4")
    sweep_repeats: int = 1
    # a tiny generated `shapes` instead of the real one (the harness test)
    tiny_data: bool = False


QUICK = Sizes("quick")
FULL = Sizes("full", repeats=5, steps=20, eval_batches=10, loader_batches=100, inv_classes=8,
             inv_budgets=(0.25, 0.5, 1.0, 2.0), inv_repeats=2, adapt_repeats=2, model_steps=300,
             prec_steps=10, prec_repeats=5, sweep_methods=("ft", "lwf", "ilt", "mib"),
             sweep_tasks=("15-5", "15-5s"), sweep_repeats=2)
TINY = Sizes("tiny", repeats=1, batch=4, crop=32, warmup=1, steps=2, eval_batches=1,
             matmul_n=128, loader_warm=1, loader_batches=2, mask_px=64, n_masks=2,
             remap_repeats=1, lut_number=2, naive_number=1, inv_classes=2, inv_per_class=2,
             inv_image_size=32, inv_iterations=(2, 2), inv_budgets=(0.5, 1.0), model_steps=2,
             est_size=64, adapt_per_class=2,
             prec_crop=32, prec_batch=2, prec_warmup=1, prec_steps=1, prec_repeats=1,
             sweep_methods=("ft", "mib"),
             sweep_overrides=("train.epochs=1", "train.epochs_incremental=1",
                              "dataset.generator.n_train=40", "dataset.generator.n_val=4",
                              "dataset.generator.n_test=8"),
             tiny_data=True)
#: the tiny generated dataset of --tiny (every benchmark but the sweep, which has its own)
TINY_DATA = ("dataset.generator.size=32", "dataset.generator.n_train=48",
             "dataset.generator.n_val=4", "dataset.generator.n_test=4")

_T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def median(xs) -> float:
    return float(statistics.median(xs))


# --------------------------------------------------------------------------------------------
# The machine


def _cpuinfo() -> tuple[str | None, set[str]]:
    model, flags = None, set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    return model, flags


def machine_info() -> dict:
    model, flags = _cpuinfo()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": len(affinity) if affinity is not None else os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_fp16",
                                     "amx_tile", "amx_bf16"}),
        "native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "device": "cpu",
        "cuda_available": torch.cuda.is_available(),
    }


def max_rss_mb() -> float:
    """The process's peak resident set so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


# --------------------------------------------------------------------------------------------
# Shared pieces


def base_cfg(sizes: Sizes, cache: Path | None, *overrides: str):
    """The composed default config (as ``python -m incseg.run`` sees it) plus overrides."""
    over = ["logger=none", "trainer.progress_bar=false"]
    if cache is not None:
        over.append(f"paths.cache_dir={cache}")
    if sizes.tiny_data:
        over += list(TINY_DATA)
    return compose(over + list(overrides))


class Batches:
    """Pre-made in-memory batches: a sized iterable, so Lightning takes it as one loader (a
    plain list would be read as a list of loaders)."""

    def __init__(self, batches: list):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_batches(n: int, batch: int, crop: int, classes: int, seed: int = 0) -> Batches:
    g = torch.Generator().manual_seed(seed)
    distinct = [(torch.randn(batch, 3, crop, crop, generator=g),
                 torch.randint(0, classes, (batch, crop, crop), generator=g)) for _ in range(4)]
    return Batches([distinct[i % len(distinct)] for i in range(n)])


def student_module(cfg) -> StudentModule:
    """MiB's step 1 of 15-5 on BiSeNet-R18 (16 old classes, 5 new), as the protocol builds it."""
    task = get_task("shapes", "15-5")
    torch.manual_seed(0)
    old = build_model(cfg.model, [len(task.steps[0])], cfg.model.pretrained)
    model = copy.deepcopy(old)
    method = build_method(cfg.method)
    model.add_step(len(task.steps[1]), init_balanced=method.init_balanced)
    return StudentModule(model, old, task, 1, recipe(cfg, 1), method, None)


class StepTimer(L.Callback):
    """Wall time from the end of the last warm-up batch to the end of the last batch."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if batch_idx == self.warmup - 1:
            self.start = now
        elif batch_idx >= self.warmup:
            self.end, self.steps = now, self.steps + 1


def lightning_images_per_s(cfg, module, data: Batches, warmup: int, batch: int,
                           run_dir: Path) -> float:
    """Training images/s of ``module`` inside the suite's own Trainer (make_trainer: the
    configured precision, no logger, no progress bar, limit_train_batches), one epoch over
    ``data``. The epoch-end checkpoint callback is dropped: no checkpointing in the timed run."""
    trainer = make_trainer(cfg, Stage(run_dir, "bench", module.step, "student", cfg), 1)
    timer = StepTimer(warmup)
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, EpochCheckpoint)]
    trainer.callbacks.append(timer)
    trainer.fit(module, train_dataloaders=data)
    if timer.start is None or timer.end is None:
        raise RuntimeError("the Lightning run ended before its timed batches")
    return timer.steps * batch / (timer.end - timer.start)


def _autocast(precision: str):
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision in ("32-true", "32"):
        return contextlib.nullcontext()
    raise ValueError(f"the bare loop runs 32-true or bf16-mixed on a CPU, not {precision}")


def bare_images_per_s(module, data: Batches, warmup: int, batch: int, precision: str) -> float:
    """The same step without a framework: the module's loss call, SGD (Nesterov) + poly LR, in
    a plain loop over the same batches, with the same autocast as Lightning's precision."""
    r = module.recipe
    module.train()
    if r.channels_last:
        module.to(memory_format=torch.channels_last)
    params = [p for p in module.model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, nesterov=r.nesterov,
                          weight_decay=r.weight_decay)
    total = len(data)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: max(0.0, 1.0 - it / total) ** r.poly_power)
    start = None
    for i, (images, labels) in enumerate(data):
        if i == warmup:
            start = time.perf_counter()
        with _autocast(precision):
            loss = module.training_loss(module._prepare(images), labels)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return (total - warmup) * batch / (time.perf_counter() - start)


def matmul_peak_flops(n: int, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` fp32 n x n matmuls (2 n^3 FLOPs each): the attainable
    peak that model-FLOP utilisation is measured against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    _ = a @ b
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        _ = a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------------
# 1. Lightning vs a bare loop (+ FLOPs, MFU, eval images/s, peak RSS)


def bench_train(sizes: Sizes, cache: Path | None, work: Path) -> dict:
    n = sizes.warmup + sizes.steps
    cfg = base_cfg(sizes, cache, f"data.crop={sizes.crop}", f"data.batch_size={sizes.batch}",
                   f"+trainer.limit_train_batches={n}")
    fmt = training_format(cfg)
    module = student_module(cfg)
    data = make_batches(n, sizes.batch, sizes.crop, module.model.num_classes)
    rss_before = max_rss_mb()
    lit, bare = [], []
    for r in range(sizes.repeats):
        # alternate which goes first, so neither always inherits the other's warm caches
        for which in (("lightning", "bare") if r % 2 == 0 else ("bare", "lightning")):
            if which == "lightning":
                lit.append(lightning_images_per_s(cfg, module, data, sizes.warmup, sizes.batch,
                                                  work / "train"))
            else:
                bare.append(bare_images_per_s(module, data, sizes.warmup, sizes.batch,
                                              fmt.precision))
        say(f"train {r + 1}/{sizes.repeats}: Lightning {lit[-1]:.1f} img/s, "
            f"bare {bare[-1]:.1f} img/s")
    peak_rss = max_rss_mb()  # measured before anything bigger runs in this process

    images, labels = data.batches[0]
    module.train()

    def step():
        module.training_loss(module._prepare(images), labels)["loss"].backward()

    fwd_flops = count_flops(lambda: module.model(module._prepare(images)))
    step_flops = count_flops(step)
    module.zero_grad(set_to_none=True)
    peak = matmul_peak_flops(sizes.matmul_n)

    module.eval()
    evals = []
    with torch.no_grad(), _autocast(fmt.precision):
        module(module._prepare(images))
        for _ in range(sizes.repeats):
            t = time.perf_counter()
            for _ in range(sizes.eval_batches):
                module(module._prepare(images))
            evals.append(sizes.eval_batches * sizes.batch / (time.perf_counter() - t))
    module.train()
    lit_ips = median(lit)
    per_image = step_flops / sizes.batch
    return {
        "what": "StudentModule (MiB, 15-5 step 1, BiSeNet-R18) training step",
        "batch": sizes.batch, "crop": sizes.crop, "warmup": sizes.warmup,
        "timed_steps": sizes.steps, "repeats": sizes.repeats, **fmt.as_dict(),
        "lightning_images_per_s": lit_ips, "bare_images_per_s": median(bare),
        "lightning_runs": lit, "bare_runs": bare,
        "forward_flops_per_image": fwd_flops / sizes.batch,
        "train_step_flops_per_image": per_image,
        "train_step_flops_estimate_3x_forward": 3 * fwd_flops / sizes.batch,
        "matmul_n": sizes.matmul_n, "matmul_peak_gflops": peak / 1e9,
        "achieved_gflops": per_image * lit_ips / 1e9,
        "mfu": per_image * lit_ips / peak,
        "eval_images_per_s": median(evals),
        "rss_before_training_mb": rss_before, "peak_rss_mb": peak_rss,
    }


# --------------------------------------------------------------------------------------------
# 2. The data loader vs the training step


def _take(loader, n: int) -> int:
    """Pull ``n`` batches (starting new epochs as needed); returns the number of images."""
    images, got = 0, 0
    while got < n:
        for batch in loader:
            images += batch[0].shape[0]
            got += 1
            if got == n:
                break
    return images


def bench_loader(sizes: Sizes, cache: Path | None, work: Path) -> dict:
    cfg = base_cfg(sizes, cache, f"data.crop={sizes.crop}", f"data.batch_size={sizes.batch}")
    say("loader: the shapes dataset (generated once if missing, not timed)")
    source = source_from_cfg(cfg, progress=False)
    task = get_task("shapes", "15-5")
    dm = make_datamodule(cfg, source, task, 1, cache_dir_from_cfg(cfg))
    dm.setup("fit")
    loader = dm.train_dataloader()
    _take(loader, sizes.loader_warm)  # starts the (persistent) workers
    runs = []
    for r in range(sizes.repeats):
        t = time.perf_counter()
        images = _take(loader, sizes.loader_batches)
        runs.append(images / (time.perf_counter() - t))
        say(f"loader {r + 1}/{sizes.repeats}: {runs[-1]:.0f} img/s")
    out = {"what": "IncrementalDataModule.train_dataloader, shapes, 15-5 step 1",
           "root": str(source.root), "num_workers": int(cfg.data.num_workers),
           "batch": sizes.batch, "crop": sizes.crop, "batches": sizes.loader_batches,
           "train_images": len(loader.dataset), "repeats": sizes.repeats,
           "images_per_s": median(runs), "runs": runs}
    del loader, dm
    gc.collect()
    return out


# --------------------------------------------------------------------------------------------
# 4. Our DeepInversion generator vs a plain reference loop


def trained_model(sizes: Sizes, cache: Path | None, task, seed: int, crop: int) -> torch.nn.Module:
    """A BiSeNet-R18 trained ``sizes.model_steps`` SGD steps on ``task`` (one step) with seed
    ``seed``; kept in ``<cache>/bench/`` under a content key, so reruns skip the training."""
    # untimed set-up, so no loader workers: a fork of this process after the timed benchmarks
    # once left the teacher's workers stuck (main waiting in _try_get_data, load 0)
    cfg = base_cfg(sizes, cache, f"seed={seed}", f"data.crop={crop}",
                   f"data.batch_size={sizes.batch}", "data.num_workers=0")
    source = source_from_cfg(cfg, progress=False)
    cache_root = cache_dir_from_cfg(cfg)
    key = content_key("bench-model", {"root": str(source.root), "steps": task.steps,
                                      "seed": seed, "crop": crop, "sgd_steps": sizes.model_steps,
                                      "batch": int(cfg.data.batch_size), "lr": float(cfg.train.lr),
                                      "model": str(cfg.model.name)})
    path = cache_root / "bench" / f"{key}.pt"
    if path.exists():
        with contextlib.suppress(CheckpointError):
            return load_model(path, cfg.model, task.steps, 0)
    L.seed_everything(seed, workers=True, verbose=False)
    model = build_model(cfg.model, [len(task.steps[0])], cfg.model.pretrained)
    module = TeacherModule(model, task, 0, recipe(cfg, 0))
    trainer = L.Trainer(accelerator="cpu", max_steps=sizes.model_steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, precision=training_format(cfg).precision)
    dm = make_datamodule(cfg, source, task, 0, cache_root)
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    save_model(path, module.model, cfg.model, task.steps, 0)
    return module.model


def _accuracy(model, images, targets, r: float) -> float:
    from incseg.replay import verifier_predictions

    preds = verifier_predictions(model, images, r)
    return sum(int(p) == int(t) for p, t in zip(preds, targets)) / max(len(targets), 1)


def time_to_reach(points: list[tuple[float, float]], target: float) -> tuple[float, bool]:
    """Seconds our generator needs to reach ``target`` accuracy, from (seconds, accuracy) at
    increasing budgets: linear interpolation between the last budget below the target and the
    first that reaches it (the first budget itself when it already does, an upper bound);
    ``(seconds of the largest budget, False)`` when none reaches it."""
    for k, (t, acc) in enumerate(points):
        if acc >= target:
            if k == 0:
                return t, True
            t0, a0 = points[k - 1]
            return t0 + (target - a0) / (acc - a0) * (t - t0), True
    return points[-1][0], False


#: the paper's generator (Sec. 4.3 and appendix): 15 old classes x 32 images x 20k iterations at
#: 512 px, teacher BiSeNet-R50, competition student BiSeNet-R18; "almost 10 hours" per class on a T4
PAPER_WORKLOAD = {"classes": 15, "images_per_class": 32, "iterations": 20000, "image_size": 512,
                  "teacher": "bisenet_r50", "student": "bisenet_r18", "t4_hours": 150.0}
#: NVIDIA T4 datasheet peak (FLOP/s), fp16 tensor cores
T4_FP16_PEAK = 65e12


def inversion_iteration_flops(model: torch.nn.Module, size: int, at: int | None = None) -> int:
    """FLOPs of one generator iteration for one image through ``model``: the forward and the
    backward to the image only (the weights are frozen). Counted at ``at`` px and scaled by the
    pixel count to ``size`` (a conv net's FLOPs are proportional to it)."""
    at = at or size
    model = copy.deepcopy(model).eval().requires_grad_(False)
    x = torch.rand(1, 3, at, at, requires_grad=True)
    flops = count_flops(lambda: model(x).logits.float().sum().backward())
    return round(flops * (size / at) ** 2)


def paper_estimate(sizes: Sizes, cpu_fraction_of_peak: float) -> dict:
    """GPU-hours of the paper's workload: the paper's own loop (every iteration at 512 px) and
    ours with the paper preset (half the iterations at 256 px), each at two rates: the rate the
    paper's 150 T4-hours imply for its loop, and a T4 in fp16 running at the fraction of its peak
    that our generator reaches of this CPU's matmul peak."""
    w = PAPER_WORKLOAD
    at = min(sizes.est_size, w["image_size"])
    n_out = 16  # background + 15 classes
    teacher = build_model(w["teacher"], [n_out], None)
    student = build_model(w["student"], [n_out], None)
    full = (inversion_iteration_flops(teacher, w["image_size"], at)
            + inversion_iteration_flops(student, w["image_size"], at))
    half = (inversion_iteration_flops(teacher, w["image_size"] // 2, at // 2)
            + inversion_iteration_flops(student, w["image_size"] // 2, at // 2))
    images = w["classes"] * w["images_per_class"]
    paper_flops = images * w["iterations"] * full
    ours_flops = images * (w["iterations"] // 2) * (half + full)
    paper_rate = paper_flops / (w["t4_hours"] * 3600)
    t4_rate = cpu_fraction_of_peak * T4_FP16_PEAK
    return {
        "workload": w, "flops_per_image_iteration": {"512": full, "256": half},
        "paper_loop_flops": paper_flops, "ours_flops": ours_flops,
        "paper_implied_t4_flops_per_s": paper_rate,
        "paper_implied_fraction_of_t4_fp16_peak": paper_rate / T4_FP16_PEAK,
        "ours_t4_hours_at_paper_rate": ours_flops / paper_rate / 3600,
        "assumed_fraction_of_t4_fp16_peak": cpu_fraction_of_peak,
        "paper_loop_t4_hours_at_that_fraction": paper_flops / t4_rate / 3600,
        "ours_t4_hours_at_that_fraction": ours_flops / t4_rate / 3600,
    }


def bench_inversion(sizes: Sizes, cache: Path | None) -> dict:
    from incseg.replay import InversionSettings, synthesise

    cfg = base_cfg(sizes, cache)
    # conf/inversion/cpu.yaml, the generator's CPU settings
    settings = InversionSettings.from_dict(OmegaConf.to_container(cfg.inversion, resolve=True))
    changes = {"n_per_class": sizes.inv_per_class}
    if sizes.inv_image_size:
        changes["image_size"] = sizes.inv_image_size
    if sizes.inv_iterations:
        changes["iterations_low"], changes["iterations_full"] = sizes.inv_iterations
    settings = dataclasses.replace(settings, **changes)
    classes = list(range(sizes.inv_classes + 1))
    task = get_task("shapes", "bench", [classes])
    say(f"inversion: teacher and verifier ({sizes.model_steps} SGD steps each, cached)")
    teacher = trained_model(sizes, cache, task, seed=1, crop=settings.image_size)
    verifier = trained_model(sizes, cache, task, seed=2, crop=settings.image_size)
    targets = classes[1:]
    r = settings.lse_r
    ref_st = ReferenceSettings.like(settings)

    ref_runs, ref_acc, ref_teacher_acc = [], None, None
    for _ in range(sizes.inv_repeats):
        images, tgts, seconds = reference_inversion(teacher, targets, sizes.inv_per_class,
                                                    settings.image_size, ref_st)
        ref_runs.append(seconds)
        ref_acc = _accuracy(verifier, images, tgts, r)  # deterministic: same every repeat
        ref_teacher_acc = _accuracy(teacher, images, tgts, r)
    say(f"inversion: reference {median(ref_runs):.1f} s, verifier accuracy {ref_acc:.2f}")

    ours = []
    low, full = settings.iterations_low, settings.iterations_full
    for b in sizes.inv_budgets:
        st = dataclasses.replace(settings, iterations_low=round(b * low),
                                 iterations_full=max(1, round(b * full)))
        runs, acc, t_acc = [], None, None
        for _ in range(sizes.inv_repeats):
            t = time.perf_counter()
            images, info = synthesise(teacher, targets, st, progress=False)
            runs.append(time.perf_counter() - t)
            acc = _accuracy(verifier, images, info["targets"], r)
            t_acc = _accuracy(teacher, images, info["targets"], r)
        ours.append({"budget": b, "iterations_low": st.iterations_low,
                     "iterations_full": st.iterations_full, "seconds": median(runs),
                     "runs": runs, "verifier_accuracy": acc, "teacher_accuracy": t_acc})
        say(f"inversion: ours x{b}: {median(runs):.1f} s, verifier accuracy {acc:.2f}")
    seconds, reached = time_to_reach([(o["seconds"], o["verifier_accuracy"]) for o in ours],
                                     ref_acc)
    # how much of this CPU our generator uses (its largest budget), for the paper estimate
    top = ours[-1]
    size = settings.image_size
    flops = len(targets) * sizes.inv_per_class * (
        top["iterations_low"] * inversion_iteration_flops(teacher, size // 2)
        + top["iterations_full"] * inversion_iteration_flops(teacher, size))
    peak = matmul_peak_flops(sizes.matmul_n)
    fraction = flops / top["seconds"] / peak
    estimate = paper_estimate(sizes, fraction)
    say(f"inversion: ours at {flops / top['seconds'] / 1e9:.1f} GFLOP/s = {fraction:.1%} of "
        f"the matmul peak; paper workload: ours {estimate['ours_t4_hours_at_that_fraction']:.1f} "
        f"T4-hours at that fraction of a T4 (the paper's loop: "
        f"{estimate['paper_loop_t4_hours_at_that_fraction']:.1f}; the paper reports 150)")
    return {
        "what": "seconds to the reference's verifier accuracy, same teacher and verifier",
        "classes": targets, "images_per_class": sizes.inv_per_class,
        "image_size": settings.image_size, "teacher_sgd_steps": sizes.model_steps,
        "reference": {"iterations": ref_st.iterations, "batches": len(targets),
                      "seconds": median(ref_runs), "runs": ref_runs,
                      "verifier_accuracy": ref_acc, "teacher_accuracy": ref_teacher_acc},
        "ours": ours, "ours_seconds_to_reference_accuracy": seconds,
        "reached": reached,
        "cpu": {"flops_per_s": flops / top["seconds"], "matmul_peak_flops_per_s": peak,
                "fraction_of_peak": fraction},
        "paper_estimate": estimate,
    }


# --------------------------------------------------------------------------------------------
# 7. The adaptive inversion budget against the fixed one


def _iteration_figures(its: list[int]) -> dict:
    return {"median": float(statistics.median(its)), "max": max(its), "min": min(its),
            "mean": sum(its) / len(its)}


def bench_adaptive(sizes: Sizes, cache: Path | None) -> dict:
    """Each preset's set (its images per class and iterations, the benchmark's classes) made
    with the fixed budget and with the adaptive one (``inversion.budget=adaptive``, the
    preset's ``stop`` rule, ``batch_size`` ``sizes.adapt_batch``), alternating, same teacher
    and verifier as the inversion benchmark: wall time, iterations per image, accuracies."""
    from incseg.replay import InversionSettings, synthesise

    classes = list(range(sizes.inv_classes + 1))
    task = get_task("shapes", "bench", [classes])
    targets = classes[1:]
    out = {}
    for preset in sizes.adapt_presets:
        cfg = base_cfg(sizes, cache, f"inversion={preset}")
        fixed = InversionSettings.from_dict(OmegaConf.to_container(cfg.inversion, resolve=True))
        changes = {}
        if sizes.inv_image_size:
            changes["image_size"] = sizes.inv_image_size
        if sizes.inv_iterations:
            changes["iterations_low"], changes["iterations_full"] = sizes.inv_iterations
        if sizes.adapt_per_class:
            changes["n_per_class"] = sizes.adapt_per_class
        fixed = dataclasses.replace(fixed, **changes)
        adaptive = dataclasses.replace(fixed, budget="adaptive", batch_size=sizes.adapt_batch)
        say(f"adaptive ({preset}): teacher and verifier ({sizes.model_steps} SGD steps each, "
            "cached)")
        teacher = trained_model(sizes, cache, task, seed=1, crop=fixed.image_size)
        verifier = trained_model(sizes, cache, task, seed=2, crop=fixed.image_size)
        r = fixed.lse_r
        rows = {"fixed": {"runs": []}, "adaptive": {"runs": []}}
        for rep in range(sizes.adapt_repeats):
            order = ("fixed", "adaptive") if rep % 2 == 0 else ("adaptive", "fixed")
            for name in order:
                st = fixed if name == "fixed" else adaptive
                t = time.perf_counter()
                images, info = synthesise(teacher, targets, st, progress=False)
                rows[name]["runs"].append(time.perf_counter() - t)
                its = info.get("image_iterations") or [
                    st.iterations_low + st.iterations_full] * images.shape[0]
                rows[name].update(
                    images=images.shape[0], iterations=_iteration_figures(its),
                    verifier_accuracy=_accuracy(verifier, images, info["targets"], r),
                    teacher_accuracy=_accuracy(teacher, images, info["targets"], r),
                    batch_size=(info["batches"][0].get("slots", st.batch_size)
                                if info["batches"] else None))
                say(f"adaptive ({preset}) {name}: {rows[name]['runs'][-1]:.1f} s, iterations "
                    f"median {rows[name]['iterations']['median']:g} max "
                    f"{rows[name]['iterations']['max']}, verifier accuracy "
                    f"{rows[name]['verifier_accuracy']:.2f}")
        for row in rows.values():
            row["seconds"] = median(row["runs"])
        out[preset] = {
            **rows, "classes": targets, "images_per_class": fixed.n_per_class,
            "image_size": fixed.image_size,
            "max_iterations": [fixed.iterations_low, fixed.iterations_full],
            "stop": dataclasses.asdict(adaptive.stop_rule),
            "seconds_ratio": rows["fixed"]["seconds"] / rows["adaptive"]["seconds"],
            "accuracy_kept": (rows["adaptive"]["verifier_accuracy"]
                              >= rows["fixed"]["verifier_accuracy"]),
        }
    return {"what": "one replay set per preset, fixed budget vs adaptive budget (same teacher, "
                    "verifier and classes as the inversion benchmark)",
            "teacher_sgd_steps": sizes.model_steps, "repeats": sizes.adapt_repeats,
            "presets": out}


# --------------------------------------------------------------------------------------------
# 5. The default precision / memory format at 128 px vs fp32 eager contiguous

PRECISION_VARIANTS = {
    "fp32": ("32-true", False),
    "fp32_channels_last": ("32-true", True),
    "bf16": ("bf16-mixed", False),
    "bf16_channels_last": ("bf16-mixed", True),
}


def bench_precision(sizes: Sizes, cache: Path | None, work: Path) -> dict:
    n = sizes.prec_warmup + sizes.prec_steps
    common = (f"data.crop={sizes.prec_crop}", f"data.batch_size={sizes.prec_batch}",
              f"+trainer.limit_train_batches={n}")
    default = training_format(base_cfg(sizes, cache, *common))
    variants = {name: base_cfg(sizes, cache, *common, f"trainer.precision={p}",
                               f"train.channels_last={str(cl).lower()}")
                for name, (p, cl) in PRECISION_VARIANTS.items()}
    default_name = next((name for name, f in PRECISION_VARIANTS.items()
                         if f == (default.precision, default.channels_last)), None)
    if default_name is None:  # a default none of the fixed variants covers: measure it too
        default_name = "default"
        variants["default"] = base_cfg(sizes, cache, *common)
    first = student_module(variants["fp32"])
    modules = {}
    for name, cfg in variants.items():  # same weights; its own memory format and recipe
        m = copy.deepcopy(first)
        m.recipe = recipe(cfg, 1)
        modules[name] = m
    data = make_batches(n, sizes.prec_batch, sizes.prec_crop, first.model.num_classes)
    runs = {name: [] for name in variants}
    for r in range(sizes.prec_repeats):
        for name, cfg in variants.items():
            runs[name].append(lightning_images_per_s(cfg, modules[name], data,
                                                     sizes.prec_warmup, sizes.prec_batch,
                                                     work / "precision"))
        say(f"precision {r + 1}/{sizes.prec_repeats}: "
            + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()) + " img/s")
    ips = {name: median(v) for name, v in runs.items()}
    return {
        "what": "training images/s at the crop below, StudentModule step in make_trainer",
        "crop": sizes.prec_crop, "batch": sizes.prec_batch, "repeats": sizes.prec_repeats,
        "default": {**default.as_dict(), "variant": default_name},
        "images_per_s": ips, "runs": runs,
        "default_images_per_s": ips[default_name], "fp32_images_per_s": ips["fp32"],
    }


# --------------------------------------------------------------------------------------------
# 6. A method sweep with and without the step-0 cache


def bench_sweep(sizes: Sizes) -> dict:
    from incseg.data.index import scan_labels

    with tempfile.TemporaryDirectory(prefix="incseg-bench-sweep-") as tmp:
        tmp = Path(tmp)
        base = ["experiment=smoke", f"paths.cache_dir={tmp / 'cache'}", "seed=0",
                "resume=never", *sizes.sweep_overrides]
        cfg = compose(base)
        source = source_from_cfg(cfg, progress=False)  # data and label scans before the clock
        for split in ("train", "val", "test"):
            scan_labels(source, split, cache_dir_from_cfg(cfg), progress=False)
        runs = [(task, method) for task in sizes.sweep_tasks for method in sizes.sweep_methods]
        configs = {flag: [compose(base + [f"task={t}", f"method={m}",
                                          f"protocol.step0_cache={str(flag).lower()}"])
                          for t, m in runs] for flag in (False, True)}
        walls = {False: [], True: []}
        for r in range(sizes.sweep_repeats):
            for flag in (False, True):
                shutil.rmtree(tmp / "cache" / "step0", ignore_errors=True)  # a cold cache
                t = time.perf_counter()
                for k, c in enumerate(configs[flag]):
                    run_protocol(c, tmp / "runs" / f"{r}-{flag}-{k}")
                walls[flag].append(time.perf_counter() - t)
                say(f"sweep {r + 1}/{sizes.sweep_repeats}, step-0 cache "
                    f"{'on' if flag else 'off'}: {walls[flag][-1]:.1f} s")
    return {
        "what": "wall time of a method sweep, in process (run_protocol), temporary cache",
        "runs": [f"{m} {t}" for t, m in runs], "overrides": ["experiment=smoke",
                                                             *sizes.sweep_overrides],
        "repeats": sizes.sweep_repeats,
        "without_cache_s": median(walls[False]), "with_cache_s": median(walls[True]),
        "without_cache_runs": walls[False], "with_cache_runs": walls[True],
    }


# --------------------------------------------------------------------------------------------
# Ratios, the table, the file


def ratios_of(results: dict) -> dict:
    out = {}
    if "train" in results:
        tr = results["train"]
        out["lightning_vs_bare"] = tr["lightning_images_per_s"] / tr["bare_images_per_s"]
        if "loader" in results:
            out["loader_vs_train"] = (results["loader"]["images_per_s"]
                                      / tr["lightning_images_per_s"])
    if "remap" in results:
        out["lut_vs_naive"] = results["remap"]["lut_vs_naive"]
    if "inversion" in results:
        inv = results["inversion"]
        out["inversion_vs_reference"] = (inv["reference"]["seconds"]
                                         / inv["ours_seconds_to_reference_accuracy"])
    if "precision" in results:
        p = results["precision"]
        out["precision_speedup_128"] = p["default_images_per_s"] / p["fp32_images_per_s"]
    if "sweep" in results:
        s = results["sweep"]
        out["step0_cache_sweep_speedup"] = s["without_cache_s"] / s["with_cache_s"]
    for preset, row in results.get("adaptive", {}).get("presets", {}).items():
        out[f"adaptive_vs_fixed_{preset}"] = row["seconds_ratio"]
    return out


def table(results: dict, ratios: dict) -> str:
    r = results
    rows = []

    def add(key, measured, also=True):
        if key in ratios:
            ok = "ok" if ratios[key] >= TARGETS[key] and also else "BELOW"
            rows.append((key, measured, f"{ratios[key]:.2f}", f">= {TARGETS[key]:g}", ok))

    if "train" in r:
        t = r["train"]
        add("lightning_vs_bare", f"Lightning {t['lightning_images_per_s']:.1f} img/s, "
            f"bare {t['bare_images_per_s']:.1f} img/s ({t['precision']})")
        if "loader" in r:
            add("loader_vs_train", f"loader {r['loader']['images_per_s']:.0f} img/s "
                f"({r['loader']['num_workers']} workers), training "
                f"{t['lightning_images_per_s']:.1f} img/s")
    if "remap" in r:
        add("lut_vs_naive", f"LUT {r['remap']['lut_ms']:.3f} ms, per-class loop "
            f"{r['remap']['naive_ms']:.2f} ms per {r['remap']['mask_px']} px mask")
    if "inversion" in r:
        inv = r["inversion"]
        note = "" if inv["reached"] else " (not reached: largest budget)"
        add("inversion_vs_reference", f"reference {inv['reference']['seconds']:.1f} s to "
            f"verifier acc {inv['reference']['verifier_accuracy']:.2f}, ours "
            f"{inv['ours_seconds_to_reference_accuracy']:.1f} s{note}")
    if "precision" in r:
        p = r["precision"]
        d = p["default"]
        add("precision_speedup_128", f"default ({d['precision']}, channels_last "
            f"{str(d['channels_last']).lower()}) {p['default_images_per_s']:.1f} img/s, fp32 "
            f"{p['fp32_images_per_s']:.1f} img/s; "
            + ", ".join(f"{k} {v:.1f}" for k, v in p["images_per_s"].items()))
    if "sweep" in r:
        s = r["sweep"]
        add("step0_cache_sweep_speedup", f"{len(s['runs'])} runs: without "
            f"{s['without_cache_s']:.1f} s, with {s['with_cache_s']:.1f} s")
    for preset, a in r.get("adaptive", {}).get("presets", {}).items():
        f, d = a["fixed"], a["adaptive"]
        add(f"adaptive_vs_fixed_{preset}", f"fixed {f['seconds']:.1f} s ({f['iterations']['max']} "
            f"its/image, verifier acc {f['verifier_accuracy']:.2f}), adaptive {d['seconds']:.1f} s "
            f"(its/image median {d['iterations']['median']:g}, max {d['iterations']['max']}; "
            f"verifier acc {d['verifier_accuracy']:.2f}; batch {d['batch_size']})",
            also=a["accuracy_kept"])
    widths = [max(len(row[i]) for row in rows + [("ratio",) * 5]) for i in range(5)]
    head = ("benchmark", "measured", "ratio", "target", "")
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    if "train" in r:
        t = r["train"]
        lines += ["", f"model-FLOP utilisation {100 * t['mfu']:.1f}% "
                  f"({t['achieved_gflops']:.1f} of {t['matmul_peak_gflops']:.1f} GFLOP/s fp32 "
                  f"matmul peak); eval {t['eval_images_per_s']:.1f} img/s; peak RSS "
                  f"{t['peak_rss_mb']:.0f} MB"]
    if "inversion" in r:
        e, c = r["inversion"]["paper_estimate"], r["inversion"]["cpu"]
        lines += [f"generator at {100 * c['fraction_of_peak']:.1f}% of the matmul peak; the "
                  f"paper's workload (15 x 32 images x 20k its at 512 px, R50 + R18) at that "
                  f"fraction of a T4's fp16 peak: ours {e['ours_t4_hours_at_that_fraction']:.1f} "
                  f"T4-hours, the paper's loop {e['paper_loop_t4_hours_at_that_fraction']:.1f} "
                  f"(reported: {e['workload']['t4_hours']:g}, i.e. "
                  f"{100 * e['paper_implied_fraction_of_t4_fp16_peak']:.1f}% of the fp16 peak); "
                  f"ours at the paper's rate {e['ours_t4_hours_at_paper_rate']:.0f} T4-hours"]
    return "\n".join(lines)


def run(sizes: Sizes, out: Path, cache: Path | None = None, only=BENCHMARKS) -> dict:
    """Run the benchmarks of ``only`` at ``sizes``; write ``out/bench.json``; return it."""
    quiet_lightning()
    logging.getLogger("incseg").setLevel(logging.WARNING)
    # the timed fits pass training batches only, on purpose
    warnings.filterwarnings("ignore", message=".*validation_step.*but have no.*")
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    say(f"{sizes.name}: {machine['cpu']}, {machine['torch_threads']} torch threads; "
        f"benchmarks {', '.join(only)}")
    results: dict = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="incseg-bench-") as work:
        work = Path(work)
        # the training step first: peak RSS is a high-water mark, so it is read before the
        # bigger 128 px steps and the sweep run in this process
        if "train" in only:
            results["train"] = bench_train(sizes, cache, work)
        if "loader" in only:
            results["loader"] = bench_loader(sizes, cache, work)
        if "remap" in only:
            say("label remapping")
            results["remap"] = remap_bench.main(size=sizes.mask_px, n_masks=sizes.n_masks,
                                                repeats=sizes.remap_repeats,
                                                number=sizes.lut_number,
                                                naive_number=sizes.naive_number)
        if "inversion" in only:
            results["inversion"] = bench_inversion(sizes, cache)
        if "precision" in only:
            results["precision"] = bench_precision(sizes, cache, work)
        if "sweep" in only:
            results["sweep"] = bench_sweep(sizes)
        if "adaptive" in only:
            results["adaptive"] = bench_adaptive(sizes, cache)
    ratios = ratios_of(results)
    results["run"] = {"variant": sizes.name, "sizes": dataclasses.asdict(sizes),
                      "targets": TARGETS, "wall_s": time.perf_counter() - start}
    doc = {"machine": machine, "results": results, "ratios": ratios}
    atomic_write_json(out / "bench.json", doc)
    print(table(results, ratios))
    say(f"done in {results['run']['wall_s']:.0f} s: {out / 'bench.json'}")
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the < 10 min variant")
    size.add_argument("--tiny", action="store_true",
                      help="seconds, on a tiny generated dataset: checks the harness only")
    ap.add_argument("--out", required=True, type=Path, help="folder for bench.json")
    ap.add_argument("--cache", type=Path, default=None,
                    help="cache directory (default: the suite's paths.cache_dir)")
    ap.add_argument("--only", default=",".join(BENCHMARKS),
                    help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    args = ap.parse_args(argv)
    only = tuple(b.strip() for b in args.only.split(",") if b.strip())
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    sizes = TINY if args.tiny else QUICK if args.quick else FULL
    run(sizes, args.out, args.cache, only)
    return 0


if __name__ == "__main__":
    sys.exit(main())

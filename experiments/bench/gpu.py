"""The GPU check: training and evaluation speed, memory and the generator's cost on one GPU.

    python experiments/bench/gpu.py --out DIR        # about 2 minutes on an H200
    python experiments/bench/gpu.py --tiny --out DIR # seconds on the CPU: the script itself
    python experiments/bench/gpu.py --parts adaptive --from-bench bench.json --out DIR

What it measures, each in one process, medians over repeats:

1. ``train``: images/s and peak memory of a training step (forward, the suite's CE on every
   head, backward, SGD Nesterov) of BiSeNet-R18, BiSeNet-R50 and DeepLabV3-R101 at 512 px,
   batch 16, in fp32 / 16-mixed / bf16-mixed, contiguous and channels_last; a bare loop over
   pre-made batches already on the device (the model's own cost, no loader).
2. ``eval``: inference images/s of the same models and formats.
3. ``auto``: what ``trainer.precision=auto`` / ``train.channels_last=auto`` pick on this device
   (``incseg.precision``) beside the fastest measured format of each model.
4. ``mib``: the MiB step (StudentModule, 15-5 step 1) inside the suite's Trainer against the same
   step in a bare PyTorch loop, both copying each batch from host memory.
5. ``inversion``: DeepInversion iterations/s of the paper preset (``conf/inversion/paper.yaml``:
   batch 32, 256 px then 512 px, fp16) with the BiSeNet-R50 teacher, alone (the suite's replay)
   and with a BiSeNet-R18 competition student (the paper), and from them the GPU-hours of the
   paper's workload (15 classes x 32 images x 20k iterations).
6. ``adaptive``: the same preset with ``inversion.budget=adaptive inversion.batch_size=auto``:
   the batch ``auto`` picks on this device, image-iterations/s at half and full resolution
   with every slot busy (``incseg.replay.adaptive``), the generator's TFLOP/s (FLOPs counted
   with ``FlopCounterMode``) as a fraction of the measured fp16 matmul peak, and the paper
   workload's GPU-hours: at the maximum (no image stops early: the auto batch alone) and at
   the mean iterations per image as fractions of each stage's maximum, from ``--stage-fractions
   LOW,FULL`` or the ``cpu`` preset's adaptive figures in a ``run.py`` ``bench.json``
   (``--from-bench``). Random weights never satisfy the stopping rule, so where the images
   stop cannot be measured here; the fractions carry that figure over from a trained teacher,
   an assumption the JSON names (``fractions_from``). Continuous batching keeps every slot
   busy but the last ``batch`` images, which the hours neglect.

Progress lines go to stderr, a table to stdout, every figure to ``DIR/gpu_bench.json``
(``{"machine", "results"}``, written atomically after each part, the generator's first, so a
run cut off by a time limit keeps what it finished). Without a GPU it says so in one line (exit
status 2) unless ``--tiny`` is given; ``--tiny`` runs every part on the CPU at 32 px, batch 2,
two iterations, BiSeNet-R18 and DeepLabV3-R50, in the precisions a CPU runs (fp32,
bf16-mixed); its hours are this CPU's at those sizes, meaningless beyond checking the
arithmetic. Weights are random: speed and memory do not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import math
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run.py's helpers

import run as bench  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from incseg.config import compose  # noqa: E402
from incseg.io import atomic_write_json  # noqa: E402
from incseg.losses import bisenet_loss, cross_entropy  # noqa: E402
from incseg.models import build_model  # noqa: E402
from incseg.precision import (  # noqa: E402
    cuda_supports_bf16,
    resolve_channels_last,
    resolve_precision,
)
from incseg.protocol.trainer import quiet_lightning  # noqa: E402

say = bench.say
median = bench.median

#: precision name -> (Lightning string, autocast dtype or None)
PRECISIONS = {"fp32": ("32-true", None), "16-mixed": ("16-mixed", torch.float16),
              "bf16-mixed": ("bf16-mixed", torch.bfloat16)}
PAPER_WORKLOAD = bench.PAPER_WORKLOAD  # 15 classes x 32 images x 20k iterations, 150 T4-hours


@dataclass(frozen=True)
class Sizes:
    name: str
    device: str
    models: tuple[str, ...] = ("bisenet_r18", "bisenet_r50", "deeplabv3_r101")
    precisions: tuple[str, ...] = ("fp32", "16-mixed", "bf16-mixed")
    crop: int = 512
    batch: int = 16
    warmup: int = 3
    steps: int = 15
    repeats: int = 3
    eval_steps: int = 15
    mib_model: str = "bisenet_r18"
    mib_warmup: int = 5
    mib_steps: int = 30
    inv_warmup: int = 3
    inv_steps: int = 15
    inv_overrides: tuple[str, ...] = ()  # on top of inversion=paper
    adapt_batch: int | str = "auto"
    adapt_warmup: int = 2
    adapt_steps: int = 5
    peak_n: int = 8192                   # the matmul whose rate is the peak (fp16 on CUDA)
    flops_at: int = 128                  # generator FLOPs counted at this size, scaled up


GPU = Sizes("gpu", "cuda")
TINY = Sizes("tiny", "cpu", models=("bisenet_r18", "deeplabv3_r50"),
             precisions=("fp32", "bf16-mixed"), crop=32, batch=2, warmup=1,
             steps=1, repeats=1, eval_steps=1, mib_warmup=1, mib_steps=1, inv_warmup=1,
             inv_steps=1, inv_overrides=("inversion.image_size=32", "inversion.batch_size=4",
                                         "inversion.precision=32"),
             adapt_batch=3, adapt_warmup=1, adapt_steps=1, peak_n=256, flops_at=32)
PARTS = ("inversion", "adaptive", "mib", "train")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def autocast(device: str, dtype):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device, dtype=dtype)


def variants(sizes: Sizes) -> list[tuple[str, str, bool]]:
    """(name, precision, channels_last) of every measured format."""
    return [(f"{p}{'_channels_last' if cl else ''}", p, cl)
            for p in sizes.precisions for cl in (False, True)]


# --------------------------------------------------------------------------------------------
# 1-2. Training and evaluation speed and memory of each model and format


def train_images_per_s(model, sizes: Sizes, precision: str, channels_last: bool) -> dict:
    """Bare training steps on batches already on the device; median images/s over repeats and
    the peak memory of the first repeat."""
    dev, dtype = sizes.device, PRECISIONS[precision][1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(dev, memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True,
                          weight_decay=1e-4)
    scaler = torch.amp.GradScaler(dev, enabled=precision == "16-mixed")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sizes.batch, 3, sizes.crop, sizes.crop, generator=g).to(dev)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, model.num_classes, (sizes.batch, sizes.crop, sizes.crop),
                      generator=g).to(dev)

    def step():
        with autocast(dev, dtype):
            out = model(x)
            loss = bisenet_loss(out.logits, out.aux, y, cross_entropy)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    runs, peak = [], None
    for r in range(sizes.repeats):
        reset_peak(dev)
        for _ in range(sizes.warmup):
            step()
        sync(dev)
        t = time.perf_counter()
        for _ in range(sizes.steps):
            step()
        sync(dev)
        runs.append(sizes.steps * sizes.batch / (time.perf_counter() - t))
        if r == 0:
            peak = peak_mib(dev)
    return {"images_per_s": median(runs), "runs": runs, "peak_memory_mib": peak}


@torch.no_grad()
def eval_images_per_s(model, sizes: Sizes, precision: str, channels_last: bool) -> float:
    dev, dtype = sizes.device, PRECISIONS[precision][1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(dev, memory_format=fmt).eval()
    x = torch.randn(sizes.batch, 3, sizes.crop, sizes.crop).to(dev).contiguous(memory_format=fmt)
    runs = []
    for _ in range(sizes.repeats):
        with autocast(dev, dtype):
            for _ in range(sizes.warmup):
                model(x)
            sync(dev)
            t = time.perf_counter()
            for _ in range(sizes.eval_steps):
                model(x)
            sync(dev)
        runs.append(sizes.eval_steps * sizes.batch / (time.perf_counter() - t))
    return median(runs)


def auto_choice(sizes: Sizes) -> dict:
    """What ``trainer.precision=auto`` and ``train.channels_last=auto`` resolve to here."""
    cuda = sizes.device == "cuda"
    precision = resolve_precision("auto", device=sizes.device, crop=sizes.crop,
                                  cpu_bf16=not cuda and bench.cpu_has_native_bf16(),
                                  cuda_bf16=cuda and cuda_supports_bf16())
    cl = resolve_channels_last("auto", precision, device=sizes.device, crop=sizes.crop)
    name = {v[0]: k for k, v in PRECISIONS.items()}.get(precision, precision)
    return {"precision": precision, "channels_last": cl,
            "variant": f"{name}{'_channels_last' if cl else ''}"}


def bench_models(sizes: Sizes) -> dict:
    out = {}
    auto = auto_choice(sizes)
    for name in sizes.models:
        torch.manual_seed(0)
        base = build_model(name, [21], None)
        params = sum(p.numel() for p in base.parameters())
        rows = {}
        for var, precision, cl in variants(sizes):
            model = copy.deepcopy(base)
            row = train_images_per_s(model, sizes, precision, cl)
            row["eval_images_per_s"] = eval_images_per_s(model, sizes, precision, cl)
            rows[var] = row
            say(f"{name} {var}: train {row['images_per_s']:.1f} img/s, eval "
                f"{row['eval_images_per_s']:.1f} img/s, peak "
                + ("-" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.0f} MiB"))
            del model
            gc.collect()
            if sizes.device == "cuda":
                torch.cuda.empty_cache()
        fastest = max(rows, key=lambda k: rows[k]["images_per_s"])
        chosen = rows.get(auto["variant"])
        out[name] = {
            "parameters": params, "variants": rows, "fastest": fastest,
            "auto": auto["variant"],
            "auto_vs_fastest": (chosen["images_per_s"] / rows[fastest]["images_per_s"]
                                if chosen else None),
        }
    return {"what": f"bare training / eval steps at {sizes.crop} px, batch {sizes.batch}, "
                    "random weights and batches on the device",
            "crop": sizes.crop, "batch": sizes.batch, "auto": auto,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark), "models": out}


# --------------------------------------------------------------------------------------------
# 4. The MiB step: the suite's Trainer against a bare PyTorch loop


def bare_mib_images_per_s(module, data, warmup: int, batch: int, precision: str,
                          device: str) -> float:
    """The student's loss call, SGD (Nesterov) + poly LR, autocast (+ a GradScaler in fp16) as
    Lightning's precision plugin does; each batch copied from host memory as the loader's."""
    r = module.recipe
    dtype = PRECISIONS[{v[0]: k for k, v in PRECISIONS.items()}[precision]][1]
    module.to(device).train()
    if r.channels_last:
        module.to(memory_format=torch.channels_last)
    params = [p for p in module.model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, nesterov=r.nesterov,
                          weight_decay=r.weight_decay)
    total = len(data)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: max(0.0, 1.0 - it / total) ** r.poly_power)
    scaler = torch.amp.GradScaler(device, enabled=precision == "16-mixed")
    start = None
    for i, (images, labels) in enumerate(data):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        images, labels = images.to(device), labels.to(device)
        with autocast(device, dtype):
            loss = module.training_loss(module._prepare(images), labels)["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    sync(device)
    return (total - warmup) * batch / (time.perf_counter() - start)


def bench_mib(sizes: Sizes, work: Path) -> dict:
    n = sizes.mib_warmup + sizes.mib_steps
    trainer = "gpu" if sizes.device == "cuda" else "cpu"
    cfg = compose(["logger=none", "trainer.progress_bar=false", f"trainer={trainer}",
                   f"model={sizes.mib_model}", "method=mib", f"data.crop={sizes.crop}",
                   f"data.batch_size={sizes.batch}", f"+trainer.limit_train_batches={n}"])
    fmt = bench.training_format(cfg)
    module = bench.student_module(cfg)
    data = bench.make_batches(n, sizes.batch, sizes.crop, module.model.num_classes)
    lit, bare = [], []
    for r in range(sizes.repeats):
        for which in (("lightning", "bare") if r % 2 == 0 else ("bare", "lightning")):
            if which == "lightning":
                lit.append(bench.lightning_images_per_s(cfg, module, data, sizes.mib_warmup,
                                                        sizes.batch, work / "mib"))
            else:
                bare.append(bare_mib_images_per_s(module, data, sizes.mib_warmup, sizes.batch,
                                                  fmt.precision, sizes.device))
        say(f"mib {r + 1}/{sizes.repeats}: Lightning {lit[-1]:.1f} img/s, bare "
            f"{bare[-1]:.1f} img/s ({fmt.precision}, channels_last {fmt.channels_last})")
    return {"what": f"StudentModule (MiB, 15-5 step 1, {sizes.mib_model}) training step",
            "crop": sizes.crop, "batch": sizes.batch, **fmt.as_dict(),
            "lightning_images_per_s": median(lit), "bare_images_per_s": median(bare),
            "lightning_vs_bare": median(lit) / median(bare), "lightning_runs": lit,
            "bare_runs": bare}


# --------------------------------------------------------------------------------------------
# 5. DeepInversion iterations/s of the paper preset and the paper workload's GPU-hours


def iterations_per_s(teacher, student, settings, sizes: Sizes) -> tuple[float, float]:
    """Iterations/s of one batch at half and at full resolution (the generator's two stages)."""
    from incseg.replay.generator import InversionModule
    from incseg.replay.settings import batch_plan

    targets = list(range(1, PAPER_WORKLOAD["classes"] + 1))
    n = sizes.inv_warmup + sizes.inv_steps
    st = dataclasses.replace(settings, iterations_low=n, iterations_full=n)
    module = InversionModule(teacher, batch_plan(targets, st)[0], st, student=student)
    module.to(sizes.device)
    opts = module.make_optimizers()
    module.attach_hooks()
    rates = []
    try:
        for _stage in (0, 1):
            for _ in range(sizes.inv_warmup):
                module.optimisation_step(opts)
            sync(sizes.device)
            t = time.perf_counter()
            for _ in range(sizes.inv_steps):
                module.optimisation_step(opts)
            sync(sizes.device)
            rates.append(sizes.inv_steps / (time.perf_counter() - t))
    finally:
        module.detach_hooks()
    return rates[0], rates[1]


def workload_hours(settings, low_its: float, full_its: float) -> dict:
    """GPU-hours of 15 classes x 32 images at the measured rates: ours (the preset's low/full
    split of the 20k iterations) and the paper's loop (every iteration at full resolution)."""
    w = PAPER_WORKLOAD
    batches = math.ceil(w["classes"] * w["images_per_class"] / settings.batch_size)
    ours = batches * (settings.iterations_low / low_its + settings.iterations_full / full_its)
    paper_loop = batches * w["iterations"] / full_its
    return {"batches": batches, "ours_gpu_hours": ours / 3600,
            "paper_loop_gpu_hours": paper_loop / 3600}


def bench_inversion(sizes: Sizes) -> dict:
    from incseg.replay import InversionSettings

    cfg = compose(["inversion=paper", *sizes.inv_overrides])
    settings = InversionSettings.from_dict(OmegaConf.to_container(cfg.inversion, resolve=True))
    torch.manual_seed(0)
    n_out = PAPER_WORKLOAD["classes"] + 1
    # on the device before the generator is built: it sizes its fp16 GradScaler from there
    teacher = build_model(PAPER_WORKLOAD["teacher"], [n_out], None).to(sizes.device)
    student = build_model(PAPER_WORKLOAD["student"], [n_out], None).to(sizes.device)
    out = {"what": "DeepInversion iterations/s of one batch, paper preset",
           "settings": {"batch_size": settings.batch_size, "image_size": settings.image_size,
                        "iterations_low": settings.iterations_low,
                        "iterations_full": settings.iterations_full,
                        "precision": settings.precision},
           "workload": PAPER_WORKLOAD}
    for label, s in (("teacher", None), ("teacher_student", student)):
        low, full = iterations_per_s(teacher, s, settings, sizes)
        hours = workload_hours(settings, low, full)
        out[label] = {"iterations_per_s_low": low, "iterations_per_s_full": full, **hours}
        say(f"inversion ({label}): {low:.2f} it/s at {settings.image_size // 2} px, {full:.2f} "
            f"it/s at {settings.image_size} px; workload {hours['ours_gpu_hours']:.1f} h "
            f"(the paper's loop {hours['paper_loop_gpu_hours']:.1f})")
        gc.collect()
        if sizes.device == "cuda":
            torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------------
# 6. The adaptive budget with the auto batch: the paper workload's GPU-hours


def matmul_peak(sizes: Sizes, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` n x n matmuls, fp16 on CUDA (fp32 on the CPU): the
    attainable peak the generator's rate is a fraction of."""
    dtype = torch.float16 if sizes.device == "cuda" else torch.float32
    n = sizes.peak_n
    a = torch.randn(n, n, device=sizes.device, dtype=dtype)
    b = torch.randn(n, n, device=sizes.device, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        sync(sizes.device)
        t = time.perf_counter()
        a @ b
        sync(sizes.device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def adaptive_rates(teacher, student, settings, slots: int, sizes: Sizes) -> tuple[float, float]:
    """Image-iterations/s of ``slots`` busy slots at half and at full resolution."""
    from incseg.replay.adaptive import AdaptiveInversion, ImageJob
    from incseg.replay.verdicts import frozen

    rates = []
    with frozen(teacher, student):
        for stage in (0, 1):
            engine = AdaptiveInversion(teacher, settings, slots, sizes.device, student=student)
            for slot in range(slots):
                engine.place(slot, ImageJob(slot, 1 + slot % PAPER_WORKLOAD["classes"], 0),
                             stage=stage)
            try:
                for _ in range(sizes.adapt_warmup):
                    engine.step()
                sync(sizes.device)
                t = time.perf_counter()
                for _ in range(sizes.adapt_steps):
                    engine.step()
                sync(sizes.device)
                rates.append(sizes.adapt_steps * slots / (time.perf_counter() - t))
            finally:
                engine.close()
            del engine
            gc.collect()
            if sizes.device == "cuda":
                torch.cuda.empty_cache()
    return rates[0], rates[1]


def adaptive_hours(settings, low_rate: float, full_rate: float,
                   fractions: tuple[float, float] = (1.0, 1.0)) -> float:
    """GPU-hours of 15 classes x 32 images when each image takes ``fractions`` of each stage's
    maximum, at ``low_rate`` / ``full_rate`` image-iterations/s."""
    w = PAPER_WORKLOAD
    images = w["classes"] * w["images_per_class"]
    seconds = images * (fractions[0] * settings.iterations_low / low_rate
                        + fractions[1] * settings.iterations_full / full_rate)
    return seconds / 3600


def fractions_from_bench(path: Path, preset: str = "cpu") -> tuple[float, float]:
    """Mean iterations per image over each stage's maximum, from the adaptive benchmark of a
    ``run.py`` ``bench.json`` (its ``stage_iterations`` are not stored per stage there, so the
    mean of all iterations over their maximum stands for both stages)."""
    import json

    a = json.loads(Path(path).read_text())["results"]["adaptive"]["presets"][preset]
    frac = a["adaptive"]["iterations"]["mean"] / sum(a["max_iterations"])
    return frac, frac


def bench_adaptive(sizes: Sizes, fractions: tuple[float, float] | None,
                   fractions_from: str | None) -> dict:
    from incseg.replay import InversionSettings
    from incseg.replay.batching import auto_batch_size

    cfg = compose(["inversion=paper", *sizes.inv_overrides, "inversion.budget=adaptive",
                   # never met: the rates are measured with every slot busy for the whole run
                   "inversion.stop.min_prob=1.0"])
    settings = InversionSettings.from_dict(OmegaConf.to_container(cfg.inversion, resolve=True))
    settings = dataclasses.replace(settings, batch_size=sizes.adapt_batch)
    torch.manual_seed(0)
    n_out = PAPER_WORKLOAD["classes"] + 1
    teacher = build_model(PAPER_WORKLOAD["teacher"], [n_out], None).to(sizes.device)
    student = build_model(PAPER_WORKLOAD["student"], [n_out], None).to(sizes.device)
    images = PAPER_WORKLOAD["classes"] * PAPER_WORKLOAD["images_per_class"]
    size = settings.image_size
    peak = matmul_peak(sizes)
    out = {"what": "adaptive budget, paper preset: image-iterations/s with every slot busy",
           "settings": {"batch_size": settings.batch_size, "image_size": size,
                        "iterations_low": settings.iterations_low,
                        "iterations_full": settings.iterations_full,
                        "precision": settings.precision},
           "matmul_peak_flops_per_s": peak, "fractions": fractions,
           "fractions_from": fractions_from, "workload": PAPER_WORKLOAD}
    for label, s in (("teacher", None), ("teacher_student", student)):
        from incseg.replay.verdicts import frozen

        with frozen(teacher, s):
            slots = (auto_batch_size(teacher, settings, sizes.device, s, images)
                     if settings.batch_size == "auto" else int(settings.batch_size))
        low, full = adaptive_rates(teacher, s, settings, slots, sizes)
        models = [teacher] + ([s] if s is not None else [])
        flops_low = sum(bench.inversion_iteration_flops(m.cpu(), size // 2, sizes.flops_at // 2)
                        for m in models)
        flops_full = sum(bench.inversion_iteration_flops(m.cpu(), size, sizes.flops_at)
                         for m in models)
        for m in models:
            m.to(sizes.device)
        row = {"batch": slots, "image_iterations_per_s_low": low,
               "image_iterations_per_s_full": full,
               "flops_per_image_iteration": {"low": flops_low, "full": flops_full},
               "tflops_per_s": {"low": flops_low * low / 1e12, "full": flops_full * full / 1e12},
               "fraction_of_peak": {"low": flops_low * low / peak,
                                    "full": flops_full * full / peak},
               "gpu_hours_at_max": adaptive_hours(settings, low, full)}
        if fractions is not None:
            row["gpu_hours"] = adaptive_hours(settings, low, full, fractions)
        out[label] = row
        say(f"adaptive ({label}): batch {slots}, {low:.1f} / {full:.1f} image-it/s (half / full "
            f"size), {row['fraction_of_peak']['full']:.1%} of the matmul peak at full size; "
            f"workload {row['gpu_hours_at_max']:.2f} h at the maximum"
            + ("" if fractions is None else f", {row['gpu_hours']:.2f} h at the fractions"))
        gc.collect()
        if sizes.device == "cuda":
            torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------------
# The machine, the table, the file


def machine(sizes: Sizes) -> dict:
    m = bench.machine_info()
    m["device"] = sizes.device
    if sizes.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        m.update(gpu=p.name, gpu_memory_mib=p.total_memory / 2**20,
                 gpu_capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda,
                 cudnn=torch.backends.cudnn.version(), gpu_bf16=cuda_supports_bf16())
    return m


def table(results: dict) -> str:
    """The measured parts (a run of ``--parts`` has only those)."""
    lines = []
    if "train" in results:
        tr = results["train"]
        lines.append(f"training / eval images/s at {tr['crop']} px, batch {tr['batch']} "
                     f"(peak MiB); auto = {tr['auto']['variant']}")
        for name, m in tr["models"].items():
            lines.append(f"  {name} ({m['parameters'] / 1e6:.1f} M parameters): fastest "
                         f"{m['fastest']}, auto at "
                         + ("-" if m["auto_vs_fastest"] is None
                            else f"{m['auto_vs_fastest']:.2f}") + " of it")
            for var, row in m["variants"].items():
                mem = "-" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.0f}"
                lines.append(f"    {var:<26} train {row['images_per_s']:8.1f}   eval "
                             f"{row['eval_images_per_s']:8.1f}   peak {mem}")
    if "mib" in results:
        mib = results["mib"]
        lines.append(f"MiB step ({mib['precision']}, channels_last {mib['channels_last']}): "
                     f"Lightning {mib['lightning_images_per_s']:.1f} img/s, bare "
                     f"{mib['bare_images_per_s']:.1f} img/s, ratio "
                     f"{mib['lightning_vs_bare']:.2f}")
    inv = results.get("inversion", {})
    for label in ("teacher", "teacher_student") if inv else ():
        r = inv[label]
        lines.append(f"DeepInversion ({label}): {r['iterations_per_s_low']:.2f} / "
                     f"{r['iterations_per_s_full']:.2f} it/s (half / full size); paper workload "
                     f"{r['ours_gpu_hours']:.1f} device-hours with the preset, "
                     f"{r['paper_loop_gpu_hours']:.1f} with every iteration at full size "
                     f"(the paper: {PAPER_WORKLOAD['t4_hours']:g} T4-hours)")
    ad = results.get("adaptive", {})
    for label in ("teacher", "teacher_student") if ad else ():
        r = ad[label]
        lines.append(
            f"adaptive budget ({label}): auto batch {r['batch']}, "
            f"{r['image_iterations_per_s_low']:.1f} / {r['image_iterations_per_s_full']:.1f} "
            f"image-it/s (half / full size), {r['tflops_per_s']['full']:.1f} TFLOP/s = "
            f"{100 * r['fraction_of_peak']['full']:.1f}% of the matmul peak; paper workload "
            f"{r['gpu_hours_at_max']:.2f} device-hours at the maximum"
            + ("" if "gpu_hours" not in r else
               f", {r['gpu_hours']:.2f} at stage fractions {ad['fractions']}"))
    return "\n".join(lines)


def run(sizes: Sizes, out: Path, parts=PARTS, fractions: tuple[float, float] | None = None,
        fractions_from: str | None = None) -> dict:
    quiet_lightning()
    warnings.filterwarnings("ignore", message=".*validation_step.*but have no.*")
    out.mkdir(parents=True, exist_ok=True)
    info = machine(sizes)
    say(f"{sizes.name}: {info.get('gpu', info['cpu'])}")
    start = time.perf_counter()
    results: dict = {}
    doc = {"machine": info, "results": results}

    def part(name, fn):
        # each part is written as soon as it is measured: a device lease that ends mid-run (a
        # per-call time limit) still leaves the finished parts in gpu_bench.json
        results[name] = fn()
        results["run"] = {"variant": sizes.name, "sizes": dataclasses.asdict(sizes),
                          "parts": [k for k in results if k != "run"],
                          "wall_s": time.perf_counter() - start}
        atomic_write_json(out / "gpu_bench.json", doc)

    # the generator's cost first: the figure the paper's GPU-hours are compared with
    if "inversion" in parts:
        part("inversion", lambda: bench_inversion(sizes))
    if "adaptive" in parts:
        part("adaptive", lambda: bench_adaptive(sizes, fractions, fractions_from))
    if "mib" in parts:
        with tempfile.TemporaryDirectory(prefix="incseg-gpu-bench-") as work:
            part("mib", lambda: bench_mib(sizes, Path(work)))
    if "train" in parts:
        part("train", lambda: bench_models(sizes))
    print(table(results))
    say(f"done in {results['run']['wall_s']:.0f} s: {out / 'gpu_bench.json'}")
    return doc


def check_args(args) -> tuple[tuple[str, ...], tuple[float, float] | None, str | None]:
    """``(parts, stage fractions, where they come from)``; ValueError with the one line to
    show for a bad ``--parts``, ``--stage-fractions`` or ``--from-bench``."""
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise ValueError(f"--parts {args.parts}: unknown part(s) {', '.join(unknown)}; choose "
                         f"from {', '.join(PARTS)}")
    if args.stage_fractions:
        try:
            fractions = tuple(float(f) for f in args.stage_fractions.split(","))
        except ValueError:
            fractions = ()
        if len(fractions) != 2 or not all(0 < f <= 1 for f in fractions):
            raise ValueError(f"--stage-fractions {args.stage_fractions}: give two numbers in "
                             "(0, 1], the mean iterations per image over each stage's maximum, "
                             "e.g. --stage-fractions 0.2,0.3")
        return parts, fractions, "--stage-fractions"
    if args.from_bench:
        try:
            return parts, fractions_from_bench(args.from_bench), str(args.from_bench)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"--from-bench {args.from_bench}: no adaptive benchmark of the cpu "
                             f"preset there ({type(err).__name__}); run experiments/bench/run.py "
                             "--only adaptive first and pass its bench.json") from None
    return parts, None, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true",
                    help="seconds on the CPU at tiny sizes: checks the script only")
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu_bench.json")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated subset of {','.join(PARTS)}")
    frac = ap.add_mutually_exclusive_group()
    frac.add_argument("--stage-fractions", default=None,
                      help="LOW,FULL: mean iterations per image of the adaptive budget as "
                           "fractions of each stage's maximum (e.g. 0.2,0.3)")
    frac.add_argument("--from-bench", type=Path, default=None,
                      help="a run.py bench.json with the adaptive benchmark: its cpu preset's "
                           "mean iterations per image over the maximum, for both stages")
    args = ap.parse_args(argv)
    try:
        parts, fractions, source = check_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.tiny and not torch.cuda.is_available():
        print("error: experiments/bench/gpu.py measures a GPU and torch sees none "
              "(torch.cuda.is_available() is False); run it on a GPU machine, or with --tiny to "
              "check the script on the CPU", file=sys.stderr)
        return 2
    run(TINY if args.tiny else GPU, args.out, parts, fractions, source)
    return 0


if __name__ == "__main__":
    sys.exit(main())

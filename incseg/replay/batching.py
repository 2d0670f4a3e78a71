"""A set's images through the adaptive budget's slots: how many slots (``batch_size: auto``),
and the plan batches as they complete (:func:`synthesise_stream`), which the cache commits one
by one (:mod:`incseg.replay.fill`) and :func:`~incseg.replay.synthesis.synthesise` collects.

One optimisation batch spans several plan batches here, so unlike the fixed budget's batches
(one ``Trainer.fit`` each) the images run in one plain loop with a progress bar of its own.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from incseg.replay.adaptive import AdaptiveInversion, Finished, ImageJob
from incseg.replay.settings import AUTO_BATCH_CPU, InversionSettings, batch_plan
from incseg.replay.verdicts import frozen, teacher_verdicts

__all__ = ["auto_batch_size", "batch_from_peaks", "synthesise_adaptive", "synthesise_stream"]

log = logging.getLogger("incseg.replay")

#: share of the free device memory ``batch_size: auto`` leaves unused (allocator fragmentation,
#: cuDNN workspaces that differ between batch sizes)
AUTO_MARGIN = 0.15
#: the two batch sizes whose peak memory ``auto`` extrapolates from
AUTO_PROBES = (2, 4)


# --------------------------------------------------------------------------------------------
# How many images per optimisation batch


def auto_batch_size(teacher: nn.Module, settings: InversionSettings, device,
                    student: nn.Module | None = None, n_images: int | None = None) -> int:
    """The images per optimisation batch ``batch_size: auto`` takes.

    CUDA: one full-resolution iteration (the larger stage, student included) at
    ``AUTO_PROBES`` = 2 and 4 images, each from a reset peak of
    ``torch.cuda.max_memory_allocated``; the difference gives the memory per image, the rest
    the fixed part, and the batch is the largest whose linear extrapolation fits in the free
    device memory less a ``AUTO_MARGIN`` share. Elsewhere: ``AUTO_BATCH_CPU``. Never more than
    the ``n_images`` to make.
    """
    device = torch.device(device)
    cap = int(n_images) if n_images else None
    if device.type != "cuda":
        n = AUTO_BATCH_CPU
    else:
        peaks = []
        for b in AUTO_PROBES:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            probe = AdaptiveInversion(teacher, settings, b, device, student=student)
            for slot in range(b):
                probe.place(slot, ImageJob(-1 - slot, 1, -1), stage=1)
            probe.step()
            probe.close()
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - before)
            del probe
        torch.cuda.empty_cache()
        n = batch_from_peaks(AUTO_PROBES, peaks, torch.cuda.mem_get_info(device)[0])
    return max(1, min(n, cap)) if cap else n


def batch_from_peaks(probes: Sequence[int], peaks: Sequence[float], free: float,
                     margin: float = AUTO_MARGIN) -> int:
    """The largest batch whose memory, extrapolated linearly from the peak bytes ``peaks`` of
    the batches ``probes`` (two of them), fits in ``(1 - margin) * free`` bytes; at least 1."""
    (b1, b2), (p1, p2) = probes, peaks
    per_image = max((p2 - p1) / (b2 - b1), 1.0)
    fixed = max(p1 - b1 * per_image, 0.0)
    usable = free * (1.0 - margin)
    n = max(int((usable - fixed) // per_image), 1)
    log.info("inversion batch_size=auto: %.0f MiB per image, %.0f MiB fixed, %.0f MiB usable: "
             "%d images", per_image / 2**20, fixed / 2**20, usable / 2**20, n)
    return n


# --------------------------------------------------------------------------------------------
# A set's batches through the slots


def synthesise_stream(teacher: nn.Module, targets: Sequence[int], settings: InversionSettings,
                      student: nn.Module | None = None, progress: bool = True,
                      device: str | torch.device = "cpu",
                      batches: Sequence[int] | None = None,
                      ) -> Iterator[tuple[int, Tensor, dict[str, Any]]]:
    """The images of the plan batches ``batches`` (default all) with the adaptive budget,
    ``(k, images of batch k on the CPU, record)`` as soon as batch k's images are all done.

    The record has the fixed budget's per-batch keys (losses are means over the batch's
    images of each image's own) plus ``image_iterations`` (iterations each image took, both
    stages) and ``stage_iterations`` (``[half, full]`` per image), ``slots`` (the batch size
    used). The teacher and student are frozen and moved to ``device`` for the duration.
    """
    plan = batch_plan(targets, settings)
    indices = list(range(len(plan))) if batches is None else [int(k) for k in batches]
    for k in indices:
        if not 0 <= k < len(plan):
            raise ValueError(f"batch {k} outside the plan of {len(plan)} batches")
    device = torch.device(device)
    first = [sum(len(b) for b in plan[:k]) for k in range(len(plan))]
    jobs = [ImageJob(first[k] + j, t, k) for k in indices for j, t in enumerate(plan[k])]
    pending = {k: len(plan[k]) for k in indices}
    got: dict[int, dict[int, Finished]] = {k: {} for k in indices}
    with frozen(teacher, student, device=device):
        slots = settings.batch_size
        if slots == "auto":
            slots = auto_batch_size(teacher, settings, device, student, len(jobs))
        slots = max(1, min(int(slots), len(jobs) or 1))
        engine = AdaptiveInversion(teacher, settings, slots, device, student=student)
        bar = tqdm(total=len(jobs), desc="inversion (adaptive)", leave=False, file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        t0 = tb = time.perf_counter()
        try:
            for fin in engine.run(jobs, bar):
                k = fin.job.batch
                got[k][fin.job.index] = fin
                pending[k] -= 1
                if pending[k]:
                    continue
                batch = got.pop(k)
                done = [batch[i] for i in sorted(batch)]
                images = torch.stack([f.image for f in done])
                tgt = torch.tensor([f.job.target for f in done], dtype=torch.long)
                pred, conf, _ = teacher_verdicts(teacher, images.to(device), tgt.to(device),
                                                 settings)
                its = [sum(f.stage_iterations) for f in done]
                now = time.perf_counter()
                yield k, images, {
                    "index": k, "count": len(done), "iterations": max(its),
                    "start_loss": _mean(f.start_loss for f in done),
                    "final_loss": _mean(f.final_loss for f in done),
                    "best_loss": _mean(f.best_loss for f in done),
                    "teacher_pred": pred.tolist(), "teacher_conf": conf.tolist(),
                    "image_iterations": its,
                    "stage_iterations": [f.stage_iterations for f in done],
                    "slots": slots, "seconds": now - tb,
                }
                tb = now
        finally:
            bar.close()
            engine.close()
        log.info("inversion (adaptive): %d images in %.1f s, %d optimisation steps of up to %d "
                 "images", len(jobs), time.perf_counter() - t0, engine.steps, slots)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def synthesise_adaptive(teacher: nn.Module, targets: Sequence[int], settings: InversionSettings,
                        student: nn.Module | None = None, progress: bool = True,
                        device: str | torch.device = "cpu",
                        batches: Sequence[int] | None = None) -> tuple[Tensor, dict[str, Any]]:
    """:func:`~incseg.replay.synthesis.synthesise`'s result with the adaptive budget: the
    batches in plan order, ``info`` as there plus the per-batch ``image_iterations``."""
    plan = batch_plan(targets, settings)
    indices = list(range(len(plan))) if batches is None else [int(k) for k in batches]
    t0 = time.perf_counter()
    out = {k: (images, rec) for k, images, rec in
           synthesise_stream(teacher, targets, settings, student, progress, device, indices)}
    records = [out[k][1] for k in indices]
    images = (torch.cat([out[k][0] for k in indices]) if indices else
              torch.zeros(0, 3, settings.image_size, settings.image_size))
    info = {
        "batches": records,
        "targets": [t for k in indices for t in plan[k]],
        "teacher_pred": [p for r in records for p in r["teacher_pred"]],
        "teacher_conf": [c for r in records for c in r["teacher_conf"]],
        "image_iterations": [i for r in records for i in r["image_iterations"]],
        "seconds": time.perf_counter() - t0,
    }
    return images, info

"""A set's batches, each a ``Trainer.fit`` of its :class:`InversionModule`: :func:`synthesise`.

Manual optimisation, the image batch is the parameter, one dataloader item per iteration; the
device, the progress bar and the loggers are the Trainer's, as in every other stage. The numeric
format is the generator's own (``inversion.precision``, part of the cache key): the Trainer runs
at 32-true and the module autocasts its forward passes, the same operations as
:meth:`InversionModule.run`, the plain loop, which gives the same images to the bit on a CPU.
"""

from __future__ import annotations

import signal
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from incseg.checkpoints import StderrProgressBar
from incseg.replay.generator import InversionModule
from incseg.replay.settings import InversionSettings, batch_plan
from incseg.replay.verdicts import frozen

__all__ = ["inversion_trainer", "synthesise"]


def inversion_trainer(device: str | torch.device = "cpu", progress: bool = True,
                      loggers: Sequence = (), log_every_n_steps: int = 50) -> L.Trainer:
    """A Trainer that fits one batch on ``device`` (one device: under DDP every rank fits its
    own batches, nothing to synchronise); 32-true, the module autocasts itself."""
    device = torch.device(device)
    accelerator = "gpu" if device.type == "cuda" else device.type
    return L.Trainer(
        accelerator=accelerator, devices=[device.index or 0] if accelerator == "gpu" else 1,
        precision="32-true", max_epochs=1, logger=list(loggers) or False,
        callbacks=[StderrProgressBar(leave=False)] if progress else [],
        enable_progress_bar=progress, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=False,
        log_every_n_steps=int(log_every_n_steps))


def _fit(trainer: L.Trainer, module: InversionModule) -> None:
    """``trainer.fit``; Ctrl-C stays a KeyboardInterrupt (Lightning turns it into exit status 1
    with SIGINT ignored from then on): the finished batches are kept, a rerun resumes."""
    try:
        trainer.fit(module)
    except SystemExit:
        if trainer.state.status != TrainerStatus.INTERRUPTED:
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt from None


def synthesise(
    teacher: nn.Module,
    targets: list[int],
    settings: InversionSettings,
    student: nn.Module | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    batches: Sequence[int] | None = None,
    trainer: Callable[[int], L.Trainer] | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Synthesise ``settings.n_per_class`` images per target channel (see :func:`batch_plan`).

    Args:
        teacher: frozen segmentation model of the previous step (its mode, ``requires_grad``
            flags and device are restored afterwards; weights and buffers are not written).
        targets: target channels (old foreground classes, ``1..C_o-1``).
        settings: :class:`InversionSettings`.
        student: optional frozen competition student.
        progress: a progress bar on stderr.
        device: where to optimise.
        batches: only these batch indices of the plan (default: all), e.g. to resume.
        trainer: the Trainer that fits batch ``k``, ``trainer(k)`` (default:
            :func:`inversion_trainer` on ``device``, no logger); a new one per batch.

    Returns:
        ``(images N x 3 x H x W normalised on CPU, info)``; ``info`` has ``batches`` (per batch:
        index, count, iterations, start/final/best loss, teacher_pred, teacher_conf, seconds),
        the flat per-image ``targets``, ``teacher_pred``, ``teacher_conf`` and ``seconds``.

    With ``settings.budget == "adaptive"`` the images of all the given batches share refilled
    optimisation slots in one plain loop (:mod:`incseg.replay.adaptive`; one optimisation
    batch spans several plan batches, so there is no per-batch Trainer) and ``info`` adds the
    iterations each image took.
    """
    if settings.adaptive and settings.iterations_low + settings.iterations_full > 0:
        from incseg.replay.batching import synthesise_adaptive

        return synthesise_adaptive(teacher, targets, settings, student, progress, device,
                                   batches)
    plan = batch_plan(targets, settings)
    indices = list(range(len(plan))) if batches is None else [int(k) for k in batches]
    for k in indices:
        if not 0 <= k < len(plan):
            raise ValueError(f"batch {k} outside the plan of {len(plan)} batches")
    device = torch.device(device)
    if trainer is None:
        def trainer(k: int) -> L.Trainer:
            return inversion_trainer(device, progress)
    images, records = [], []
    t0 = time.perf_counter()
    with frozen(teacher, student, device=device):
        for k in indices:
            tb = time.perf_counter()
            module = InversionModule(teacher, plan[k], settings, student=student, batch_index=k)
            module.to(device)
            if module.total_iterations:  # none for the noise control
                try:
                    # Lightning draws nothing the images depend on (they have their own
                    # generator); isolated all the same, so the protocol's streams go on as
                    # if the set had come from the cache
                    with isolate_rng(include_cuda=device.type == "cuda"), \
                            warnings.catch_warnings():
                        # the frozen teacher (and student) are in eval mode on purpose; the
                        # module logs at its own steps, not at Lightning's logging interval
                        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode")
                        warnings.filterwarnings("ignore", message=".*the logging interval")
                        _fit(trainer(k), module)
                finally:
                    module.detach_hooks()
            images.append(module.result_images().cpu())
            rec = module.summary()
            rec["seconds"] = time.perf_counter() - tb
            records.append(rec)
            del module
    out = torch.cat(images) if images else torch.zeros(0, 3, settings.image_size,
                                                       settings.image_size)
    info = {
        "batches": records,
        "targets": [t for k in indices for t in plan[k]],
        "teacher_pred": [p for r in records for p in r["teacher_pred"]],
        "teacher_conf": [c for r in records for c in r["teacher_conf"]],
        "seconds": time.perf_counter() - t0,
    }
    return out, info

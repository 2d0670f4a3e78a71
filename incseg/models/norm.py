"""BatchNorm modes for a block of code, and freezing a model.

Distillation compares a training student with a frozen teacher; which statistics each
normalises with decides what a distance measures. These contexts set every BatchNorm of a model
to a mode for one forward, whatever mode the rest of the model is in, and restore it after.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["batch_statistics", "freeze", "running_statistics", "teacher_statistics"]


def freeze(model: nn.Module) -> nn.Module:
    """A frozen previous model: eval mode (BN running statistics fixed), no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@contextmanager
def _bn_mode(model: torch.nn.Module, training: bool, track_running_stats: bool | None = None):
    """Set every BatchNorm of ``model`` to ``training`` (and ``track_running_stats``) for the
    block, whatever mode the rest of the model is in; restored afterwards."""
    saved = []
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            saved.append((mod, mod.training, mod.track_running_stats))
            mod.training = training
            if track_running_stats is not None:
                mod.track_running_stats = track_running_stats
    try:
        yield model
    finally:
        for mod, training_, track in saved:
            mod.training, mod.track_running_stats = training_, track


def running_statistics(model: torch.nn.Module):
    """Run ``model``'s BatchNorms on their running statistics (as in eval mode), without
    updating them, while the rest of the model stays in training mode.

    The replay forward of the student uses it: the frozen teacher scores the synthetic batch
    with running statistics, so a train-mode student would differ from it by the BN mode alone
    and be pushed to distort its weights to close that gap; and synthetic batches would leak
    into the running statistics used at test time (measured in docs/measurements.md).
    """
    return _bn_mode(model, training=False)


@contextmanager
def teacher_statistics(model: torch.nn.Module, teacher: torch.nn.Module):
    """Run ``model``'s BatchNorms in eval mode on the *teacher's* running statistics (the
    BatchNorms are paired by name; the student is a copy of its teacher, so every one has a
    twin), without updating any buffer; restored afterwards.

    Why one would: the synthetic images are made to match the teacher's BN statistics (the
    old data's), while the student's own running statistics drift within a few iterations toward
    the current step's data (on 15-5s, images of one class), so with ``bn=running`` part of the
    replay distance measures that drift rather than the weights'. It did not cure the MSE
    replay instability it was written for (docs/measurements.md); kept as an ablation, the
    default is ``running``.
    """
    twins = dict(teacher.named_modules())
    pairs = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            twin = twins.get(name)
            if not isinstance(twin, torch.nn.modules.batchnorm._BatchNorm) or \
                    twin.running_mean is None or twin.running_mean.shape != mod.running_mean.shape:
                raise ValueError(f"replay.bn=teacher: the teacher has no BatchNorm {name!r} "
                                 "matching the student's")
            pairs.append((mod, twin))
    saved = [(mod, mod.running_mean, mod.running_var) for mod, _ in pairs]
    for mod, twin in pairs:
        mod._buffers["running_mean"] = twin.running_mean
        mod._buffers["running_var"] = twin.running_var
    try:
        with running_statistics(model):  # eval-mode BN on the swapped-in statistics
            yield model
    finally:
        for mod, mean, var in saved:
            mod._buffers["running_mean"], mod._buffers["running_var"] = mean, var


def batch_statistics(model: torch.nn.Module):
    """Run ``model``'s BatchNorms on the batch's statistics without touching their buffers.

    The student trains with BN in training mode (batch statistics); a teacher in eval mode
    normalises with running statistics. On batches drawn from a few new classes the two differ
    a lot (docs/measurements.md), so a feature MSE against an eval-mode teacher penalises the
    BN mode, not the drift of the weights. Inside this context the teacher normalises like the
    student: at the start of a step the two features are equal and the MSE is 0.
    """
    return _bn_mode(model, training=True, track_running_stats=False)  # no buffer update

"""Model hand-over files and Lightning's epoch checkpoints, written atomically, loaded safely.

A step's model is handed to the next step through ``checkpoints/step<t>.pt``: the state dict
plus what it is (model name, classes per step, task steps), so a checkpoint from another task or
model is refused with one line instead of a shape error deep inside ``load_state_dict``.
Everything is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from incseg.errors import CheckpointError, TrainingError
from incseg.io import atomic_path
from incseg.models import build_model, model_config

log = logging.getLogger(__name__)

FORMAT = "incseg-model/1"


def safe_load(path: str | Path, what: str = "checkpoint") -> dict:
    """``torch.load(weights_only=True)`` with a one-line error for a truncated/foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist", reason="it does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle of foreign objects, ...
        reason = f"unreadable or truncated: {type(err).__name__}"
        raise CheckpointError(f"{what} {path} is unreadable or truncated ({type(err).__name__}); "
                              "delete it and rerun to rebuild it", reason=reason) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path} is not an incseg checkpoint",
                              reason=f"it holds a {type(obj).__name__}, not a checkpoint")
    return obj


def save_model(path: str | Path, model, model_cfg, task_steps, step: int,
               extra: dict | None = None) -> None:
    """Write a step's model with what it is: its config (rebuilt from it on load), its classes
    per step and the task's steps, so a model of another task or architecture is refused."""
    cfg = model_config(model_cfg)
    payload = {"format": FORMAT, "model": cfg.get("name"), "model_config": cfg,
               "classes_per_step": model.classes_per_step,
               "task_steps": [list(map(int, s)) for s in task_steps], "step": int(step),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               **(extra or {})}
    buf = io.BytesIO()
    torch.save(payload, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def read_model_file(path: str | Path) -> dict:
    """A model file's contents, refused with one line when it is not one of ours."""
    ckpt = safe_load(path, "model checkpoint")
    if ckpt.get("format") != FORMAT or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not an incseg model checkpoint (format "
                              f"{ckpt.get('format')!r}); pass a checkpoints/step<t>.pt of a run, "
                              "or delete it and rerun",
                              reason=f"not an incseg model checkpoint: format "
                                     f"{ckpt.get('format')!r}")
    return ckpt


def model_from_checkpoint(ckpt: dict, path: str | Path):
    """The model a checkpoint holds, rebuilt from its stored config (older files name a
    ``conf/model`` choice instead), with its weights loaded."""
    spec = ckpt.get("model_config") or str(ckpt.get("model"))
    try:
        model = build_model(spec, [int(n) for n in ckpt["classes_per_step"]])
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint {path} does not fit a {ckpt.get('model')}: {detail}",
                              reason=f"does not fit a {ckpt.get('model')}: {detail}") from None
    return model


def load_model(path: str | Path, model_cfg, task_steps, step: int, ckpt: dict | None = None):
    """The model of ``step`` saved by :func:`save_model`; its classes and architecture must
    match the task and the config. ``ckpt``: the file's contents when already read."""
    ckpt = read_model_file(path) if ckpt is None else ckpt
    want = [list(map(int, s)) for s in task_steps[: step + 1]]
    have = ckpt.get("task_steps", [])[: ckpt.get("step", -1) + 1]
    if have != want:
        raise CheckpointError(
            f"checkpoint {path} was trained on classes {have} but step {step} of this task needs "
            f"{want}; use the checkpoint of the same task or resume=never to retrain",
            reason=f"trained on classes {have}, not {want}")
    name = model_config(model_cfg).get("name")
    if ckpt.get("model") != name:
        raise CheckpointError(f"checkpoint {path} holds a {ckpt.get('model')} but the config "
                              f"asks for {name}; set model={ckpt.get('model')}",
                              reason=f"it holds a {ckpt.get('model')}, not a {name}")
    return model_from_checkpoint(ckpt, path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written by temp file + rename; read with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        with atomic_path(path) as tmp:
            tmp.write_bytes(buf.getvalue())

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return safe_load(path, "epoch checkpoint")


def first_non_finite(module: torch.nn.Module) -> str | None:
    """The name of the first parameter or floating buffer holding a NaN or an infinity."""
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


class EpochCheckpoint(Callback):
    """Save the whole training state at every epoch end (resume restarts the next epoch).

    The loss is checked at every batch, but the optimiser step after the last finite loss of an
    epoch can still overflow the weights; such a state is never saved over the previous epoch's
    checkpoint, so the file on disk is always the last good one.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        bad = first_non_finite(pl_module)
        if bad is not None:
            kept = (f"the last good checkpoint {self.path} is kept, so rerunning resumes from it"
                    if self.path.exists() else "no epoch of this stage finished cleanly")
            raise TrainingError(
                f"non-finite weights ({bad}) at the end of step {getattr(pl_module, 'step', '?')}"
                f", epoch {trainer.current_epoch}; lower the learning rate (train.lr / "
                f"train.lr_incremental) or use trainer.precision=32-true — {kept}"
            )
        trainer.save_checkpoint(self.path)


class StderrProgressBar(TQDMProgressBar):
    """Lightning's bars write to stdout; ours go to stderr so stdout carries only results."""

    def _on_stderr(self, init):
        with contextlib.redirect_stdout(sys.stderr):
            return init()

    def init_sanity_tqdm(self):
        return self._on_stderr(super().init_sanity_tqdm)

    def init_train_tqdm(self):
        return self._on_stderr(super().init_train_tqdm)

    def init_validation_tqdm(self):
        return self._on_stderr(super().init_validation_tqdm)

    def init_test_tqdm(self):
        return self._on_stderr(super().init_test_tqdm)

    def init_predict_tqdm(self):
        return self._on_stderr(super().init_predict_tqdm)

"""Run state for exact resume, content fingerprints, and the ranks of a DDP run.

The run directory is deterministic; ``state.json`` records the config hash and the finished
steps. Rerunning the same command skips finished steps and restarts an interrupted one from its
last epoch-end checkpoint (RNG states inside). Every random draw of a step derives from
(seed, step[, epoch]), so a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from incseg.checkpoints import read_model_file
from incseg.errors import CheckpointError, ConfigError
from incseg.io import atomic_write_json, stable_hash
from incseg.precision import training_format

log = logging.getLogger("incseg.protocol")

#: config keys that do not change a run's numbers (ignored by the resume check and cache keys)
VOLATILE = ("resume", "logger", "paths", "hydra", "experiment")


def is_rank_zero() -> bool:
    """Lightning's DDP relaunches the command per rank with LOCAL_RANK/NODE_RANK set."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def is_distributed(cfg: DictConfig) -> bool:
    """The config asks for several processes (trainer=ddp): known before any process starts."""
    tc = cfg.trainer
    return str(tc.strategy).startswith("ddp") and (
        int(tc.get("num_nodes", 1)) > 1 or str(tc.devices) not in ("1", "auto"))


def world_size(cfg: DictConfig) -> int:
    """How many processes train (devices x nodes under DDP, else 1): a DDP-trained model
    differs from a one-process one (per-rank BatchNorm statistics, which rank sees which
    sample), so caches must not mix them."""
    tc = cfg.trainer
    if not str(tc.strategy).startswith("ddp"):
        return 1
    devices = tc.devices
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        n = len(devices)
    elif str(devices) in ("auto", "-1"):
        gpu = str(tc.accelerator) in ("gpu", "cuda") or (
            str(tc.accelerator) == "auto" and torch.cuda.is_available())
        n = max(1, torch.cuda.device_count()) if gpu else 1
    else:
        n = int(devices)
    return n * int(tc.get("num_nodes", 1))


def barrier() -> None:
    """Wait for every rank (no-op in one process): rank 0 has written what the others read."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def derive_seed(*parts: int) -> int:
    """A seed for (seed, step[, epoch]): independent of what ran before in this process."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def fingerprint(cfg: DictConfig) -> dict:
    """The resolved config minus keys that cannot change the numbers."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in VOLATILE:
        plain.pop(key, None)
    plain.get("data", {}).pop("num_workers", None)
    plain.get("trainer", {}).pop("progress_bar", None)
    plain.get("trainer", {}).pop("timeout_s", None)  # how long a dead rank is waited for
    for group in ("method", "model"):
        plain.get(group, {}).pop("label", None)  # a display name
    ds = plain.get("dataset")
    if isinstance(ds, dict):
        # a pretraining the run does not use is not part of it: a run from random weights is
        # the one it was before either existed, a corpus run the one it was before the
        # segmentation pretraining existed, under the same hashes and caches
        used = str(ds.get("pretrained")).strip().lower()
        unused = [w for w in ("corpus", "segmentation") if w in ds and used != w]
        for word in unused:
            ds.pop(word)
        if unused and ds.get("pretrained") is None:
            ds.pop("pretrained", None)
    gen = ds.get("generator") if isinstance(ds, dict) else None
    if isinstance(gen, dict) and gen.get("classes") == "twins":
        # shapes' default class design: the run is the one it was before the choice existed
        gen.pop("classes")
    mem = plain.get("memory")
    if isinstance(mem, dict) and (not _positive(mem.get("size"))
                                  or plain.get("method", {}).get("joint", False)):
        # no labelled memory (or Joint, which ignores it): the run is the one it was before
        # the memory block existed, under the same hash and caches
        plain.pop("memory")
    if (plain.get("eval") or {}).get("hiou", "suite") == "suite":
        # the default hIoU: the run is the one it was before the choice existed
        plain.pop("eval", None)
    if "trainer" in plain and "train" in plain and "data" in plain:
        # what the numbers depend on is the resolved format, not the word "auto": a run or a
        # cache entry made with an explicit 32-true is the same as one that auto resolved so
        fmt = training_format(cfg)
        plain["trainer"]["precision"] = fmt.precision
        plain["train"]["channels_last"] = fmt.channels_last
    return plain


def _positive(value) -> bool:
    try:
        return int(value) > 0
    except (TypeError, ValueError):
        return True  # not a size at all: left in, the config check refuses it


def usable_model(path: Path) -> bool:
    """A finished step's model file is readable and ours (a truncated or foreign file is
    reported, then the step is trained again: never loaded)."""
    if not path.exists():
        return False
    try:
        read_model_file(path)
    except CheckpointError as err:
        log.warning("model checkpoint %s is unusable (%s); training that step again now",
                    path, err.reason)
        return False
    return True


@dataclass
class RunState:
    """``state.json``: which steps of this run are finished, under which config."""

    path: Path
    config_hash: str
    steps: dict[int, dict] = field(default_factory=dict)

    @classmethod
    def open(cls, run_dir: Path, cfg: DictConfig) -> RunState:
        path = run_dir / "state.json"
        h = stable_hash(fingerprint(cfg))
        # DDP ranks > 0 start (Lightning relaunches the command) when rank 0 reaches its first
        # fit or test; by then rank 0 has removed a stale run (resume=never) and written nothing
        # new, so they read the state as rank 0 saw it and never delete anything themselves.
        if not path.exists() or (cfg.resume == "never" and is_rank_zero()):
            if is_rank_zero():
                for stale in ("checkpoints", "memory", "state.json", "results.json"):
                    p = run_dir / stale
                    if p.is_dir():
                        shutil.rmtree(p)
                    elif p.exists():
                        p.unlink()
            return cls(path, h)
        try:
            data = json.loads(path.read_text())
        except ValueError:
            log.warning("%s is corrupt; starting the run afresh", path)
            return cls(path, h)
        if data.get("config_hash") != h:
            raise ConfigError(
                f"{run_dir} holds a run with a different config; rerun with resume=never to "
                "replace it, or choose another directory with hydra.run.dir=DIR"
            )
        steps = {int(k): v for k, v in data.get("steps", {}).items()}
        if steps:
            log.info("resuming %s: steps %s already finished", run_dir, sorted(steps))
        return cls(path, h, steps)

    def forget_from(self, step: int) -> None:
        """Mark ``step`` and every later step unfinished (their models are rebuilt)."""
        stale = [k for k in self.steps if k >= step]
        if stale:
            log.info("steps %s will be trained again", sorted(stale))
            for k in stale:
                del self.steps[k]
            self._write()

    def finish_step(self, step: int, record: dict) -> None:
        self.steps[step] = record
        self._write()

    def _write(self) -> None:
        if not is_rank_zero():  # the other ranks keep the same state in memory
            return
        atomic_write_json(self.path, {"config_hash": self.config_hash,
                                      "steps": {str(k): v for k, v in sorted(self.steps.items())}})

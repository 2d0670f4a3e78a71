"""A new Trainer per stage, its loggers and the DataModule of a step, built from the config.

A finished Trainer is never reused (fitting it again silently does nothing). The Trainer is
``conf/trainer``'s ``_target_``; the loggers are the ``_target_`` factories that
``conf/logger`` lists, each called with the stage it logs.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import subprocess
import warnings
from contextlib import contextmanager
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from incseg.checkpoints import (
    AtomicCheckpointIO,
    EpochCheckpoint,
    StderrProgressBar,
    safe_load,
)
from incseg.config.build import instantiate
from incseg.data.datamodule import IncrementalDataModule
from incseg.errors import CheckpointError, Interrupted
from incseg.precision import cpu_kernels, cpu_model, training_format
from incseg.protocol.state import derive_seed, fingerprint
from incseg.systems.base import Recipe
from incseg.tasks import Task

log = logging.getLogger("incseg.protocol")

#: keys of ``conf/trainer`` that are incseg's, not the Trainer's
TRAINER_OWN_KEYS = ("progress_bar", "sync_batchnorm", "strategy", "precision", "timeout_s")


class Stage:
    """What the loggers of one stage are told: the run, the stage (``step0``, ``step1``, ...,
    ``joint``), its step, the W&B job type (teacher | student) and the run's config. A plain
    class, not a dataclass: Hydra's ``instantiate`` would turn a dataclass argument into a
    config node."""

    def __init__(self, run_dir: Path, name: str, step: int, job_type: str, cfg: DictConfig):
        self.run_dir, self.name, self.step = Path(run_dir), name, step
        self.job_type, self.cfg = job_type, cfg


def csv_logger(stage: Stage):
    """``<run_dir>/logs/<stage>/metrics.csv``."""
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=str(stage.run_dir), name="logs", version=stage.name)


def wandb_logger(stage: Stage, project: str = "incseg", entity: str | None = None,
                 offline: bool = True):
    """W&B: group = the protocol run, job_type = teacher / student, name = the stage. None
    under ``WANDB_MODE=disabled``: W&B's own switch for "no W&B at all" (what CI and tests
    set), which an explicit ``offline=True`` would otherwise override, leaving offline runs."""
    from lightning.pytorch.loggers import WandbLogger

    if os.environ.get("WANDB_MODE", "").strip().lower() == "disabled":
        return None
    cfg = stage.cfg
    logger = WandbLogger(
        project=str(project), entity=entity, group=str(stage.run_dir), job_type=stage.job_type,
        name=stage.name, save_dir=str(stage.run_dir), offline=bool(offline),
        reinit="finish_previous",
        config={"task": str(cfg.task.name), "method": str(cfg.method.name), "step": stage.step,
                "seed": int(cfg.seed), "dataset": str(cfg.dataset.name),
                "config": fingerprint(cfg)})
    # Lightning hands wandb.init an `anonymous` argument always (None unless asked for); W&B
    # removed anonymous mode (wandb/wandb#10909) and warns on every run for any value it is
    # given. Not passing it is what W&B asks for; Lightning offers no switch to leave it out.
    logger._wandb_init.pop("anonymous", None)
    return logger


def make_loggers(stage: Stage) -> list:
    """A new stage's loggers. Any W&B run still open is finished first: Lightning's
    WandbLogger reuses a live ``wandb.run`` instead of starting its own (``reinit`` is never
    read then), so the stages made inside a step (the verifier's Joint training, the
    competition student, the inversion runs) would otherwise log into the previous one."""
    finish_wandb()
    loggers = (instantiate(node, stage=stage) for node in stage.cfg.logger.get("loggers") or [])
    return [lg for lg in loggers if lg is not None]


def recipe(cfg: DictConfig, step: int) -> Recipe:
    """The training recipe of ``step``; ``train.channels_last: auto`` resolved with the
    precision (:mod:`incseg.precision`), so the memory format matches the Trainer's."""
    t = cfg.train
    return Recipe(lr=float(t.lr if step == 0 else t.lr_incremental), momentum=float(t.momentum),
                  nesterov=bool(t.nesterov), weight_decay=float(t.weight_decay),
                  poly_power=float(t.poly_power),
                  channels_last=training_format(cfg).channels_last,
                  loss_reduction=str(t.get("loss_reduction", "valid")))


def data_kwargs(data: DictConfig) -> dict[str, Any]:
    """``data.*`` as the DataModule's keyword arguments (the augmentations flattened; the
    dataset location belongs to the source, not the loader)."""
    d = OmegaConf.to_container(data, resolve=True)
    for key in ("root", "sbd_root"):
        d.pop(key, None)
    d.update(d.pop("augment", {}) or {})
    return d


def make_datamodule(cfg: DictConfig, source, task: Task, step: int, cache: Path,
                    replay_dataset=None, memory=None) -> IncrementalDataModule:
    """The DataModule of ``step``; ``memory``: the labelled exemplar memory's samples (trained
    with ``memory.labels``, mixed in as ``memory.mix``), or None."""
    mem = cfg.get("memory") or {}
    return IncrementalDataModule(
        source, task, step, overlap=bool(cfg.overlap), seed=derive_seed(cfg.seed, step),
        cache_dir=cache, progress=bool(cfg.trainer.progress_bar), replay_dataset=replay_dataset,
        memory=memory, memory_labels=str(mem.get("labels", "seen")),
        memory_mix=str(mem.get("mix", "half")),
        # the source's policy: a folder without val.txt turns data.val=split into none
        **{**data_kwargs(cfg.data), "val": source.val})


def make_trainer(cfg: DictConfig, stage: Stage, epochs: int):
    """A new Trainer for one stage (``step0``, ``step1``, ..., ``joint``)."""
    tc = cfg.trainer
    callbacks = [EpochCheckpoint(stage.run_dir / "checkpoints" / f"{stage.name}-last.ckpt")]
    if tc.progress_bar:
        callbacks.append(StderrProgressBar())
    strategy, sync_bn = str(tc.strategy), False
    if strategy.startswith("ddp"):
        from lightning.pytorch.strategies import DDPStrategy

        cuda = str(tc.accelerator) in ("gpu", "cuda") or (
            str(tc.accelerator) == "auto" and torch.cuda.is_available())
        # NCCL and SyncBatchNorm on GPUs; gloo and plain BN on CPUs (no SyncBatchNorm there).
        # The timeout bounds every collective (a barrier, a gradient all-reduce) whose peer is
        # gone: torch's own default is 10 min for NCCL and 30 min for gloo, Lightning's 30 min
        # for both; docs/distributed.md
        strategy = DDPStrategy(process_group_backend="nccl" if cuda else "gloo",
                               timeout=timedelta(seconds=float(tc.get("timeout_s", 1800))))
        sync_bn = cuda and bool(tc.get("sync_batchnorm", True))
    own = {k: v for k, v in OmegaConf.to_container(tc, resolve=True).items()
           if k not in TRAINER_OWN_KEYS}
    if str(own.get("deterministic")) != "warn":
        own["deterministic"] = bool(own.get("deterministic", False))
    return instantiate(
        own, strategy=strategy, sync_batchnorm=sync_bn,
        # trainer.precision / train.channels_last: auto -> what this hardware trains fastest with
        precision=training_format(cfg).precision, max_epochs=int(epochs),
        logger=make_loggers(stage), callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False, enable_progress_bar=bool(tc.progress_bar),
        enable_model_summary=False, num_sanity_val_steps=0,
        check_val_every_n_epoch=int(cfg.train.val_every),
        default_root_dir=str(stage.run_dir), use_distributed_sampler=False)


def fit(trainer, module, dm, run_dir: Path, stage: str) -> None:
    """``trainer.fit``, resumed from the stage's epoch checkpoint when a readable one is there
    (an unreadable one is reported and the stage starts over)."""
    ckpt = run_dir / "checkpoints" / f"{stage}-last.ckpt"
    resume_from = None
    if ckpt.exists():
        try:
            safe_load(ckpt, "epoch checkpoint")
            resume_from = str(ckpt)
            log.info("%s: resuming from the epoch checkpoint %s", stage, ckpt)
        except CheckpointError as err:
            log.warning("epoch checkpoint %s is unusable (%s); training %s from its first "
                        "epoch now", ckpt, err.reason, stage)
            ckpt.unlink()
    with interruptible(trainer, module):
        trainer.fit(module, datamodule=dm, ckpt_path=resume_from, weights_only=True)


@contextmanager
def interruptible(trainer, module):
    """Ctrl-C inside a Trainer call: Lightning shuts down and calls ``sys.exit(1)`` with
    SIGINT ignored from then on; say instead where the run stopped and how to go on (exit
    status 130), and give SIGINT back its default meaning."""
    try:
        yield
    except SystemExit:
        from lightning.pytorch.trainer.states import TrainerStatus

        if trainer.state.status != TrainerStatus.INTERRUPTED:
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise Interrupted(f"interrupted in step {module.step}, epoch {trainer.current_epoch}; "
                          "rerun the same command to resume from the last finished epoch"
                          ) from None


def provenance(cfg: DictConfig) -> dict:
    """What a result depends on beside the config: code version, packages, device."""
    def ver(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else platform.processor() or platform.machine())
    return {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "git_commit": commit,
        "versions": {p: ver(p) for p in ("incseg", "torch", "torchvision", "lightning",
                                          "hydra-core", "albumentations", "torchmetrics",
                                          "numpy")},
        "device": device, "cpu": cpu_model(), "cpu_kernels": cpu_kernels(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "training_format": training_format(cfg).as_dict(),
    }


def quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.trainer.connectors"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # the empty val list of a dataset without a validation split (folder without val.txt)
    warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    # epoch-level metrics come from torchmetrics states that are already summed across ranks
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
    # the frozen previous model is in eval mode on purpose (BN statistics fixed)
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")


def finish_wandb() -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass

"""The replay of a step t >= 1: its images (DeepInversion from model t-1 for every old
foreground class, or a control: noise, real exemplars) and the student's replay term."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from incseg.methods import method_prediction
from incseg.protocol.state import derive_seed, is_rank_zero
from incseg.protocol.teachers import (
    competition_student,
    student_model_config,
    verifier_model,
)
from incseg.protocol.trainer import Stage, make_loggers
from incseg.replay.term import ReplaySpec, ReplayTerm
from incseg.tasks import Task

log = logging.getLogger("incseg.protocol")


@dataclass
class ReplayStage:
    """What replay gives a step: the dataset the loader draws synthetic batches from, the term
    the student adds, and the figures recorded in ``results.json``."""

    dataset: object
    term: ReplayTerm
    info: dict
    key: str | None = None  # the replay set's cache key (controls from the data: none)


def check_batch(ds, n: int = 8) -> torch.Tensor:
    """A fixed, class-mixed batch for the curvature test; (index, seed) reads are
    deterministic and leave the augmentation streams of training alone."""
    idx = np.linspace(0, len(ds) - 1, num=min(n, len(ds))).round().astype(int)
    return torch.stack([ds[(int(i), 0)] for i in idx])


def generation_ranks() -> tuple[int, int, bool]:
    """``(rank, world size, fill)`` of this process for making a replay set together.

    Under DDP every rank makes its share once the process group is up. A rank > 0 can run
    before it is: Lightning starts the other ranks at rank 0's first fit or test, and on a
    resumed run that comes after rank 0 has made the set alone; such a rank waits for it."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, is_rank_zero()


def process_name(rank: int, world: int, fill: bool) -> str:
    """This process in the lines of a wait. A rank waiting before the process group is up
    knows only its local rank (Lightning's LOCAL_RANK / NODE_RANK)."""
    if fill or world > 1:
        return f"rank {rank} of {world}" if world > 1 else f"rank {rank}"
    node = os.environ.get("NODE_RANK", "0")
    return (f"local rank {os.environ.get('LOCAL_RANK', '0')}"
            + (f" of node {node}" if node != "0" else ""))


def generation_device(cfg: DictConfig) -> torch.device:
    """Where this process optimises images: its GPU when the stages train on GPUs (under DDP
    the one of its local rank), else the CPU."""
    tc = cfg.trainer
    gpu = str(tc.accelerator) in ("gpu", "cuda") or (
        str(tc.accelerator) == "auto" and torch.cuda.is_available())
    if not gpu:
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    ids = OmegaConf.to_container(tc.devices) if OmegaConf.is_list(tc.devices) else None
    return torch.device("cuda", int(ids[local]) if ids else local)


def inversion_trainers(cfg: DictConfig, run_dir: Path, step: int, device: torch.device):
    """``k -> Trainer`` for the batches of step ``step``'s set: its own logger run (stage
    ``inversion<t>``, W&B job_type inversion; created at the first batch, so a cache hit logs
    nothing), shared by its batches; the progress bar of the other stages, on rank 0."""
    from incseg.replay import inversion_trainer

    loggers: list = []

    def trainer(k: int):
        if not loggers:
            loggers.extend(make_loggers(Stage(run_dir, f"inversion{step}", step, "inversion",
                                              cfg)))
        return inversion_trainer(device, bool(cfg.trainer.progress_bar) and is_rank_zero(),
                                 loggers, int(cfg.trainer.get("log_every_n_steps", 50)))

    return trainer


def build_replay(cfg: DictConfig, run_dir: Path, cache: Path, source, task: Task, step: int,
                 old_model) -> ReplayStage | None:
    """The replay of ``step``, or None with ``replay=none``."""
    from incseg.replay import InversionSettings, ReplayDataset, class_grid, ensure_replay_set

    prediction = method_prediction(cfg.method)
    spec = ReplaySpec.from_config(OmegaConf.to_container(cfg.replay, resolve=True), prediction)
    if spec is None:
        return None
    class_ids = task.classes_before(step)
    targets = list(range(1, len(class_ids)))  # old foreground channels; background is no target
    settings = InversionSettings.from_dict(OmegaConf.to_container(cfg.inversion, resolve=True))
    # the class objective follows the method's prediction rule (a CE for a softmax, one BCE per
    # class for DKD's and STAR's sigmoids); part of the replay set's key when not the CE
    settings = dataclasses.replace(settings, objective="sigmoid" if prediction == "sigmoid"
                                   else "softmax")
    if spec.kind == "exemplars":
        from incseg.replay import exemplar_dataset

        ds, info = exemplar_dataset(source, task, step, settings.n_per_class,
                                    settings.image_size, cache, derive_seed(cfg.seed, step))
        return ReplayStage(ds, ReplayTerm(spec, check_batch(ds) if len(ds) else None), info)
    verifier, channel_of = (verifier_model(cfg, run_dir, cache, source, task)
                            if cfg.replay.verifier == "joint" else (None, None))
    verifier_channel_of = ({k: channel_of[c] for k, c in enumerate(class_ids)}
                           if channel_of else None)
    # Adaptive DeepInversion: the noise control is never optimised, so it has no competition
    student = (competition_student(cfg, run_dir, cache, source, task, step)
               if settings.competition and spec.kind == "deepinversion" else None)
    rank, world, fill = generation_ranks()  # after the fits above, which may start the ranks
    device = generation_device(cfg)
    rs = ensure_replay_set(cache, old_model, targets, settings, kind=spec.kind,
                           class_ids=class_ids, student=student, verifier=verifier,
                           verifier_channel_of=verifier_channel_of,
                           progress=bool(cfg.trainer.progress_bar), device=device,
                           trainer=inversion_trainers(cfg, run_dir, step, device), fill=fill,
                           rank=rank, world_size=world, name=process_name(rank, world, fill))
    if is_rank_zero():
        class_grid(rs, run_dir / "replay" / f"step{step}_classes.png")
    ds = ReplayDataset(rs, hflip=True)
    info = rs.as_dict()
    if student is not None:
        info["competition_student"] = str(student_model_config(cfg).name)
    log.info("step %d replay: %d %s images, teacher accuracy %.2f, verifier accuracy %s",
             step, info["images"], spec.kind, info["teacher_accuracy"],
             "-" if info["verifier_accuracy"] is None else f"{info['verifier_accuracy']:.3f}")
    return ReplayStage(ds, ReplayTerm(spec, check_batch(ds) if len(ds) else None), info, rs.key)

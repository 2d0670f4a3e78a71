"""The MiB protocol loop: one Trainer per stage, hand-over through checkpoint files.

    for step t = 0..T-1:
        t == 0: TeacherModule (or a hit in the step-0 cache)      -> checkpoints/step0.pt
        t >= 1: StudentModule vs the frozen model t-1              -> checkpoints/step<t>.pt
        after each step: test-split evaluation -> state.json (finished steps)
    results.json / .csv / .md

Resume (SPEC 8): the run directory is deterministic; ``state.json`` records the config hash and
the finished steps. Rerunning the same command skips finished steps and restarts an interrupted
one from its last epoch-end checkpoint (``checkpoints/step<t>-last.ckpt``, RNG states inside).
Every random draw of a step derives from (seed, step[, epoch]), so a resumed run reproduces the
uninterrupted one.
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import shutil
import subprocess
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from incseg.checkpoints import (
    FORMAT as CKPT_FORMAT,
)
from incseg.checkpoints import (
    AtomicCheckpointIO,
    EpochCheckpoint,
    StderrProgressBar,
    load_model,
    safe_load,
    save_model,
)
from incseg.config import cache_dir_from_cfg, source_from_cfg, task_from_cfg
from incseg.data.datamodule import IncrementalDataModule
from incseg.errors import CheckpointError, ConfigError
from incseg.io import atomic_write_json, content_key, entry_lock, stable_hash
from incseg.losses import REPLAY_LOSSES
from incseg.models import build_model
from incseg.precision import training_format
from incseg.results import final_block, step_record, write_results
from incseg.systems import StudentModule, TeacherModule
from incseg.systems.base import Recipe
from incseg.systems.student import MethodSpec, ReplaySpec, freeze
from incseg.tasks import Task

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
    if "trainer" in plain and "train" in plain and "data" in plain:
        # what the numbers depend on is the resolved format, not the word "auto": a run or a
        # cache entry made with an explicit 32-true is the same as one that auto resolved so
        fmt = training_format(cfg)
        plain["trainer"]["precision"] = fmt.precision
        plain["train"]["channels_last"] = fmt.channels_last
    return plain


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
        if cfg.resume not in ("auto", "never"):
            raise ConfigError(f"resume={cfg.resume!r} is not valid; use auto or never")
        # DDP ranks > 0 start (Lightning relaunches the command) when rank 0 reaches its first
        # fit or test; by then rank 0 has removed a stale run (resume=never) and written nothing
        # new, so they read the state as rank 0 saw it and never delete anything themselves.
        if not path.exists() or (cfg.resume == "never" and is_rank_zero()):
            if is_rank_zero():
                for stale in ("checkpoints", "state.json", "results.json"):
                    p = run_dir / stale
                    if p.is_dir():
                        shutil.rmtree(p)
                    elif p.exists():
                        p.unlink()
            return cls(path, h)
        import json

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


def recipe(cfg: DictConfig, step: int) -> Recipe:
    """The training recipe of ``step``; ``train.channels_last: auto`` resolved with the
    precision (:mod:`incseg.precision`), so the memory format matches the Trainer's."""
    t = cfg.train
    return Recipe(lr=float(t.lr if step == 0 else t.lr_incremental), momentum=float(t.momentum),
                  nesterov=bool(t.nesterov), weight_decay=float(t.weight_decay),
                  poly_power=float(t.poly_power),
                  channels_last=training_format(cfg).channels_last)


def method_spec(cfg: DictConfig) -> MethodSpec:
    m = OmegaConf.to_container(cfg.method, resolve=True)
    m.pop("joint", None)
    try:
        return MethodSpec(**m)
    except TypeError as err:
        raise ConfigError(f"method config: {err}") from None


@dataclass
class Context:
    cfg: DictConfig
    run_dir: Path
    task: Task
    source: object
    cache: Path
    provenance: dict = field(default_factory=dict)
    replay_info: dict = field(default_factory=dict)

    @property
    def group(self) -> str:
        return str(self.run_dir)


def make_datamodule(ctx: Context, task: Task, step: int) -> IncrementalDataModule:
    d = ctx.cfg.data
    return IncrementalDataModule(
        ctx.source, task, step, overlap=bool(ctx.cfg.overlap),
        void_as_background=bool(d.void_as_background), unseen_as=str(d.unseen_as),
        crop=int(d.crop), test_mode=str(d.test_mode), batch_size=int(d.batch_size),
        eval_batch_size=d.eval_batch_size, num_workers=int(d.num_workers),
        hflip=bool(d.augment.hflip), rotation=float(d.augment.rotation),
        color_jitter=float(d.augment.color_jitter), seed=derive_seed(ctx.cfg.seed, step),
        cache_dir=ctx.cache, progress=bool(ctx.cfg.trainer.progress_bar))


def make_loggers(ctx: Context, stage: str, step: int, job_type: str) -> list:
    from lightning.pytorch.loggers import CSVLogger

    kind = ctx.cfg.logger.name
    if kind == "none":
        return []
    loggers = [CSVLogger(save_dir=str(ctx.run_dir), name="logs", version=stage)]
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        lc = ctx.cfg.logger
        loggers.append(WandbLogger(
            project=str(lc.project), entity=lc.get("entity"), group=ctx.group,
            job_type=job_type, name=stage, save_dir=str(ctx.run_dir),
            offline=bool(lc.offline), reinit="finish_previous",
            config={"task": ctx.task.name, "method": str(ctx.cfg.method.name), "step": step,
                    "seed": int(ctx.cfg.seed), "dataset": ctx.task.dataset,
                    "config": fingerprint(ctx.cfg)}))
    return loggers


def make_trainer(ctx: Context, stage: str, step: int, epochs: int, job_type: str) -> L.Trainer:
    """A new Trainer for one stage (``step0``, ``step1``, ..., ``joint``): a finished Trainer is
    never reused (fitting it again silently does nothing)."""
    tc = ctx.cfg.trainer
    ckpt = ctx.run_dir / "checkpoints" / f"{stage}-last.ckpt"
    callbacks = [EpochCheckpoint(ckpt)]
    if tc.progress_bar:
        callbacks.append(StderrProgressBar())
    # trainer.precision / train.channels_last: auto -> what this hardware trains fastest with
    fmt = training_format(ctx.cfg)
    if ctx.provenance.get("training_format") != fmt.as_dict():
        log.info("%s: precision %s, channels_last %s", stage, fmt.precision,
                 str(fmt.channels_last).lower())
    ctx.provenance["training_format"] = fmt.as_dict()
    strategy, sync_bn = str(tc.strategy), False
    if strategy.startswith("ddp"):
        from lightning.pytorch.strategies import DDPStrategy

        cuda = str(tc.accelerator) in ("gpu", "cuda") or (
            str(tc.accelerator) == "auto" and torch.cuda.is_available())
        # NCCL and SyncBatchNorm on GPUs; gloo and plain BN on CPUs (no SyncBatchNorm there)
        strategy = DDPStrategy(process_group_backend="nccl" if cuda else "gloo")
        sync_bn = cuda and bool(tc.get("sync_batchnorm", True))
    return L.Trainer(
        accelerator=str(tc.accelerator), devices=tc.devices, strategy=strategy,
        num_nodes=int(tc.get("num_nodes", 1)), sync_batchnorm=sync_bn,
        precision=fmt.precision, max_epochs=int(epochs),
        logger=make_loggers(ctx, stage, step, job_type),
        callbacks=callbacks, plugins=[AtomicCheckpointIO()], enable_checkpointing=False,
        enable_progress_bar=bool(tc.progress_bar), enable_model_summary=False,
        num_sanity_val_steps=0, check_val_every_n_epoch=int(ctx.cfg.train.val_every),
        log_every_n_steps=int(tc.log_every_n_steps), default_root_dir=str(ctx.run_dir),
        use_distributed_sampler=False,
        deterministic="warn" if str(tc.deterministic) == "warn" else bool(tc.deterministic),
        limit_train_batches=tc.get("limit_train_batches", 1.0),
        limit_val_batches=tc.get("limit_val_batches", 1.0))


def fit(ctx: Context, trainer: L.Trainer, module, dm, stage: str) -> None:
    ckpt = ctx.run_dir / "checkpoints" / f"{stage}-last.ckpt"
    resume_from = None
    if ckpt.exists():
        try:
            safe_load(ckpt, "epoch checkpoint")
            resume_from = str(ckpt)
            log.info("%s: resuming from the epoch checkpoint %s", stage, ckpt)
        except CheckpointError as err:
            log.warning("%s; training %s from its start", err, stage)
            ckpt.unlink()
    trainer.fit(module, datamodule=dm, ckpt_path=resume_from, weights_only=True)


def teacher_key(ctx: Context, classes: list[int]) -> str:
    """Everything a teacher model (step 0 or Joint) depends on. The method is not part of it,
    so a sweep shares step 0 across FT/LwF/ILT/MiB and across tasks with the same step 0
    (15-5 and 15-5s), and Joint across tasks over the same classes."""
    fp = fingerprint(ctx.cfg)
    return content_key("teacher", {
        "dataset": fp["dataset"], "data_root": str(ctx.source.root), "data": fp["data"],
        "overlap": fp["overlap"], "classes": classes, "model": fp["model"],
        "train": {k: v for k, v in fp["train"].items() if not k.endswith("_incremental")},
        "trainer": {k: fp["trainer"].get(k) for k in ("precision", "accelerator")},
        "seed": fp["seed"],
    })


def fit_teacher(ctx: Context, module, dm, task: Task, kind: str) -> L.Trainer:
    """Train a TeacherModule, or load it from the teacher cache (filled under a file lock, so
    parallel sweep jobs train it once). ``kind`` is ``step-0`` or ``joint``."""
    cfg = ctx.cfg
    stage = "step0" if kind == "step-0" else "joint"
    trainer = make_trainer(ctx, stage, 0, cfg.train.epochs, "teacher")
    if not cfg.protocol.step0_cache:
        fit(ctx, trainer, module, dm, stage)
        return trainer
    key = teacher_key(ctx, task.steps[0])
    entry = ctx.cache / "step0" / f"{key}.pt"
    ctx.provenance.setdefault("cache_keys", {})[kind] = key
    # Under DDP every rank must join the fit, so no rank may wait on the lock meanwhile; the
    # ranks agree without it (rank 0 alone decides before the others exist: Lightning starts
    # them at the first fit, and they find the same entry, or none) and rank 0 writes.
    lock = nullcontext() if is_distributed(cfg) else entry_lock(entry)
    with lock:
        if entry.exists():
            try:
                payload = safe_load(entry, "cache entry")
                cached = load_model(entry, cfg.model.name, task.steps, 0, ckpt=payload)
                module.model.load_state_dict(cached.state_dict())
                # the record of a cache hit equals the one of the run that trained the entry
                module.val_summary = payload.get("val_summary")
                log.info("%s cache hit: %s (not retrained)", kind, entry)
                ctx.provenance[f"{kind}_cache"] = "hit"
                return trainer
            except CheckpointError as err:
                log.warning("%s cache entry unusable (%s); retraining", kind, err)
                if is_rank_zero():
                    entry.unlink(missing_ok=True)
        log.info("%s cache miss: training (entry %s)", kind, entry.name)
        ctx.provenance[f"{kind}_cache"] = "miss"
        fit(ctx, trainer, module, dm, stage)
        if is_rank_zero():
            save_model(entry, module.model, cfg.model.name, task.steps, 0,
                       extra={"val_summary": module.val_summary})
        barrier()
    return trainer


def replay_spec(cfg: DictConfig) -> ReplaySpec | None:
    rc = cfg.get("replay")
    if rc is None or rc.name == "none":
        return None
    if rc.loss not in REPLAY_LOSSES:
        raise ConfigError(f"replay.loss={rc.loss!r} is not valid; use one of "
                          f"{', '.join(REPLAY_LOSSES)}")
    weight = rc.weight if rc.weight is not None else rc.weights[rc.loss]
    return ReplaySpec(kind=str(rc.name), loss=str(rc.loss), weight=float(weight),
                      bn=str(rc.get("bn", "running")),
                      background=str(rc.get("background", "unbiased")),
                      temperature=float(rc.temperature), check=int(rc.get("check", 20)))


def verifier_model(ctx: Context):
    """An independent judge of synthetic images: the (cached) Joint model over all classes of
    the task. It never trains the student; it only scores the replay set."""
    cfg = ctx.cfg
    joint = ctx.task.joint()
    model = build_model(cfg.model.name, [len(joint.steps[0])], cfg.model.pretrained)
    module = TeacherModule(model, joint, 0, recipe(cfg, 0))
    with _seeded(derive_seed(cfg.seed, 0, 1)):
        fit_teacher(ctx, module, make_datamodule(ctx, joint, 0), joint, "joint")
    return freeze(module.model), {c: i for i, c in enumerate(joint.steps[0])}


class _seeded:
    """Seed everything for a block and restore the global RNG states afterwards."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        import random

        self.states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        L.seed_everything(self.seed, workers=True, verbose=False)

    def __exit__(self, *exc):
        import random

        torch.set_rng_state(self.states[0])
        np.random.set_state(self.states[1])
        random.setstate(self.states[2])


def build_replay(ctx: Context, step: int, old_model, dm) -> dict | None:
    """The replay images of ``step`` (SPEC 6): synthesised from model t-1 for all its old
    foreground classes (DeepInversion), or the controls (noise, real exemplars)."""
    from incseg.replay import InversionSettings, ReplayDataset, class_grid, ensure_replay_set

    cfg, task = ctx.cfg, ctx.task
    spec = replay_spec(cfg)
    if spec is None:
        return None
    class_ids = task.classes_before(step)
    targets = list(range(1, len(class_ids)))  # old foreground channels; background is no target
    settings = InversionSettings.from_dict(OmegaConf.to_container(cfg.inversion, resolve=True))
    if spec.kind == "exemplars":
        from incseg.replay import exemplar_dataset

        ds, info = exemplar_dataset(ctx.source, task, step, settings.n_per_class,
                                    settings.image_size, ctx.cache, derive_seed(cfg.seed, step))
        dm.replay_dataset = ds
        return info
    verifier, channel_of = (verifier_model(ctx) if cfg.replay.verifier == "joint"
                            else (None, None))
    verifier_channel_of = ({k: channel_of[c] for k, c in enumerate(class_ids)}
                           if channel_of else None)
    if spec.kind not in ("deepinversion", "noise"):
        raise ConfigError(f"replay={spec.kind!r} is not valid; use none, deepinversion, noise "
                          "or exemplars")
    rs = ensure_replay_set(ctx.cache, old_model, targets, settings, kind=spec.kind,
                           class_ids=class_ids, verifier=verifier,
                           verifier_channel_of=verifier_channel_of,
                           progress=bool(cfg.trainer.progress_bar), fill=is_rank_zero())
    ctx.provenance.setdefault("cache_keys", {})[f"replay_step{step}"] = rs.key
    if is_rank_zero():
        class_grid(rs, ctx.run_dir / "replay" / f"step{step}_classes.png")
    dm.replay_dataset = ReplayDataset(rs, hflip=True)
    info = rs.as_dict()
    log.info("step %d replay: %d %s images, teacher accuracy %.2f, verifier accuracy %s",
             step, info["images"], spec.kind, info["teacher_accuracy"],
             _fmt(info["verifier_accuracy"]))
    return info


def _usable_model(path: Path) -> bool:
    """A finished step's model file is readable and ours (a truncated or foreign file is
    reported, then the step is trained again: never loaded)."""
    if not path.exists():
        return False
    try:
        ok = safe_load(path, "model checkpoint").get("format") == CKPT_FORMAT
    except CheckpointError as err:
        log.warning("%s; retraining that step", err)
        return False
    if not ok:
        log.warning("%s is not an incseg model checkpoint (foreign file); retraining that step",
                    path)
    return ok


def run_step(ctx: Context, step: int):
    cfg = ctx.cfg
    L.seed_everything(derive_seed(cfg.seed, step, 1), workers=True, verbose=False)
    dm = make_datamodule(ctx, ctx.task, step)
    if step == 0:
        model = build_model(cfg.model.name, [len(ctx.task.steps[0])], cfg.model.pretrained)
        module = TeacherModule(model, ctx.task, 0, recipe(cfg, 0))
        return module, fit_teacher(ctx, module, dm, ctx.task, "step-0")
    prev = ctx.run_dir / "checkpoints" / f"step{step - 1}.pt"
    old = load_model(prev, cfg.model.name, ctx.task.steps, step - 1)
    model = copy.deepcopy(old)  # the student starts from model t-1; `old` stays frozen
    spec = method_spec(cfg)
    model.add_step(len(ctx.task.steps[step]), init_balanced=spec.init_balanced)
    replay = build_replay(ctx, step, old, dm)
    if replay is not None:
        ctx.replay_info[step] = replay
    module = StudentModule(model, old, ctx.task, step, recipe(cfg, step), spec,
                           replay_spec(cfg))
    trainer = make_trainer(ctx, f"step{step}", step, cfg.train.epochs_incremental, "student")
    fit(ctx, trainer, module, dm, f"step{step}")
    if replay is not None and module.replay_stability is not None:
        replay.update(module.replay_stability)  # the curvature test, in results.json
    return module, trainer


def run_joint(ctx: Context):
    cfg = ctx.cfg
    L.seed_everything(derive_seed(cfg.seed, 0, 1), workers=True, verbose=False)
    joint = ctx.task.joint()
    dm = make_datamodule(ctx, joint, 0)
    model = build_model(cfg.model.name, [len(joint.steps[0])], cfg.model.pretrained)
    module = TeacherModule(model, joint, 0, recipe(cfg, 0), score_task=ctx.task,
                           score_step=ctx.task.num_steps - 1)
    return module, fit_teacher(ctx, module, dm, joint, "joint"), joint


def evaluate(trainer: L.Trainer, module, dm) -> dict:
    trainer.test(module, datamodule=dm, verbose=False)
    return module.test_summary


def provenance(cfg: DictConfig) -> dict:
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
        "device": device, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.trainer.connectors"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    # epoch-level metrics come from torchmetrics states that are already summed across ranks
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
    # the frozen previous model is in eval mode on purpose (BN statistics fixed)
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")


def run_protocol(cfg: DictConfig, run_dir: Path) -> dict:
    """Run (or resume) every step of the task in ``run_dir``; returns the results dict."""
    quiet_lightning()
    run_dir = Path(run_dir)
    task = task_from_cfg(cfg)
    joint = bool(cfg.method.get("joint", False))
    state = RunState.open(run_dir, cfg)
    source = source_from_cfg(cfg, progress=bool(cfg.trainer.progress_bar))
    ctx = Context(cfg, run_dir, task, source, cache_dir_from_cfg(cfg))
    ctx.provenance = provenance(cfg)
    walls = {}
    steps = [0] if joint else range(task.num_steps)
    for t in steps:
        if t in state.steps and _usable_model(run_dir / "checkpoints" / f"step{t}.pt"):
            log.info("step %d already finished: skipped", t)
            continue
        state.forget_from(t)  # a lost or damaged model: this step and the later ones rerun
        start = time.perf_counter()
        if joint:
            module, trainer, trained_task = run_joint(ctx)
            classes = task.classes_seen(task.num_steps - 1)
        else:
            module, trainer = run_step(ctx, t)
            trained_task, classes = task, task.classes_added(t)
        dm = make_datamodule(ctx, trained_task, t)
        summary = evaluate(trainer, module, dm)
        walls[t] = round(time.perf_counter() - start, 2)
        if is_rank_zero():
            save_model(run_dir / "checkpoints" / f"step{t}.pt", module.model, cfg.model.name,
                       trained_task.steps, t)
        extra = {"replay": ctx.replay_info[t]} if t in ctx.replay_info else {}
        if module.val_summary is not None:  # model selection and calibration use val, never test
            extra["val_miou_all"] = module.val_summary["miou_all"]
        # Test confusion (rows: ground truth, columns: prediction) over the seen classes in task
        # order, so the report can show where old classes went (mostly: background).
        extra["confusion"] = {"classes": [int(c) for c in trained_task.classes_seen(t)],
                              "counts": module.test_confusion.long().tolist()}
        record = step_record(t, classes, summary, wall_time_s=walls[t],
                             step0_cache=ctx.provenance.get("step-0_cache") if t == 0 else None,
                             **extra)
        state.finish_step(t, record)
        if is_rank_zero():
            for stage in (f"step{t}", "joint"):
                (run_dir / "checkpoints" / f"{stage}-last.ckpt").unlink(missing_ok=True)
        barrier()  # step t's model is on disk before any rank starts step t+1 from it
        log.info("step %d: old %s new %s all %s (%.1f s)", t, _fmt(record["miou_old"]),
                 _fmt(record["miou_new"]), _fmt(record["miou_all"]), walls[t])
        _finish_wandb()
    header = {"dataset": task.dataset, "task": task.name, "method": str(cfg.method.name),
              "overlap": bool(cfg.overlap), "seed": int(cfg.seed), "model": str(cfg.model.name),
              "replay": str(cfg.replay.name)}
    records = [state.steps[t] for t in sorted(state.steps)]
    ctx.provenance["wall_times_s"] = walls
    if not is_rank_zero():
        return {**header, "steps": records, "final": final_block(records)}
    return write_results(run_dir, header, records, ctx.provenance)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _finish_wandb() -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass


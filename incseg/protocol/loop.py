"""The MiB protocol loop: one Trainer per stage, hand-over through checkpoint files.

    for step t = 0..T-1:
        t == 0: TeacherModule (or a hit in the step-0 cache)      -> checkpoints/step0.pt
        t >= 1: StudentModule vs the frozen model t-1              -> checkpoints/step<t>.pt
        after each step: test-split evaluation -> state.json (finished steps)
    results.json / .csv / .md

Each stage returns what it measured (:class:`StepOutcome`); nothing is read back from objects.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from incseg.checkpoints import load_model, read_model_file, save_model
from incseg.config import cache_dir_from_cfg, source_from_cfg, task_from_cfg
from incseg.methods import build_method, is_joint
from incseg.protocol.memory import Memory, build_memory, memory_active, memory_size
from incseg.protocol.replay_sets import ReplayStage, build_replay
from incseg.protocol.state import (
    RunState,
    barrier,
    derive_seed,
    is_rank_zero,
    usable_model,
)
from incseg.protocol.teachers import train_teacher
from incseg.protocol.trainer import (
    Stage,
    finish_wandb,
    fit,
    interruptible,
    make_datamodule,
    make_trainer,
    provenance,
    quiet_lightning,
    recipe,
)
from incseg.results import (
    conventions,
    final_block,
    hiou_convention,
    step_record,
    write_results,
)
from incseg.systems import StudentModule
from incseg.tasks import Task

log = logging.getLogger("incseg.protocol")


@dataclass
class Student:
    """Everything step t >= 1 trains with, built by :func:`build_student`."""

    module: StudentModule
    datamodule: object
    replay: ReplayStage | None
    memory: Memory | None = None


@dataclass
class StepOutcome:
    """What one step measured: the test summary and confusion, the last validation, the
    cache's verdict for a teacher, the replay figures, the trained task (Joint's differs)."""

    module: object
    summary: dict
    confusion: list
    trained_task: Task
    val_summary: dict | None = None
    cache: tuple[str, str | None, str | None] | None = None   # (kind, hit|miss, key)
    replay: dict | None = None
    replay_key: str | None = None
    extra: dict = field(default_factory=dict)
    method_state: dict | None = None  # what the method hands to the next step
    memory: dict | None = None  # the labelled memory the step trained with


def build_student(cfg: DictConfig, run_dir: Path, cache: Path, source, task: Task,
                  step: int) -> Student:
    """The student of step ``step`` >= 1, ready to fit: the model of step t-1 (from
    ``run_dir/checkpoints``) copied and grown by the step's classes, the method, the replay
    and the DataModule (with the labelled memory of the step, when ``memory.size`` > 0), with
    the global seed of the step set as the protocol sets it. The method starts from what the
    previous step's method handed over (saved in its model file)."""
    L.seed_everything(derive_seed(cfg.seed, step, 1), workers=True, verbose=False)
    prev = run_dir / "checkpoints" / f"step{step - 1}.pt"
    payload = read_model_file(prev)
    old = load_model(prev, cfg.model, task.steps, step - 1, ckpt=payload)
    model = copy.deepcopy(old)  # the student starts from model t-1; `old` stays frozen
    method = build_method(cfg.method)
    method.load_previous_step(payload.get("method_state") or {})
    method.add_classes(model, len(task.steps[step]))
    replay = build_replay(cfg, run_dir, cache, source, task, step, old)
    module = StudentModule(model, old, task, step, recipe(cfg, step), method,
                           replay.term if replay else None)
    memory = build_memory(cfg, run_dir, cache, source, task, step)
    dm = make_datamodule(cfg, source, task, step, cache,
                         replay_dataset=replay.dataset if replay else None,
                         memory=memory.samples if memory else None)
    return Student(module, dm, replay, memory)


def evaluate(trainer, module, cfg, source, task: Task, step: int, cache: Path):
    """Test-split summary and confusion (rows: ground truth, columns: prediction, over the
    seen classes in task order) of ``module``."""
    with interruptible(trainer, module):
        trainer.test(module, datamodule=make_datamodule(cfg, source, task, step, cache),
                     verbose=False)
    return module.test_summary, module.test_confusion.long().tolist()


def run_step(cfg: DictConfig, run_dir: Path, cache: Path, source, task: Task,
             step: int) -> StepOutcome:
    """Train (or load from the teacher cache) and evaluate step ``step``."""
    if is_joint(cfg.method):
        L.seed_everything(derive_seed(cfg.seed, 0, 1), workers=True, verbose=False)
        fitted = train_teacher(cfg, run_dir, cache, source, task.joint(), score_task=task)
        trained, kind = task.joint(), "joint"
    elif step == 0:
        L.seed_everything(derive_seed(cfg.seed, step, 1), workers=True, verbose=False)
        method = build_method(cfg.method)
        fitted = train_teacher(cfg, run_dir, cache, source, task,
                               method=method if method.trains_step0 else None)
        trained, kind = task, "step-0"
    else:
        student = build_student(cfg, run_dir, cache, source, task, step)
        trainer = make_trainer(cfg, Stage(run_dir, f"step{step}", step, "student", cfg),
                               cfg.train.epochs_incremental)
        fit(trainer, student.module, student.datamodule, run_dir, f"step{step}")
        summary, confusion = evaluate(trainer, student.module, cfg, source, task, step, cache)
        replay = None
        if student.replay is not None:
            replay = dict(student.replay.info)
            if student.module.replay_stability is not None:
                replay.update(student.module.replay_stability)  # the curvature test
        return StepOutcome(student.module, summary, confusion, task,
                           student.module.val_summary, replay=replay,
                           replay_key=student.replay.key if student.replay else None,
                           method_state=student.module.method.next_step_state(),
                           memory=student.memory.info if student.memory else None)
    summary, confusion = evaluate(fitted.trainer, fitted.module, cfg, source, trained, step,
                                  cache)
    return StepOutcome(fitted.module, summary, confusion, trained, fitted.module.val_summary,
                       cache=(kind, fitted.cache, fitted.key), method_state=fitted.method_state)


def run_protocol(cfg: DictConfig, run_dir: Path) -> dict:
    """Run (or resume) every step of the task in ``run_dir``; returns the results dict."""
    quiet_lightning()
    run_dir = Path(run_dir)
    task = task_from_cfg(cfg)
    joint = is_joint(cfg.method)
    if joint and memory_size(cfg) > 0:
        log.info("memory.size=%d ignored: Joint training sees every class's data at once",
                 memory_size(cfg))
    state = RunState.open(run_dir, cfg)
    source = source_from_cfg(cfg, progress=bool(cfg.trainer.progress_bar))
    cache = cache_dir_from_cfg(cfg)
    prov = provenance(cfg)
    fmt = prov["training_format"]
    log.info("precision %s, channels_last %s", fmt["precision"],
             str(fmt["channels_last"]).lower())
    walls = {}
    for t in [0] if joint else range(task.num_steps):
        if t in state.steps and usable_model(run_dir / "checkpoints" / f"step{t}.pt"):
            log.info("step %d already finished: skipped", t)
            continue
        state.forget_from(t)  # a lost or damaged model: this step and the later ones rerun
        start = time.perf_counter()
        out = run_step(cfg, run_dir, cache, source, task, t)
        walls[t] = round(time.perf_counter() - start, 2)
        if is_rank_zero():
            # class names and colours travel with the model (incseg.predict draws with them),
            # and the method's hand-over to the next step is written with it
            extra = dict(source.class_info() or {})
            if out.method_state:
                extra["method_state"] = out.method_state
            if out.module.prediction != "argmax":  # DKD's rule: predict and reports use it too
                extra["prediction"] = out.module.prediction
            save_model(run_dir / "checkpoints" / f"step{t}.pt", out.module.model, cfg.model,
                       out.trained_task.steps, t, extra=extra or None)
        if out.cache is not None and out.cache[1] is not None:
            kind, verdict, key = out.cache
            prov.setdefault("cache_keys", {})[kind] = key
            prov[f"{kind}_cache"] = verdict
        if out.replay_key is not None:
            prov.setdefault("cache_keys", {})[f"replay_step{t}"] = out.replay_key
        extra = {"replay": out.replay} if out.replay is not None else {}
        if out.memory is not None:
            extra["memory"] = out.memory
        if out.val_summary is not None:  # model selection and calibration use val, never test
            extra["val_miou_all"] = out.val_summary["miou_all"]
        extra["confusion"] = {"classes": [int(c) for c in out.trained_task.classes_seen(t)],
                              "counts": out.confusion}
        classes = task.classes_seen(task.num_steps - 1) if joint else task.classes_added(t)
        step0_cache = out.cache[1] if (t == 0 and out.cache and out.cache[0] == "step-0") \
            else None
        record = step_record(t, classes, out.summary, hiou=hiou_convention(cfg),
                             wall_time_s=walls[t], step0_cache=step0_cache, **extra)
        state.finish_step(t, record)
        if is_rank_zero():
            for stage in (f"step{t}", "joint"):
                (run_dir / "checkpoints" / f"{stage}-last.ckpt").unlink(missing_ok=True)
        barrier()  # step t's model is on disk before any rank starts step t+1 from it
        log.info("step %d: old %s new %s all %s (%.1f s)", t, _fmt(record["miou_old"]),
                 _fmt(record["miou_new"]), _fmt(record["miou_all"]), walls[t])
        finish_wandb()
    header = {"dataset": task.dataset, "task": task.name, "method": str(cfg.method.name),
              "overlap": bool(cfg.overlap), "seed": int(cfg.seed), "model": str(cfg.model.name),
              "replay": str(cfg.replay.name),
              "conventions": {**conventions(cfg), "val": source.val}, **source.class_info()}
    if memory_active(cfg):  # only then: the results of a run without memory stay as they were
        header["memory"] = {"size": memory_size(cfg), "labels": str(cfg.memory.labels),
                            "mix": str(cfg.memory.mix)}
        header["method_label"] = f"{cfg.method.get('label') or cfg.method.name}-M"
    records = [state.steps[t] for t in sorted(state.steps)]
    prov["wall_times_s"] = walls
    if not is_rank_zero():
        return {**header, "steps": records, "final": final_block(records)}
    return write_results(run_dir, header, records, prov)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"

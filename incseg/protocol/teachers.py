"""Teachers: the step-0 model, the Joint model and the competition student, trained once
and shared through the cache.

The step-0 cache lets a method sweep train step 0 once: FT, LwF, ILT and MiB on 15-5 and 15-5s
share one step-0 model per (dataset, overlap, model, recipe, seed); Joint likewise per set of
classes. Entries are content-keyed, filled under a file lock (parallel sweep jobs), written
atomically and verified on read. The competition student of Adaptive DeepInversion is such a
model too (another architecture, trained on the classes the teacher knows), cached the same way.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.seed import isolate_rng
from omegaconf import DictConfig, OmegaConf, open_dict

from incseg.checkpoints import load_model, safe_load, save_model
from incseg.config import CONF_DIR, source_from_cfg, task_from_cfg
from incseg.config.build import plain
from incseg.errors import CheckpointError, ConfigError
from incseg.io import atomic_path, atomic_write_json, content_key, entry_lock
from incseg.models import build_model
from incseg.models.backbones import RESNETS, protocol_pretraining
from incseg.models.norm import freeze
from incseg.protocol.pretrain import corpus_backbone
from incseg.protocol.state import (
    barrier,
    derive_seed,
    fingerprint,
    is_distributed,
    is_rank_zero,
    world_size,
)
from incseg.protocol.trainer import Stage, fit, make_datamodule, make_trainer, recipe
from incseg.systems import TeacherModule
from incseg.tasks import Task

log = logging.getLogger("incseg.protocol")


@dataclass
class TeacherFit:
    """A trained (or cache-loaded) teacher: its module, the Trainer that evaluates it, and the
    cache's verdict (``hit`` / ``miss``; None with the cache off) under ``key``."""

    module: TeacherModule
    trainer: L.Trainer
    cache: str | None = None
    key: str | None = None
    method_state: dict | None = None  # a trains_step0 method's hand-over to step 1


def teacher_key(cfg: DictConfig, data_root, classes: list[int],
                with_method: bool = False) -> str:
    """Everything a teacher model (step 0 or Joint) depends on. The method is not part of it,
    so a sweep shares step 0 across methods and across tasks with the same step 0 (15-5 and
    15-5s), and Joint across tasks over the same classes; except ``with_method``, for a
    method that trains step 0 itself (``Method.trains_step0``): its entry holds its state."""
    fp = fingerprint(cfg)
    parts = {
        "dataset": fp["dataset"], "data_root": str(data_root), "data": fp["data"],
        "overlap": fp["overlap"], "classes": classes, "model": fp["model"],
        "train": {k: v for k, v in fp["train"].items() if not k.endswith("_incremental")},
        "trainer": {k: fp["trainer"].get(k) for k in ("precision", "accelerator")},
        "seed": fp["seed"],
    }
    n = world_size(cfg)
    if n > 1:  # only then, so one-process entries keep their keys
        parts["world_size"] = n
    if with_method:  # only then, so the shared entries keep their keys
        parts["method"] = {k: v for k, v in fp["method"].items() if k != "label"}
    return content_key("teacher", parts)


def fit_teacher(cfg: DictConfig, run_dir: Path, cache: Path, source, module: TeacherModule,
                dm, task: Task, kind: str, stage: str | None = None) -> TeacherFit:
    """Train a TeacherModule, or load it from the teacher cache. ``kind``: step-0 | joint | a
    name for the log; ``stage``: the stage's name for its logs and epoch checkpoint (default
    step0 for step-0, else joint)."""
    if stage is None:
        stage = "step0" if kind == "step-0" else "joint"
    trainer = make_trainer(cfg, Stage(run_dir, stage, 0, "teacher", cfg), cfg.train.epochs)
    method = module.method

    def handover():
        return method.next_step_state() if method is not None else None

    if not cfg.protocol.step0_cache:
        fit(trainer, module, dm, run_dir, stage)
        return TeacherFit(module, trainer, method_state=handover())
    key = teacher_key(cfg, source.cache_identity(), task.steps[0], with_method=method is not None)
    entry = cache / "step0" / f"{key}.pt"
    # Under DDP every rank must join the fit, so no rank may wait on the lock meanwhile; the
    # ranks agree without it (rank 0 alone decides before the others exist: Lightning starts
    # them at the first fit, and they find the same entry, or none) and rank 0 writes.
    lock = nullcontext() if is_distributed(cfg) else entry_lock(entry)
    with lock:
        if entry.exists():
            try:
                payload = safe_load(entry, "cache entry")
                if method is not None and "method_state" not in payload:
                    raise CheckpointError(f"cache entry {entry} holds no method state",
                                          reason="it holds no method state")
                cached = load_model(entry, cfg.model, task.steps, 0, ckpt=payload)
                module.model.load_state_dict(cached.state_dict())
                # the record of a cache hit equals the one of the run that trained the entry
                module.val_summary = payload.get("val_summary")
                log.info("%s cache hit: %s (not retrained)", kind, entry)
                return TeacherFit(module, trainer, "hit", key, payload.get("method_state"))
            except CheckpointError as err:
                log.warning("%s cache entry %s is unusable (%s); training it again now, the "
                            "entry is replaced when done", kind, entry, err.reason)
                if is_rank_zero():
                    entry.unlink(missing_ok=True)
        log.info("%s cache miss: training (entry %s)", kind, entry.name)
        fit(trainer, module, dm, run_dir, stage)
        extra = {"val_summary": module.val_summary}
        if method is not None:
            extra["method_state"] = handover()
        if is_rank_zero():
            save_model(entry, module.model, cfg.model, task.steps, 0, extra=extra)
        barrier()
    return TeacherFit(module, trainer, "miss", key, extra.get("method_state"))


def train_teacher(cfg: DictConfig, run_dir: Path, cache: Path, source, task: Task,
                  score_task: Task | None = None, method=None) -> TeacherFit:
    """Step 0 of ``task`` (or, with ``score_task``, Joint training on the one-step ``task``
    scored with ``score_task``'s split at its last step). ``method``: a method that trains
    step 0 itself (``Method.trains_step0``), else None for the shared plain-CE teacher."""
    joint = score_task is not None
    dm = make_datamodule(cfg, source, task, 0, cache)
    model = build_model(cfg.model, [len(task.steps[0])], model_weights(cfg, cache))
    module = TeacherModule(model, task, 0, recipe(cfg, 0), score_task=score_task,
                           score_step=score_task.num_steps - 1 if joint else None,
                           method=method)
    return fit_teacher(cfg, run_dir, cache, source, module, dm, task,
                       "joint" if joint else "step-0")


def verifier_model(cfg: DictConfig, run_dir: Path, cache: Path, source, task: Task):
    """An independent judge of synthetic images: the (cached) Joint model over all classes of
    the task, and its channel of every dataset class. It never trains the student. Made by the
    Joint method's own seeding and training, as its cache key says: a verifier that drew its
    head's initial weights before seeding stored another model under the Joint key, which a
    later ``method=joint`` run then reported. Under PLOP's, DKD's or STAR's label conventions
    it is still the Joint method's model (:func:`joint_conventions`), so every method's images
    meet one judge, and the one cache entry."""
    joint = task.joint()
    with isolate_rng():  # the student's step draws the same numbers with or without it
        L.seed_everything(derive_seed(cfg.seed, 0, 1), workers=True, verbose=False)
        fitted = train_teacher(joint_conventions(cfg), run_dir, cache, source, joint,
                               score_task=task)
    return freeze(fitted.module.model), {c: i for i, c in enumerate(joint.steps[0])}


def _model_options() -> dict[str, dict]:
    return {p.stem: plain(OmegaConf.load(p)) for p in sorted((CONF_DIR / "model").glob("*.yaml"))}


def student_model_config(cfg: DictConfig) -> DictConfig:
    """The competition student's model config (Adaptive DeepInversion): the ``conf/model``
    option ``inversion.student_model``, or by default the teacher's model with a ResNet-18
    context path, as the paper's student (Di Salvo et al., appendix: the same BiSeNet with a
    ResNet-18 backbone). The default is named after the option it equals (bisenet_r50_paper ->
    bisenet_r18_paper), so it shares the step-0 cache with runs of that model."""
    options = _model_options()
    name = cfg.inversion.get("student_model")
    if name is not None:
        if str(name) not in options:
            raise ConfigError(f"inversion.student_model={name} names no conf/model option; "
                              f"choose one of: {', '.join(options)}")
        return OmegaConf.create(options[str(name)])
    node = {k: v for k, v in plain(cfg.model).items() if k != "label"}
    if "backbone" not in node:
        raise ConfigError(f"inversion.competition=true: model={cfg.model.get('name')} has no "
                          "backbone to make the ResNet-18 student from; name the student with "
                          "inversion.student_model=NAME")
    node["backbone"] = "resnet18"
    same = [n for n, o in options.items()
            if {k: v for k, v in o.items() if k not in ("name", "label")}
            == {k: v for k, v in node.items() if k != "name"}]
    node["name"] = same[0] if same else f"{node.get('name')}-resnet18"
    return OmegaConf.create(node)


def competition_student(cfg: DictConfig, run_dir: Path, cache: Path, source, task: Task,
                        step: int):
    """The frozen competition student of step ``step`` >= 1: :func:`student_model_config`
    trained on the classes the teacher (model ``step``-1) knows, i.e. one step over
    ``classes_before(step)`` with the step-0 recipe and seed. At step 1 that is the teacher's own
    step-0 training with the other model, under the same step-0 cache key; later steps train
    it on the old classes at once. Cached like the step-0 model."""
    scfg = copy.deepcopy(cfg)
    with open_dict(scfg):
        scfg.model = student_model_config(cfg)
    known = Task(task.dataset, task.name, [task.classes_before(step)], task.num_dataset_classes)
    model = build_model(scfg.model, [len(known.steps[0])], model_weights(scfg, cache))
    module = TeacherModule(model, known, 0, recipe(scfg, 0))
    stage = f"competition{step}"
    with isolate_rng():  # the student's step draws the same numbers with or without it
        L.seed_everything(derive_seed(cfg.seed, 0, 1), workers=True, verbose=False)
        fit_teacher(scfg, run_dir, cache, source, module,
                    make_datamodule(scfg, source, known, 0, cache), known,
                    "competition student", stage=stage)
    if is_rank_zero():  # trained and cached: its epoch checkpoint has served its purpose
        (run_dir / "checkpoints" / f"{stage}-last.ckpt").unlink(missing_ok=True)
    return freeze(module.model)


# -- where a backbone starts -------------------------------------------------------------------

#: ``dataset.segmentation``: the keys and defaults of the segmentation pretraining
SEGMENTATION_DEFAULTS = {"generator_seed": 1, "epochs": 21, "crop": 64, "lr": 0.05, "seed": 0}


def segmentation_spec(node) -> dict:
    """The ``dataset.segmentation`` node with its defaults; one line on a bad key or value."""
    given = dict(node or {})
    unknown = sorted(set(given) - set(SEGMENTATION_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown dataset.segmentation key(s) {', '.join(map(str, unknown))}; "
                          f"valid: {', '.join(SEGMENTATION_DEFAULTS)}")
    spec = {**SEGMENTATION_DEFAULTS, **given}
    try:
        spec = {k: (float if k == "lr" else int)(v) for k, v in spec.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"dataset.segmentation={given} is invalid: generator_seed, epochs, "
                          "crop and seed are integers, lr a number") from None
    if spec["epochs"] < 1 or spec["crop"] < 8 or spec["lr"] <= 0:
        raise ConfigError("dataset.segmentation needs epochs >= 1, crop >= 8 and lr > 0")
    return spec


#: the keys a method's config sets outside its own node; the pretraining takes the defaults
_METHOD_SET_KEYS = (("data", "void_as_background"), ("data", "unseen_as"),
                    ("train", "loss_reduction"))


def joint_conventions(cfg: DictConfig) -> DictConfig:
    """``cfg`` with the label conventions a method sets outside its own node
    (``_METHOD_SET_KEYS``) back at the defaults, the Joint method's: the config under which a
    Joint model made for another method (the pretraining, the replay verifier) is the one
    ``method=joint`` trains and caches."""
    p = copy.deepcopy(cfg)
    base = OmegaConf.load(CONF_DIR / "config.yaml")
    with open_dict(p):
        for group, key in _METHOD_SET_KEYS:  # PLOP's, DKD's and STAR's label conventions
            p[group][key] = base[group][key]
    return p


def segmentation_config(cfg: DictConfig, spec: dict) -> DictConfig:
    """The config of the pretraining run: Joint over every class of the run's ``shapes``
    generator with its seed replaced by ``generator_seed`` (a disjoint image stream: no
    benchmark image is seen), from random weights, with the spec's epochs, crop, lr and seed
    and the run's recipe otherwise, in one process. Overlap and the task do not change a Joint
    model over all classes, so they are fixed: every task and setting of a sweep shares one
    pretraining."""
    p = joint_conventions(cfg)
    with open_dict(p):
        p.pop("hydra", None)  # the entry point's check composes with Hydra's own node
        p.dataset.generator.seed = spec["generator_seed"]
        p.dataset.pretrained = None
        p.model.pretrained = None
        p.method = OmegaConf.load(CONF_DIR / "method" / "joint.yaml")
        p.replay = OmegaConf.load(CONF_DIR / "replay" / "none.yaml")
        p.logger = OmegaConf.load(CONF_DIR / "logger" / "none.yaml")
        p.train.epochs = spec["epochs"]
        p.train.lr = spec["lr"]
        p.data.crop = spec["crop"]
        p.seed = spec["seed"]
        p.overlap = True
        p.protocol.step0_cache = True
        # one process: the entry point makes it before DDP starts its ranks, which would
        # relaunch the command and wait on this entry's lock
        p.trainer.strategy, p.trainer.devices = "auto", 1
        p.trainer.pop("num_nodes", None)
        if p.get("memory") is not None:
            p.memory.size = 0
    return p


def segmentation_backbone(cfg: DictConfig, cache: Path, progress: bool = True) -> Path:
    """``model.pretrained=segmentation``: the backbone of a Joint model trained once on every
    class of another generator stream of ``shapes`` (:func:`segmentation_config`), as VOC's
    backbones start from ImageNet, whose classes include VOC's, on images VOC does not hold.
    The Joint model is an ordinary step-0 cache entry; its backbone is written next to the
    corpus backbones with a manifest of what it cost and how well the Joint model segments."""
    backbone = str(cfg.model.get("backbone"))
    if backbone not in RESNETS:
        raise ConfigError(f"model.pretrained=segmentation pretrains a ResNet backbone, and "
                          f"model.backbone={backbone} is not one ({', '.join(sorted(RESNETS))}); "
                          "pass model.pretrained=null (or imagenet) with this model")
    if cfg.dataset.name != "shapes" or cfg.data.get("root") not in (None, "", "null"):
        raise ConfigError("model.pretrained=segmentation trains on another stream of the "
                          "shapes generator, so it needs the generated shapes dataset (no "
                          "data.root); pass model.pretrained=null or imagenet for "
                          f"dataset={cfg.dataset.name}")
    node = OmegaConf.select(cfg, "dataset.segmentation")
    spec = segmentation_spec(None if node is None else OmegaConf.to_container(node, resolve=True))
    if spec["generator_seed"] == int(cfg.dataset.generator.seed):
        raise ConfigError(f"dataset.segmentation.generator_seed={spec['generator_seed']} is the "
                          "benchmark's own dataset.generator.seed: the pretraining would see "
                          "its images; choose another seed")
    pcfg = segmentation_config(cfg, spec)
    source = source_from_cfg(pcfg, progress=progress)
    task = task_from_cfg(pcfg)
    joint = task.joint()
    key = teacher_key(pcfg, source.cache_identity(), joint.steps[0])
    path = Path(cache) / "pretrain" / f"{backbone}-segmentation-{key}.pt"
    with entry_lock(path):
        if path.is_file():
            return path
        log.info("pretraining the %s backbone: Joint segmentation of every class on generator "
                 "seed %d (%d epochs, %d px crops; once, then cached in %s)", backbone,
                 spec["generator_seed"], spec["epochs"], spec["crop"], path.parent)
        work = path.parent / f"work-{key}"  # its epoch checkpoint: a killed pretraining resumes
        start = time.perf_counter()
        with isolate_rng():
            L.seed_everything(derive_seed(pcfg.seed, 0, 1), workers=True, verbose=False)
            fitted = train_teacher(pcfg, work, cache, source, joint, score_task=task)
        val = fitted.module.val_summary or {}
        manifest = {
            "kind": "segmentation_backbone", "backbone": backbone, "segmentation": spec,
            "joint_entry": f"{key}.pt", "joint_cache": fitted.cache,
            "val_miou_all": None if val.get("miou_all") is None else round(val["miou_all"], 4),
            "total_s": round(time.perf_counter() - start, 1),
            "threads": torch.get_num_threads(),
        }
        with atomic_path(path) as tmp:
            torch.save(fitted.module.model.backbone.state_dict(), tmp)
        atomic_write_json(path.with_suffix(".json"), manifest)
        shutil.rmtree(work, ignore_errors=True)
        log.info("segmentation backbone ready in %.0f s (its Joint model's val mIoU %s)",
                 manifest["total_s"], manifest["val_miou_all"])
    return path


def model_weights(cfg: DictConfig, cache: Path, progress: bool = False):
    """What to load into ``cfg.model``'s backbone: ``model.pretrained`` as it is, or for
    ``corpus`` / ``segmentation`` the cached weights file (trained now if the cache holds
    none). The config keeps the word: run hashes and step-0 keys follow the pretraining and
    its recipe, not a path on this machine."""
    pretrained = OmegaConf.select(cfg, "model.pretrained")
    word = protocol_pretraining(pretrained)
    if word == "corpus":
        return str(corpus_backbone(cfg, cache, progress))
    if word == "segmentation":
        return str(segmentation_backbone(cfg, cache, progress))
    return pretrained


def resolved_model(cfg: DictConfig, cache: Path, progress: bool = True) -> DictConfig:
    """``cfg.model`` with ``pretrained`` replaced by :func:`model_weights` (for the entry
    point's check that the weights load)."""
    node = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    if protocol_pretraining(node.get("pretrained")) is not None:
        node.pretrained = model_weights(cfg, cache, progress)
    return node


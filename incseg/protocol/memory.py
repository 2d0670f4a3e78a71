"""The labelled exemplar memory of a run ("-M"): which training images it keeps at each step.

At every step t >= 1 the memory is selected anew, ``memory.size`` images in total, from the
training images of step t-1 and the memory of step t-1 (clovaai/SSUL and cvlab-yonsei/DKD
``utils/memory.py``: the previous step's training set plus the previous memory's list), by the
class-balanced round robin of :func:`incseg.data.memory.balanced_selection` over the old
foreground classes. Which old classes a candidate holds is read from its ground truth: SSUL and
DKD read it from the previous step's labels topped up with the old model's pseudo-labels,
because those labels hide the classes older than that step; a labelled memory has the full
ground truth anyway, and the selection then depends on the data and the seed only, not on a
model.

The choice is a file of the run, ``<run_dir>/memory/step<t>.json`` (image ids, their indices in
the training list, images picked per class), not a shared cache entry: it is the run's own
state. A resumed run reads it back; it is never selected twice.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from incseg.data.base import Sample
from incseg.data.index import foreground, scan_labels, select_train
from incseg.errors import DataError
from incseg.io import atomic_write_json
from incseg.protocol.state import is_rank_zero
from incseg.tasks import Task

log = logging.getLogger("incseg.protocol")

#: the selection's own random stream ("MEM"), apart from the training draws of (seed, step)
MEMORY_STREAM = 0x4D454D


def memory_size(cfg: DictConfig) -> int:
    """``memory.size`` (0 when the config has no memory block)."""
    mem = cfg.get("memory")
    return int(mem.get("size", 0) or 0) if mem is not None else 0


def memory_active(cfg: DictConfig) -> bool:
    """Whether the run keeps a memory: ``memory.size`` > 0 and not Joint training, which sees
    every class's data at once (the memory is then ignored, with a note in the log)."""
    return memory_size(cfg) > 0 and not bool(cfg.method.get("joint", False))


@dataclass
class Memory:
    """The memory of one step: its samples (training list order of the choice) and what
    ``results.json`` records of it."""

    samples: list[Sample]
    info: dict


def _too_large(size: int, available: int, source_name: str, task: Task, overlap: bool) -> str:
    return (f"memory.size={size} is larger than the {available} training images of step 0 "
            f"of task {task.name} in {source_name} (overlap={str(overlap).lower()}) that step 1 "
            f"selects its memory from; lower memory.size to at most {available}")


def check_memory_size(source, task: Task, overlap: bool, cache: Path | None, size: int,
                      progress: bool = False) -> None:
    """Refuse, before step 0 trains, a memory larger than its first pool of candidates (step
    0's training images). Every later pool holds the previous memory, so it is never smaller."""
    if size <= 0 or task.num_steps < 2:
        return
    labels = scan_labels(source, "train", cache, progress)
    available = len(select_train(labels, task, 0, overlap))
    if size > available:
        raise DataError(_too_large(size, available, source.name, task, overlap))


def select_memory(labels: list[list[int]], task: Task, step: int, overlap: bool,
                  previous: list[int], size: int, seed: int) -> tuple[list[int], dict[int, int]]:
    """The memory of ``step`` >= 1 as indices into the training list (``labels``: each
    image's dataset classes), chosen from step ``step``-1's training images and ``previous``
    (the memory of step ``step``-1), and the images picked per old class. Deterministic for
    ``seed``."""
    from incseg.data.memory import balanced_selection

    old = foreground(task.classes_before(step))
    candidates = sorted(set(select_train(labels, task, step - 1, overlap)) | set(previous))
    if size > len(candidates):
        raise DataError(f"memory.size={size} is larger than the {len(candidates)} candidate "
                        f"images of step {step}; lower memory.size to at most "
                        f"{len(candidates)}")
    rng = np.random.default_rng([int(seed), int(step), MEMORY_STREAM])
    order = [int(i) for i in rng.permutation(candidates)]
    classes = [int(c) for c in rng.permutation(sorted(old))]
    held = {i: foreground(labels[i]) & old for i in candidates}
    return balanced_selection(order, held, classes, size)


def _read(path: Path, step: int, size: int, seed: int, ids: list[str]) -> list[int] | None:
    """The stored choice of ``step``, or None (missing, unreadable or another choice's)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        indices = [int(i) for i in data["indices"]]
        ok = (data["step"] == step and data["size"] == size and data["seed"] == seed
              and all(0 <= i < len(ids) for i in indices)
              and [ids[i] for i in indices] == list(data["ids"]))
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        log.warning("memory file %s is unreadable or does not fit this run; selecting the "
                    "memory of step %d again", path, step)
        return None
    return indices


def _indices(cfg: DictConfig, run_dir: Path, labels: list[list[int]], ids: list[str],
             task: Task, step: int) -> tuple[list[int], dict[int, int]]:
    """The memory of ``step`` (read back, or selected and stored) and the images picked per
    old class."""
    if step == 0:
        return [], {}
    size, seed = memory_size(cfg), int(cfg.seed)
    path = run_dir / "memory" / f"step{step}.json"
    stored = _read(path, step, size, seed, ids)
    if stored is not None:
        per_class = json.loads(path.read_text()).get("per_class") or {}
        return stored, {int(c): int(n) for c, n in per_class.items()}
    previous, _ = _indices(cfg, run_dir, labels, ids, task, step - 1)
    chosen, per_class = select_memory(labels, task, step, bool(cfg.overlap), previous, size,
                                      seed)
    if is_rank_zero():  # every rank selects the same; one writes
        atomic_write_json(path, {"step": step, "size": size, "seed": seed,
                                 "ids": [ids[i] for i in chosen], "indices": chosen,
                                 "per_class": {str(c): n for c, n in per_class.items()}})
    return chosen, per_class


def build_memory(cfg: DictConfig, run_dir: Path, cache: Path, source, task: Task,
                 step: int) -> Memory | None:
    """The labelled memory step ``step`` trains with, or None (no memory, step 0, Joint)."""
    if step == 0 or not memory_active(cfg):
        return None
    labels = scan_labels(source, "train", cache, progress=False)
    samples = source.samples("train")
    ids = [s.id for s in samples]
    chosen, per_class = _indices(cfg, Path(run_dir), labels, ids, task, step)
    info = {"images": len(chosen), "labels": str(cfg.memory.labels),
            "mix": str(cfg.memory.mix), "per_class": {str(c): n for c, n in per_class.items()}}
    log.info("step %d memory: %d images (%s), labels %s, mix %s", step, len(chosen),
             ", ".join(f"class {c}: {n}" for c, n in per_class.items()), info["labels"],
             info["mix"])
    return Memory([samples[i] for i in chosen], info)

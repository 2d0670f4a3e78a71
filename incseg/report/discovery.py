"""Finding runs below a directory and reading what each one is: task, table, row, seed.

A run is one ``results.json``. Its row in a table (:class:`Variant`) is its method, replay and
replay distance as the run recorded them, and whether it kept a labelled exemplar memory; the
row's label is the method config's ``label`` (``conf/method/*.yaml``) when the run has one, else
the method's name, so a method the report has never heard of gets a row like any other; a run
with a memory adds "-M" (MiB-M, PLOP-M: SSUL's and DKD's name for the setting).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from incseg.config import task_dirname
from incseg.errors import DataError, IncsegError
from incseg.results import load_results
from incseg.tasks import Task, get_task

log = logging.getLogger("incseg.report")

REPLAY_NAMES = {"deepinversion": "DI", "noise": "noise", "exemplars": "exemplars"}
REPLAY_ORDER = ("none", "deepinversion", "noise", "exemplars")
LOSS_ORDER = ("mse", "kl", "ukd")


def _rank(value: str, order: Sequence[str]) -> int:
    return order.index(value) if value in order else len(order)


@dataclass(frozen=True)
class Variant:
    """A table row: a method, optionally with replay (and its distillation loss)."""

    method: str
    replay: str = "none"
    loss: str | None = None
    detail: str = ""  # the settings that tell apart runs of one tuning or budget sweep
    # Display only: two runs of one method are one row even if only one of them was written
    # after the method's config gained its label.
    method_label: str = field(default="", compare=False)
    memory: bool = False  # a labelled exemplar memory (memory.size > 0)

    @property
    def label(self) -> str:
        name = (self.method_label or self.method) + ("-M" if self.memory else "")
        tail = f" [{self.detail}]" if self.detail else ""
        if self.replay == "none":
            return name + tail
        extra = f" ({self.loss})" if self.loss else ""
        return f"{name} + {REPLAY_NAMES.get(self.replay, self.replay)}{extra}{tail}"

    @property
    def slug(self) -> str:
        tail = ("_" + "_".join(self.detail.replace("=", "").split())) if self.detail else ""
        method = self.method + ("-M" if self.memory else "")
        if self.replay == "none":
            return method + tail
        return f"{method}+{self.replay}" + (f"-{self.loss}" if self.loss else "") + tail

    @property
    def replay_key(self) -> tuple:
        """Order of the rows of one method: plain, then replay kinds, distances, settings;
        the same with a memory after those without."""
        return (self.memory, _rank(self.replay, REPLAY_ORDER), self.replay,
                _rank(self.loss or "", LOSS_ORDER), self.loss or "", self.detail)


@dataclass(frozen=True)
class Group:
    """One table: runs that may be compared (same dataset, model and overlap setting)."""

    dataset: str
    model: str
    overlap: bool

    @property
    def title(self) -> str:
        return f"{self.dataset}, {self.model}, {'overlap' if self.overlap else 'disjoint'}"

    @property
    def slug(self) -> str:
        return f"{self.dataset}_{self.model}_{'overlap' if self.overlap else 'disjoint'}"


@dataclass
class Run:
    path: Path
    results: dict[str, Any]
    task: Task
    task_label: str
    group: Group
    variant: Variant
    seed: int

    @property
    def config(self) -> dict[str, Any]:
        return (self.results.get("provenance") or {}).get("config") or {}

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.results["steps"]

    @property
    def joint(self) -> bool:
        return is_joint(self.results)


@dataclass
class Missing:
    path: Path
    reason: str


def _config_of(results: dict[str, Any]) -> dict[str, Any]:
    cfg = (results.get("provenance") or {}).get("config")
    return cfg if isinstance(cfg, dict) else {}


def _sub(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    val = cfg.get(key)
    return val if isinstance(val, dict) else {}


def pretrained_label(value: Any) -> str | None:
    """How a run's backbone started, for its table's title: segmentation, corpus, imagenet, the
    file's name, or None from random weights."""
    if value in (None, "", "none", "null"):
        return None
    text = str(value)
    return text if text in ("segmentation", "corpus", "imagenet") else Path(text).name


def method_label(results: dict[str, Any]) -> str:
    """The method's display name: its config's ``label``, else the name ``results.json`` has.

    The label is taken only from a method config of the same name: a results file whose
    config describes another method (edited by hand) must not rename the row.
    """
    name = str(results["method"])
    cfg = _sub(_config_of(results), "method")
    label = cfg.get("label")
    if label in (None, "") or str(cfg.get("name", name)) != name:
        return name
    return str(label)


def is_joint(results: dict[str, Any]) -> bool:
    """Offline training on all classes in one step (``method.joint: true`` in its config); a
    results file without a recorded config only has the name to go by."""
    return results.get("method") == "joint" or bool(_sub(_config_of(results), "method")
                                                     .get("joint", False))


def task_of(results: dict[str, Any]) -> tuple[Task, str]:
    """The run's task (a custom split from its config) and its label (the run-path name)."""
    steps = _sub(_config_of(results), "task").get("steps")
    dataset, name = str(results["dataset"]), str(results["task"])
    names = results.get("class_names")  # a dataset with its own classes (folder)
    if isinstance(steps, list):
        return get_task(dataset, name, steps, names), task_dirname(name, steps)
    return get_task(dataset, name, None, names), task_dirname(name, None)


def expected_steps(results: dict[str, Any], task: Task) -> int:
    return 1 if is_joint(results) else task.num_steps


def has_memory(results: dict[str, Any]) -> bool:
    """The run kept a labelled exemplar memory (``results.json`` has a ``memory`` block only
    then)."""
    return bool(results.get("memory"))


def variant_of(results: dict[str, Any]) -> Variant:
    method, label = str(results["method"]), method_label(results)
    memory = has_memory(results)
    replay = str(results.get("replay") or _sub(_config_of(results), "replay").get("name")
                 or "none")
    if replay in ("none", "None", "null"):
        return Variant(method, method_label=label, memory=memory)
    loss = _sub(_config_of(results), "replay").get("loss")
    return Variant(method, replay, str(loss) if loss else None, method_label=label,
                   memory=memory)


#: config keys that never tell experiments apart (where and how a run was written, and the
#: method's display label, which a run may or may not have depending on when it ran)
_NOT_AXES = ("seed", "paths.", "logger.", "trainer.progress_bar", "data.num_workers", "resume",
             "hydra.", "experiment", "replay.check", "replay.weights.", "method.label")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: json_scalar(d)}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def json_scalar(v: Any) -> Any:
    return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)


def _details(results_files: Sequence[Path]) -> dict[Path, str]:
    """For runs that share method, replay, task and model but differ in other settings (a
    tuning sweep: batch size, lr, augmentation; a generator budget), the differing settings as
    ``key=value`` words, so each setting is its own row instead of a duplicate."""
    by_kind: dict[tuple, list[tuple[Path, dict]]] = {}
    for path in results_files:
        try:
            res = load_results(path)
        except IncsegError:
            continue
        cfg = _flat(_config_of(res))
        if not has_memory(res):  # memory.size=0 and a run from before the block: no axis
            cfg = {k: v for k, v in cfg.items() if not k.startswith("memory.")}
        if "replay.weight" in cfg and cfg["replay.weight"] is None:
            # the weight the run used: ``replay.weight: null`` means the per-loss default, so
            # a run with the default and one that sets it to the same value are one row
            cfg["replay.weight"] = cfg.get(f"replay.weights.{cfg.get('replay.loss')}")
        v = variant_of(res)
        kind = (res.get("dataset"), res.get("task"), res.get("model"), res.get("overlap"),
                v.method, v.replay, v.loss, v.memory)
        by_kind.setdefault(kind, []).append((path, cfg))
    out: dict[Path, str] = {}
    for members in by_kind.values():
        if len(members) < 2:
            continue
        keys = sorted({k for _, c in members for k in c})
        differ = [k for k in keys if not k.startswith(_NOT_AXES)
                  and len({json.dumps(c.get(k), sort_keys=True) for _, c in members}) > 1]
        for path, cfg in members:
            out[path] = " ".join(f"{k.split('.')[-1]}={cfg.get(k)}" for k in differ)
    return out


def _hydra_label(run_dir: Path) -> str:
    """'MiB, shapes 15-5s, seed 0' from an unfinished run's ``.hydra/config.yaml``, if there."""
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"),
                                     resolve=False)
        replay = cfg.get("replay", {}).get("name", "none")
        memory = int((cfg.get("memory") or {}).get("size") or 0) > 0 and \
            not cfg["method"].get("joint", False)
        var = Variant(str(cfg["method"]["name"]), str(replay),
                      cfg.get("replay", {}).get("loss") if replay != "none" else None,
                      method_label=str(cfg["method"].get("label") or ""), memory=memory)
        return f"{var.label}, {cfg['dataset']['name']} {cfg['task']['name']}, seed {cfg['seed']}"
    except Exception:  # best effort only: the path alone still identifies the run
        return ""


def _finished_steps(state_json: Path) -> list[int]:
    try:
        return sorted(int(k) for k in json.loads(state_json.read_text()).get("steps", {}))
    except (OSError, ValueError, AttributeError):
        return []


def _one_label_per_method(runs: list[Run]) -> None:
    """Give every row of a method the same label: the first one a run of it carries (runs in
    discovery order), so a run written before the method's config had a label joins the rest."""
    labels: dict[str, str] = {}
    for run in runs:
        v = run.variant
        if v.method_label != v.method:
            labels.setdefault(v.method, v.method_label)
    for run in runs:
        label = labels.get(run.variant.method, run.variant.method)
        if run.variant.method_label not in (label, run.variant.method):
            log.info("%s: method %s is labelled %r here, %r elsewhere; using %r", run.path,
                     run.variant.method, run.variant.method_label, label, label)
        run.variant = dataclasses.replace(run.variant, method_label=label)


def discover(root: Path) -> tuple[list[Run], list[Missing]]:
    """Every run below ``root``: finished ones, and the rest with the reason they are left out.

    Finished runs come in the order of their ``results.json`` paths. That order stands in for
    the order the runs were started in, which ``results.json`` does not record (its provenance
    holds the config, versions, device and per-step wall times, no start time).
    """
    if not root.is_dir():
        raise DataError(f"{root} is not a directory; pass a run or sweep directory "
                        "(the hydra.run.dir or hydra.sweep.dir of python -m incseg.run)")
    report_dir = root / "report"
    results_files = sorted(p for p in root.rglob("results.json") if report_dir not in p.parents)
    state_files = sorted(p for p in root.rglob("state.json") if report_dir not in p.parents)
    if not results_files and not state_files:
        raise DataError(f"no results.json or state.json below {root}; run "
                        "`python -m incseg.run ...` first, or pass its run/sweep directory")
    runs: list[Run] = []
    missing: list[Missing] = []
    for state in state_files:
        if not (state.parent / "results.json").exists():
            done = _finished_steps(state)
            label = _hydra_label(state.parent)
            missing.append(Missing(state.parent, (f"{label}: " if label else "")
                                   + f"unfinished, no results.json yet (steps finished: "
                                   f"{done if done else 'none'})"))
    seen: dict[tuple, Path] = {}
    details = _details(results_files)
    for path in results_files:
        try:
            results = load_results(path)
            task, task_label = task_of(results)
        except IncsegError as err:
            missing.append(Missing(path.parent, f"unreadable results: {err}"))
            continue
        variant = variant_of(results)
        if details.get(path):
            variant = dataclasses.replace(variant, detail=details[path])
        model = str(results.get("model") or _sub(_config_of(results), "model").get("name")
                    or "?")
        start = pretrained_label((results.get("conventions") or {}).get("pretrained"))
        if start:  # a pretrained backbone is another benchmark: its own table
            model = f"{model} ({start})"
        group = Group(str(results["dataset"]), model, bool(results.get("overlap", True)))
        run = Run(path.parent, results, task, task_label, group, variant,
                  int(results["seed"]))
        have, want = len(results["steps"]), expected_steps(results, task)
        if have < want:
            missing.append(Missing(path.parent, f"{variant.label}, {task_label}, seed {run.seed}: "
                                   f"unfinished, results.json has {have} of {want} steps"))
            continue
        key = (group, task_label, variant, run.seed)
        if key in seen:
            missing.append(Missing(path.parent, f"{variant.label}, {task_label}, seed {run.seed}: "
                                   f"duplicate of {seen[key]}; not averaged"))
            continue
        seen[key] = path.parent
        runs.append(run)
    _one_label_per_method(runs)
    return runs, missing

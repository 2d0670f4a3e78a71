"""``python -m incseg.report DIR [--no-overlays] [--images N]``: tables and plots from runs.

DIR is a run directory or a sweep directory; every ``results.json`` below it is one run, keyed by
(dataset, task, method, replay, seed). Runs are grouped into one table per (dataset, model,
overlap), because averaging a ResNet-18 with a ResNet-101, or overlap with disjoint, would mix
different experiments. Within a table: one row per method (+ replay variant) in the paper's
order (FT, LwF, ILT, MiB, MiB + replay, Joint), one column group per task with the final step's
old / new / all mIoU as mean ± sample std over seeds (ddof=1) and the number of seeds n.

A run that is not finished (``state.json`` without ``results.json``, or fewer steps than its
task has), a results file that cannot be read, or a second run with the same key is listed
under "Missing or unfinished" and left out of every average: never dropped silently.

Everything is written into ``DIR/report/`` (``table.md``, ``table.csv``, ``table.tex``,
``runs.csv`` with one line per run (the per-seed numbers) and the PNG plots), each file
atomically; the markdown tables are printed on stdout, logs on stderr.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from incseg.cli import report_errors
from incseg.config import setup_logging, task_dirname
from incseg.errors import ConfigError, DataError, IncsegError
from incseg.io import atomic_path, atomic_write_bytes, atomic_write_text
from incseg.results import load_results
from incseg.tasks import SPLITS, Task, get_task

log = logging.getLogger("incseg.report")

CAPTION = (
    "old = background + step-0 classes (paper's 1-15), new = classes added after step 0, "
    "all = all seen classes; mIoU over classes present in the test ground truth; test split"
)
CELLS = ("mean ± sample std (ddof=1) over the n seeds of the cell; with one seed, the mean "
         "alone; IoU in [0, 1]")
METHOD_NAMES = {"ft": "FT", "lwf": "LwF", "ilt": "ILT", "mib": "MiB", "joint": "Joint"}
METHOD_ORDER = ("ft", "lwf", "ilt", "mib")
REPLAY_NAMES = {"deepinversion": "DI", "noise": "noise", "exemplars": "exemplars"}
REPLAY_ORDER = ("none", "deepinversion", "noise", "exemplars")
LOSS_ORDER = ("mse", "kl", "ukd")
METRICS = ("old", "new", "all")


def _rank(value: str, order: Sequence[str]) -> int:
    return order.index(value) if value in order else len(order)


@dataclass(frozen=True)
class Variant:
    """A table row: a method, optionally with replay (and its distillation loss)."""

    method: str
    replay: str = "none"
    loss: str | None = None
    detail: str = ""  # the config values that tell apart runs of one sweep (Tables 1 and 4)

    @property
    def label(self) -> str:
        name = METHOD_NAMES.get(self.method, self.method)
        tail = f" [{self.detail}]" if self.detail else ""
        if self.replay == "none":
            return name + tail
        extra = f" ({self.loss})" if self.loss else ""
        return f"{name} + {REPLAY_NAMES.get(self.replay, self.replay)}{extra}{tail}"

    @property
    def slug(self) -> str:
        tail = ("_" + "_".join(self.detail.replace("=", "").split())) if self.detail else ""
        if self.replay == "none":
            return self.method + tail
        return f"{self.method}+{self.replay}" + (f"-{self.loss}" if self.loss else "") + tail

    @property
    def sort_key(self) -> tuple:
        # Joint is the upper bound: last, as in the paper's tables.
        m = 99 if self.method == "joint" else _rank(self.method, METHOD_ORDER)
        return (m, self.method, _rank(self.replay, REPLAY_ORDER), self.replay,
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


@dataclass
class Missing:
    path: Path
    reason: str


@dataclass
class Cell:
    """The runs of one (row, task): their final old/new/all as (mean, std, n)."""

    runs: list[Run]

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs)

    def stat(self, metric: str) -> tuple[float | None, float | None, int]:
        return mean_std(r.results["final"].get(metric) for r in self.runs)


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample std with ddof=1, n) over the non-null values; std is None for n < 2."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None, 0
    arr = np.asarray(vals, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else None
    return float(arr.mean()), std, len(arr)


def fmt_cell(mean: float | None, std: float | None, pm: str = "±") -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} {pm} {std:.3f}"


# --------------------------------------------------------------------------------------------
# Finding runs


def _config_of(results: dict[str, Any]) -> dict[str, Any]:
    cfg = (results.get("provenance") or {}).get("config")
    return cfg if isinstance(cfg, dict) else {}


def _sub(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    val = cfg.get(key)
    return val if isinstance(val, dict) else {}


def task_of(results: dict[str, Any]) -> tuple[Task, str]:
    """The run's task (a custom split from its config) and its label (the run-path name)."""
    steps = _sub(_config_of(results), "task").get("steps")
    dataset, name = str(results["dataset"]), str(results["task"])
    if isinstance(steps, list):
        return get_task(dataset, name, steps), task_dirname(name, steps)
    return get_task(dataset, name), task_dirname(name, None)


def expected_steps(results: dict[str, Any], task: Task) -> int:
    joint = results.get("method") == "joint" or bool(_sub(_config_of(results), "method")
                                                       .get("joint", False))
    return 1 if joint else task.num_steps


def variant_of(results: dict[str, Any]) -> Variant:
    replay = str(results.get("replay") or _sub(_config_of(results), "replay").get("name")
                 or "none")
    if replay in ("none", "None", "null"):
        return Variant(str(results["method"]))
    loss = _sub(_config_of(results), "replay").get("loss")
    return Variant(str(results["method"]), replay, str(loss) if loss else None)


#: config keys that never tell experiments apart (where and how a run was written)
_NOT_AXES = ("seed", "paths.", "logger.", "trainer.progress_bar", "data.num_workers", "resume",
             "hydra.", "experiment", "replay.check", "replay.weights.")


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
        if "replay.weight" in cfg and cfg["replay.weight"] is None:
            # the weight the run used: ``replay.weight: null`` means the per-loss default, so
            # a run with the default and one that sets it to the same value are one row
            cfg["replay.weight"] = cfg.get(f"replay.weights.{cfg.get('replay.loss')}")
        v = variant_of(res)
        kind = (res.get("dataset"), res.get("task"), res.get("model"), res.get("overlap"),
                v.method, v.replay, v.loss)
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
    """'MiB 15-5s seed 0' from an unfinished run's ``.hydra/config.yaml``, if it is there."""
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"),
                                     resolve=False)
        replay = cfg.get("replay", {}).get("name", "none")
        var = Variant(str(cfg["method"]["name"]), str(replay),
                      cfg.get("replay", {}).get("loss") if replay != "none" else None)
        return f"{var.label}, {cfg['dataset']['name']} {cfg['task']['name']}, seed {cfg['seed']}"
    except Exception:  # best effort only: the path alone still identifies the run
        return ""


def _finished_steps(state_json: Path) -> list[int]:
    import json

    try:
        return sorted(int(k) for k in json.loads(state_json.read_text()).get("steps", {}))
    except (OSError, ValueError, AttributeError):
        return []


def discover(root: Path) -> tuple[list[Run], list[Missing]]:
    """Every run below ``root``: finished ones, and the rest with the reason they are left out."""
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
            variant = Variant(variant.method, variant.replay, variant.loss, details[path])
        model = str(results.get("model") or _sub(_config_of(results), "model").get("name")
                    or "?")
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
    return runs, missing


# --------------------------------------------------------------------------------------------
# Tables

Table = dict[Variant, dict[str, Cell]]


def _task_order(dataset: str, label: str) -> tuple:
    known = list(SPLITS.get(dataset, {}))
    return (known.index(label), "") if label in known else (len(known), label)


def aggregate(runs: Sequence[Run]) -> dict[Group, Table]:
    """{group: {row: {task label: Cell}}}, groups/rows/tasks in report order."""
    out: dict[Group, Table] = {}
    for run in runs:
        row = out.setdefault(run.group, {}).setdefault(run.variant, {})
        row.setdefault(run.task_label, Cell([])).runs.append(run)
    ordered: dict[Group, Table] = {}
    for group in sorted(out, key=lambda g: (g.dataset, g.model, not g.overlap)):
        table = out[group]
        ordered[group] = {v: table[v] for v in sorted(table, key=lambda v: v.sort_key)}
    return ordered


def tasks_of(group: Group, table: Table) -> list[str]:
    labels = {t for cells in table.values() for t in cells}
    return sorted(labels, key=lambda t: _task_order(group.dataset, t))


def markdown_table(group: Group, table: Table) -> str:
    tasks = tasks_of(group, table)
    head = ["method"] + [f"{t} {m}" for t in tasks for m in (*METRICS, "n")]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for variant, cells in table.items():
        row = [variant.label]
        for t in tasks:
            cell = cells.get(t)
            if cell is None:
                row += ["-"] * (len(METRICS) + 1)
                continue
            row += [fmt_cell(*cell.stat(m)[:2]) for m in METRICS] + [str(len(cell.runs))]
        lines.append("| " + " | ".join(row) + " |")
    caption = (f"*{group.title}: final step. {CAPTION}. Cells: {CELLS}; n = number of seeds "
               "in the cell.*")
    return "\n".join(lines) + "\n\n" + caption + "\n"


def _num(x: float | None) -> str:
    return "" if x is None else repr(round(x, 6))


def csv_text(tables: dict[Group, Table]) -> str:
    """Tidy CSV: one line per (table, row, task) with mean/std of old/new/all and n."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "model", "overlap", "row", "method", "replay", "replay_loss", "task",
                "n", "seeds", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std"))])
    for group, table in tables.items():
        tasks = tasks_of(group, table)
        for variant, cells in table.items():
            for t in tasks:
                if t not in cells:
                    continue
                cell = cells[t]
                stats = []
                for m in METRICS:
                    mean, std, _ = cell.stat(m)
                    stats += [_num(mean), _num(std)]
                w.writerow([group.dataset, group.model, str(group.overlap).lower(),
                            variant.label, variant.method, variant.replay, variant.loss or "",
                            t, len(cell.runs), " ".join(map(str, cell.seeds)), *stats])
    return buf.getvalue()


def runs_csv_text(runs: Sequence[Run], root: Path) -> str:
    """One line per finished run: its row label, task, seed, final old/new/all/avg, all-mIoU
    after each step and, with replay, the curvature test of each step. The per-seed numbers
    behind the table's means, for paired comparisons (method A vs B at the same seed)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "row", "task", "seed", "old", "new", "all", "avg", "all_per_step",
                "replay_sharpness_per_step", "replay_stability_bound"])
    for r in sorted(runs, key=lambda r: (r.task_label, r.variant.label, r.seed)):
        final = r.results["final"]
        reps = [s.get("replay") or {} for s in r.steps[1:]]
        sharp = " ".join(_num(x.get("sharpness")) for x in reps if "sharpness" in x)
        bound = next((x["stability_bound"] for x in reps if "stability_bound" in x), None)
        w.writerow([str(r.path.relative_to(root)) if r.path.is_relative_to(root) else r.path,
                    r.variant.label, r.task_label, r.seed,
                    *(_num(final.get(m)) for m in ("old", "new", "all", "avg")),
                    " ".join(_num(s.get("miou_all")) for s in r.steps), sharp, _num(bound)])
    return buf.getvalue()


PM_TEX = r"\pm"
_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def latex_table(group: Group, table: Table) -> str:
    tasks = tasks_of(group, table)
    k = len(METRICS) + 1
    spec = "l" + " ".join("c" * k for _ in tasks)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\caption{" + tex_escape(f"{group.title}: final step. {CAPTION}. ")
        + tex_escape(f"Cells: {CELLS}; n = number of seeds in the cell.").replace(
            "±", r"$\pm$") + "}",
        r"\begin{tabular}{" + spec + "}",
        r"\toprule",
        " & " + " & ".join(rf"\multicolumn{{{k}}}{{c}}{{{tex_escape(t)}}}" for t in tasks)
        + r" \\",
        "".join(rf"\cmidrule(lr){{{2 + i * k}-{1 + (i + 1) * k}}}" for i in range(len(tasks))),
        "Method & " + " & ".join(f"{m}" for _ in tasks for m in (*METRICS, "$n$")) + r" \\",
        r"\midrule",
    ]
    for variant, cells in table.items():
        row = [tex_escape(variant.label)]
        for t in tasks:
            cell = cells.get(t)
            if cell is None:
                row += ["--"] * k
                continue
            for m in METRICS:
                mean, std, _ = cell.stat(m)
                row.append("--" if mean is None else "$" + fmt_cell(mean, std, PM_TEX) + "$")
            row.append(str(len(cell.runs)))
        lines.append(" & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def latex_text(tables: dict[Group, Table]) -> str:
    head = "% incseg report (python -m incseg.report); needs \\usepackage{booktabs}\n"
    return head + "\n".join(latex_table(g, t) for g, t in tables.items())


def missing_section(missing: Sequence[Missing], root: Path) -> str:
    lines = ["## Missing or unfinished", ""]
    if not missing:
        lines.append("None: every run found below the directory is finished and in the tables.")
    for m in missing:
        try:
            rel = m.path.relative_to(root)
        except ValueError:
            rel = m.path
        lines.append(f"- `{rel}`: {m.reason}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas directly: no pyplot global state, no display needed)


def _figure(rows: int, cols: int, w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * cols, h * rows), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _last_task(cell: Cell) -> Task:
    return cell.runs[0].task


def plot_curves(group: Group, table: Table, path: Path) -> Path:
    """(a) mIoU(all) per step, mean over seeds with a ±1 sample-std band; Joint as a dashed
    line at its single value (the offline upper bound)."""
    tasks = tasks_of(group, table)
    fig, axes = _figure(1, len(tasks), 4.2, 3.2)
    colours = dict(zip(table, _colours(len(table))))
    for ax, t in zip(axes[0], tasks):
        n_steps = max(len(c.runs[0].steps) for cells in table.values()
                      for tt, c in cells.items() if tt == t)
        for variant, cells in table.items():
            if t not in cells:
                continue
            runs = cells[t].runs
            length = len(runs[0].steps)
            stats = [mean_std(r.steps[s].get("miou_all") for r in runs) for s in range(length)]
            mean = np.array([np.nan if m is None else m for m, _, _ in stats])
            std = np.array([0.0 if s is None else s for _, s, _ in stats])
            x = np.arange(length)
            if length == 1 and n_steps > 1:
                x, mean, std = np.array([0, n_steps - 1]), np.repeat(mean, 2), np.repeat(std, 2)
                ax.plot(x, mean, "--", color=colours[variant], label=variant.label)
            else:
                ax.plot(x, mean, "o-", color=colours[variant], label=variant.label, ms=3)
            ax.fill_between(x, mean - std, mean + std, color=colours[variant], alpha=0.2, lw=0)
        ax.set_title(t)
        ax.set_xlabel("step")
        ax.set_ylabel("mIoU (all)")
        ax.set_xticks(range(n_steps))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_heatmap(group: Group, table: Table, path: Path) -> Path:
    """(b) per-class IoU at the final step, mean over seeds; grey = no IoU (class absent from
    the test ground truth, or never scored)."""
    from matplotlib import colormaps

    tasks = tasks_of(group, table)
    n_cls = max(len(get_task_seen(table, t)) for t in tasks)
    # ADE's 151 classes would make a 60-inch figure: cap the width, drop the cell labels there
    fig, axes = _figure(len(tasks), 1, min(max(6.0, 0.38 * n_cls + 2.5), 30.0),
                        0.35 * len(table) + 1.4)
    annotate = n_cls <= 40
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    for ax, t in zip(axes[:, 0], tasks):
        classes = get_task_seen(table, t)
        rows = [v for v in table if t in table[v]]
        grid = np.full((len(rows), len(classes)), np.nan)
        for i, v in enumerate(rows):
            for j, c in enumerate(classes):
                m, _, _ = mean_std(r.steps[-1]["iou"].get(str(c)) for r in table[v][t].runs)
                if m is not None:
                    grid[i, j] = m
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(classes)), [str(c) for c in classes],
                      fontsize=7 if annotate else 4)
        ax.set_yticks(range(len(rows)), [v.label for v in rows], fontsize=8)
        ax.set_xlabel("class id")
        ax.set_title(f"{t}: per-class IoU at the final step")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if annotate and not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=5,
                            color="white" if grid[i, j] < 0.5 else "black")
        ax.figure.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    return _save(fig, path)


def get_task_seen(table: Table, task_label: str) -> list[int]:
    """All classes of the task in task order (what the final step of any method has seen)."""
    for cells in table.values():
        if task_label in cells:
            task = _last_task(cells[task_label])
            return task.classes_seen(task.num_steps - 1)
    return []


def forgetting_step0(results: dict[str, Any], task: Task) -> dict[int, float]:
    """Per step-0 class: IoU after step 0 minus IoU at the final step (positive = forgotten).

    Classes without an IoU at either end (absent from the test ground truth) are left out.
    """
    first, last = results["steps"][0]["iou"], results["steps"][-1]["iou"]
    out: dict[int, float] = {}
    for c in task.steps[0]:
        a, b = first.get(str(c)), last.get(str(c))
        if a is not None and b is not None:
            out[c] = float(a) - float(b)
    return out


def old_to_background(results: dict[str, Any], task: Task) -> dict[int, float] | None:
    """Per old foreground class: the fraction of its ground-truth pixels predicted as background
    at the final step (from ``steps[-1].confusion``, rows = ground truth); None when the results
    predate that field. Classes with no ground-truth pixels are left out."""
    conf = results["steps"][-1].get("confusion")
    if not isinstance(conf, dict) or "classes" not in conf or "counts" not in conf:
        return None
    classes = [int(c) for c in conf["classes"]]
    counts = np.asarray(conf["counts"], dtype=np.int64)
    if 0 not in classes or counts.shape != (len(classes), len(classes)):
        return None
    bg = classes.index(0)
    out: dict[int, float] = {}
    for c in task.steps[0]:
        if c == 0 or c not in classes:
            continue
        row = counts[classes.index(c)]
        if row.sum() > 0:
            out[c] = float(row[bg]) / float(row.sum())
    return out


def _bars(ax, classes: list[int], series: dict[Variant, dict[int, float]], colours) -> None:
    k = max(len(series), 1)
    width = 0.8 / k
    x = np.arange(len(classes))
    for i, (v, values) in enumerate(series.items()):
        ys = [values.get(c, np.nan) for c in classes]
        ax.bar(x - 0.4 + width * (i + 0.5), ys, width, label=v.label, color=colours[v])
    ax.set_xticks(x, [str(c) for c in classes], fontsize=7)
    ax.set_xlabel("class id")
    ax.grid(axis="y", alpha=0.3)


def _mean_per_class(dicts: Iterable[dict[int, float]]) -> dict[int, float]:
    dicts = list(dicts)
    keys = sorted({c for d in dicts for c in d})
    out = {}
    for c in keys:
        m, _, _ = mean_std(d.get(c) for d in dicts)
        if m is not None:
            out[c] = m
    return out


def plot_forgetting(group: Group, table: Table, path: Path) -> Path | None:
    """(c) forgetting of the step-0 classes per method (Joint and 1-step runs have none)."""
    tasks = [t for t in tasks_of(group, table)
             if any(t in c and len(c[t].runs[0].steps) > 1 for c in table.values())]
    if not tasks:
        return None
    fig, axes = _figure(len(tasks), 1, 9.0, 2.8)
    colours = dict(zip(table, _colours(len(table))))
    for ax, t in zip(axes[:, 0], tasks):
        series = {}
        for v, cells in table.items():
            if t in cells and len(cells[t].runs[0].steps) > 1:
                series[v] = _mean_per_class(forgetting_step0(r.results, r.task)
                                            for r in cells[t].runs)
        _bars(ax, _last_task(next(c[t] for c in table.values() if t in c)).steps[0], series,
              colours)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_ylabel("IoU step 0 - IoU final")
        ax.set_title(f"{t}: forgetting of the step-0 classes (mean over seeds)")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_confusion(group: Group, table: Table, path: Path) -> tuple[Path | None, list[str]]:
    """(d) old class -> background at the final step; (None, rows lacking the field) when no
    run of the group has ``steps[-1].confusion``."""
    tasks = tasks_of(group, table)
    lacking: list[str] = []
    data: dict[str, dict[Variant, dict[int, float]]] = {}
    for t in tasks:
        for v, cells in table.items():
            if t not in cells:
                continue
            fractions = [old_to_background(r.results, r.task) for r in cells[t].runs]
            if any(f is None for f in fractions):
                lacking.append(f"{v.label} ({t})")
            have = [f for f in fractions if f is not None]
            if have:
                data.setdefault(t, {})[v] = _mean_per_class(have)
    if not data:
        return None, lacking
    fig, axes = _figure(len(data), 1, 9.0, 2.8)
    colours = dict(zip(table, _colours(len(table))))
    for ax, (t, series) in zip(axes[:, 0], data.items()):
        task = _last_task(next(c[t] for c in table.values() if t in c))
        _bars(ax, [c for c in task.steps[0] if c != 0], series, colours)
        ax.set_ylim(0, 1)
        ax.set_ylabel("GT pixels -> background")
        ax.set_title(f"{t}: old classes predicted as background at the final step")
        ax.legend(fontsize=7)
    return _save(fig, path), lacking


# --------------------------------------------------------------------------------------------
# Replay grids and prediction overlays


def _lowest_seed(cell: Cell) -> Run:
    return min(cell.runs, key=lambda r: r.seed)


def copy_replay_grids(group: Group, table: Table, out_dir: Path) -> list[tuple[str, Path]]:
    """(e) the run's own ``replay/step<t>_classes.png`` grids (lowest seed), copied so the
    report folder stands alone."""
    copied = []
    for t in tasks_of(group, table):
        for v, cells in table.items():
            if t not in cells or v.replay == "none":
                continue
            run = _lowest_seed(cells[t])
            for png in sorted((run.path / "replay").glob("step*_classes.png")):
                dst = out_dir / "replay" / f"{group.slug}_{t}_{v.slug}_seed{run.seed}_{png.name}"
                atomic_write_bytes(dst, png.read_bytes())
                copied.append((f"{v.label}, {t}, seed {run.seed}, {png.stem}", dst))
    return copied


def _denormalize(x) -> np.ndarray:
    """The eval transform's normalised tensor back to a displayable uint8 image."""
    from incseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    img = x.permute(1, 2, 0).cpu().numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def plot_overlays(group: Group, table: Table, task_label: str, path: Path, n_images: int
                  ) -> tuple[Path | None, str | None]:
    """(f) image | ground truth | one prediction per method on the first ``n_images`` test
    images, each method's final checkpoint of its lowest seed; (None, reason) if impossible.

    Images go through the eval transform of the first row's config, so they look like what the
    test split scored; predictions are mapped from channels to dataset ids by the checkpoint.
    """
    from omegaconf import OmegaConf

    from incseg.config import source_from_cfg
    from incseg.data.dataset import read_image
    from incseg.data.index import read_mask
    from incseg.data.transforms import eval_transform
    from incseg.viz import colorize, load_segmenter, predict_ids

    rows = [(v, _lowest_seed(c[task_label])) for v, c in table.items() if task_label in c]
    preds: list[tuple[str, Any, list[int]]] = []
    skipped = []
    for v, run in rows:
        ckpt = run.path / "checkpoints" / f"step{len(run.steps) - 1}.pt"
        if not ckpt.is_file():
            skipped.append(f"{v.label}: no {ckpt.name}")
            continue
        try:
            model, class_ids, _ = load_segmenter(ckpt, None if group.model == "?" else group.model)
        except IncsegError as err:
            skipped.append(f"{v.label}: {err}")
            continue
        want = run.task.classes_seen(run.task.num_steps - 1)
        if sorted(class_ids) != sorted(want):
            skipped.append(f"{v.label}: {ckpt.name} holds classes {class_ids}, not the task's")
            continue
        preds.append((v.label, model, class_ids))
    if skipped:
        log.info("overlays %s: skipped %s", task_label, "; ".join(skipped))
    if not preds:
        return None, "no final checkpoints (" + "; ".join(skipped) + ")"
    ref = rows[0][1]
    try:
        cfg = OmegaConf.create(ref.config)
        source = source_from_cfg(cfg, progress=False)
        samples = source.samples("test")[: max(int(n_images), 1)]
        transform = eval_transform(int(cfg.data.crop), str(cfg.data.test_mode))
        items = []
        for s in samples:
            # read_mask gives a read-only view; ToTensorV2 wants a writable array
            out = transform(image=read_image(s.image), mask=np.array(read_mask(s.mask)))
            items.append((s.id, out["image"], np.asarray(out["mask"], dtype=np.uint8)))
    except (IncsegError, KeyError, AttributeError, ValueError) as err:
        msg = " ".join(str(err).split())
        log.info("overlays %s skipped: cannot rebuild the test images (%s)", task_label, msg)
        return None, f"cannot rebuild the test images from the run's config ({msg})"
    if not items:
        return None, "the test split lists no images"
    cols = 2 + len(preds)
    fig, axes = _figure(len(items), cols, 2.0, 2.0)
    for i, (sid, x, gt) in enumerate(items):
        panels = [(f"{sid}", _denormalize(x)), ("ground truth", colorize(gt))]
        for label, model, class_ids in preds:
            panels.append((label, colorize(predict_ids(model, x.unsqueeze(0), class_ids)[0])))
        for j, (title, img) in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 or j == 0:
                ax.set_title(title, fontsize=7)
    return _save(fig, path), ("; ".join(skipped) or None)


# --------------------------------------------------------------------------------------------
# The report


@dataclass
class Report:
    root: Path
    runs: list[Run]
    missing: list[Missing]
    tables: dict[Group, Table] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)  # markdown lines of the Plots section

    def tables_md(self) -> str:
        parts = [f"# incseg report: {self.root}", "",
                 f"{len(self.runs)} finished runs in the tables; {len(self.missing)} missing or "
                 "unfinished (listed below, not averaged).", ""]
        for group, table in self.tables.items():
            parts += [f"## {group.title}", "", markdown_table(group, table)]
        if not self.tables:
            parts += ["No finished run to tabulate.", ""]
        parts.append(missing_section(self.missing, self.root))
        return "\n".join(parts)


def _link(out_dir: Path, path: Path) -> str:
    return path.relative_to(out_dir).as_posix()


def make_plots(rep: Report, out_dir: Path, overlays: bool, n_images: int) -> None:
    lines = ["## Plots", ""]
    for group, table in rep.tables.items():
        lines += [f"### {group.title}", ""]
        p = plot_curves(group, table, out_dir / f"curves_{group.slug}.png")
        lines.append(f"- mIoU(all) per step, mean ± std over seeds: ![curves]({_link(out_dir, p)})")
        p = plot_heatmap(group, table, out_dir / f"heatmap_{group.slug}.png")
        lines.append(f"- per-class IoU at the final step: ![heatmap]({_link(out_dir, p)})")
        p = plot_forgetting(group, table, out_dir / f"forgetting_{group.slug}.png")
        if p is None:
            lines.append("- forgetting: skipped (no run has more than one step)")
        else:
            lines.append("- forgetting of the step-0 classes (IoU after step 0 minus IoU at the "
                         f"final step; Joint is trained in one step, so it has none): "
                         f"![forgetting]({_link(out_dir, p)})")
        p, lacking = plot_confusion(group, table, out_dir / f"confusion_{group.slug}.png")
        if p is None:
            msg = ("old-class -> background confusion: skipped, these results lack "
                   "steps[-1].confusion (written by newer incseg versions; rerun to get it)")
            lines.append(f"- {msg}")
            log.info("%s: %s", group.title, msg)
        else:
            lines.append("- fraction of each old class's ground-truth pixels predicted as "
                         f"background at the final step: ![confusion]({_link(out_dir, p)})")
            if lacking:
                lines.append("  (without steps[-1].confusion, left out of this plot: "
                             + ", ".join(lacking) + ")")
        grids = copy_replay_grids(group, table, out_dir)
        if grids:
            lines.append("- synthetic replay images (one row per old class):")
            lines += [f"  - [{label}]({_link(out_dir, p)})" for label, p in grids]
        if overlays:
            for t in tasks_of(group, table):
                p, note = plot_overlays(group, table, t, out_dir / f"overlays_{group.slug}_{t}.png",
                                        n_images)
                if p is None:
                    lines.append(f"- prediction overlays {t}: skipped, {note}")
                else:
                    lines.append(f"- predictions on the first {n_images} test images, {t} "
                                 f"(image | ground truth | methods): "
                                 f"![overlays {t}]({_link(out_dir, p)})"
                                 + (f" (skipped: {note})" if note else ""))
        else:
            lines.append("- prediction overlays: not drawn (--no-overlays)")
        lines.append("")
    rep.plots = lines


def make_report(root: Path, overlays: bool = True, n_images: int = 4) -> Report:
    """Find the runs below ``root``, write ``root/report/*`` and return the report."""
    root = Path(root)
    runs, missing = discover(root)
    rep = Report(root, runs, missing, aggregate(runs))
    out_dir = root / "report"
    if rep.tables:
        make_plots(rep, out_dir, overlays, n_images)
    md = rep.tables_md() + ("\n" + "\n".join(rep.plots) + "\n" if rep.plots else "")
    atomic_write_text(out_dir / "table.csv", csv_text(rep.tables))
    atomic_write_text(out_dir / "runs.csv", runs_csv_text(runs, root))
    atomic_write_text(out_dir / "table.tex", latex_text(rep.tables))
    atomic_write_text(out_dir / "table.md", md)
    return rep


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``error:`` line and exit 2 like every incseg command."""

    def error(self, message: str):
        raise ConfigError(f"{message}; usage: python -m incseg.report DIR [--no-overlays] "
                          "[--images N]")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = _Parser(prog="python -m incseg.report", description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path, help="a run directory or a sweep directory")
    p.add_argument("--no-overlays", action="store_true",
                   help="do not load checkpoints to draw prediction overlays")
    p.add_argument("--images", type=int, default=4, help="test images in the overlays")
    args = p.parse_args(list(argv))
    if args.images < 1:
        raise ConfigError(f"--images {args.images}: give at least 1")
    return args


@report_errors
def main(argv: Sequence[str] | None = None) -> None:
    setup_logging()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rep = make_report(args.dir, overlays=not args.no_overlays, n_images=args.images)
    log.info("wrote %s (table.md, table.csv, table.tex, plots)", args.dir / "report")
    print(rep.tables_md(), flush=True)


if __name__ == "__main__":
    main()

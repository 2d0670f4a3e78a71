"""The figures of a report, drawn on matplotlib's Agg canvas directly (no pyplot global state,
no display needed): mIoU per step, per-class IoU, forgetting of the step-0 classes, old classes
predicted as background, and copies of the runs' own replay grids.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from incseg.io import atomic_path, atomic_write_bytes
from incseg.report.discovery import Group, Run, Variant
from incseg.report.tables import Cell, Table, class_names, mean_std, tasks_of
from incseg.results import class_label
from incseg.tasks import Task


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
    """mIoU(all) per step, mean over seeds with a ±1 sample-std band; a one-step (joint) row
    as a dashed line at its single value (the offline upper bound)."""
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
    """Per-class IoU at the final step, mean over seeds; grey = no IoU (class absent from
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
        names = class_names(table, t)
        ax.set_xticks(range(len(classes)), [class_label(c, names) for c in classes],
                      fontsize=7 if annotate else 4, rotation=45 if names else 0,
                      ha="right" if names else "center")
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
    """Forgetting of the step-0 classes per row (one-step rows, i.e. joint training, have none)."""
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
    """Old class -> background at the final step; (None, rows lacking the field) when no
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


def _lowest_seed(cell: Cell) -> Run:
    return min(cell.runs, key=lambda r: r.seed)


def copy_replay_grids(group: Group, table: Table, out_dir: Path) -> list[tuple[str, Path]]:
    """The run's own ``replay/step<t>_classes.png`` grids (lowest seed), copied so the
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

"""Aggregation over seeds and the tables: markdown, tidy CSV, per-run CSV and LaTeX.

Runs are grouped into one table per (dataset, model, overlap): averaging a ResNet-18 with a
ResNet-101, or overlap with disjoint, would mix different experiments. A cell is the final
step's old / new / all mIoU and their harmonic mean hIoU (DKD, Baek et al., NeurIPS 2022) as
mean ± sample std (ddof=1) over seeds; mIoU averages the classes present in the ground truth,
as in MiB (Cermelli et al., CVPR 2020).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from incseg.report.discovery import Group, Missing, Run, Variant
from incseg.results import class_label, final_metric
from incseg.tasks import SPLITS

log = logging.getLogger("incseg.report")

CAPTION = (
    "old = background + step-0 classes (paper's 1-15), new = classes added after step 0, "
    "all = all seen classes, hIoU = 2 old new / (old + new) (DKD); mIoU over classes present "
    "in the test ground truth; test split"
)
CELLS = ("mean ± sample std (ddof=1) over the n seeds of the cell; with one seed, the mean "
         "alone; IoU in [0, 1]")
METRICS = ("old", "new", "all", "hiou")
#: how the tables head each metric
HEADS = {"hiou": "hIoU"}


@dataclass
class Cell:
    """The runs of one (row, task): their final old/new/all/hiou as (mean, std, n)."""

    runs: list[Run]

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs)

    def stat(self, metric: str) -> tuple[float | None, float | None, int]:
        return mean_std(final_metric(r.results["final"], metric) for r in self.runs)


Table = dict[Variant, dict[str, Cell]]


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


def method_order(runs: Sequence[Run], order: Sequence[str] | None = None) -> list[str]:
    """The methods of ``runs`` in row order.

    By default: the order in which each method first appears among ``runs`` (discovery order),
    except that methods trained jointly (offline, ``method.joint: true``) come after the
    incremental ones: they are the upper bound the others are read against, last in the
    tables of MiB and its successors and in the README's results. ``order`` (method names, as
    in ``results.json``) puts the methods it names first, in its order; the rest follow as
    by default.
    """
    first_seen = list(dict.fromkeys(r.variant.method for r in runs))
    joint = {r.variant.method for r in runs if r.joint}
    default = [m for m in first_seen if m not in joint] + [m for m in first_seen if m in joint]
    if not order:
        return default
    unknown = [m for m in order if m not in first_seen]
    if unknown:
        log.warning("--order: no finished run of %s (methods found: %s)", ", ".join(unknown),
                    ", ".join(first_seen))
    chosen = [m for m in dict.fromkeys(order) if m in first_seen]
    return chosen + [m for m in default if m not in chosen]


def _task_order(dataset: str, label: str) -> tuple:
    known = list(SPLITS.get(dataset, {}))
    return (known.index(label), "") if label in known else (len(known), label)


def aggregate(runs: Sequence[Run], order: Sequence[str] | None = None) -> dict[Group, Table]:
    """{group: {row: {task label: Cell}}}: groups by dataset/model/overlap, rows by
    :func:`method_order` then replay variant, tasks as the dataset lists its splits."""
    out: dict[Group, Table] = {}
    for run in runs:
        row = out.setdefault(run.group, {}).setdefault(run.variant, {})
        row.setdefault(run.task_label, Cell([])).runs.append(run)
    rank = {m: i for i, m in enumerate(method_order(runs, order))}
    ordered: dict[Group, Table] = {}
    for group in sorted(out, key=lambda g: (g.dataset, g.model, not g.overlap)):
        table = out[group]
        rows = sorted(table, key=lambda v: (rank[v.method], v.replay_key))
        ordered[group] = {v: table[v] for v in rows}
    return ordered


def tasks_of(group: Group, table: Table) -> list[str]:
    labels = {t for cells in table.values() for t in cells}
    return sorted(labels, key=lambda t: _task_order(group.dataset, t))


def markdown_table(group: Group, table: Table) -> str:
    tasks = tasks_of(group, table)
    head = ["method"] + [f"{t} {HEADS.get(m, m)}" for t in tasks for m in (*METRICS, "n")]
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


def class_names(table: Table, task_label: str) -> list[str] | None:
    """The dataset's class names (``class_names`` in results.json, e.g. a folder dataset's
    classes.yaml), or None where the runs record ids only."""
    for cells in table.values():
        if task_label in cells:
            return cells[task_label].runs[0].results.get("class_names")
    return None


def per_class_markdown(group: Group, table: Table) -> str:
    """Per task, each seen class's IoU at the final step (rows: class id and name, in task
    order; columns: the table's rows), mean ± std over seeds."""
    parts = []
    for t in tasks_of(group, table):
        rows = [v for v in table if t in table[v]]
        task = table[rows[0]][t].runs[0].task
        names = class_names(table, t)
        lines = [f"{t}:", "",
                 "| class | " + " | ".join(v.label for v in rows) + " |",
                 "|---|" + "---:|" * len(rows)]
        for c in task.classes_seen(task.num_steps - 1):
            cells = [fmt_cell(*mean_std(r.steps[-1]["iou"].get(str(c))
                                        for r in table[v][t].runs)[:2]) for v in rows]
            lines.append(f"| {class_label(c, names)} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


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
    """One line per finished run: its row label, task, seed, final old/new/all/avg/hiou (avg:
    the mean of all over steps, as in PLOP, Douillard et al., CVPR 2021), all-mIoU after each
    step
    and, with replay, the curvature test of each step. These are the per-seed numbers behind
    the table's means, for paired comparisons (method A vs B at the same seed)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "row", "task", "seed", "old", "new", "all", "avg", "hiou", "all_per_step",
                "replay_sharpness_per_step", "replay_stability_bound"])
    for r in sorted(runs, key=lambda r: (r.task_label, r.variant.label, r.seed)):
        final = r.results["final"]
        reps = [s.get("replay") or {} for s in r.steps[1:]]
        sharp = " ".join(_num(x.get("sharpness")) for x in reps if "sharpness" in x)
        bound = next((x["stability_bound"] for x in reps if "stability_bound" in x), None)
        w.writerow([str(r.path.relative_to(root)) if r.path.is_relative_to(root) else r.path,
                    r.variant.label, r.task_label, r.seed,
                    *(_num(final_metric(final, m)) for m in ("old", "new", "all", "avg", "hiou")),
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
        "Method & " + " & ".join(HEADS.get(m, m) for _ in tasks for m in (*METRICS, "$n$"))
        + r" \\",
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

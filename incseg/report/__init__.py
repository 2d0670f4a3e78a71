"""Tables and plots from runs: ``python -m incseg.report DIR`` (see ``__main__``).

DIR is a run directory or a sweep directory; every ``results.json`` below it is one run, keyed by
(dataset, task, method, replay, seed). One table per (dataset, model, overlap); within a table,
one row per method (+ replay variant), one column group per task with the final step's old /
new / all mIoU as mean ± sample std over seeds and the number of seeds n. Row labels and order
come from the runs themselves (:mod:`.discovery`, :func:`.tables.method_order`).

A run that is not finished (``state.json`` without ``results.json``, or fewer steps than its
task has), a results file that cannot be read, or a second run with the same key is listed
under "Missing or unfinished" and left out of every average: never dropped silently.

Everything is written into ``DIR/report/`` (``table.md``, ``table.csv``, ``table.tex``,
``runs.csv`` with one line per run (the per-seed numbers) and the PNG plots), each file
atomically; the markdown tables are printed on stdout, logs on stderr.
"""

from __future__ import annotations

from incseg.report.build import Report, make_plots, make_report
from incseg.report.discovery import (
    Group,
    Missing,
    Run,
    Variant,
    discover,
    expected_steps,
    is_joint,
    method_label,
    task_of,
    variant_of,
)
from incseg.report.overlays import plot_overlays
from incseg.report.plots import (
    copy_replay_grids,
    forgetting_step0,
    old_to_background,
    plot_confusion,
    plot_curves,
    plot_forgetting,
    plot_heatmap,
)
from incseg.report.tables import (
    CAPTION,
    CELLS,
    METRICS,
    Cell,
    Table,
    aggregate,
    csv_text,
    fmt_cell,
    latex_text,
    markdown_table,
    mean_std,
    method_order,
    missing_section,
    runs_csv_text,
    tasks_of,
)

__all__ = [
    "CAPTION", "CELLS", "METRICS", "Cell", "Group", "Missing", "Report", "Run", "Table",
    "Variant", "aggregate", "copy_replay_grids", "csv_text", "discover", "expected_steps",
    "fmt_cell", "forgetting_step0", "is_joint", "latex_text", "main", "make_plots",
    "make_report", "markdown_table", "mean_std", "method_label", "method_order",
    "missing_section", "old_to_background", "parse_args", "plot_confusion", "plot_curves",
    "plot_forgetting", "plot_heatmap", "plot_overlays", "runs_csv_text", "task_of", "tasks_of",
    "variant_of",
]


def __getattr__(name: str):
    # The CLI lives in __main__ and is imported only on demand: importing it here would put
    # incseg.report.__main__ in sys.modules before `python -m incseg.report` runs it, and runpy
    # then warns on stderr (the CLI's errors are meant to be one line there).
    if name in ("main", "parse_args"):
        from incseg.report import __main__ as cli

        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The report as a whole: find the runs, tabulate them, draw the figures, write the files."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from incseg.io import atomic_write_text
from incseg.report.discovery import Group, Missing, Run, discover
from incseg.report.overlays import plot_overlays
from incseg.report.plots import (
    copy_replay_grids,
    plot_confusion,
    plot_curves,
    plot_forgetting,
    plot_heatmap,
)
from incseg.report.tables import (
    Table,
    aggregate,
    csv_text,
    latex_text,
    markdown_table,
    missing_section,
    per_class_markdown,
    runs_csv_text,
    tasks_of,
)

log = logging.getLogger("incseg.report")


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

    def per_class_md(self) -> str:
        """Each seen class's final IoU, by id and, where the dataset names them, name (long for
        ADE's 150 classes: in table.md only, not printed)."""
        if not self.tables:
            return ""
        parts = ["## Per-class IoU at the final step", ""]
        for group, table in self.tables.items():
            parts += [f"### {group.title}", "", per_class_markdown(group, table)]
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


def make_report(root: Path, overlays: bool = True, n_images: int = 4,
                order: Sequence[str] | None = None) -> Report:
    """Find the runs below ``root``, write ``root/report/*`` and return the report; ``order``
    (method names) puts those methods' rows first (see :func:`method_order`)."""
    root = Path(root)
    runs, missing = discover(root)
    rep = Report(root, runs, missing, aggregate(runs, order))
    out_dir = root / "report"
    if rep.tables:
        make_plots(rep, out_dir, overlays, n_images)
    md = rep.tables_md() + ("\n" + rep.per_class_md() if rep.tables else "") + \
        ("\n" + "\n".join(rep.plots) + "\n" if rep.plots else "")
    atomic_write_text(out_dir / "table.csv", csv_text(rep.tables))
    atomic_write_text(out_dir / "runs.csv", runs_csv_text(runs, root))
    atomic_write_text(out_dir / "table.tex", latex_text(rep.tables))
    atomic_write_text(out_dir / "table.md", md)
    return rep

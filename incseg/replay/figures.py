"""Figures of a replay set, for a look at what the student replays."""

from __future__ import annotations

import os
from pathlib import Path

from incseg.io import atomic_path
from incseg.replay.store import ReplaySet, read_png

__all__ = ["class_grid"]


def class_grid(replay_set: ReplaySet, out_png: str | os.PathLike, per_class: int = 4) -> Path:
    """A PNG grid: one row per class (labelled with its dataset class id), ``per_class`` images."""
    # matplotlib only when a figure is drawn: importing the package stays light.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_class: dict[int, list[Path]] = {}
    for rec, f in zip(replay_set.records, replay_set.image_files, strict=True):
        by_class.setdefault(int(rec["target"]), []).append(f)
    classes = sorted(by_class)
    ids = {int(r["target"]): int(r["class_id"]) for r in replay_set.records}
    rows, cols = max(len(classes), 1), max(int(per_class), 1)
    fig = Figure(figsize=(1.2 * cols + 0.6, 1.2 * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, c in enumerate(classes):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if j < len(by_class[c]):
                ax.imshow(read_png(by_class[c][j]))
            if j == 0:
                ax.set_ylabel(f"class {ids[c]}", fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out

"""Prediction overlays: test images, their ground truth and each row's prediction, from the
final checkpoint of the row's lowest seed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from incseg.errors import IncsegError
from incseg.report.discovery import Group
from incseg.report.plots import _figure, _lowest_seed, _save
from incseg.report.tables import Table

log = logging.getLogger("incseg.report")


def _display(x) -> np.ndarray:
    """An eval-transformed ``3 x H x W`` image as ``H x W x 3`` uint8 for imshow."""
    from incseg.replay import denormalise

    img = denormalise(x.unsqueeze(0))[0].permute(1, 2, 0).cpu().numpy()
    return np.rint(img * 255.0).astype(np.uint8)


def plot_overlays(group: Group, table: Table, task_label: str, path: Path, n_images: int
                  ) -> tuple[Path | None, str | None]:
    """Image | ground truth | one prediction per method on the first ``n_images`` test
    images, each method's final checkpoint of its lowest seed; (None, reason) if impossible.

    Images go through the eval transform of the first row's config, so they look like what the
    test split scored; predictions are mapped from channels to dataset ids by the checkpoint.
    """
    from omegaconf import OmegaConf

    from incseg.config import source_from_cfg
    from incseg.data.dataset import read_image
    from incseg.data.index import read_mask
    from incseg.data.transforms import eval_transform
    from incseg.viz import colorize, load_segmenter, palette_of, predict_ids

    rows = [(v, _lowest_seed(c[task_label])) for v, c in table.items() if task_label in c]
    preds: list[tuple[str, Any, list[int], str]] = []
    skipped = []
    for v, run in rows:
        ckpt = run.path / "checkpoints" / f"step{len(run.steps) - 1}.pt"
        if not ckpt.is_file():
            skipped.append(f"{v.label}: no {ckpt.name}")
            continue
        try:
            model, class_ids, meta = load_segmenter(ckpt,
                                                    None if group.model == "?" else group.model)
        except IncsegError as err:
            skipped.append(f"{v.label}: {err}")
            continue
        want = run.task.classes_seen(run.task.num_steps - 1)
        if sorted(class_ids) != sorted(want):
            skipped.append(f"{v.label}: {ckpt.name} holds classes {class_ids}, not the task's")
            continue
        preds.append((v.label, model, class_ids, meta["prediction"]))
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
    palette = palette_of(ref.results.get("class_colors"))  # a folder dataset's own colours
    cols = 2 + len(preds)
    fig, axes = _figure(len(items), cols, 2.0, 2.0)
    for i, (sid, x, gt) in enumerate(items):
        panels = [(f"{sid}", _display(x)), ("ground truth", colorize(gt, palette))]
        for label, model, class_ids, rule in preds:
            pred = predict_ids(model, x.unsqueeze(0), class_ids, prediction=rule)[0]
            panels.append((label, colorize(pred, palette)))
        for j, (title, img) in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 or j == 0:
                ax.set_title(title, fontsize=7)
    return _save(fig, path), ("; ".join(skipped) or None)

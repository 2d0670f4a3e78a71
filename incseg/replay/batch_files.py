"""One committed batch of a replay set being filled: its PNGs, then its atomic ``batch_<k>.json``
marker (written last, so a marker vouches for every file it lists), and the check that a rerun
or a waiting rank applies before it trusts a marker (keys, targets and every file's hash: a
batch that fails is regenerated, never used).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from incseg.data.prepare import save_palette_png
from incseg.io import atomic_write_json, file_sha256
from incseg.replay.settings import InversionSettings, from_uint8, quantise
from incseg.replay.store import check_records, log, teacher_fingerprint
from incseg.replay.verdicts import device_of, frozen, teacher_verdicts, verifier_predictions

__all__ = ["read_marker", "write_batch"]


def write_batch(work: Path, k: int, key: str, images: Tensor, targets: Sequence[int],
                 first: int, teacher: nn.Module, settings: InversionSettings,
                 class_of: Mapping[int, int], info: dict[str, Any] | None,
                 verifier: nn.Module | None) -> dict[str, Any]:
    """Write one batch's PNGs, then its atomic marker; return the marker's content."""
    arr = quantise(images)
    stored = from_uint8(list(arr))  # what a reader of the PNGs gets back
    tgt = torch.tensor([int(t) for t in targets], dtype=torch.long)
    with frozen(teacher):
        pred, conf, masks = teacher_verdicts(teacher, stored.to(device_of(teacher)), tgt,
                                             settings)
    vpred = verifier_predictions(verifier, stored, settings.lse_r) if verifier else None
    records = []
    for j in range(arr.shape[0]):
        n = first + j
        file, mask = f"images/{n:06d}.png", f"teacher_masks/{n:06d}.png"
        Image.fromarray(arr[j]).save(work / file, format="PNG", optimize=False)
        save_palette_png(masks[j].numpy().astype(np.uint8), work / mask)
        records.append({
            "index": n, "file": file, "mask": mask, "batch": k,
            "target": int(targets[j]), "class_id": int(class_of[int(targets[j])]),
            "teacher_pred": int(pred[j]), "teacher_conf": float(conf[j]),
            "verifier_pred": None if vpred is None else int(vpred[j]),
            "file_bytes": (work / file).stat().st_size, "file_sha256": file_sha256(work / file),
            "mask_bytes": (work / mask).stat().st_size, "mask_sha256": file_sha256(work / mask),
        })
    rec = info or {}
    its = rec.get("image_iterations") or [rec.get("iterations", 0)] * len(records)
    for r, n_its in zip(records, its, strict=True):
        r["iterations"] = int(n_its)  # the adaptive budget's differ per image
    marker = {
        "key": key, "batch": k, "count": len(records),
        "final_loss": rec.get("final_loss"), "best_loss": rec.get("best_loss"),
        "start_loss": rec.get("start_loss"), "iterations": rec.get("iterations", 0),
        "seconds": rec.get("seconds"),
        "verifier": None if verifier is None else teacher_fingerprint(verifier),
        "images": records,
    }
    atomic_write_json(work / f"batch_{k}.json", marker)
    return marker


def read_marker(work: Path, k: int, key: str, expected: Sequence[int], size: int,
                 warn: bool = True) -> dict[str, Any] | None:
    """Batch ``k``'s marker when it and every PNG it lists are intact, else None (an invalid
    one is reported when ``warn``: its batch is regenerated, never used)."""
    path = work / f"batch_{k}.json"
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
        ok = (marker["key"] == key and marker["batch"] == k
              and [r["target"] for r in marker["images"]] == [int(t) for t in expected]
              and check_records(work, marker["images"], size, hashes=True) is None)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        if warn:
            log.warning("partial replay batch %s in %s is invalid; regenerating it", k, work)
        return None
    return marker

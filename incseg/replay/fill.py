"""Generate a replay set once and cache it: :func:`ensure_replay_set`.

Filling is resumable batch by batch, because a DeepInversion set takes long enough on a CPU to
be interrupted: batches are written into ``<cache>/replay/.<key>.partial/`` and each one is
committed by an atomic ``batch_<k>.json`` marker written after its PNGs; a rerun regenerates
only the batches without a valid marker (a batch's images depend only on the seed and its
index, so the result equals an uninterrupted run). When every batch is done the manifest is
written last and the folder renamed to its final name (``os.replace``). Everything happens under
:func:`incseg.io.entry_lock`.

Teacher figures are measured on the stored (uint8-quantised) images, which is what the student
replays; the verifier (an independent model that knows all old classes, evaluation only) likewise.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from incseg.data.prepare import save_palette_png
from incseg.errors import CheckpointError
from incseg.io import atomic_write_json, entry_lock, file_sha256
from incseg.replay.controls import generator_settings
from incseg.replay.generator import synthesise
from incseg.replay.settings import InversionSettings, batch_plan, from_uint8, quantise
from incseg.replay.store import (
    FORMAT,
    ReplaySet,
    check_kind,
    check_records,
    discard,
    expected_settings,
    log,
    read_png,
    replay_key,
    teacher_fingerprint,
    verify_entry,
)
from incseg.replay.verdicts import (
    device_of,
    frozen,
    teacher_verdicts,
    verifier_accuracy,
    verifier_predictions,
)

__all__ = ["ensure_replay_set"]


def ensure_replay_set(
    cache: Path,
    teacher: nn.Module,
    targets: Sequence[int],
    settings: InversionSettings,
    *,
    kind: str = "deepinversion",
    class_ids: Sequence[int] | None = None,
    student: nn.Module | None = None,
    verifier: nn.Module | None = None,
    verifier_channel_of: Mapping[int, int] | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    fill: bool = True,
) -> ReplaySet:
    """The replay set of ``teacher`` for ``targets``, generated once and cached.

    Args:
        cache: the cache directory (the entry is ``cache/replay/<key>``).
        teacher: frozen model of the previous step.
        targets: channels of the old foreground classes (``1..C_o-1``).
        settings: :class:`InversionSettings`.
        kind: "deepinversion", or "noise" for the noise control
            (:func:`~incseg.replay.controls.generator_settings`); part of the key.
        class_ids: dataset class id of every teacher channel (indexed by channel; names and the
            manifest); default: the channel itself.
        student: optional competition student (Adaptive DeepInversion; part of the key);
            "deepinversion" only.
        verifier: optional independent model that knows all old classes (evaluation only).
        verifier_channel_of: teacher channel -> verifier channel (default identity).
        progress: tqdm bars on stderr.
        device: where to optimise (default: the teacher's device).
        fill: generate a missing entry (false: wait until another process has written it).
    """
    check_kind(kind)
    if kind == "noise" and student is not None:
        raise ValueError("a noise replay set has no competition student; pass student=None")
    targets = [int(t) for t in targets]
    if class_ids is None:
        class_ids = list(range(max(targets) + 1))
    class_ids = [int(c) for c in class_ids]
    if max(targets) >= len(class_ids):
        raise ValueError(f"class_ids has {len(class_ids)} entries; it needs one per teacher "
                          f"channel up to {max(targets)}")
    class_of = {t: class_ids[t] for t in targets}
    key = replay_key(teacher, settings, targets, class_ids=class_ids, student=student, kind=kind)
    root = Path(cache) / "replay"
    final = root / key
    work = root / f".{key}.partial"
    settings_dict = expected_settings(settings, student is not None)
    plan = batch_plan(targets, settings)
    n_total = sum(len(b) for b in plan)
    if device is None:
        device = device_of(teacher)

    manifest = verify_entry(final, key, settings_dict, n_total, warn=False)
    if manifest is None and not fill:
        # DDP ranks > 0: rank 0 generates (no collective involved, so no barrier timeout on
        # long generations); the others poll until its entry verifies.
        log.info("replay set %s: waiting for rank 0 to write it", key)
        while manifest is None:
            time.sleep(2.0)
            manifest = verify_entry(final, key, settings_dict, n_total, warn=False)
    if manifest is None:
        with entry_lock(final):
            manifest = verify_entry(final, key, settings_dict, n_total)
            if manifest is None:
                discard(final)
                manifest = _fill(work, final, key, kind, teacher, targets, plan, settings,
                                 settings_dict, class_of, student, verifier, progress, device)
                return _finish(final, manifest, settings, verifier, verifier_channel_of)
    log.info("replay set cache hit: %s (%d images, not regenerated)", final, n_total)
    return _finish(final, manifest, settings, verifier, verifier_channel_of)


def _write_batch(work: Path, k: int, key: str, images: Tensor, targets: Sequence[int],
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


def _read_marker(work: Path, k: int, key: str, expected: Sequence[int], size: int
                 ) -> dict[str, Any] | None:
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
        log.warning("partial replay batch %s in %s is invalid; regenerating it", k, work)
        return None
    return marker


def _common_verifier(markers: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The verifier of the stored predictions when every batch used the same one."""
    fps = {m.get("verifier") for m in markers}
    if len(fps) != 1 or None in fps:
        return None
    return {"fingerprint": fps.pop()}


def _fill(work: Path, final: Path, key: str, kind: str, teacher: nn.Module,
          targets: list[int], plan: list[list[int]], settings: InversionSettings,
          settings_dict: dict[str, Any], class_of: Mapping[int, int],
          student: nn.Module | None, verifier: nn.Module | None, progress: bool,
          device) -> dict[str, Any]:
    (work / "images").mkdir(parents=True, exist_ok=True)
    (work / "teacher_masks").mkdir(parents=True, exist_ok=True)
    gen_settings = generator_settings(kind, settings)
    markers: list[dict[str, Any]] = []
    first = 0
    for k, batch in enumerate(plan):
        marker = _read_marker(work, k, key, batch, settings.image_size)
        if marker is None:
            log.info("replay set %s: generating batch %d/%d", key, k + 1, len(plan))
            images, info = synthesise(teacher, targets, gen_settings, student=student,
                                      progress=progress, device=device, batches=[k])
            if images.shape[0] != len(batch):
                raise CheckpointError(f"generator returned {images.shape[0]} images for batch "
                                      f"{k} of {len(batch)}")
            rec = info["batches"][0] if info.get("batches") else None
            marker = _write_batch(work, k, key, images, batch, first, teacher, settings,
                                  class_of, rec, verifier)
        markers.append(marker)
        first += len(batch)
    records = [r for m in markers for r in m["images"]]
    hits = sum(int(r["teacher_pred"] == r["target"]) for r in records)
    manifest = {
        "format": FORMAT,
        "key": key,
        "kind": kind,
        "settings": settings_dict,
        "teacher": teacher_fingerprint(teacher),
        "student": teacher_fingerprint(student) if student is not None else None,
        "image_size": settings.image_size,
        "count": len(records),
        "class_ids": {str(t): c for t, c in class_of.items()},
        "teacher_accuracy": hits / len(records) if records else 0.0,
        "verifier": _common_verifier(markers),
        "batches": [{k: m[k] for k in ("batch", "count", "start_loss", "final_loss",
                                       "best_loss", "iterations", "seconds")} for m in markers],
        "images": records,
    }
    atomic_write_json(work / "manifest.json", manifest)
    os.replace(work, final)
    log.info("replay set %s written (%d images, teacher accuracy %.3f)", final, len(records),
             manifest["teacher_accuracy"])
    return manifest


def _finish(final: Path, manifest: dict[str, Any], settings: InversionSettings,
            verifier: nn.Module | None, channel_of: Mapping[int, int] | None) -> ReplaySet:
    rs = ReplaySet(final, manifest)
    if verifier is None:
        return rs
    stored = manifest.get("verifier") or {}
    preds = [r.get("verifier_pred") for r in rs.records]
    if stored.get("fingerprint") != teacher_fingerprint(verifier) or None in preds:
        log.info("replay set %s: evaluating the stored images with the given verifier", final)
        # A different verifier than at generation: evaluate the stored images now (read-only).
        images = from_uint8([read_png(f) for f in rs.image_files])
        preds = verifier_predictions(verifier, images, settings.lse_r)
    rs.verifier_accuracy = verifier_accuracy(preds, rs.targets, channel_of)
    return rs

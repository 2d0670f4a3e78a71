"""Replay sets in the cache directory (SPEC 6.1, 6.2, 8): DeepInversion images and controls.

Layout of an entry ``<cache>/replay/<key>/``::

    manifest.json            settings, key, per-image records, per-batch losses, quality figures
    images/<n>.png           lossless PNG of the de-normalised uint8 image
    teacher_masks/<n>.png    the teacher's pixel argmax (channel index) as a palette PNG

The key (:func:`replay_key`) hashes the teacher's weights and buffers (not checkpoint bytes), the
resolved generator settings, the target channels and their dataset ids, the kind ("deepinversion"
or "noise") and the competition student's weights when there is one.

Filling is resumable batch by batch: batches are written into ``<cache>/replay/.<key>.partial/``
and each one is committed by an atomic ``batch_<k>.json`` marker written after its PNGs; a rerun
regenerates only the batches without a valid marker. When every batch is done the manifest is
written last and the folder renamed to its final name (``os.replace``). Everything happens under
:func:`incseg.io.entry_lock`. On read the entry is verified (manifest parses, key and settings
match, every listed PNG exists with its byte size, sha256 and pixel size); anything else is
logged and regenerated, never used.

Teacher figures are measured on the stored (uint8-quantised) images, which is what the student
replays; the verifier (an independent model that knows all old classes, evaluation only) likewise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from incseg.data.prepare import save_palette_png
from incseg.errors import CheckpointError, ConfigError
from incseg.inversion import (
    InversionSettings,
    batch_plan,
    denormalise,
    frozen,
    image_level_logits,
    normalise,
    synthesise,
    teacher_verdicts,
)
from incseg.io import atomic_write_json, content_key, entry_lock, file_sha256

log = logging.getLogger(__name__)

__all__ = [
    "KINDS",
    "ReplayDataset",
    "ReplaySet",
    "class_grid",
    "ensure_replay_set",
    "noise_replay_set",
    "replay_key",
    "teacher_fingerprint",
    "verifier_predictions",
]

FORMAT = 1
KINDS = ("deepinversion", "noise")


# --------------------------------------------------------------------------------------------
# Keys


def teacher_fingerprint(model: nn.Module) -> str:
    """sha256 (32 hex digits) of a model's weights and buffers: every ``state_dict`` entry in
    key order (name, dtype, shape, raw bytes). Independent of how the model was stored."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def replay_key(
    teacher: nn.Module,
    settings: InversionSettings,
    targets: Sequence[int],
    *,
    class_ids: Sequence[int] | None = None,
    student: nn.Module | None = None,
    kind: str = "deepinversion",
) -> str:
    """Content key of a replay set (``content_key("replay", ...)``)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown replay set kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return content_key("replay", _key_params(teacher, settings, targets, class_ids, student, kind))


def _key_params(teacher, settings, targets, class_ids, student, kind) -> dict[str, Any]:
    return {
        "kind": kind,
        "format": FORMAT,
        "teacher": teacher_fingerprint(teacher),
        "student": teacher_fingerprint(student) if student is not None else None,
        "settings": settings.resolved(student is not None),
        "targets": [int(t) for t in targets],
        "class_ids": None if class_ids is None else [int(c) for c in class_ids],
    }


# --------------------------------------------------------------------------------------------
# The replay set


class ReplaySet:
    """A verified replay-set entry (read from its ``manifest.json``).

    ``verifier_accuracy`` is the verifier's accuracy for this call (None without verifier).
    """

    def __init__(self, path: Path, manifest: dict[str, Any],
                 verifier_accuracy: float | None = None) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.verifier_accuracy = verifier_accuracy

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def images_dir(self) -> Path:
        return self.path / "images"

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.manifest["images"]

    @property
    def images(self) -> int:
        return len(self.records)

    def __len__(self) -> int:
        return self.images

    @property
    def targets(self) -> list[int]:
        return [r["target"] for r in self.records]

    @property
    def class_ids(self) -> list[int]:
        return [r["class_id"] for r in self.records]

    @property
    def image_files(self) -> list[Path]:
        return [self.path / r["file"] for r in self.records]

    @property
    def mask_files(self) -> list[Path]:
        return [self.path / r["mask"] for r in self.records]

    @property
    def teacher_accuracy(self) -> float:
        return float(self.manifest["teacher_accuracy"])

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.images_dir),
            "images": self.images,
            "teacher_accuracy": self.teacher_accuracy,
            "verifier_accuracy": self.verifier_accuracy,
        }

    def __repr__(self) -> str:
        return (f"ReplaySet({self.path}, images={self.images}, "
                f"teacher_accuracy={self.teacher_accuracy:.3f}, "
                f"verifier_accuracy={self.verifier_accuracy})")


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _to_tensor01(arrays: Sequence[np.ndarray]) -> Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


class ReplayDataset(Dataset):
    """The images of a replay set as normalised float tensors ``3 x H x W``.

    Items are indices or ``(index, seed)`` pairs (as :class:`SeededSampler` yields); with
    ``hflip=True`` the seed decides a horizontal flip (a plain index is never flipped, so reads
    are deterministic). ``with_targets=True`` yields ``(image, target channel)`` instead.
    """

    def __init__(self, replay_set: ReplaySet | str | os.PathLike, hflip: bool = False,
                 with_targets: bool = False) -> None:
        if not isinstance(replay_set, ReplaySet):
            path = Path(replay_set)
            if path.name == "images":
                path = path.parent
            replay_set = ReplaySet(path, json.loads((path / "manifest.json").read_text()))
        self.replay_set = replay_set
        self.files = replay_set.image_files
        self.targets = replay_set.targets
        self.hflip = bool(hflip)
        self.with_targets = bool(with_targets)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item):
        seed = None
        if isinstance(item, tuple):
            item, seed = item
        x = normalise(_to_tensor01([read_png(self.files[item])]))[0]
        if self.hflip and seed is not None and np.random.default_rng(int(seed)).random() < 0.5:
            x = torch.flip(x, dims=(2,))
        if self.with_targets:
            return x, self.targets[item]
        return x


# --------------------------------------------------------------------------------------------
# Evaluation helpers


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def quantise(images: Tensor) -> np.ndarray:
    """Normalised ``B x 3 x H x W`` -> uint8 ``B x H x W x 3`` (what the PNGs store)."""
    x = (denormalise(images.detach().cpu()) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def verifier_predictions(verifier: nn.Module, images: Tensor, r: float,
                         batch_size: int = 32) -> list[int]:
    """Image-level prediction of ``verifier`` on normalised images: argmax of the LSE-LBA pooled
    logits over its foreground channels (1..)."""
    preds: list[int] = []
    with frozen(verifier):
        device = _device_of(verifier)
        for k in range(0, images.shape[0], batch_size):
            _, pooled = image_level_logits(verifier, images[k:k + batch_size].to(device), r)
            fg = pooled[:, 1:] if pooled.shape[1] > 1 else pooled
            preds.extend((fg.argmax(dim=1) + (1 if pooled.shape[1] > 1 else 0)).tolist())
    return preds


def _verifier_accuracy(preds: Sequence[int], targets: Sequence[int],
                       channel_of: Mapping[int, int] | None) -> float:
    if not targets:
        return 0.0
    hits = 0
    for p, t in zip(preds, targets, strict=True):
        expected = t if channel_of is None else channel_of.get(int(t), channel_of.get(str(t)))
        if expected is None:
            raise ConfigError(f"verifier_channel_of has no entry for teacher channel {t}")
        hits += int(p) == int(expected)
    return hits / len(targets)


# --------------------------------------------------------------------------------------------
# Verification


def _expected_settings(settings: InversionSettings, has_student: bool) -> dict[str, Any]:
    return json.loads(json.dumps(settings.resolved(has_student)))


def _check_png(path: Path, rec: dict[str, Any], field: str, size: int, hashes: bool) -> str | None:
    if not path.is_file():
        return f"missing {path.name}"
    if path.stat().st_size != rec[f"{field}_bytes"]:
        return f"{path.name} has the wrong byte size"
    try:
        with Image.open(path) as im:
            if im.size != (size, size):
                return f"{path.name} is {im.size}, expected {size}x{size}"
    except OSError:
        return f"{path.name} is not a readable PNG"
    if hashes and file_sha256(path) != rec[f"{field}_sha256"]:
        return f"{path.name} has the wrong sha256"
    return None


def _check_records(root: Path, records: Sequence[dict[str, Any]], size: int,
                   hashes: bool) -> str | None:
    for rec in records:
        for field in ("file", "mask"):
            problem = _check_png(root / rec[field], rec, field, size, hashes)
            if problem:
                return problem
    return None


def _verify_entry(path: Path, key: str, settings_dict: dict[str, Any], n_expected: int,
                  hashes: bool = True, warn: bool = True) -> dict[str, Any] | None:
    """The manifest of a valid entry, else None (with a warning when something is there)."""
    mf = path / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(mf.read_text())
        if manifest.get("key") != key or manifest.get("format") != FORMAT:
            problem = "foreign entry (key or format differs)"
        elif manifest.get("settings") != settings_dict:
            problem = "its settings differ"
        elif len(manifest["images"]) != n_expected or manifest.get("count") != n_expected:
            problem = f"it lists {len(manifest['images'])} images, expected {n_expected}"
        else:
            problem = _check_records(path, manifest["images"], settings_dict["image_size"],
                                     hashes)
    except (OSError, ValueError, KeyError, TypeError) as err:
        problem = f"unreadable manifest ({type(err).__name__}: {err})"
    if problem:
        if not warn:
            return None
        log.warning("replay set %s is invalid (%s); regenerating it", path, problem)
        return None
    return manifest


def _discard(path: Path) -> None:
    if path.exists():
        trash = path.with_name(f".{path.name}.discard.{os.getpid()}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Filling


def _write_batch(work: Path, k: int, key: str, images: Tensor, targets: Sequence[int],
                 first: int, teacher: nn.Module, settings: InversionSettings,
                 class_of: Mapping[int, int], info: dict[str, Any] | None,
                 verifier: nn.Module | None) -> dict[str, Any]:
    """Write one batch's PNGs, then its atomic marker; return the marker's content."""
    arr = quantise(images)
    stored = normalise(_to_tensor01(list(arr)))  # what a reader of the PNGs gets back
    tgt = torch.tensor([int(t) for t in targets], dtype=torch.long)
    with frozen(teacher):
        pred, conf, masks = teacher_verdicts(teacher, stored.to(_device_of(teacher)), tgt,
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
              and _check_records(work, marker["images"], size, hashes=True) is None)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        log.warning("partial replay batch %s in %s is invalid; regenerating it", k, work)
        return None
    return marker


def _ensure(
    cache: Path, teacher: nn.Module, targets: Sequence[int], settings: InversionSettings,
    class_ids: Sequence[int] | None, kind: str, student: nn.Module | None,
    verifier: nn.Module | None, verifier_channel_of: Mapping[int, int] | None,
    progress: bool, device: str | torch.device | None, fill: bool = True,
) -> ReplaySet:
    targets = [int(t) for t in targets]
    if class_ids is None:
        class_ids = list(range(max(targets) + 1))
    class_ids = [int(c) for c in class_ids]
    if max(targets) >= len(class_ids):
        raise ConfigError(f"class_ids has {len(class_ids)} entries; it needs one per teacher "
                          f"channel up to {max(targets)}")
    class_of = {t: class_ids[t] for t in targets}
    key = replay_key(teacher, settings, targets, class_ids=class_ids, student=student, kind=kind)
    root = Path(cache) / "replay"
    final = root / key
    work = root / f".{key}.partial"
    settings_dict = _expected_settings(settings, student is not None)
    plan = batch_plan(targets, settings)
    n_total = sum(len(b) for b in plan)
    if device is None:
        device = _device_of(teacher)

    manifest = _verify_entry(final, key, settings_dict, n_total, warn=False)
    if manifest is None and not fill:
        # DDP ranks > 0: rank 0 generates (no collective involved, so no barrier timeout on
        # long generations); the others poll until its entry verifies.
        log.info("replay set %s: waiting for rank 0 to write it", key)
        while manifest is None:
            time.sleep(2.0)
            manifest = _verify_entry(final, key, settings_dict, n_total, warn=False)
    if manifest is None:
        with entry_lock(final):
            manifest = _verify_entry(final, key, settings_dict, n_total)
            if manifest is None:
                _discard(final)
                manifest = _fill(work, final, key, kind, teacher, targets, plan, settings,
                                 settings_dict, class_of, student, verifier, progress, device)
                return _finish(final, manifest, settings, verifier, verifier_channel_of)
    log.info("replay set cache hit: %s (%d images, not regenerated)", final, n_total)
    return _finish(final, manifest, settings, verifier, verifier_channel_of)


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
    gen_settings = settings
    if kind == "noise":
        gen_settings = replace(settings, iterations_low=0, iterations_full=0)
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
        images = normalise(_to_tensor01([read_png(f) for f in rs.image_files]))
        preds = verifier_predictions(verifier, images, settings.lse_r)
    rs.verifier_accuracy = _verifier_accuracy(preds, rs.targets, channel_of)
    return rs


def ensure_replay_set(
    cache: Path,
    teacher: nn.Module,
    targets: Sequence[int],
    settings: InversionSettings,
    class_ids: Sequence[int] | None = None,
    student: nn.Module | None = None,
    verifier: nn.Module | None = None,
    verifier_channel_of: Mapping[int, int] | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    fill: bool = True,
) -> ReplaySet:
    """The DeepInversion replay set of ``teacher`` for ``targets``, generated once and cached.

    Args:
        cache: the cache directory (the entry is ``cache/replay/<key>``).
        teacher: frozen model of the previous step.
        targets: channels of the old foreground classes (``1..C_o-1``).
        settings: :class:`InversionSettings`.
        class_ids: dataset class id of every teacher channel (indexed by channel; names and the
            manifest); default: the channel itself.
        student: optional competition student (Adaptive DeepInversion; part of the key).
        verifier: optional independent model that knows all old classes (evaluation only).
        verifier_channel_of: teacher channel -> verifier channel (default identity).
        progress: tqdm bars on stderr.
        device: where to optimise (default: the teacher's device).
        fill: generate a missing entry (false: wait until another process has written it).
    """
    return _ensure(Path(cache), teacher, targets, settings, class_ids, "deepinversion", student,
                   verifier, verifier_channel_of, progress, device, fill)


def noise_replay_set(
    cache: Path,
    teacher: nn.Module,
    targets: Sequence[int],
    settings: InversionSettings,
    class_ids: Sequence[int] | None = None,
    verifier: nn.Module | None = None,
    verifier_channel_of: Mapping[int, int] | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    fill: bool = True,
) -> ReplaySet:
    """Control (SPEC 6.2, a lower bound): the generator's unoptimised initialisation (N(0, 1) in
    the normalised space, clamped), same count, targets and layout; ``kind="noise"`` in the key."""
    return _ensure(Path(cache), teacher, targets, settings, class_ids, "noise", None,
                   verifier, verifier_channel_of, progress, device, fill)


# --------------------------------------------------------------------------------------------
# Figures


def class_grid(replay_set: ReplaySet, out_png: str | os.PathLike, per_class: int = 4) -> Path:
    """A PNG grid: one row per class (labelled with its dataset class id), ``per_class`` images."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from incseg.io import atomic_path

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

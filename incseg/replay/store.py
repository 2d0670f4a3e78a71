"""Replay sets in the cache directory: keys, layout, reading and verification.

Layout of an entry ``<cache>/replay/<key>/``::

    manifest.json            settings, key, per-image records, per-batch losses, quality figures
    images/<n>.png           lossless PNG of the de-normalised uint8 image
    teacher_masks/<n>.png    the teacher's pixel argmax (channel index) as a palette PNG

The key (:func:`replay_key`) hashes the teacher's weights and buffers (not checkpoint bytes, so a
re-saved checkpoint still hits), the resolved generator settings, the target channels and their
dataset ids, the kind ("deepinversion" or "noise") and the competition student's weights when
there is one. On read an entry is verified (manifest parses, key and settings match, every
listed PNG exists with its byte size, sha256 and pixel size); anything else is logged and
regenerated, never used. Writing is :mod:`incseg.replay.fill`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from incseg.io import content_key, file_sha256
from incseg.replay.settings import InversionSettings, from_uint8

# One logger for the whole package, named as before it became a package.
log = logging.getLogger("incseg.replay")

__all__ = [
    "KINDS",
    "ReplayDataset",
    "ReplaySet",
    "read_png",
    "replay_key",
    "teacher_fingerprint",
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


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown replay set kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return kind


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
    check_kind(kind)
    return content_key("replay", {
        "kind": kind,
        "format": FORMAT,
        "teacher": teacher_fingerprint(teacher),
        "student": teacher_fingerprint(student) if student is not None else None,
        "settings": settings.resolved(student is not None),
        "targets": [int(t) for t in targets],
        "class_ids": None if class_ids is None else [int(c) for c in class_ids],
    })


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
        x = from_uint8([read_png(self.files[item])])[0]
        if self.hflip and seed is not None and np.random.default_rng(int(seed)).random() < 0.5:
            x = torch.flip(x, dims=(2,))
        if self.with_targets:
            return x, self.targets[item]
        return x


# --------------------------------------------------------------------------------------------
# Verification


def expected_settings(settings: InversionSettings, has_student: bool) -> dict[str, Any]:
    """The resolved settings as a manifest stores them (through JSON: tuples become lists)."""
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


def check_records(root: Path, records: Sequence[dict[str, Any]], size: int,
                  hashes: bool) -> str | None:
    """The first problem with the PNGs ``records`` list under ``root``, or None."""
    for rec in records:
        for field in ("file", "mask"):
            problem = _check_png(root / rec[field], rec, field, size, hashes)
            if problem:
                return problem
    return None


def verify_entry(path: Path, key: str, settings_dict: dict[str, Any], n_expected: int,
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
            problem = check_records(path, manifest["images"], settings_dict["image_size"],
                                    hashes)
    except (OSError, ValueError, KeyError, TypeError) as err:
        problem = f"unreadable manifest ({type(err).__name__}: {err})"
    if problem:
        if not warn:
            return None
        log.warning("replay set %s is invalid (%s); regenerating it", path, problem)
        return None
    return manifest


def discard(path: Path) -> None:
    """Remove an invalid entry: renamed first, so a crash mid-delete never leaves a half entry
    under the final name."""
    if path.exists():
        trash = path.with_name(f".{path.name}.discard.{os.getpid()}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

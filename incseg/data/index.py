"""Per-image class sets and the per-step selection rules of MiB (Cermelli et al., CVPR 2020;
fcdl94/MiB).

Selecting the images of a step needs the set of labels in every mask. Reading 10k VOC masks
takes a while, so the scan is done once per (dataset, split) and cached in the cache directory,
keyed by the files' names, sizes and modification times; a second run reads one small file.
The scan is also where bad files are caught: mask values outside the dataset's classes and 255,
a mask whose size differs from its image, an unreadable or truncated image or mask — each named
in a one-line error.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from incseg.data.base import Sample, Source
from incseg.errors import DataError
from incseg.io import atomic_write_json, content_key, entry_lock
from incseg.tasks import IGNORE, Task

log = logging.getLogger(__name__)


def read_mask(path: Path) -> np.ndarray:
    """A mask as an H x W uint8 array of class ids (palette index or grey level)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DataError(
                    f"mask {path} is a {im.mode} image; masks must be palette (P) or grey (L) "
                    "PNGs whose values are class ids"
                )
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"mask {path} cannot be read ({err}); replace or re-create it") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image, after decoding all of it: a truncated or corrupt file fails
    here, in the scan before training, not in a loader worker hours later. JPEGs are decoded
    in draft mode (1/8 scale, DCT scaling): the whole entropy-coded stream is still read, so
    truncation is caught, at about a third of the cost of a full decode."""
    try:
        with Image.open(path) as im:
            size = im.size
            if im.format == "JPEG":
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
            return size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"image {path} cannot be read ({err}); replace or re-create it") from None


def pixel_counts(sample: Sample, num_classes: int,
                 fix: str = "fix the mask or choose the right dataset") -> np.ndarray:
    """Pixels per mask value (256 counts) of one sample, after decoding its image and checking
    that image and mask have one size and every value is a class id or 255."""
    mask = read_mask(sample.mask)
    size = image_size(sample.image)
    if (mask.shape[1], mask.shape[0]) != size:
        raise DataError(
            f"mask {sample.mask} is {mask.shape[1]}x{mask.shape[0]} but its image "
            f"{sample.image} is {size[0]}x{size[1]}; they must be the same size"
        )
    counts = np.bincount(mask.ravel(), minlength=256)
    bad = [int(v) for v in np.flatnonzero(counts) if v >= num_classes and v != IGNORE]
    if bad:
        raise DataError(
            f"mask {sample.mask} holds values {bad} outside the dataset's classes "
            f"0..{num_classes - 1} and 255; {fix}"
        )
    return counts


def _scan_one(sample: Sample, source: Source) -> list[int]:
    counts = pixel_counts(sample, source.num_classes, source.mask_value_fix)
    return [int(v) for v in np.flatnonzero(counts)]


def _fingerprint(samples: list[Sample]) -> list:
    # The images are part of the key too: the scan is also their check (a truncated JPEG
    # replaced after a cached scan must be read again, not trusted).
    out = []
    for s in samples:
        row = [s.id]
        for path, what in ((s.mask, "mask"), (s.image, "image")):
            try:
                st = path.stat()
            except FileNotFoundError:
                raise DataError(f"{what} {path} is missing; restore it, or remove {s.id} "
                                "from the split's list") from None
            row += [str(path), st.st_size, st.st_mtime_ns]
        out.append(row)
    return out


def scan_labels(source: Source, split: str, cache: Path | None,
                progress: bool = True) -> list[list[int]]:
    """Labels present in each mask of ``split`` (in ``source.samples(split)`` order).

    The scan covers the whole list ``split`` is drawn from (:meth:`Source.origin`: under
    ``data.val=holdout`` train and val are two parts of the training list, scanned once) and is
    cached under ``cache/index/<key>.json``; the key covers every mask's and image's path,
    size and mtime, so an edited mask or image invalidates it.
    """
    name, keep = source.origin(split)
    if name is None:
        return []
    labels = _scan_list(source, name, cache, progress)
    return labels if keep is None else [labels[i] for i in keep]


def _scan_list(source: Source, name: str, cache: Path | None,
               progress: bool) -> list[list[int]]:
    samples = source.check_list(name)
    key = content_key("labels", {"dataset": source.name, "split": name,
                                 "files": _fingerprint(samples)})
    entry = cache / "index" / f"{source.name}-{name}-{key}.json" if cache else None
    if entry is not None and (labels := _read_entry(entry, len(samples))) is not None:
        return labels
    lock = entry_lock(entry) if entry is not None else None
    if lock is not None:
        lock.acquire()
    try:
        if entry is not None and (labels := _read_entry(entry, len(samples))) is not None:
            return labels
        workers = min(8, os.cpu_count() or 1)
        # PIL releases the GIL while decoding, so threads overlap the reads.
        with ThreadPoolExecutor(workers) as pool:
            it = pool.map(lambda s: _scan_one(s, source), samples)
            labels = list(tqdm(it, total=len(samples), disable=not progress, leave=False,
                               desc=f"scanning {source.name}/{name} masks"))
        if entry is not None:
            atomic_write_json(entry, {"count": len(samples), "labels": labels})
        return labels
    finally:
        if lock is not None:
            lock.release()


def class_counts(source: Source, split: str, progress: bool = True) -> tuple[int, np.ndarray,
                                                                            np.ndarray]:
    """(images, pixels per mask value, images per mask value) of ``split``, every image and
    mask read once with the scan's checks; nothing is cached (``python -m incseg.data check``
    is how a user sees the data as it is on disk now)."""
    samples = source.check_split(split)
    pixels = np.zeros(256, dtype=np.int64)
    images = np.zeros(256, dtype=np.int64)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        it = pool.map(lambda s: pixel_counts(s, source.num_classes, source.mask_value_fix),
                      samples)
        # closed (and erased) on an error too: the error is the last line a terminal shows
        with tqdm(it, total=len(samples), disable=not progress, leave=False,
                  desc=f"checking {source.name}/{split}") as bar:
            for counts in bar:
                pixels += counts
                images += counts > 0
    return len(samples), pixels, images


def _read_entry(entry: Path, count: int) -> list[list[int]] | None:
    if not entry.exists():
        return None
    try:
        data = json.loads(entry.read_text())
        labels = data["labels"]
        if data["count"] != count or len(labels) != count:
            raise ValueError("count mismatch")
        return labels
    except (ValueError, KeyError, TypeError) as err:
        log.warning("label index %s is corrupt (%s); rebuilding it", entry, err)
        entry.unlink(missing_ok=True)
        return None


def foreground(labels: list[int]) -> set[int]:
    """Selection counts foreground classes only: 0 and 255 never count."""
    return {c for c in labels if c not in (0, IGNORE)}


def select_train(labels: list[list[int]], task: Task, step: int, overlap: bool) -> list[int]:
    """Indices of the training images of ``step`` (MiB's ``filter_images``).

    Overlap: the mask holds a foreground class of the current step. Disjoint: additionally
    every foreground label is old or current (no future classes).
    """
    current = foreground(task.classes_added(step))
    seen = set(task.classes_seen(step))
    keep = []
    for i, lab in enumerate(labels):
        fg = foreground(lab)
        if fg & current and (overlap or fg <= seen):
            keep.append(i)
    return keep


def select_test(labels: list[list[int]], task: Task, step: int) -> list[int]:
    """Indices of the evaluation images after ``step``: those holding a seen foreground class."""
    seen = foreground(task.classes_seen(step))
    return [i for i, lab in enumerate(labels) if foreground(lab) & seen]

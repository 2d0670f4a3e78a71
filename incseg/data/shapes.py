"""The built-in benchmark ``shapes``: a procedurally generated, VOC-like segmentation dataset.

Twenty foreground classes (ids 1..20, background 0, void 255, exactly like PASCAL VOC) that are
told apart by **shape and texture**: ten shapes, each ``solid`` or ``striped``::

    id = 2 * shape + 1 + striped   (1 circle-solid, 2 circle-striped, ..., 20 arrow-striped)

That is the default class design, ``classes=twins``. With ``classes=shapes`` a class is one of
20 shapes (``id = shape + 1``), each object's texture is drawn at random and shape s has hue
band s mod ``hue_bands``, so that only the shape names the class, as an object's shape and
parts do in VOC (``incseg.data.shapes_draw``). Backgrounds, objects and void are drawn alike
in both designs.

Colour is only a partial cue: every class has a typical hue band, but each band is shared by
classes of different shapes (``hue_bands=10``: one solid and one striped shape a band; ``5``:
two of each), and ``hue_cue`` widens the bands until they overlap (0 = any colour). Backgrounds
carry a colour gradient, low-frequency noise and distractor strokes that are labelled
background (``clutter``). Each image holds 1-3 objects with random scale, rotation, aspect and
position; later objects are painted over earlier ones (occlusion) and the mask shows the
visible object. A band of void pixels (255) runs along every object outline, as in VOC.

Difficulty knobs (fields of :class:`ShapesParams`); the defaults sit between a setting that a
from-scratch BiSeNet-R18 on 2 CPU cores barely learns and one it nearly saturates, so that
incremental methods can differ. Overlapping hue bands are the strongest knob, clutter and stripe
contrast finer ones (the measurements are in ``experiments/calibration.md``).

- ``hue_cue``: 0 = random hue, 1 = tight class-typical hue band.
- ``hue_bands``: how many hue bands the 20 classes share (5: four classes a band; 10: two).
- ``clutter``: 0..1, scales background noise amplitude, gradient strength, the number of
  distractor strokes and the pixel noise on the whole image.
- ``stripe_contrast``: 0..1, how far the second stripe colour moves towards black/white.
- ``scale``: (min, max) object size (outer diameter) as a fraction of the image side.
- ``void_width``: width of the void band in pixels (0 = none).

``generate`` writes the VOC layout; ``ensure_shapes`` keeps it in the content-keyed cache.
Every image's random generator is seeded from ``(seed, split, index)`` only, so generation is
deterministic (byte-identical files) whatever the order or number of worker processes.
Drawing (the class taxonomy, shapes, textures) lives in ``incseg.data.shapes_draw``, the docs'
figures in ``incseg.data.shapes_figures``, the parameters in ``incseg.data.shapes_params``;
their public names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import multiprocessing.context
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from incseg.data.prepare import voc_colormap
from incseg.data.shapes_draw import (
    CLASS_NAMES,
    DESIGN_SHAPES,
    EXTRA_SHAPE_FNS,
    NUM_CLASSES,
    SHAPE_FNS,
    SHAPES,
    TEXTURES,
    VOID,
    class_hue_group,
    class_names,
    class_shape,
    class_striped,
    render,
)
from incseg.data.shapes_figures import class_sheet, sample_grid
from incseg.data.shapes_params import CLASS_DESIGNS, HUE_BANDS, ShapesParams
from incseg.io import atomic_dir, atomic_write_json, content_key, entry_lock

__all__ = [
    "CLASS_DESIGNS", "CLASS_NAMES", "DESIGN_SHAPES", "EXTRA_SHAPE_FNS", "HUE_BANDS", "MANIFEST",
    "NUM_CLASSES", "SHAPE_FNS", "SHAPES", "SPLITS", "TEXTURES", "VOID", "ShapesParams",
    "class_hue_group", "class_names", "class_shape", "class_sheet", "class_striped",
    "ensure_shapes", "generate", "render", "render_sample", "sample_grid", "sample_id",
    "sample_rng", "shapes_key", "voc_colormap", "write_docs",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"

_PALETTE = voc_colormap(256).flatten().tolist()


# --------------------------------------------------------------------------------------------
# Which generator and classes each image gets (what makes the files byte-identical)


def sample_rng(p: ShapesParams, split: str, index: int) -> np.random.Generator:
    """The generator of image ``index`` of ``split``: a function of (seed, split, index) only."""
    return np.random.default_rng(np.random.SeedSequence([p.seed, SPLITS.index(split), index]))


def _balanced_class(p: ShapesParams, split: str, index: int) -> int:
    # One object per image cycles through the classes (in a per-split random order), so every
    # class is in at least ~1/20 of each split's images; the others are drawn uniformly.
    order = np.random.default_rng([p.seed, SPLITS.index(split), 2**31]).permutation(20) + 1
    return int(order[index % 20])


def render_sample(p: ShapesParams, split: str, index: int):
    """Image ``index`` of ``split``: (RGB uint8 image, mask, instance map), deterministic."""
    rng = sample_rng(p, split, index)
    k = int(rng.integers(p.min_objects, p.max_objects + 1))
    classes = [int(c) for c in rng.integers(1, NUM_CLASSES, size=k)]
    classes[int(rng.integers(0, k))] = _balanced_class(p, split, index)
    return render(p, rng, classes)


def sample_id(split: str, index: int) -> str:
    return f"{split}_{index + 1:06d}"


# --------------------------------------------------------------------------------------------
# Writing the VOC layout


def _write_range(args: tuple[dict, str, int, int, str]) -> list[list[int]]:
    """Render and write images [start, stop) of ``split``; returns the classes of each mask."""
    pd, split, start, stop, base = args
    p = ShapesParams.from_dict(pd)
    basep = Path(base)
    present = []
    for i in range(start, stop):
        image, mask, _ = render_sample(p, split, i)
        sid = sample_id(split, i)
        Image.fromarray(image, "RGB").save(
            basep / "JPEGImages" / f"{sid}.jpg", format="JPEG", quality=p.jpeg_quality,
            subsampling=0,
        )
        m = Image.fromarray(mask, "L").convert("P")
        m.putpalette(_PALETTE)
        m.save(basep / "SegmentationClass" / f"{sid}.png", format="PNG")
        present.append([int(c) for c in np.unique(mask) if 0 < c < VOID])
    return present


def default_workers() -> int:
    try:
        return max(1, min(2, len(os.sched_getaffinity(0))))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, min(2, os.cpu_count() or 1))


def _fork_context() -> multiprocessing.context.BaseContext | None:
    """A fork context when forking is safe (POSIX, no other Python threads), else None.

    Forked workers start at once (no re-import); a process that already runs threads (a
    logger, a data loader) generates in-process instead, which only costs time.
    """
    if "fork" not in multiprocessing.get_all_start_methods() or threading.active_count() > 1:
        return None
    return multiprocessing.get_context("fork")


def map_in_order(fn: Callable[[Any], Any], jobs: list, workers: int,
                 size: Callable[[Any], int], bar: tqdm) -> list:
    """``fn`` over ``jobs``, results in job order, in up to ``workers`` forked processes where
    forking is safe (else in this process); ``bar`` advances by ``size(job)`` as each is done.
    Every job draws from its own generator, so the results do not depend on the processes."""
    ctx = _fork_context() if workers > 1 else None
    out = []
    with (ProcessPoolExecutor(max_workers=workers, mp_context=ctx) if ctx else nullcontext()) as ex:
        for job, res in zip(jobs, ex.map(fn, jobs) if ex else map(fn, jobs)):
            out.append(res)
            bar.update(size(job))
    return out


def generate(params: ShapesParams, out: str | os.PathLike, progress: bool = True,
             workers: int | None = None) -> dict[str, Any]:
    """Write the dataset under ``out/VOCdevkit/VOC2012`` (VOC layout).

    Returns a summary: image counts and, per split, the number of images holding each class.
    ``workers`` (default: up to 2 processes) does not change a single byte of the output.
    """
    base = Path(out) / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    workers = default_workers() if workers is None else max(1, int(workers))
    total = sum(params.count(s) for s in SPLITS)
    pd = params.to_dict()
    chunk = 100
    jobs = [(pd, s, a, min(a + chunk, params.count(s)), str(base))
            for s in SPLITS for a in range(0, params.count(s), chunk)]
    bar = tqdm(total=total, desc="shapes", unit="img", disable=not progress, file=sys.stderr,
               leave=False)
    with bar:
        results = map_in_order(_write_range, jobs, workers if total >= 200 else 1,
                               lambda job: job[3] - job[2], bar)
    per_split: dict[str, list[int]] = {s: [0] * NUM_CLASSES for s in SPLITS}
    for job, res in zip(jobs, results):
        for present in res:
            for c in present:
                per_split[job[1]][c] += 1
    for s in SPLITS:
        ids = [sample_id(s, i) for i in range(params.count(s))]
        (base / "ImageSets" / "Segmentation" / f"{s}.txt").write_text("\n".join(ids) + "\n")
    return {
        "counts": {s: params.count(s) for s in SPLITS},
        "class_images": {s: per_split[s][1:] for s in SPLITS},
    }


# --------------------------------------------------------------------------------------------
# Cache


def shapes_key(params: ShapesParams) -> str:
    return content_key("shapes", params.key_dict())


def _check_entry(entry: Path, params: ShapesParams) -> str | None:
    """None when ``entry`` is a complete dataset for ``params``, else what is wrong."""
    man_path = entry / MANIFEST
    if not man_path.is_file():
        return f"{MANIFEST} is missing"
    try:
        man = json.loads(man_path.read_text())
    except (OSError, ValueError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    if not isinstance(man, dict) or man.get("params") != params.to_dict():
        return f"{MANIFEST} was written for other parameters"
    counts = {s: params.count(s) for s in SPLITS}
    if man.get("counts") != counts:
        return f"{MANIFEST} lists other image counts"
    base = entry / "VOCdevkit" / "VOC2012"
    try:
        jpgs = set(os.listdir(base / "JPEGImages"))
        pngs = set(os.listdir(base / "SegmentationClass"))
        for s in SPLITS:
            ids = (base / "ImageSets" / "Segmentation" / f"{s}.txt").read_text().split()
            if len(ids) != counts[s]:
                return f"the {s} list has {len(ids)} ids, expected {counts[s]}"
            missing = [i for i in ids if f"{i}.jpg" not in jpgs or f"{i}.png" not in pngs]
            if missing:
                return f"{len(missing)} {s} images or masks are missing (e.g. {missing[0]})"
    except OSError as e:
        return f"unreadable layout ({e})"
    return None


def ensure_shapes(params: ShapesParams, cache: str | os.PathLike, progress: bool = True) -> Path:
    """The dataset root (the folder that holds ``VOCdevkit/``) for ``params`` in ``cache``.

    Generated once, under a file lock, into a temporary folder renamed into place; the manifest
    is written last. A broken entry is reported and rebuilt.
    """
    entry = Path(cache) / "shapes" / shapes_key(params)
    if entry.is_dir() and _check_entry(entry, params) is None:
        return entry
    with entry_lock(entry):
        if entry.exists():
            problem = _check_entry(entry, params)
            if problem is None:
                return entry  # another process finished it while we waited
            log.warning("shapes cache entry %s is broken (%s); regenerating it", entry, problem)
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        log.info("generating the shapes dataset into %s", entry)
        with atomic_dir(entry) as tmp:
            summary = generate(params, tmp, progress=progress)
            manifest = {"kind": "shapes", "key": entry.name, "params": params.to_dict(),
                        "classes": list(class_names(params)), **summary}
            atomic_write_json(tmp / MANIFEST, manifest)
    return entry


# --------------------------------------------------------------------------------------------
# The README's figures


def write_docs(docs: str | os.PathLike = "docs", params: ShapesParams | None = None) -> None:
    """Regenerate ``docs/shapes_grid.png``, ``docs/shapes_classes.png`` (default params),
    ``docs/shapes_classes_shapes.png`` (the same with ``classes=shapes``) and
    ``docs/corpus_grid.png`` (the pretraining corpus)."""
    from incseg.data.corpus import corpus_grid

    params = params or ShapesParams()
    with tempfile.TemporaryDirectory() as tmp:
        small = dataclasses.replace(params, n_train=24, n_val=1, n_test=1)
        generate(small, tmp, progress=False, workers=1)  # same images as the full set's first 24
        sample_grid(tmp, Path(docs) / "shapes_grid.png")
    class_sheet(params, Path(docs) / "shapes_classes.png")
    class_sheet(dataclasses.replace(params, classes="shapes"),
                Path(docs) / "shapes_classes_shapes.png")
    corpus_grid(Path(docs) / "corpus_grid.png")


if __name__ == "__main__":
    write_docs(sys.argv[1] if len(sys.argv) > 1 else "docs")

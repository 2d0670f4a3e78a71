"""Colouring, overlays and checkpoint inference shared by ``incseg.report`` and ``incseg.predict``.

A model's output channel k is the k-th class of ``task.classes_seen(step)`` (task order), so a
prediction is only meaningful once channels are mapped back to dataset class ids; the map comes
from the checkpoint itself (its ``task_steps`` flattened up to its ``step``), never from a
config that might describe another task. Images are normalised with the eval transform's own
``normalize()`` so that inference here sees exactly what the test split saw.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from incseg.checkpoints import model_from_checkpoint, read_model_file
from incseg.data.prepare import voc_colormap
from incseg.errors import CheckpointError
from incseg.io import atomic_write_bytes
from incseg.models import SegmentationModel
from incseg.prediction import prediction_scores

_CMAP = voc_colormap(256)


def palette_of(class_colors: Sequence[Sequence[int]] | None) -> np.ndarray:
    """256 x 3 uint8: a dataset's own colours (``class_colors`` of a checkpoint or results,
    RGB per class id) over the VOC palette, or the VOC palette alone."""
    pal = _CMAP.copy()
    if class_colors:
        pal[: len(class_colors)] = np.asarray(class_colors, dtype=np.uint8).reshape(-1, 3)
    return pal


def colorize(ids: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """H x W class ids (uint8, 255 = void) -> H x W x 3 uint8 in ``palette`` (default VOC's)."""
    return (_CMAP if palette is None else palette)[np.asarray(ids, dtype=np.uint8)]


def overlay(image: np.ndarray, ids: np.ndarray, alpha: float = 0.5,
            palette: np.ndarray | None = None) -> np.ndarray:
    """``(1 - alpha) * image + alpha * colour(ids)``: H x W x 3 uint8 (image and ids same H x W)."""
    if image.shape[:2] != ids.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {ids.shape} differ in size")
    colour = colorize(ids, palette).astype(np.float32)
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colour
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def palette_png_bytes(ids: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """A palette (P-mode) PNG of class ids, the format of VOC's own masks (pixel = class id);
    ``palette`` only changes how viewers show it, never the ids."""
    im = Image.fromarray(np.asarray(ids, dtype=np.uint8), mode="P")
    im.putpalette((_CMAP if palette is None else palette).ravel().tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_palette_png(ids: np.ndarray, path: str | os.PathLike,
                      palette: np.ndarray | None = None) -> None:
    atomic_write_bytes(path, palette_png_bytes(ids, palette))


def write_rgb_png(rgb: np.ndarray, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8), mode="RGB").save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def load_segmenter(path: str | Path, model_name: str | None = None
                   ) -> tuple[SegmentationModel, list[int], dict]:
    """(model in eval mode, dataset class id of every output channel, checkpoint metadata; its
    ``prediction`` is the rule the model was evaluated with, :mod:`incseg.prediction`).

    Unlike :func:`incseg.checkpoints.load_model` it needs no task: the checkpoint says which
    classes it was trained on. ``model_name`` (optional) must match the stored model name.
    """
    ckpt = read_model_file(path)
    stored = str(ckpt.get("model"))
    if model_name is not None and str(model_name) != stored:
        raise CheckpointError(f"checkpoint {path} holds a {stored} but model={model_name} was "
                              f"given; drop model= or set model={stored}")
    step = int(ckpt.get("step", -1))
    steps = ckpt.get("task_steps") or []
    class_ids = [int(c) for s in steps[: step + 1] for c in s]
    per_step = [int(n) for n in ckpt.get("classes_per_step", [])]
    if step < 0 or not class_ids or sum(per_step) != len(class_ids):
        raise CheckpointError(f"checkpoint {path} has inconsistent class metadata (step {step}, "
                              f"{sum(per_step)} channels, classes {class_ids}); re-save it")
    model = model_from_checkpoint(ckpt, path)
    model.eval()
    meta = {k: ckpt.get(k) for k in ("model", "step", "task_steps", "classes_per_step",
                                     "class_names", "class_colors")}
    meta["prediction"] = ckpt.get("prediction") or "argmax"
    return model, class_ids, meta


def channel_lut(class_ids: Sequence[int]) -> np.ndarray:
    """Channel index -> dataset class id, as a uint8 array for one gather per prediction."""
    return np.asarray(class_ids, dtype=np.uint8)


def to_input(image: np.ndarray, size: int | None = None) -> torch.Tensor:
    """H x W x 3 uint8 RGB -> 1 x 3 x h x w float, normalised like the eval transform.

    ``size`` resizes the shorter side (the eval ``resize`` mode without its centre crop, so the
    whole image is segmented); None keeps the image's resolution (``test_mode=full``).
    """
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    from incseg.data.transforms import normalize

    ops: list = [A.SmallestMaxSize(max_size=int(size))] if size else []
    out = A.Compose(ops + [normalize(), ToTensorV2()])(image=image)["image"]
    return out.unsqueeze(0)


@torch.no_grad()
def predict_ids(model: SegmentationModel, x: torch.Tensor, class_ids: Sequence[int],
                out_size: tuple[int, int] | None = None,
                prediction: str = "argmax") -> np.ndarray:
    """B x 3 x h x w normalised images -> B x H x W uint8 dataset class ids.

    Logits are resized to ``out_size`` (bilinear, as the heads' own upsampling) before the
    argmax, so a mask for the original image is as sharp as the model allows; ``prediction``:
    the rule of the checkpoint's method (``load_segmenter``'s ``meta["prediction"]``).
    """
    device = next(model.parameters()).device
    logits = model(x.to(device)).logits
    if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
        logits = torch.nn.functional.interpolate(logits, size=tuple(out_size), mode="bilinear",
                                                 align_corners=False)
    channels = prediction_scores(logits, prediction).argmax(dim=1).cpu().numpy()
    return channel_lut(class_ids)[channels]

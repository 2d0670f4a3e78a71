"""Segmentation metrics: a confusion-matrix metric and the old/new/all summaries of class-
incremental segmentation as MiB reports them (Cermelli et al., CVPR 2020; fcdl94/MiB).

The confusion matrix is accumulated over the model's output channels (rows = ground truth,
columns = prediction). Channel k is the k-th class of ``task.classes_seen(step)``, so
:func:`summarize` maps channels back to dataset class ids before grouping them.

Conventions (MiB):

- IoU_k = TP / (TP + FP + FN), defined only for classes present in the ground truth; a class
  absent from the ground truth has IoU ``None`` (its false positives still lower the IoU of the
  true classes through their false negatives).
- mIoU averages the classes that have an IoU.
- old = background + step-0 classes (the paper's "1-15" is arithmetically 0-15), new = classes
  added after step 0, all = every seen class; the ``_nobg`` variants leave out class 0.

hIoU (the harmonic mean of old and new) has two conventions (``eval.hiou``): ``suite`` takes
old and new above; ``dkd`` takes DKD's (cvlab-yonsei/DKD ``utils/metric.py``, ``Evaluator.
Mean_Intersection_over_Union``), in which a class absent from the ground truth scores IoU 0 and
pulls its group's mean down (:func:`dkd_iou_per_class`, :func:`dkd_old_new`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

from incseg.tasks import IGNORE, Task


# Not torchmetrics' MulticlassConfusionMatrix (1.9), which counts the same pixels only once
# out-of-range targets are set to 255 by hand: it raises (target < 0) or fails (target >= C)
# where we skip, counts a prediction >= C in another cell (validate_args checks how many
# distinct values there are, not their range) where we raise, and with
# trainer.deterministic=true its bincount becomes an N x C^2 comparison (tens of GB for one
# 512 x 512 ADE20K image) where torch.bincount stays exact.
class SegMetric(Metric):
    """Confusion matrix (``num_classes`` x ``num_classes``, int64) of a segmentation model.

    ``update(preds, target)`` takes class indices (B x H x W) or logits (B x C x H x W, reduced
    by argmax over dim 1) and a target (B x H x W); target pixels equal to ``ignore_index`` or
    outside ``0..num_classes-1`` are skipped. ``compute()`` returns the confusion matrix, summed
    across DDP ranks.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = IGNORE, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.add_state(
            "confusion",
            default=torch.zeros(self.num_classes, self.num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.dim() == target.dim() + 1:
            if preds.shape[1] != self.num_classes:
                raise ValueError(
                    f"logits have {preds.shape[1]} channels but the metric has "
                    f"{self.num_classes} classes"
                )
            preds = preds.argmax(dim=1)
        if preds.shape != target.shape:
            raise ValueError(
                f"predictions {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape"
            )
        c = self.num_classes
        preds = preds.reshape(-1).long()
        target = target.reshape(-1).to(preds.device).long()
        valid = (target != self.ignore_index) & (target >= 0) & (target < c)
        preds = preds[valid]
        target = target[valid]
        if preds.numel() == 0:
            return
        if bool(((preds < 0) | (preds >= c)).any()):
            raise ValueError(f"predicted class indices must lie in 0..{c - 1}")
        counts = torch.bincount(target * c + preds, minlength=c * c)
        self.confusion += counts.reshape(c, c).to(self.confusion.device)

    def compute(self) -> torch.Tensor:
        return self.confusion


def _as_numpy(confusion: Any) -> np.ndarray:
    if isinstance(confusion, torch.Tensor):
        confusion = confusion.detach().cpu().numpy()
    cm = np.asarray(confusion, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    return cm


def iou_per_class(confusion: Any) -> list[float | None]:
    """IoU of each channel; ``None`` for a channel absent from the ground truth (row sum 0)."""
    cm = _as_numpy(confusion)
    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    pred = cm.sum(axis=0)
    out: list[float | None] = []
    for k in range(cm.shape[0]):
        if gt[k] == 0:
            out.append(None)
        else:
            out.append(float(tp[k]) / float(gt[k] + pred[k] - tp[k]))
    return out


def dkd_iou_per_class(confusion: Any) -> list[float]:
    """DKD's IoU per channel: TP / (GT + P - (TP + 1e-6)), its ``np.diag(cm + 1e-6)`` put
    where a 1e-6 guard was meant to go. A class absent from the ground truth and never
    predicted gets 0 / -1e-6, i.e. 0 (its ``nan_to_num`` would have made a 0/0 0 too); one
    absent but predicted gets 0 / P = 0: DKD's means count such classes as IoU 0."""
    cm = _as_numpy(confusion).astype(np.float64)
    tp = np.diag(cm)
    iou = tp / (cm.sum(axis=1) + cm.sum(axis=0) - (tp + 1e-6))
    return [float(v) + 0.0 for v in np.nan_to_num(iou)]  # + 0.0: -0.0 -> 0.0


def dkd_old_new(confusion: Any, task: Task, step: int) -> tuple[float | None, float | None]:
    """DKD's old and new mIoU after ``step``: the mean of :func:`dkd_iou_per_class` over the
    old (background + step-0) and the new seen classes, absent classes included as 0; None for
    a group with no class (new at step 0, where DKD reports no harmonic mean)."""
    cm = _as_numpy(confusion)
    seen = task.classes_seen(step)
    by_class = dict(zip(seen, dkd_iou_per_class(cm)))
    old_set, new_set = set(task.old_classes), set(task.new_classes)
    old = [by_class[c] for c in seen if c in old_set]
    new = [by_class[c] for c in seen if c in new_set]
    return (sum(old) / len(old) if old else None, sum(new) / len(new) if new else None)


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def pixel_accuracy(confusion: Any) -> float | None:
    """Fraction of counted pixels predicted correctly; ``None`` when no pixel was counted."""
    cm = _as_numpy(confusion)
    total = int(cm.sum())
    return float(np.trace(cm)) / total if total else None


def summarize(confusion: Any, task: Task, step: int) -> dict[str, Any]:
    """Per-class IoU keyed by dataset class id (str) and the old/new/all mIoUs after ``step``
    (and DKD's old / new, ``dkd_miou_old`` / ``dkd_miou_new``, for its hIoU convention).

    Joint is scored with the incremental task's split: pass the task itself and its last step
    (its channel order equals ``task.joint()``'s).
    """
    cm = _as_numpy(confusion)
    seen = task.classes_seen(step)
    if cm.shape[0] != len(seen):
        raise ValueError(
            f"confusion matrix has {cm.shape[0]} classes but task {task.name} has seen "
            f"{len(seen)} classes at step {step}"
        )
    by_class = dict(zip(seen, iou_per_class(cm)))
    old_set, new_set = set(task.old_classes), set(task.new_classes)
    old = [c for c in seen if c in old_set]
    new = [c for c in seen if c in new_set]
    dkd_old, dkd_new = dkd_old_new(cm, task, step)
    return {
        "iou": {str(c): by_class[c] for c in seen},
        "miou_old": _mean(by_class[c] for c in old),
        "miou_new": _mean(by_class[c] for c in new),
        "miou_all": _mean(by_class[c] for c in seen),
        "miou_old_nobg": _mean(by_class[c] for c in old if c != 0),
        "miou_all_nobg": _mean(by_class[c] for c in seen if c != 0),
        "pixel_accuracy": pixel_accuracy(cm),
        # DKD's old / new (absent classes as IoU 0): what ``eval.hiou=dkd`` takes hIoU from
        "dkd_miou_old": dkd_old,
        "dkd_miou_new": dkd_new,
    }


def mean_over_steps(values: Iterable[float | None]) -> float | None:
    """PLOP's "avg": the mean over steps of mIoU(all), skipping ``None``."""
    return _mean(values)


def forgetting(iou_by_step: Sequence[Mapping[str, float | None]]) -> dict[str, float]:
    """Per class: max IoU over the earlier steps minus its IoU at the final step.

    ``iou_by_step[t]`` maps class id -> IoU (a step record's ``iou``). Classes whose final IoU is
    ``None``, or with no earlier IoU (e.g. added at the final step), are left out.
    """
    if not iou_by_step:
        return {}
    *earlier, final = iou_by_step
    out: dict[str, float] = {}
    for cls, last in final.items():
        if last is None:
            continue
        prev = [s[cls] for s in earlier if s.get(cls) is not None]
        if prev:
            out[cls] = float(max(prev)) - float(last)
    return out

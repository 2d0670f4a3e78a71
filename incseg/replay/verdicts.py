"""What a frozen model says about replay images: image-level logits and predictions.

Segmentation models give pixel logits; an image-level verdict pools them with LSE-LBA (the same
pooling the generator's CE uses), so "the teacher recognises the image as class c" means the
same thing during synthesis, in the cache manifest and for the independent verifier.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from incseg.models.pooling import lse_lba_pool
from incseg.prediction import prediction_scores
from incseg.replay.settings import InversionSettings

__all__ = [
    "class_diversity",
    "frozen",
    "image_level_logits",
    "model_logits",
    "pooled_features",
    "teacher_verdicts",
    "verifier_accuracy",
    "verifier_predictions",
]


def model_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Pixel logits of ``model(x)``: a :class:`SegOutput`'s ``.logits`` or a plain tensor."""
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def image_level_logits(model: nn.Module, x: Tensor, r: float) -> tuple[Tensor, Tensor]:
    """``(pixel logits B x C x H x W, LSE-LBA pooled B x C)`` of ``model`` on ``x`` (no grad)."""
    with torch.no_grad():
        logits = model_logits(model, x).float()
        return logits, lse_lba_pool(logits, r)


def device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def frozen(*models: nn.Module | None, device=None) -> Iterator[None]:
    """Put models in eval mode with ``requires_grad=False`` (optionally on ``device``); restore
    their mode, flags and device afterwards. Weights and buffers are never written: a teacher
    left in train mode would move its BN running statistics, which are what the generator
    matches."""
    saved = []
    for m in models:
        if m is None:
            continue
        flags = [(p, p.requires_grad) for p in m.parameters()]
        first = next(iter(m.parameters()), None)
        saved.append((m, m.training, flags, first.device if first is not None else None))
        m.eval()
        m.requires_grad_(False)
        if device is not None:
            m.to(device)
    try:
        yield
    finally:
        for m, training, flags, dev in saved:
            m.train(training)
            for p, flag in flags:
                p.requires_grad_(flag)
            if device is not None and dev is not None:
                m.to(dev)


def teacher_verdicts(
    teacher: nn.Module, images: Tensor, targets: Tensor, settings: InversionSettings
) -> tuple[Tensor, Tensor, Tensor]:
    """``(prediction B, confidence for the target B, pixel argmax B x H x W)`` of a frozen
    teacher on normalised ``images`` (no jitter, full resolution).

    The prediction is the argmax over the foreground channels (all channels with
    ``include_background``): the targets are foreground channels, so the verdict asks which
    of them the teacher sees. The confidence is a softmax over all channels; for a teacher of
    one sigmoid per class (``settings.objective``: DKD, STAR) the target's sigmoid, and the pixel
    map follows that rule (background where no class's sigmoid exceeds 0.5)."""
    logits, pooled = image_level_logits(teacher, images, settings.lse_r)
    index = targets.view(-1, 1).to(pooled.device)
    if settings.objective == "sigmoid":
        conf = torch.sigmoid(pooled.gather(1, index)).squeeze(1)
        pixels = prediction_scores(logits, "sigmoid").argmax(dim=1)
    else:
        conf = pooled.softmax(dim=1).gather(1, index).squeeze(1)
        pixels = logits.argmax(dim=1)
    if settings.include_background or pooled.shape[1] == 1:
        pred = pooled.argmax(dim=1)
    else:
        pred = pooled[:, 1:].argmax(dim=1) + 1
    return pred.cpu(), conf.cpu(), pixels.cpu()


def verifier_predictions(verifier: nn.Module, images: Tensor, r: float,
                         batch_size: int = 32) -> list[int]:
    """Image-level prediction of ``verifier`` on normalised images: argmax of the LSE-LBA pooled
    logits over its foreground channels (1..)."""
    preds: list[int] = []
    with frozen(verifier):
        device = device_of(verifier)
        for k in range(0, images.shape[0], batch_size):
            _, pooled = image_level_logits(verifier, images[k:k + batch_size].to(device), r)
            fg = pooled[:, 1:] if pooled.shape[1] > 1 else pooled
            preds.extend((fg.argmax(dim=1) + (1 if pooled.shape[1] > 1 else 0)).tolist())
    return preds


def verifier_accuracy(preds: Sequence[int], targets: Sequence[int],
                      channel_of: Mapping[int, int] | None) -> float:
    """Share of ``preds`` equal to the verifier channel of each teacher channel in ``targets``
    (``channel_of``: teacher channel -> verifier channel; None: the same channel)."""
    if not targets:
        return 0.0
    hits = 0
    for p, t in zip(preds, targets, strict=True):
        expected = t if channel_of is None else channel_of.get(int(t), channel_of.get(str(t)))
        if expected is None:
            raise ValueError(f"verifier_channel_of has no entry for teacher channel {t}")
        hits += int(p) == int(expected)
    return hits / len(targets)


def pooled_features(model: nn.Module, images: Tensor, key: str = "decoder",
                    batch_size: int = 32) -> Tensor:
    """``N x D``: the model's ``key`` feature map (the contract's ``decoder``: what its
    classifier reads) averaged over space and scaled to unit length, per image. The unit
    length makes distances comparable across models and feature widths."""
    feats = []
    with frozen(model):
        device = device_of(model)
        for k in range(0, images.shape[0], batch_size):
            with torch.no_grad():
                f = model(images[k:k + batch_size].to(device)).features[key]
            feats.append(torch.nn.functional.normalize(f.float().mean(dim=(2, 3)), dim=1).cpu())
    return torch.cat(feats)


def class_diversity(features: Tensor, targets: Sequence[int]) -> dict[int, float]:
    """Per class, the mean Euclidean distance over all pairs of its images' ``features``
    (0 for a class with one image): how spread out the replay images of a class look to a
    model. Identical images give 0; unit vectors at most 2."""
    t = torch.as_tensor([int(x) for x in targets])
    out: dict[int, float] = {}
    for c in sorted(set(t.tolist())):
        f = features[t == c].double()
        n = f.shape[0]
        if n < 2:
            out[c] = 0.0
            continue
        d = torch.cdist(f, f)
        out[c] = float(d.sum() / (n * (n - 1)))  # the diagonal is 0: each pair counted twice
    return out

"""STAR's pieces (Chen et al., "Saving 100x Storage: Prototype Replay for Reconstructing
Training Sample Distribution in Class-Incremental Semantic Segmentation", NeurIPS 2023), as its
code computes them (jinpeng0528/STAR ``base/base_trainer.py``: ``compute_prototypes``,
``compute_noise``; ``trainer/trainer_voc.py``: the replayed features and the loss weights;
``models/loss.py``: ``PKDLoss``, ``ContLoss``).

What STAR keeps of an old class c instead of images, read on the decoder feature f (what the
classifier reads) at the pixels of c:

    prototype p_c   the mean direction: normalise(sum of f / |f|)                  (D values)
    noise     s_c   per dimension, sqrt(mean of (f / |f| - p_c)^2)                 (D values)
    norm      m_c, σ_c   mean and (unbiased) std of |f|                            (2 values)
    count     n_c   how many of its pixels the step's data held                    (1 value)

counted on the labels sampled at the feature's resolution, at the centre of each cell (the
reference's ``label[:, 8::16, 8::16]`` at output stride 16). A replayed feature of c is
(p_c + s_c ⊙ ε) · r with ε ~ N(0, I) and r ~ N(m_c, σ_c).

Shapes: labels ``B x H x W``, decoder feature ``B x D x h x w``, prototypes ``K x D``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ClassSums", "class_sums", "class_statistics", "feature_distillation_in_region",
           "old_sigmoid_prediction", "prototype_separation", "sample_prototype_features",
           "subsample_labels"]


def subsample_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """``B x H x W`` labels at the ``h x w`` feature resolution, one label per feature cell,
    read at the cell's centre: rows ``i·s + s // 2`` with s = H // h (the reference's
    ``[:, 8::16, 8::16]`` at s = 16). A size that does not divide evenly reads the cell
    ``floor(i·H / h)`` plus half a stride."""
    H, W = labels.shape[-2:]
    h, w = size

    def idx(n: int, m: int) -> Tensor:
        step = n // m
        return (torch.arange(m, device=labels.device) * n // m + step // 2).clamp(max=n - 1)

    return labels[:, idx(H, h)][:, :, idx(W, w)]


class ClassSums(dict):
    """Per-class sums over the pixels of each class (float64, on the feature's device):
    ``count`` (K), ``unit`` (K x D: sum of f/|f|), ``unit_sq`` (K x D: sum of (f/|f|)^2),
    ``norm`` (K: sum of |f|), ``norm_sq`` (K: sum of |f|^2)."""

    def add(self, other: ClassSums) -> ClassSums:
        for k, v in other.items():
            self[k] = self[k] + v if k in self else v.clone()
        return self


def class_sums(feature: Tensor, labels_small: Tensor, classes: Tensor) -> ClassSums:
    """The sums behind STAR's statistics for ``classes`` (K class ids) on one batch:
    ``feature`` B x D x h x w, ``labels_small`` B x h x w (:func:`subsample_labels`). The
    reference accumulates the normalised features of a class's pixels (``compute_prototypes``)
    and, on a second pass, their squared distance to the finished prototype
    (``compute_noise``); the squares' and plain sums give the same distance from one pass."""
    f = feature.detach().double().permute(0, 2, 3, 1).reshape(-1, feature.shape[1])  # N x D
    norm = f.norm(dim=1)
    unit = F.normalize(f, p=2, dim=1)
    onehot = (labels_small.reshape(-1, 1) == classes.view(1, -1).to(labels_small.device))
    onehot = onehot.double()                                                        # N x K
    return ClassSums(count=onehot.sum(0), unit=onehot.T @ unit, unit_sq=onehot.T @ unit.square(),
                     norm=onehot.T @ norm, norm_sq=onehot.T @ norm.square())


def class_statistics(sums: ClassSums, noise_centres: Tensor | None = None
                     ) -> dict[str, Tensor]:
    """STAR's stored statistics from :func:`class_sums` (float32): ``prototypes`` K x D (the
    normalised sum of the normalised features), ``noise`` K x D (per dimension, the root mean
    square of normalised feature minus ``noise_centres``; by default each class's own
    prototype), ``norm_mean`` / ``norm_std`` K (std unbiased, as ``Tensor.std``) and
    ``counts`` K. A class without a pixel gets zeros throughout (the reference's code would
    fail on it: it never happens on VOC); one with a single pixel a zero norm std (the
    reference: NaN)."""
    n = sums["count"]
    prototypes = F.normalize(sums["unit"], p=2, dim=1)
    q = prototypes if noise_centres is None else noise_centres.to(prototypes)
    safe = n.clamp(min=1).unsqueeze(1)
    # mean of (x - q)^2 = (sum x^2 - 2 q sum x + n q^2) / n, per dimension
    msd = (sums["unit_sq"] - 2 * q * sums["unit"] + n.unsqueeze(1) * q.square()) / safe
    noise = msd.clamp(min=0).sqrt() * (n > 0).unsqueeze(1)
    mean = sums["norm"] / n.clamp(min=1)
    var = (sums["norm_sq"] - n * mean.square()) / (n - 1).clamp(min=1)
    std = var.clamp(min=0).sqrt() * (n > 1)
    return {"prototypes": prototypes.float(), "noise": noise.float(),
            "norm_mean": mean.float(), "norm_std": std.float(), "counts": n.float()}


def sample_prototype_features(prototypes: Tensor, noise: Tensor, norm_mean: Tensor,
                              norm_std: Tensor, numbers: Tensor,
                              generator: torch.Generator | None = None,
                              norm_per_element: bool = False) -> Tensor:
    """``numbers[k]`` replayed features of each class k, classes in order: ``N x D``,
    N = sum(numbers). Feature j of class k is (p_k + s_k ⊙ ε_j) · r_j with ε_j ~ N(0, I_D)
    and r_j ~ N(m_k, σ_k): a unit-length direction around the prototype, scaled to a norm
    drawn from the class's norms. ``norm_per_element``: r drawn per element of the D x n
    block instead of per feature, as the reference's ``randn_like(per_cls_fake_features)``
    does (each dimension then gets its own scale); draws and their order are the
    reference's, so a generator seeded as the reference's global one gives its numbers."""
    out = []
    D = prototypes.shape[1]
    for k in range(prototypes.shape[0]):
        n = int(numbers[k])
        if n <= 0:
            continue
        opts = {"generator": generator, "device": prototypes.device, "dtype": prototypes.dtype}
        eps = torch.randn(D, n, **opts)                            # the reference's 1 x D x n x 1
        feats = prototypes[k].view(D, 1) + eps * noise[k].view(D, 1)
        r = torch.randn(D, n, **opts) if norm_per_element else torch.randn(1, n, **opts)
        out.append((feats * (r * norm_std[k] + norm_mean[k])).T)
    if not out:
        return prototypes.new_zeros(0, D)
    return torch.cat(out)


def old_sigmoid_prediction(old_logits: Tensor, threshold_logit: float = 0.0) -> Tensor:
    """The old model's prediction from its ``B x C_o x H x W`` logits (channel 0 is no class,
    :mod:`incseg.prediction`): the class of the largest logit among channels 1.., background
    where none exceeds ``threshold_logit``: 0 is the sigmoid rule σ > 0.5; the reference's
    training code compares the raw logits with 0.5 (``logit_old > 0.5``), i.e. σ > 0.62."""
    z = old_logits[:, 1:]
    pred = z.argmax(dim=1) + 1
    pred[(z > threshold_logit).sum(dim=1) == 0] = 0
    return pred


def feature_distillation_in_region(feature: Tensor, old_feature: Tensor, region: Tensor
                                   ) -> Tensor:
    """STAR's old-class features maintaining (OCFM) loss (the reference's ``PKDLoss``): the
    squared difference of the decoder features of the new and the old model, weighted by
    ``region`` (B x 1 x H x W: background-labelled pixels the old model calls an old class)
    resized bilinearly to the feature's size, summed and divided by (sum of the weights x D).
    0 for an empty region (the reference divides 0 by 0; its fp16 scaler then skips the
    step)."""
    r = F.interpolate(region.to(feature.dtype), size=feature.shape[-2:], mode="bilinear",
                      align_corners=False)
    denom = r.sum() * feature.shape[1]
    if denom <= 0:
        return feature.new_zeros(())
    return ((feature - old_feature).square() * r).sum() / denom


def prototype_separation(feature: Tensor, targets: Tensor, prototypes: Tensor) -> Tensor:
    """STAR's similarity-aware discriminative (SAD) loss (the reference's ``ContLoss``):
    ``targets`` B x K_new x H x W (one-hot of the step's classes) resized bilinearly to the
    feature's size weights the normalised features into one centre per new class (normalised
    sum); the loss is the mean over new classes of 1 / (distance to the nearest old
    prototype), which pushes each new class away from the old class it resembles most. A new
    class absent from the batch has a zero centre: distance 1 to every prototype, a constant
    1 without gradient, as in the reference."""
    t = F.interpolate(targets.to(feature.dtype), size=feature.shape[-2:], mode="bilinear",
                      align_corners=False)
    unit = F.normalize(feature, p=2, dim=1)
    centres = F.normalize(torch.einsum("bkhw,bdhw->kd", t, unit), p=2, dim=1)
    dist = (centres.unsqueeze(1) - prototypes.to(centres).unsqueeze(0)).norm(dim=2)  # new x old
    return (1 / dist.min(dim=1).values).mean()

"""DeepInversion losses (Yin et al., CVPR 2020) for synthesising replay images.

- :class:`BNStatisticsHook` / :func:`bn_statistics_loss`: the BN feature regulariser, matching the
  batch statistics of every BatchNorm input to the teacher's running statistics.
- :func:`image_priors`: total-variation and L2 priors on the image batch.
- :func:`competition_loss`: Adaptive DeepInversion's teacher/student competition term.

Each has a per-image form (``bn_image_distance``, ``per_image_priors``,
``competition_loss(..., per_image=True)``, ``BNStatisticsHook(per_image=True)``): the terms of
every image as if it were a batch of one, what the adaptive budget optimises, so that an image
does not depend on the others in its optimisation batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BNStatisticsHook",
    "bn_image_distance",
    "bn_layer_distance",
    "bn_statistics_loss",
    "competition_loss",
    "image_priors",
    "per_image_priors",
]

# BatchNorm2d and SyncBatchNorm (which DDP conversion may produce) both see N x C x H x W inputs.
_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)


def bn_layer_distance(x: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """One BN layer's term ``||mu - running_mean||_2 + ||sigma^2 - running_var||_2``.

    Args:
        x: ``N x C x H x W`` input of the BN layer.
        running_mean: ``C`` stored mean.
        running_var: ``C`` stored variance.

    Returns:
        Scalar. ``mu``/``sigma^2`` are the per-channel mean and *biased* variance over N, H, W
        (what BN normalises with in training); plain (not squared) L2 norms, as DeepInversion.
        Half-precision (autocast) inputs are upcast to float32 so the differences keep precision.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    mean = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    # Running statistics are constants of the frozen teacher.
    rm = running_mean.detach().to(x.dtype)
    rv = running_var.detach().to(x.dtype)
    return torch.linalg.vector_norm(mean - rm) + torch.linalg.vector_norm(var - rv)


def bn_image_distance(x: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """:func:`bn_layer_distance` of every image on its own: ``N`` terms, term ``i`` equal to
    ``bn_layer_distance(x[i:i+1], ...)`` (mean and biased variance over H, W only)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    mean = x.mean(dim=(2, 3))
    var = x.var(dim=(2, 3), unbiased=False)
    rm = running_mean.detach().to(x.dtype)
    rv = running_var.detach().to(x.dtype)
    return (torch.linalg.vector_norm(mean - rm, dim=1)
            + torch.linalg.vector_norm(var - rv, dim=1))


def bn_statistics_loss(
    inputs_and_bns: Iterable[tuple[Tensor, nn.Module]], first_bn_multiplier: float = 10.0
) -> Tensor:
    """Sum of :func:`bn_layer_distance` over ``(input, bn)`` pairs in forward order.

    Args:
        inputs_and_bns: ``(x, bn)`` pairs, ``x`` the ``N x C x H x W`` input that ``bn`` saw,
            in the order the layers ran; the first pair is weighted ``first_bn_multiplier``
            (DeepInversion weights the first BN, closest to the image, x10).
        first_bn_multiplier: weight of the first pair.

    Returns:
        Scalar; 0 for no pairs.
    """
    total: Tensor | None = None
    for i, (x, bn) in enumerate(inputs_and_bns):
        term = bn_layer_distance(x, bn.running_mean, bn.running_var)
        if i == 0:
            term = first_bn_multiplier * term
        total = term if total is None else total + term
    return torch.zeros(()) if total is None else total


class BNStatisticsHook:
    """Forward hooks on every BatchNorm of ``model`` that collect DeepInversion's BN regulariser.

    Usage::

        with BNStatisticsHook(teacher) as bn_hook:
            logits = teacher(images)
            loss = w_bn * bn_hook.loss

    Only BN layers that actually run contribute (a module that is defined but unused in forward
    adds nothing). A forward pre-hook on ``model`` starts a new record at every forward pass, so
    ``loss`` always refers to the last pass of ``model`` and the "first BN" is the first one to
    fire in that pass (forward order, not registration order), weighted ``first_bn_multiplier``.
    BN layers without running statistics (``track_running_stats=False``) are skipped. Calling a
    hooked BN (or a submodule) directly, outside ``model(...)``, appends to the current record;
    read ``loss`` right after the forward pass it belongs to.

    Args:
        model: network whose ``BatchNorm2d``/``SyncBatchNorm`` layers are hooked.
        first_bn_multiplier: weight of the first BN to fire (DeepInversion: 10).
        per_image: terms per image (:func:`bn_image_distance`; ``loss`` is then ``N``) instead
            of over the batch.
    """

    def __init__(self, model: nn.Module, first_bn_multiplier: float = 10.0,
                 per_image: bool = False) -> None:
        self.first_bn_multiplier = float(first_bn_multiplier)
        self._distance = bn_image_distance if per_image else bn_layer_distance
        self.terms: list[Tensor] = []  # unweighted per-layer terms of the last pass, in order
        self.names: list[str] = []  # qualified names of the BN layers that ran, same order
        self._handles = [model.register_forward_pre_hook(self._start_pass)]
        for name, module in model.named_modules():
            if isinstance(module, _BN_TYPES) and module.track_running_stats:
                self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _start_pass(self, module: nn.Module, args: tuple) -> None:
        self.reset()

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            self.terms.append(self._distance(args[0], module.running_mean, module.running_var))
            self.names.append(name)

        return hook

    def reset(self) -> None:
        """Forget the recorded terms (done automatically at each forward of ``model``)."""
        self.terms = []
        self.names = []

    @property
    def loss(self) -> Tensor:
        """Scalar ``R_BN`` of the last forward pass: first term x multiplier + the others."""
        if not self.terms:
            return torch.zeros(())
        total = self.first_bn_multiplier * self.terms[0]
        for term in self.terms[1:]:
            total = total + term
        return total

    def remove(self) -> None:
        """Remove every hook this object registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> BNStatisticsHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _neighbour_differences(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DeepInversion's four neighbour differences of ``x`` (``B x C x H x W``).

    Horizontal ``B x C x H x (W-1)``, vertical ``B x C x (H-1) x W`` and the two diagonals
    ``B x C x (H-1) x (W-1)``.
    """
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return d1, d2, d3, d4


def image_priors(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """DeepInversion's image priors on the (jittered) batch.

    Args:
        x: ``B x C x H x W`` images.

    Returns:
        ``(tv_l2, tv_l1, l2)`` scalars: ``TV_L2 = sum_k ||d_k||_F`` over the whole batch,
        ``TV_L1 = sum_k mean|d_k|`` (no /255 rescaling, as NVlabs/DeepInversion) and
        ``L2 = mean_i ||x_i||_2`` (per-image flattened norm, averaged over the batch).
    """
    diffs = _neighbour_differences(x)
    tv_l2 = sum(torch.linalg.vector_norm(d) for d in diffs)
    tv_l1 = sum(d.abs().mean() for d in diffs)
    l2 = torch.linalg.vector_norm(x.flatten(1), dim=1).mean()
    return tv_l2, tv_l1, l2


def per_image_priors(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`image_priors` of every image on its own: three ``B`` vectors, entry ``i`` equal
    to ``image_priors(x[i:i+1])``."""
    diffs = _neighbour_differences(x)
    tv_l2 = sum(torch.linalg.vector_norm(d.flatten(1), dim=1) for d in diffs)
    tv_l1 = sum(d.abs().flatten(1).mean(dim=1) for d in diffs)
    l2 = torch.linalg.vector_norm(x.flatten(1), dim=1)
    return tv_l2, tv_l1, l2


def competition_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 3.0,
    per_image: bool = False,
) -> Tensor:
    """Adaptive DeepInversion's competition term ``1 - clamp(JS(P, Q), 0, 1)``.

    It is large when the (weaker) student already agrees with the teacher, pushing the
    generator towards images on which they disagree. Gradients flow to both inputs (the images
    reach the loss through both frozen networks).

    Args:
        student_logits: ``B x C`` image-level student scores (e.g. LSE-LBA pooled).
        teacher_logits: ``B x C`` image-level teacher scores.
        temperature: softmax temperature (ADI uses 3).

    Returns:
        Scalar in ``[0, 1]`` (``per_image``: ``B`` of them, each image's own
        ``1 - clamp(JS_i, 0, 1)``); 1 when student and teacher agree. ``P = softmax(s/T)``,
        ``Q = softmax(t/T)``, ``M = (P+Q)/2`` from the unclamped P and Q; then M, P and Q are
        each clamped to ``[0.01, 0.99]`` (not renormalised), ``JS = (KL(M||P) + KL(M||Q))/2``
        averaged over the batch, ``KL(M||P) = sum_c M log(M/P)``. The order is the reference
        code's (NVlabs/DeepInversion ``deepinversion.py``, ``kl_loss(log P, M)`` with
        ``batchmean``); clamping P and Q before forming M changes the value whenever a
        probability is outside the clamp range.
    """
    p = F.softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    log_m = m.log()
    kl_mp = (m * (log_m - p.log())).sum(dim=1)
    kl_mq = (m * (log_m - q.log())).sum(dim=1)
    js = 0.5 * (kl_mp + kl_mq)
    if not per_image:
        js = js.mean()
    return 1.0 - js.clamp(0.0, 1.0)


def sigmoid_class_objective(pooled: Tensor, targets: Tensor) -> Tensor:
    """The generator's class objective for a model of one sigmoid per class (DKD, STAR), the
    counterpart of the cross-entropy on the pooled logits of a softmax model: one
    BCE-with-logits per class on the image-level logits of classes 1..C_o-1 (channel 0 is no
    class score: DKD's auxiliary classifier, STAR's unused channel), the target class a
    positive and every other class a negative, averaged over the batch per class and summed
    over classes (DKD's convention for its losses). A target 0 (background, with
    ``inversion.include_background``) is a negative of every class.

    Args:
        pooled: ``B x C_o`` image-level logits (e.g. LSE-LBA pooled).
        targets: ``B`` target channels in ``0..C_o-1``.
    """
    channels = torch.arange(1, pooled.shape[1], device=pooled.device)
    onehot = (targets.view(-1, 1) == channels.view(1, -1)).to(pooled.dtype)
    bce = F.binary_cross_entropy_with_logits(pooled[:, 1:], onehot, reduction="none")
    return bce.mean(dim=0).sum()

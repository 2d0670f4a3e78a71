"""PLOP (Douillard et al., "PLOP: Learning without Forgetting for Continual Semantic
Segmentation", CVPR 2021): local POD on the encoder's stages, the decoder feature and the
logits; pseudo-labels for the background from the old model, kept where its entropy is below
a per-class median; the classification loss re-weighted by the share of background kept.

Settings and reductions follow the reference's ``--method PLOP`` (arthurdouillard/
CVPR2021_PLOP ``argparser.py``, ``train.py``): POD factor 0.01 on the features and 0.0005 on
the logits, both times sqrt(C / C_new) (its ``pod_schedule``), divided by the number of maps;
entropy pseudo-labels with a 0.001 floor on the thresholds (100 bins); the adaptive factor;
CE with ``reduction='none'`` then a mean over B·H·W; init_balanced. PLOP trains and tests
with void ignored and not-yet-seen classes as background: ``conf/method/plop.yaml`` sets
``data.void_as_background: false`` and ``data.unseen_as: background``. Two reference details
differ from the paper: the histogram median's arithmetic and the uncertainty's scale
(H / (C_o log C_o log C), not H / log C_o); see :mod:`incseg.losses.pseudo_labels`. The config
keeps them (``median: reference``, ``entropy: reference``), as the published results were made
with them: on that scale every threshold is near the first bins' middle, so nearly all
background is pseudo-labelled, while a true median of H / log C_o ignores half of it, which on
a confident old model (``shapes``) costs the new classes most of their IoU.

POD reads what the reference pools (its ``features_distillation`` over ``attentions``): each
encoder stage's *pre-activation* output (the last residual block's sum before its ReLU,
negatives kept; the contract's ``stages_preact``), the decoder feature, and the logits
*before* upsampling (``sem_logits_small``; the contract's ``logits_small``), the new ones
collapsed to the old channels. ``pod_stages=activated`` and ``pod_logits_size=decoder`` /
``input`` keep the earlier readings (the ReLU'd stages; the full-size logits resized to the
decoder's size, or at the input size as the reference's ``--pod_large_logits``).

With a labelled memory (PLOP-M; the reference has none, so this is the suite's choice): a
memory image whose labels are its ground truth for every seen class (``memory.labels=seen``,
the batch's ``known`` images) keeps them; its background pixels are true background, not old
classes hidden by the step's labels, so they are neither pseudo-labelled (a guess must not
replace a known label) nor counted in the thresholds' histogram (which measures the old
model's uncertainty where the labels hide the old classes), and its adaptive factor is 1 (all
of its labels are kept). With ``memory.labels=current`` a memory image's old classes are
background like a step image's, and it is pseudo-labelled like one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incseg.losses.pod import SCALES, collapse_new_logits, local_pod_loss
from incseg.losses.pseudo_labels import (
    adaptive_factor,
    entropy_histogram,
    guessed_background,
    histogram_median,
    normalized_entropy,
    pseudo_label,
    reference_entropy,
    reference_histogram_median,
    uncertainty_thresholds,
    weighted_cross_entropy,
)
from incseg.methods.base import Batch, Method, check_weight, fresh_loader
from incseg.methods.regularizer import check_flag
from incseg.models.base import SegOutput

log = logging.getLogger(__name__)

MEDIANS = ("histogram", "reference")
ENTROPIES = ("normalized", "reference")
LOGITS_SIZES = ("small", "decoder", "input")
STAGES = ("preact", "activated")
#: the contract feature each ``pod_stages`` reads
STAGE_FEATURES = {"preact": "stages_preact", "activated": "stages"}


def _choice(name: str, value: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; use one of {', '.join(valid)}")
    return value


def _scales(value) -> tuple[int, ...]:
    try:
        scales = tuple(int(s) for s in value)
        ok = len(scales) > 0 and all(s >= 1 and s == v for s, v in zip(scales, value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"pod_scales={list(value) if isinstance(value, Iterable) else value!r}"
                         " must be a non-empty list of whole numbers >= 1, e.g. [1, 2, 4]")
    return scales


class PLOP(Method):
    """Settings (``conf/method/plop.yaml``):

    pod_weight, pod_logits_weight  POD factors of the feature maps and of the logits
    pod_scales                     the region grids of local POD ([1, 2, 4])
    pod_schedule                   both factors times sqrt(C / C_new) (the reference's default)
    pod_stages                     ``preact``: the stages before their last ReLU (the
                                   reference); ``activated``: the stage outputs
    pod_logits_size                ``small``: the logits before upsampling (the reference);
                                   ``decoder``: the full-size logits resized to the decoder
                                   feature's size; ``input``: at the input size (its
                                   ``--pod_large_logits``)
    threshold, bins                the thresholds' floor and the histogram's bins
    median, entropy                ``reference``: the published code's literal arithmetic (the
                                   config's default), or ``histogram`` / ``normalized``
                                   (a true median of H / log C_o, the paper's formula)
    adaptive_factor                re-weight each image's CE by its share of background kept
    """

    init_balanced = True
    uses_old_outputs = True

    def __init__(self, pod_weight: float = 0.01, pod_logits_weight: float = 0.0005,
                 pod_scales: Sequence[int] = SCALES, pod_schedule: bool = True,
                 pod_stages: str = "preact", pod_logits_size: str = "small",
                 threshold: float = 0.001, bins: int = 100, median: str = "reference",
                 entropy: str = "reference", adaptive_factor: bool = True) -> None:
        super().__init__()
        self.pod_weight = check_weight("pod_weight", pod_weight)
        self.pod_logits_weight = check_weight("pod_logits_weight", pod_logits_weight)
        self.pod_scales = _scales(pod_scales)
        self.pod_schedule = check_flag("pod_schedule", pod_schedule)
        self.pod_stages = _choice("pod_stages", pod_stages, STAGES)
        self.pod_logits_size = _choice("pod_logits_size", pod_logits_size, LOGITS_SIZES)
        self.needs_features = (STAGE_FEATURES[self.pod_stages], "decoder") + (
            ("logits_small",) if self.pod_logits_size == "small" else ())
        if not 0 <= float(threshold) <= 1:
            raise ValueError(f"threshold={threshold!r} must be in [0, 1] (an uncertainty)")
        self.threshold = float(threshold)
        if isinstance(bins, bool) or int(bins) != bins or bins < 1:
            raise ValueError(f"bins={bins!r} must be a whole number >= 1")
        self.bins = int(bins)
        self.median = _choice("median", median, MEDIANS)
        self.entropy = _choice("entropy", entropy, ENTROPIES)
        self.adaptive_factor = check_flag("adaptive_factor", adaptive_factor)
        self.thresholds: Tensor | None = None  # τ per old class, from on_step_start

    # ---- pseudo-labels ------------------------------------------------------------------------
    def uncertainty(self, probs: Tensor) -> Tensor:
        """B x C_o x H x W old probabilities -> B x H x W, on the thresholds' scale."""
        if self.entropy == "reference":
            return reference_entropy(probs, self.ctx.num_classes)
        return normalized_entropy(probs)

    def thresholds_from(self, hist: Tensor) -> Tensor:
        """τ from the C_o x bins histogram of background uncertainties per predicted class."""
        median = (reference_histogram_median(hist.cpu()) if self.median == "reference"
                  else histogram_median(hist.cpu()))
        return uncertainty_thresholds(median, self.threshold)

    @torch.no_grad()
    def on_step_start(self, model: nn.Module, old_model: nn.Module, train_loader) -> None:
        """One pass of the old model over the step's training data (the reference's
        ``find_median``): the histogram of the uncertainty of background pixels per predicted
        class (a labelled memory's ``known`` images left out: their background is true
        background), summed over DDP ranks so every rank labels alike."""
        num_old = self.ctx.num_old
        device = next(old_model.parameters()).device
        hist = torch.zeros(num_old, self.bins, dtype=torch.long, device=device)
        for batch in fresh_loader(train_loader):
            images, labels = batch[0].to(device), batch[1].to(device)
            known = batch[2] if len(batch) > 2 else None
            probs = torch.softmax(old_model(images).logits.float(), dim=1)
            background = guessed_background(labels, num_old, known)
            hist += entropy_histogram(self.uncertainty(probs)[background],
                                      probs.argmax(dim=1)[background], num_old, self.bins)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(hist)
        self.thresholds = self.thresholds_from(hist)
        log.info("PLOP step %d: entropy thresholds per old class %s", self.ctx.step,
                 [round(float(t), 4) for t in self.thresholds])

    # ---- the loss -----------------------------------------------------------------------------
    def segmentation_loss(self, out: SegOutput, labels: Tensor) -> Tensor:
        # PLOP's CE reads the old model's outputs (its pseudo-labels): :meth:`terms` returns it
        # as ``seg`` in place of this zero
        return out.logits.new_zeros(())

    def terms(self, batch: Batch, out: SegOutput, old_out: SegOutput) -> dict[str, Tensor]:
        if self.thresholds is None:
            raise RuntimeError("PLOP's thresholds are set by on_step_start (or a resumed "
                               "state) before its first batch")
        num_old = self.ctx.num_old
        old_logits = old_out.logits.float()
        if self.thresholds.device != old_logits.device:
            self.thresholds = self.thresholds.to(old_logits.device)
        unc = self.uncertainty(torch.softmax(old_logits, dim=1))
        labels, kept = pseudo_label(batch.labels, old_logits, self.thresholds, unc, batch.known)
        factor = (adaptive_factor(batch.labels, kept, num_old, batch.known)
                  if self.adaptive_factor else None)
        # every head, as BiSeNet's Eq. 3 (the reference's DeepLab has the main one only)
        seg = sum(weighted_cross_entropy(h, labels, factor) for h in (out.logits, *out.aux))
        return {"seg": seg, "pod": self.pod(out, old_out)}

    def _logits_map(self, out: SegOutput) -> Tensor:
        """The logits POD pools, as ``pod_logits_size`` says."""
        if self.pod_logits_size == "small":
            return out.features["logits_small"]
        if self.pod_logits_size == "input":
            return out.logits
        return F.interpolate(out.logits, size=out.features["decoder"].shape[-2:],
                             mode="bilinear", align_corners=False)

    def pod(self, out: SegOutput, old_out: SegOutput) -> Tensor:
        """Local POD over the stages (pre-activation by default), the decoder feature and the
        logits (new logits collapsed to the old channels: the new classes' scores join the
        background's)."""
        new, old = out.features, old_out.features
        stages = STAGE_FEATURES[self.pod_stages]
        new_logits = collapse_new_logits(self._logits_map(out), self.ctx.num_old)
        new_maps = [*new[stages], new["decoder"], new_logits]
        old_maps = [*old[stages], old["decoder"], self._logits_map(old_out)]
        scale = 1.0
        if self.pod_schedule:
            scale = math.sqrt(self.ctx.num_classes / (self.ctx.num_classes - self.ctx.num_old))
        weights = ([self.pod_weight * scale] * (len(new_maps) - 1)
                   + [self.pod_logits_weight * scale])
        return local_pod_loss(old_maps, new_maps, weights, self.pod_scales)

    # ---- exact resume -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {} if self.thresholds is None else {"thresholds": self.thresholds.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("thresholds") is not None:
            self.thresholds = state["thresholds"]

"""The model contract: what the systems, the methods and the replay generator may rely on.

Any ``nn.Module`` that satisfies :class:`SegmentationModel` runs the whole protocol; nothing
else of a model is read outside its own file. Feature names are model-independent so a method
written against one architecture runs on every other:

- ``encoder``: the encoder's final output (what ILT and MiB distil for DeepLab: the
  backbone's last stage),
- ``stages``: the encoder's multi-scale outputs, shallow to deep (what PLOP's local POD pools),
- ``decoder``: the feature the main classifier reads (BiSeNet's FFM output, DeepLab's ASPP).

Optional keys, which a model adds when the caller names them in ``forward(x, extra=...)``
(they may cost memory, so a method that does not read them does not pay for them; a model for
which one costs nothing may always return it, and a model that cannot provide one leaves it
out, which the method's check then names):

- ``stages_preact``: the ``stages`` before their final activation, negatives kept (a ResNet
  stage's last residual sum before its ReLU; the stage outputs themselves where the encoder has
  no activation to strip, e.g. timm's stages): what PLOP's local POD distils,
- ``logits_small``: the main head's logits before they are upsampled to the input size (what
  PLOP's POD on the logits pools, the reference's ``sem_logits_small``).

:func:`model_output` is how the suite calls a model for a method: it passes ``extra`` only to a
model whose ``forward`` takes it, so a model written against the four required keys still runs.

A model may add its own keys beside these (BiSeNet's ``spatial``, ``cx1``, ``cx2``).
Logits are upsampled to the input size; ``aux`` holds the auxiliary heads' logits in training
mode and is empty in eval mode. Every BatchNorm must run in ``forward`` (DeepInversion hooks
them all).
"""

from __future__ import annotations

import inspect
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

#: the feature keys every model provides (methods name them in ``Method.needs_features``)
FEATURE_KEYS = ("encoder", "stages", "decoder")
#: the keys a model adds when asked (``forward(x, extra=...)``)
OPTIONAL_FEATURE_KEYS = ("stages_preact", "logits_small")


@dataclass
class SegOutput:
    """What a model's ``forward`` returns.

    logits:   B x C x H x W, the main head over every class seen, at the input size.
    aux:      the auxiliary heads' B x C x H x W logits (training mode only; empty in eval).
    features: ``encoder`` (B x Ce x h x w), ``stages`` (list of B x Ci x hi x wi, shallow to
              deep), ``decoder`` (B x Cd x h' x w'); when asked, ``stages_preact`` (as
              ``stages``) and ``logits_small`` (B x C x h'' x w''); plus model-specific keys.
    """

    logits: Tensor
    aux: list[Tensor] = field(default_factory=list)
    features: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class SegmentationModel(Protocol):
    """A class-incremental segmentation model.

    ``classes_per_step[0]`` includes background (channel 0); channel k is the k-th class in task
    order, so old logits keep their indices when ``add_step`` appends a step's classes.
    """

    @property
    def num_classes(self) -> int: ...

    @property
    def classes_per_step(self) -> list[int]: ...

    def __call__(self, x: Tensor) -> SegOutput:
        """A model that offers optional features takes ``extra`` (their names) as well."""
        ...

    def add_step(self, n_new: int, init_balanced: bool = True) -> None:
        """Append ``n_new`` output channels to every head; with ``init_balanced`` the new rows
        start as MiB's background-balanced initialisation (Cermelli et al., CVPR 2020)."""
        ...


def missing_features(out: SegOutput, needed) -> list[str]:
    """The names in ``needed`` that ``out.features`` lacks."""
    return [k for k in needed if k not in out.features]


def _takes_extra(model: nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "extra" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def model_output(model: nn.Module, x: Tensor, needed: Collection[str] = ()) -> SegOutput:
    """``model(x)``, asking for the optional features among ``needed`` (a method's
    ``needs_features``) when the model's ``forward`` takes ``extra``."""
    extra = tuple(k for k in needed if k in OPTIONAL_FEATURE_KEYS)
    if extra and _takes_extra(model):
        return model(x, extra=extra)
    return model(x)

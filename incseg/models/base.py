"""The model contract: what the systems, the methods and the replay generator may rely on.

Any ``nn.Module`` that satisfies :class:`SegmentationModel` runs the whole protocol; nothing
else of a model is read outside its own file. Feature names are model-independent so a method
written against one architecture runs on every other:

- ``encoder``: the encoder's final output (what ILT and MiB distil for DeepLab: the
  backbone's last stage),
- ``stages``: the encoder's multi-scale outputs, shallow to deep (what PLOP's local POD pools),
- ``decoder``: the feature the main classifier reads (BiSeNet's FFM output, DeepLab's ASPP).

A model may add its own keys beside these (BiSeNet's ``spatial``, ``cx1``, ``cx2``).
Logits are upsampled to the input size; ``aux`` holds the auxiliary heads' logits in training
mode and is empty in eval mode. Every BatchNorm must run in ``forward`` (DeepInversion hooks
them all).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

#: the feature keys every model provides (methods name them in ``Method.needs_features``)
FEATURE_KEYS = ("encoder", "stages", "decoder")


@dataclass
class SegOutput:
    """What a model's ``forward`` returns.

    logits:   B x C x H x W, the main head over every class seen, at the input size.
    aux:      the auxiliary heads' B x C x H x W logits (training mode only; empty in eval).
    features: ``encoder`` (B x Ce x h x w), ``stages`` (list of B x Ci x hi x wi, shallow to
              deep), ``decoder`` (B x Cd x h' x w'), plus model-specific keys.
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

    def __call__(self, x: Tensor) -> SegOutput: ...

    def add_step(self, n_new: int, init_balanced: bool = True) -> None:
        """Append ``n_new`` output channels to every head; with ``init_balanced`` the new rows
        start as MiB's background-balanced initialisation (Cermelli et al., CVPR 2020)."""
        ...


def missing_features(out: SegOutput, needed) -> list[str]:
    """The names in ``needed`` that ``out.features`` lacks."""
    return [k for k in needed if k not in out.features]

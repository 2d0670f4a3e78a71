"""DeepLabV3 and BiSeNet V1 on a timm encoder (:class:`incseg.models.timm_encoders.TimmEncoder`).

- :class:`TimmDeepLabV3`: the encoder + MiB / PLOP's ASPP and incremental head
  (``incseg.models.deeplab``); ``output_stride`` 16 or 8 through timm's dilated mode where the
  family has one (ConvNeXt, ResNet, EfficientNet), the native stride (``null``) otherwise.
- :class:`TimmBiSeNet`: BiSeNet V1 (``incseg.models.bisenet``) with the encoder as context path,
  reading its 1/16 and 1/32 levels.

Both satisfy :class:`incseg.models.base.SegmentationModel` and keep the encoder as
``backbone`` (what DKD trains at a tenth of the lr). ImageNet weights:
``incseg.models.timm_weights``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from incseg.errors import ConfigError
from incseg.models.base import SegOutput
from incseg.models.bisenet import ARM, FFM, BiSeNet, SpatialPath
from incseg.models.deeplab import ASPP
from incseg.models.heads import IncrementalHead, check_classes_per_step
from incseg.models.timm_encoders import TimmEncoder, encoder_info
from incseg.models.timm_weights import check_normalisation, resolve_weights

__all__ = ["TimmBiSeNet", "TimmDeepLabV3", "aspp_rates_at"]

log = logging.getLogger("incseg.models")


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    # align_corners=False: torchvision / MiB segmentation heads
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


_NOTED: set[str] = set()


def _native_stride_note(model: str, encoder: TimmEncoder) -> None:
    """Say once per process that an encoder runs at its native stride (the model is rebuilt
    at every step; the line would repeat)."""
    if encoder.output_stride is None and model not in _NOTED:
        _NOTED.add(model)
        log.info("%s: timm's %s runs at its native output stride 1/%d", model, encoder.name,
                 encoder.reductions[-1])


class _IncrementalModel(nn.Module):
    """The heads part of the model contract (``incseg.models.base``), shared by both models."""

    @property
    def classes_per_step(self) -> list[int]:
        return self.head.classes_per_step

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def add_step(self, n_new: int, init_balanced: bool = True) -> None:
        """Add `n_new` classes to every head; MiB's init_balanced on each if asked."""
        for head in self.heads():
            head.add_step(n_new)
            if init_balanced:
                head.init_balanced(n_new)


def aspp_rates_at(stride: int, rates: Sequence[int] | None) -> tuple[int, ...]:
    """DeepLabV3's rates for the ASPP at output stride ``stride``: (6, 12, 18) at 16, scaled
    with the map (Chen et al. 2017, Sec. 4.1: doubled at 8), so (3, 6, 9) at the native 32 of
    an encoder without a dilated mode; ``rates`` (three ints) when given."""
    from incseg.models.deeplab import aspp_rates_for

    if rates is not None:
        return aspp_rates_for(16, rates)  # the same validation of the user's three rates
    return tuple(r * 16 // int(stride) for r in (6, 12, 18))


class TimmDeepLabV3(_IncrementalModel):
    """DeepLabV3 on a timm encoder: MiB / PLOP's ASPP on its deepest level, one incremental
    1x1 head, logits upsampled to the input (as :class:`incseg.models.DeepLabV3`).

    Contract features: ``encoder`` = the deepest level, ``stages`` = the four levels (shallow
    to deep), ``decoder`` = the ASPP output; ``logits_small`` = the head's logits at the
    decoder's size, ``stages_preact`` = the stages themselves (see :meth:`forward_features`).
    ``output_stride``: 16 or 8 through timm's dilated mode, null for the native stride.
    """

    def __init__(
        self,
        encoder: str = "convnext_tiny.fb_in1k",
        classes_per_step: Sequence[int] = (21,),
        pretrained: str | os.PathLike | None = None,
        output_stride: int | None = 16,
        aspp_rates: Sequence[int] | None = None,
        channels: int = 256,
        encoder_kwargs: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        classes_per_step = check_classes_per_step(classes_per_step)
        self.backbone = TimmEncoder(encoder, pretrained, output_stride, encoder_kwargs)
        self.output_stride = int(self.backbone.reductions[-1])
        rates = aspp_rates_at(self.output_stride, aspp_rates)
        self.aspp = ASPP(self.backbone.channels[-1], channels, channels, rates)
        self.head = IncrementalHead(channels, classes_per_step)
        _native_stride_note(f"DeepLabV3 on {encoder}", self.backbone)

    def heads(self) -> tuple[IncrementalHead]:
        return (self.head,)

    @staticmethod
    def check_config(encoder: str = "convnext_tiny.fb_in1k", pretrained=None,
                     output_stride: int | None = 16, aspp_rates=None, encoder_kwargs=None,
                     **_) -> None:
        """Fail before anything trains on a name, stride or kwargs timm cannot build, bad ASPP
        rates, or ImageNet weights that are neither cached nor allowed to download."""
        info = encoder_info(encoder, output_stride, encoder_kwargs)
        aspp_rates_at(info.reductions[-1], aspp_rates)
        check_normalisation(encoder, pretrained)
        resolve_weights(encoder, pretrained, download=False)

    def forward_features(self, x: Tensor) -> dict:
        """B x 3 x H x W -> ``encoder`` (C_d x H/s), ``stages`` (1/4 .. 1/s), ``decoder``
        (256 x H/s), ``stages_preact``."""
        stages = self.backbone(x)
        # timm's features_only returns each stage's output after its last activation (or
        # residual add); the value before it is not exposed, so PLOP's POD on the
        # pre-activation reads the stage outputs here
        return {"encoder": stages[-1], "stages": stages, "decoder": self.aspp(stages[-1]),
                "stages_preact": stages}

    def forward(self, x: Tensor, extra: Collection[str] = ()) -> SegOutput:
        """B x 3 x H x W -> SegOutput (logits B x num_classes x H x W, no aux). Both optional
        features cost nothing here, so they are always returned, whatever ``extra`` names."""
        feats = self.forward_features(x)
        small = self.head(feats["decoder"])
        feats["logits_small"] = small
        return SegOutput(logits=_resize(small, x.shape[-2:]), aux=[], features=feats)


class TimmBiSeNet(_IncrementalModel):
    """BiSeNet V1 (:class:`incseg.models.BiSeNet`) with a timm encoder as its context path:
    the spatial path, ARMs on the encoder's 1/16 and 1/32 levels, the FFM, main and two
    auxiliary incremental heads. ``fusion_kernel``, ``global_context``, ``arm_bias`` are
    BiSeNet's variant settings. The encoder runs at its native stride (BiSeNet reads 1/16 and
    1/32), so an encoder without those two levels is refused.

    Contract features: ``encoder`` = the 1/32 level, ``stages`` = the four levels, ``decoder``
    = the FFM output; ``spatial``, ``cx1``, ``cx2`` as BiSeNet's; ``logits_small`` = the main
    head's logits at 1/8, ``stages_preact`` = the stages.
    """

    def __init__(
        self,
        encoder: str = "convnext_tiny.fb_in1k",
        classes_per_step: Sequence[int] = (21,),
        pretrained: str | os.PathLike | None = None,
        fusion_kernel: int = 1,
        global_context: str = "add",
        arm_bias: bool = False,
        encoder_kwargs: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.check_config(encoder, None, fusion_kernel, global_context, arm_bias, encoder_kwargs)
        classes_per_step = check_classes_per_step(classes_per_step)
        self.backbone = TimmEncoder(encoder, pretrained, None, encoder_kwargs)
        r = self.backbone.reductions
        self._i16, self._i32 = r.index(16), r.index(32)
        c3, c4 = self.backbone.channels[self._i16], self.backbone.channels[self._i32]
        self.global_context = global_context
        self.spatial_path = SpatialPath()
        self.arm16 = ARM(c3, bias=bool(arm_bias))
        self.arm32 = ARM(c4, bias=bool(arm_bias))
        self.ffm = FFM(SpatialPath.out_channels + c3 + c4, 256, kernel_size=int(fusion_kernel))
        self.head = IncrementalHead(256, classes_per_step)
        self.aux1 = IncrementalHead(c3, classes_per_step)
        self.aux2 = IncrementalHead(c4, classes_per_step)

    def heads(self) -> tuple[IncrementalHead, IncrementalHead, IncrementalHead]:
        """(main, aux1, aux2)."""
        return self.head, self.aux1, self.aux2

    @staticmethod
    def check_config(encoder: str = "convnext_tiny.fb_in1k", pretrained=None, fusion_kernel=1,
                     global_context="add", arm_bias=False, encoder_kwargs=None, **_) -> None:
        """BiSeNet's variant checks, then the encoder's (it must give 1/16 and 1/32 levels)
        and its weights, before anything trains (one-line ConfigError)."""
        BiSeNet.check_config(pretrained=None, fusion_kernel=fusion_kernel,
                             global_context=global_context, arm_bias=arm_bias)
        info = encoder_info(encoder, None, encoder_kwargs)
        if not {16, 32} <= set(info.reductions):
            raise ConfigError(f"model.encoder={encoder} gives features at 1/"
                              f"{', 1/'.join(map(str, info.reductions))}, and BiSeNet's context "
                              "path reads 1/16 and 1/32; choose a hierarchical encoder (ConvNeXt, "
                              "Swin, ResNet, EfficientNet) or a DeepLabV3 model")
        check_normalisation(encoder, pretrained)
        resolve_weights(encoder, pretrained, download=False)

    def forward_features(self, x: Tensor) -> dict:
        """B x 3 x H x W -> spatial, cx1, cx2, decoder at 1/8; encoder at 1/32; stages."""
        spatial = self.spatial_path(x)
        stages = self.backbone(x)
        f16, body = stages[self._i16], stages[self._i32]
        size = spatial.shape[-2:]
        pooled = body.mean(dim=(2, 3), keepdim=True)  # BiSeNet's global context (Sec. 3.2)
        cx2 = self.arm32(body) + pooled if self.global_context == "add" \
            else self.arm32(body) * pooled
        cx2 = _resize(cx2, size)
        cx1 = _resize(self.arm16(f16), size)
        ffm = self.ffm((spatial, cx1, cx2))
        # stages_preact: timm does not expose a stage's value before its last activation
        return {"encoder": body, "stages": stages, "decoder": ffm, "spatial": spatial,
                "cx1": cx1, "cx2": cx2, "stages_preact": stages}

    def forward(self, x: Tensor, extra: Collection[str] = ()) -> SegOutput:
        """B x 3 x H x W -> SegOutput (logits B x num_classes x H x W; aux in training); the
        optional features always, as :class:`TimmDeepLabV3`."""
        feats = self.forward_features(x)
        size = x.shape[-2:]
        small = self.head(feats["decoder"])
        feats["logits_small"] = small
        aux = []
        if self.training:
            aux = [_resize(self.aux1(feats["cx1"]), size), _resize(self.aux2(feats["cx2"]), size)]
        return SegOutput(logits=_resize(small, size), aux=aux, features=feats)

"""DeepLabV3 (Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation",
2017) as the class-incremental segmentation literature builds it: MiB (Cermelli et al., CVPR
2020; fcdl94/MiB ``modules/deeplab.py``, ``models/resnet.py``) and PLOP (Douillard et al., CVPR
2021), which reuses MiB's model. It satisfies :class:`incseg.models.base.SegmentationModel`.

Layout at input size H x W, output stride s (16 as in MiB / PLOP, or 8):

    body    x -> ResNet, last stage(s) dilated     -> stages 1/4, 1/8, 1/16, 1/s; body C4 x H/s
    ASPP    body -> 256 channels (see :class:`ASPP`) -> decoder 256 x H/s x W/s
    head    one 1x1 conv per step on the decoder, upsampled bilinearly to H x W.

Contract features: ``encoder`` = layer4 output (MiB's ``body``, what ILT distils),
``stages`` = the four ResNet stages, ``decoder`` = the ASPP output the classifier reads
(MiB's ``pre_logits``). When asked (``forward(x, extra=...)``): ``stages_preact`` = the four
stages before their last ReLU (PLOP's ``attentions``) and ``logits_small`` = the head's logits
at 1/s before upsampling (PLOP's ``sem_logits_small``). No auxiliary heads: ``aux`` is always
empty.

Norm: the references use InPlace-ABN-sync (BatchNorm + leaky ReLU 0.01, one fused op); here
BatchNorm + ReLU, which Lightning turns into SyncBatchNorm under DDP on GPUs
(``trainer.sync_batchnorm``). The ImageNet weights are torchvision's ``resnet101`` /
``resnet50`` (the references load an InPlace-ABN conversion, ``resnet101_iabn_sync.pth.tar``).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incseg.models.backbones import RESNETS, ResNetBackbone, check_pretrained_value
from incseg.models.base import SegOutput
from incseg.models.heads import IncrementalHead, check_classes_per_step

__all__ = ["ASPP", "DeepLabV3", "aspp_rates_for", "dilate_resnet"]

#: output stride -> dilation of (layer3, layer4), as MiB's ResNet (``models/resnet.py``)
STAGE_DILATIONS = {16: (1, 2), 8: (2, 4)}


def aspp_rates_for(output_stride: int, rates: Sequence[int] | None = None) -> tuple[int, ...]:
    """The ASPP's three atrous rates: ``rates`` if given, else DeepLabV3's (6, 12, 18) at output
    stride 16, doubled to (12, 24, 36) at 8 (Chen et al. 2017, Sec. 4.1). MiB's code uses
    (12, 24, 32) at 8 — pass ``model.aspp_rates=[12,24,32]`` for the literal reference."""
    _check_output_stride(output_stride)
    if rates is None:
        return (6, 12, 18) if int(output_stride) == 16 else (12, 24, 36)
    ok = (isinstance(rates, Sequence) and not isinstance(rates, str) and len(rates) == 3
          and all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rates))
    if not ok:
        shown = list(rates) if isinstance(rates, Sequence) and not isinstance(rates, str) \
            else rates
        raise ValueError(f"aspp_rates={shown!r} must be three whole numbers >= 1, e.g. "
                         "model.aspp_rates=[6,12,18], or null for DeepLabV3's rates")
    return tuple(rates)


def _check_output_stride(output_stride) -> None:
    if isinstance(output_stride, bool) or not isinstance(output_stride, int) \
            or output_stride not in STAGE_DILATIONS:
        raise ValueError(f"output_stride={output_stride!r} is not supported; use "
                         "model.output_stride=16 (MiB, PLOP) or model.output_stride=8")


def _check_backbone(backbone: str) -> None:
    if backbone not in RESNETS:
        raise ValueError(f"unknown backbone {backbone!r}; valid backbones: "
                         f"{', '.join(sorted(RESNETS))}")


def dilate_resnet(backbone: ResNetBackbone, output_stride: int) -> None:
    """Trade the stride of the last stage(s) for dilation, in place (weights unchanged).

    MiB's ResNet dilates *every* block of a dilated stage (stride 1, dilation d in each 3x3
    conv); torchvision's ``replace_stride_with_dilation`` keeps the previous dilation in the
    first block of the stage. The shapes and parameters are the same; MiB's receptive field
    is the one the literature's numbers were obtained with.
    """
    _check_output_stride(output_stride)
    for layer, d in zip((backbone.layer3, backbone.layer4), STAGE_DILATIONS[int(output_stride)]):
        if d == 1:
            continue
        for block in layer:
            for conv in block.modules():
                if not isinstance(conv, nn.Conv2d):
                    continue
                conv.stride = (1, 1)  # the strided 3x3 conv and the 1x1 downsample conv
                if conv.kernel_size == (3, 3):
                    conv.dilation, conv.padding = (d, d), (d, d)


class _NormAct(nn.Sequential):
    """BatchNorm + ReLU: InPlace-ABN's BN + activation as two plain modules (every BatchNorm
    stays visible to DeepInversion's hooks and to SyncBatchNorm conversion)."""

    def __init__(self, channels: int):
        super().__init__(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling as MiB / PLOP build it (``modules/deeplab.py``).

    B x C_in x h x w -> B x out_ch x h x w:

        maps = norm(concat(conv1x1(x), conv3x3_r1(x), conv3x3_r2(x), conv3x3_r3(x)))  # 4*hidden
        pool = conv1x1(norm(conv1x1(mean_hw(x))))                      # B x out_ch x 1 x 1
        out  = norm(conv1x1(maps) + pool)        # the pooled branch broadcast over h x w

    All convs bias-free, no dropout. Unlike torchvision's ``ASPP`` (which concatenates the
    upsampled pooling branch as a fifth map, then projects with dropout 0.5), the reference
    *adds* the pooled branch after its own 1x1 projection. MiB pools over a 32 x 32 window at
    test time (``--pooling 32``); on its 512 px centre-cropped test images at output stride 16
    that window is the whole 32 x 32 map, so the global mean used here gives the same output.
    The norm after global pooling sees a B x hidden x 1 x 1 map: training needs batch >= 2.
    """

    def __init__(self, in_ch: int, hidden: int = 256, out_ch: int = 256,
                 rates: Sequence[int] = (6, 12, 18)):
        super().__init__()
        self.map_convs = nn.ModuleList(
            [nn.Conv2d(in_ch, hidden, 1, bias=False)]
            + [nn.Conv2d(in_ch, hidden, 3, padding=r, dilation=r, bias=False) for r in rates]
        )
        self.map_norm = _NormAct(hidden * len(self.map_convs))
        self.red_conv = nn.Conv2d(hidden * len(self.map_convs), out_ch, 1, bias=False)
        self.pool_conv = nn.Conv2d(in_ch, hidden, 1, bias=False)
        self.pool_norm = _NormAct(hidden)
        self.pool_red_conv = nn.Conv2d(hidden, out_ch, 1, bias=False)
        self.red_norm = _NormAct(out_ch)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MiB's head initialisation: Xavier-normal convs with the activation's gain (ReLU's
        here, leaky ReLU 0.01's there), norm weight 1 and bias 0."""
        gain = nn.init.calculate_gain("relu")
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight, gain)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        maps = self.map_norm(torch.cat([conv(x) for conv in self.map_convs], dim=1))
        pooled = x.mean(dim=(2, 3), keepdim=True)  # mean, not .view: channels_last stays valid
        pool = self.pool_red_conv(self.pool_norm(self.pool_conv(pooled)))
        return self.red_norm(self.red_conv(maps) + pool)


class DeepLabV3(nn.Module):
    """DeepLabV3 with a dilated ResNet body, MiB's ASPP and one incremental head.

    ``classes_per_step[0]`` includes background (channel 0). ``output_stride``: 16 (MiB /
    PLOP) or 8. ``aspp_rates``: None for DeepLabV3's rates at that stride, or three ints.
    ``pretrained`` applies to the body only: None (from scratch), "imagenet" (torchvision's
    file in the torch hub cache, downloaded when missing) or a path to a ResNet state dict.
    """

    def __init__(
        self,
        backbone: str = "resnet101",
        classes_per_step: Sequence[int] = (21,),
        pretrained: str | os.PathLike | None = None,
        output_stride: int = 16,
        aspp_rates: Sequence[int] | None = None,
        channels: int = 256,
    ):
        super().__init__()
        classes_per_step = check_classes_per_step(classes_per_step)
        _check_backbone(backbone)
        rates = aspp_rates_for(output_stride, aspp_rates)
        self.output_stride = int(output_stride)
        self.backbone = ResNetBackbone(backbone, pretrained=pretrained)
        dilate_resnet(self.backbone, self.output_stride)
        self.aspp = ASPP(self.backbone.out_channels[1], channels, channels, rates)
        self.head = IncrementalHead(channels, classes_per_step)

    @property
    def classes_per_step(self) -> list[int]:
        return self.head.classes_per_step

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def heads(self) -> tuple[IncrementalHead]:
        """Every classifier head (one: the references have no auxiliary head)."""
        return (self.head,)

    def add_step(self, n_new: int, init_balanced: bool = True) -> None:
        """Add `n_new` classes to every head; MiB's init_balanced on each if asked."""
        for head in self.heads():
            head.add_step(n_new)
            if init_balanced:
                head.init_balanced(n_new)

    @staticmethod
    def check_config(backbone: str = "resnet101", pretrained=None, output_stride: int = 16,
                     aspp_rates=None, **_) -> None:
        """Fail before anything trains on a bad backbone, output stride or ASPP rates (a
        ValueError the config check turns into one line) or on ImageNet weights that are not
        in the hub cache and cannot be downloaded (ConfigError naming the torchvision file)."""
        _check_backbone(backbone)
        aspp_rates_for(output_stride, aspp_rates)
        check_pretrained_value(backbone, pretrained)

    def forward_features(self, x: Tensor, preact: bool = False) -> dict:
        """B x 3 x H x W -> ``encoder`` (C4 x H/s), ``stages`` (1/4 .. 1/s), ``decoder``
        (256 x H/s); with ``preact`` also ``stages_preact``."""
        extra = {}
        if preact:
            stages, extra["stages_preact"] = self.backbone.forward_preact(x)
        else:
            stages = self.backbone(x)
        body = stages[-1]
        return {"encoder": body, "stages": stages, "decoder": self.aspp(body), **extra}

    def forward(self, x: Tensor, extra: Collection[str] = ()) -> SegOutput:
        """B x 3 x H x W -> SegOutput (logits B x num_classes x H x W, no aux); ``extra`` names
        the optional contract features to add (``stages_preact``, ``logits_small``)."""
        feats = self.forward_features(x, preact="stages_preact" in extra)
        small = self.head(feats["decoder"])
        if "logits_small" in extra:
            feats["logits_small"] = small
        # align_corners=False: MiB's IncrementalSegmentationModule
        logits = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return SegOutput(logits=logits, aux=[], features=feats)

"""BiSeNet V1 (Yu et al., "BiSeNet: Bilateral Segmentation Network", ECCV 2018) with
incremental classifier heads, as used for class-incremental segmentation by the paper this
suite reproduces (Di Salvo et al.). It satisfies :class:`incseg.models.base.SegmentationModel`.

Layout at input size H x W (C3, C4 = layer3/layer4 channels of the ResNet):

    spatial path  x -> 3 x conv3x3/2-BN-ReLU             -> spatial  256 x H/8  x W/8
    context path  x -> ResNet                            -> f16 C3 x H/16, body = f32 C4 x H/32
                  ARM(f16) -> upsample                   -> cx1      C3  x H/8  x W/8
                  ARM(f32) + GAP(f32) -> upsample        -> cx2      C4  x H/8  x W/8
    FFM           [spatial, cx1, cx2] -> 256 channels    -> ffm      256 x H/8  x W/8
    heads         main(ffm), aux1(cx1), aux2(cx2), each upsampled to H x W.

Contract features: ``encoder`` = body (layer4), ``stages`` = the ResNet's four stages,
``decoder`` = ffm; BiSeNet's own ``spatial``, ``cx1``, ``cx2`` beside them. When asked
(``forward(x, extra=...)``): ``stages_preact`` = the four stages before their last ReLU and
``logits_small`` = the main head's logits at 1/8, before upsampling.

Two variants (``conf/model/bisenet_*`` and ``bisenet_*_paper``). The default follows the BiSeNet
paper and the public implementations it cites: a 1x1 fusion conv, the global context *added* to
the 1/32 branch, bias-free ARM convs (a BN follows). The ``paper`` variant is the code Di Salvo
et al. trained (derived from the widely copied ooooverflow/BiSeNet): a 3x3 fusion conv, the
global context *multiplied* into the 1/32 branch, ARM convs with a bias; their numbers came
from it.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incseg.errors import ConfigError
from incseg.models.backbones import ResNetBackbone, check_pretrained_value
from incseg.models.base import SegOutput
from incseg.models.heads import IncrementalHead, check_classes_per_step

__all__ = ["ARM", "FFM", "BiSeNet", "ConvBNReLU", "SpatialPath"]


def _gap(x: Tensor) -> Tensor:
    """B x C x h x w -> B x C x 1 x 1 (mean keeps channels_last inputs valid, no .view)."""
    return x.mean(dim=(2, 3), keepdim=True)


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    # align_corners=False: the convention of torchvision/MiB segmentation heads.
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Sequential):
    """conv(k, stride, pad=k//2, no bias: BN follows) -> BN -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class SpatialPath(nn.Module):
    """Three stride-2 conv3x3-BN-ReLU layers: B x 3 x H x W -> B x 256 x H/8 x W/8.

    Wide and shallow (paper Sec. 3.1): keeps spatial detail at 1/8 that the context path loses.
    """

    out_channels = 256

    def __init__(self, in_ch: int = 3):
        super().__init__()
        self.layers = nn.Sequential(
            ConvBNReLU(in_ch, 64, 3, 2), ConvBNReLU(64, 128, 3, 2), ConvBNReLU(128, 256, 3, 2)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ARM(nn.Module):
    """Attention Refinement Module (paper Fig. 2b): x * sigmoid(BN(conv1x1(GAP(x)))).

    B x C x h x w -> B x C x h x w. The BN runs on a 1 x 1 map: fine in eval, needs batch >= 2
    in training (accepted; every BN must run in forward for DeepInversion's BN-statistics hooks).
    ``bias``: the conv's bias is redundant before the BN; the paper's code has one.
    """

    def __init__(self, channels: int, bias: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=bias)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.bn(self.conv(_gap(x))))


class FFM(nn.Module):
    """Feature Fusion Module (paper Fig. 2c): fuse, then channel attention with a residual.

    [B x Ci x h x w, ...] -> f = ReLU(BN(conv1x1(concat))) (B x 256 x h x w),
    a = sigmoid(conv1x1(ReLU(conv1x1(GAP(f))))), output f + f * a.
    The fusion conv is 1x1 by default as in the public BiSeNet implementations (TorchSeg,
    CoinCheung), which keeps the reference sizes (about 12.6 M parameters, about 13 GMACs for
    ResNet-18); ``kernel_size=3`` is the paper's code (2.1 M parameters more for ResNet-18).
    """

    def __init__(self, in_ch: int, out_ch: int = 256, kernel_size: int = 1):
        super().__init__()
        self.fuse = ConvBNReLU(in_ch, out_ch, kernel_size=kernel_size)
        self.attention = nn.Sequential(
            nn.Conv2d(out_ch, out_ch, 1, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 1, bias=True),
            nn.Sigmoid(),
        )

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        f = self.fuse(torch.cat(list(feats), dim=1))
        return f + f * self.attention(_gap(f))


class BiSeNet(nn.Module):
    """BiSeNet V1 with a ResNet context path and three incremental heads (main, aux1, aux2).

    ``classes_per_step[0]`` includes background (channel 0). ``pretrained`` applies to the
    backbone only: None (from scratch), "imagenet" (torchvision file in the torch hub cache,
    downloaded when missing) or a path to a ResNet state dict. ``fusion_kernel``, ``global_context``
    and ``arm_bias`` choose between this suite's variant and the paper's code (module docstring).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        classes_per_step: Sequence[int] = (21,),
        pretrained: str | os.PathLike | None = None,
        fusion_kernel: int = 1,
        global_context: str = "add",
        arm_bias: bool = False,
    ):
        super().__init__()
        self.check_config(backbone, None, fusion_kernel, global_context, arm_bias)
        classes_per_step = check_classes_per_step(classes_per_step)
        self.backbone = ResNetBackbone(backbone, pretrained=pretrained)
        c3, c4 = self.backbone.out_channels
        self.global_context = global_context
        self.spatial_path = SpatialPath()
        self.arm16 = ARM(c3, bias=bool(arm_bias))
        self.arm32 = ARM(c4, bias=bool(arm_bias))
        self.ffm = FFM(SpatialPath.out_channels + c3 + c4, 256, kernel_size=int(fusion_kernel))
        self.head = IncrementalHead(256, classes_per_step)
        # Auxiliary heads on the context features (paper Eq. 3's two auxiliary losses).
        self.aux1 = IncrementalHead(c3, classes_per_step)
        self.aux2 = IncrementalHead(c4, classes_per_step)

    @property
    def classes_per_step(self) -> list[int]:
        return self.head.classes_per_step

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def heads(self) -> tuple[IncrementalHead, IncrementalHead, IncrementalHead]:
        """(main, aux1, aux2)."""
        return self.head, self.aux1, self.aux2

    def add_step(self, n_new: int, init_balanced: bool = True) -> None:
        """Add `n_new` classes to all three heads; MiB's init_balanced on each if asked."""
        for head in self.heads():
            head.add_step(n_new)
            if init_balanced:
                head.init_balanced(n_new)

    @staticmethod
    def check_config(backbone: str = "resnet18", pretrained=None, fusion_kernel=1,
                     global_context="add", arm_bias=False, **_) -> None:
        """Fail before anything trains on a variant setting out of range or when ``pretrained``
        names a file that is not there (called by the config check; raises ConfigError)."""
        if fusion_kernel not in (1, 3) or isinstance(fusion_kernel, bool):
            raise ConfigError(f"model.fusion_kernel={fusion_kernel!r} is not valid; use 1 "
                              "(this suite's BiSeNet) or 3 (the paper's code)")
        if global_context not in ("add", "multiply"):
            raise ConfigError(f"model.global_context={global_context!r} is not valid; use add "
                              "(the BiSeNet paper) or multiply (the paper's code)")
        if not isinstance(arm_bias, bool):
            raise ConfigError(f"model.arm_bias={arm_bias!r} is not a boolean; use "
                              "model.arm_bias=true or false")
        check_pretrained_value(backbone, pretrained)

    def forward_features(self, x: Tensor, preact: bool = False) -> dict:
        """B x 3 x H x W -> the named features (spatial, cx1, cx2, decoder at 1/8; encoder at
        1/32; stages at 1/4 .. 1/32; with ``preact`` also stages_preact)."""
        spatial = self.spatial_path(x)
        extra = {}
        if preact:
            stages, extra["stages_preact"] = self.backbone.forward_preact(x)
        else:
            stages = self.backbone(x)
        f16, body = stages[2], stages[3]
        size = spatial.shape[-2:]
        # Global context (BiSeNet paper Sec. 3.2): the pooled 1/32 feature, broadcast over the
        # map; the paper's code multiplies it in instead.
        if self.global_context == "add":
            cx2 = self.arm32(body) + _gap(body)
        else:
            cx2 = self.arm32(body) * _gap(body)
        cx2 = _resize(cx2, size)
        cx1 = _resize(self.arm16(f16), size)
        ffm = self.ffm((spatial, cx1, cx2))
        return {"encoder": body, "stages": stages, "decoder": ffm,
                "spatial": spatial, "cx1": cx1, "cx2": cx2, **extra}

    def forward(self, x: Tensor, extra: Collection[str] = ()) -> SegOutput:
        """B x 3 x H x W -> SegOutput (logits B x num_classes x H x W); ``extra`` names the
        optional contract features to add (``stages_preact``, ``logits_small``)."""
        feats = self.forward_features(x, preact="stages_preact" in extra)
        size = x.shape[-2:]
        small = self.head(feats["decoder"])
        if "logits_small" in extra:
            feats["logits_small"] = small
        logits = _resize(small, size)
        aux = []
        if self.training:
            aux = [_resize(self.aux1(feats["cx1"]), size), _resize(self.aux2(feats["cx2"]), size)]
        return SegOutput(logits=logits, aux=aux, features=feats)

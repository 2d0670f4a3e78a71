"""timm encoders (Wightman, pytorch-image-models): any timm name that builds with
``features_only=True`` and gives a feature pyramid (ConvNeXt, Swin, ResNet-D, EfficientNet, ...)
becomes the encoder of :class:`incseg.models.TimmDeepLabV3` or :class:`incseg.models.TimmBiSeNet`
by naming it in ``model.encoder``; no code here knows a family.

:class:`TimmEncoder` returns the deepest four levels of timm's pyramid (1/4 .. 1/32 at the
native stride; timm's CNNs add a 1/2 stem level that no model here reads), as NCHW tensors
whatever layout timm returns (Swin's are NHWC). What a name gives (channels, strides, whether it
holds BatchNorms) is found on the meta device, so configs are checked without making a weight.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from incseg.errors import ConfigError
from incseg.models.timm_weights import (
    LoadReport,
    classifier_of,
    line,
    read_weights,
    resolve_weights,
)

__all__ = ["LEVELS", "EncoderInfo", "TimmEncoder", "encoder_info", "split_norm_act"]

#: the pyramid levels every model here reads: the deepest four
LEVELS = 4


def encoder_kwargs_of(encoder_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if encoder_kwargs is None:
        return {}
    if not isinstance(encoder_kwargs, Mapping):
        raise ConfigError(f"model.encoder_kwargs={encoder_kwargs!r} is not a mapping; pass e.g. "
                          "+model.encoder_kwargs.drop_path_rate=0.1, or {} for timm's defaults")
    return dict(encoder_kwargs)


# ---- what a timm name gives, found on the meta device --------------------------------------

class EncoderInfo(tuple):
    """(channels, reductions, has_batchnorm) of the four levels an encoder returns."""

    __slots__ = ()

    def __new__(cls, channels, reductions, has_batchnorm):
        return super().__new__(cls, (tuple(channels), tuple(reductions), bool(has_batchnorm)))

    channels = property(lambda self: self[0])
    reductions = property(lambda self: self[1])
    has_batchnorm = property(lambda self: self[2])


def _create(name: str, output_stride: int | None, kwargs: dict, **extra) -> nn.Module:
    import timm

    if output_stride not in (None, 32):  # timm's default is the native stride
        kwargs = {**kwargs, "output_stride": int(output_stride)}
    return timm.create_model(name, features_only=True, out_indices=LEVELS, **kwargs, **extra)


def _check_output_stride(output_stride) -> None:
    if output_stride is not None and (isinstance(output_stride, bool)
                                      or output_stride not in (8, 16, 32)):
        raise ConfigError(f"model.output_stride={output_stride!r} is not valid; use 16 (MiB, "
                          "PLOP), 8, or null for the encoder's native stride")


@lru_cache(maxsize=64)
def _probe(name: str, output_stride: int | None, frozen_kwargs: tuple) -> EncoderInfo:
    kwargs = dict(frozen_kwargs)
    try:
        with torch.device("meta"):  # shapes only: no weight is initialised or read
            net = _create(name, output_stride, kwargs, pretrained=False)
            # a forward at a size that is not timm's 224 px default: Swin and ViT refuse other
            # sizes unless told otherwise (dynamic_img_size), and segmentation crops vary
            net(torch.empty(1, 3, 64, 96))
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"model.encoder={name} is not a timm model; list them with "
                              "timm.list_models() (e.g. convnext_tiny.fb_in1k)") from None
        if "Invalid pretrained tag" in str(err):
            raise ConfigError(f"model.encoder={name}: {line(err)}; list the tags with "
                              f"timm.list_pretrained('{name.split('.')[0]}*')") from None
        raise
    except TypeError as err:
        if "output_stride" in str(err) and output_stride is not None:
            native = _probe(name, None, frozen_kwargs).reductions[-1]
            raise ConfigError(f"model.output_stride={output_stride}: timm's {name} has no "
                              "dilated mode; set model.output_stride=null to run it at its "
                              f"native stride (1/{native})") from None
        raise ConfigError(f"model.encoder_kwargs: timm's {name} does not take them "
                          f"({line(err)}); check model.encoder_kwargs against the timm model's "
                          "arguments") from None
    except AssertionError as err:
        raise ConfigError(f"model.encoder={name} takes only its fixed input size "
                          f"({line(err)}); pass +model.encoder_kwargs.dynamic_img_size=true "
                          "(timm's option for Swin / ViT families) so it runs at any crop "
                          "size") from None
    info = net.feature_info
    return EncoderInfo(info.channels(), info.reduction(),
                       any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()))


def encoder_info(name: str, output_stride: int | None = None,
                 encoder_kwargs: Mapping[str, Any] | None = None) -> EncoderInfo:
    """What ``timm.create_model(name, features_only=True, ...)`` gives, found without making a
    weight (meta device): channels and reductions of the four levels, whether any BatchNorm is
    in it. Raises ConfigError (one line) for a name, a stride or kwargs timm cannot build."""
    _check_output_stride(output_stride)
    kwargs = encoder_kwargs_of(encoder_kwargs)
    return _probe(str(name), output_stride, tuple(sorted(kwargs.items())))


# ---- the encoder ---------------------------------------------------------------------------

class _SplitNormAct(nn.Sequential):
    """timm's fused BatchNorm + drop + activation as three modules (same parameter names under
    ``.0``). Why: torch's ``SyncBatchNorm.convert_sync_batchnorm`` (what Lightning applies under
    DDP) turns timm's ``BatchNormAct2d`` into a plain SyncBatchNorm whose forward never calls
    the activation, silently (timm ships its own converter for this); split, every BN is a plain
    ``nn.BatchNorm2d`` that converts cleanly and that DeepInversion's hooks see by type."""


def split_norm_act(module: nn.Module) -> int:
    """Replace, in place, every timm ``BatchNormAct2d`` below ``module`` by a
    :class:`_SplitNormAct` holding the same BatchNorm parameters and buffers; returns how many
    were replaced."""
    from timm.layers import BatchNormAct2d

    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, BatchNormAct2d):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats, device="meta")
            # the very tensors, not copies: the pretrained values and their device carry over
            for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                setattr(bn, key, getattr(child, key))
            setattr(module, name, _SplitNormAct(bn, child.drop, child.act).train(child.training))
            count += 1
        else:
            count += split_norm_act(child)
    return count


class TimmEncoder(nn.Module):
    """A timm ``features_only`` model returning its four deepest levels, shallow to deep.

    Input B x 3 x H x W; output ``[f_a, f_b, f_c, f_d]``, each B x C_i x H/r_i x W/r_i (NCHW;
    Swin's NHWC outputs are permuted), ``channels`` and ``reductions`` the C_i and r_i
    (4, 8, 16, 32 at the native stride; 4, 8, 16, 16 at ``output_stride=16``). ``pretrained``:
    None, "imagenet" (timm's weights for the tag in ``name``) or a path to a timm state dict of
    that model; loaded through timm, so its checkpoint filters (Swin's, ConvNeXt's) apply.
    """

    def __init__(self, name: str, pretrained: str | os.PathLike | None = None,
                 output_stride: int | None = None,
                 encoder_kwargs: Mapping[str, Any] | None = None):
        super().__init__()
        info = encoder_info(name, output_stride, encoder_kwargs)  # one-line errors first
        found = resolve_weights(name, pretrained, download=True)
        extra: dict[str, Any] = {"pretrained": False}
        if found is not None:
            path, what = found
            extra = {"pretrained": True,
                     "pretrained_cfg_overlay": {"state_dict": read_weights(path, what),
                                                "source": None}}
        with LoadReport(classifier_of(name)) as report:
            try:
                self.net = _create(name, output_stride, encoder_kwargs_of(encoder_kwargs), **extra)
            # load_state_dict's shape report, or a checkpoint filter (timm's per-family key
            # conversion) that meets keys of another network: a KeyError, an assertion
            except (RuntimeError, KeyError, ValueError, AssertionError) as err:
                if found is None:
                    raise
                lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
                why = " ".join(lines[:2])[:300] if isinstance(err, RuntimeError) \
                    else f"{type(err).__name__} {line(err)} in timm's loader"
                raise ConfigError(f"{found[1]} {found[0]} does not fit timm's {name}: "
                                  f"{why}") from None
        if found is not None and report.problems:
            raise ConfigError(f"{found[1]} {found[0]} does not fit timm's {name}: "
                              f"{'; '.join(report.problems)[:300]}")
        split_norm_act(self.net)
        self.name = str(name)
        self.output_stride = output_stride
        self.channels: tuple[int, ...] = info.channels
        self.reductions: tuple[int, ...] = info.reductions
        self._nhwc = str(getattr(self.net, "output_fmt", "NCHW")).endswith("NHWC")

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = self.net(x)
        if self._nhwc:
            # an NCHW view of NHWC memory is channels_last, a layout every conv takes (ConvNeXt's
            # own outputs come so); no copy
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return list(feats)

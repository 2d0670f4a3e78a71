"""timm encoders (Wightman, pytorch-image-models) for DeepLabV3 and BiSeNet's context path.

Any timm name that builds with ``features_only=True`` and gives a feature pyramid (ConvNeXt,
Swin, ResNet-D, EfficientNet, ...) becomes an encoder by naming it in ``model.encoder``; the
YAMLs in ``conf/model`` (``deeplabv3_convnext_t`` ...) are such names, and no code knows a family.

- :class:`TimmEncoder`: the deepest four levels of timm's feature pyramid (1/4 .. 1/32 at the
  native stride), as NCHW tensors whatever layout timm returns (Swin's are NHWC).
- :class:`TimmDeepLabV3`: the encoder + MiB / PLOP's ASPP and incremental head
  (``incseg.models.deeplab``); ``output_stride`` 16 or 8 through timm's dilated mode where the
  family has one (ConvNeXt, ResNet, EfficientNet), the native stride (``null``) otherwise.
- :class:`TimmBiSeNet`: BiSeNet V1 (``incseg.models.bisenet``) with the encoder as context path,
  reading its 1/16 and 1/32 levels.

ImageNet weights (``model.pretrained=imagenet``) are timm's for the tag named in
``model.encoder`` (``convnext_tiny.fb_in1k``), kept in the Hugging Face hub cache: read from it
when there, downloaded with ``huggingface_hub`` when not (timm's own source), and a one-line
error when ``HF_HUB_OFFLINE`` forbids the download.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incseg.errors import ConfigError
from incseg.models.base import SegOutput
from incseg.models.bisenet import ARM, FFM, BiSeNet, SpatialPath
from incseg.models.deeplab import ASPP
from incseg.models.heads import IncrementalHead, check_classes_per_step

__all__ = [
    "EncoderInfo", "TimmBiSeNet", "TimmDeepLabV3", "TimmEncoder", "encoder_info",
    "hf_hub_cache", "split_norm_act", "timm_weights_file",
]

log = logging.getLogger("incseg.models")

#: the pyramid levels every model here reads: the deepest four (timm's CNNs add a 1/2 stem level)
LEVELS = 4


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    # align_corners=False: torchvision / MiB segmentation heads
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _line(err: BaseException) -> str:
    """An exception's first line without its full stop, to quote inside a one-line error."""
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


def _kwargs(encoder_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if encoder_kwargs is None:
        return {}
    if not isinstance(encoder_kwargs, Mapping):
        raise ConfigError(f"model.encoder_kwargs={encoder_kwargs!r} is not a mapping; pass e.g. "
                          "+model.encoder_kwargs.drop_path_rate=0.1, or {} for timm's defaults")
    return dict(encoder_kwargs)


# ---- the Hugging Face hub cache ------------------------------------------------------------

def hf_hub_cache() -> Path:
    """The Hugging Face hub cache that timm's weights live in, by huggingface_hub's rule
    (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), read when
    called: huggingface_hub freezes its constants at import, before a test or a job sets them."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache",
                                              "huggingface")
    return Path(home).expanduser() / "hub"


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _pretrained_cfg(name: str):
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as err:  # an unknown pretrained tag
        raise ConfigError(f"model.encoder={name}: {_line(err)}; list the tags with "
                          f"timm.list_pretrained('{name.split('.')[0]}*')") from None
    if cfg is None or not cfg.hf_hub_id:
        raise ConfigError(f"model.pretrained=imagenet: timm has no Hugging Face hub weights for "
                          f"{name}; name a tag that has (timm.list_pretrained()), pass a weights "
                          "file as model.pretrained=PATH, or set model.pretrained=null")
    return cfg


def timm_weights_file(name: str, download: bool = False) -> Path:
    """The local file of timm's ImageNet weights for ``name`` (``arch.tag``), from the Hugging
    Face hub cache; with ``download`` fetched into it when missing (what timm's
    ``pretrained=True`` would do). Raises ConfigError (one line) when the file is not there and
    ``HF_HUB_OFFLINE`` (or ``download=False`` with it set) forbids fetching it, or the download
    fails. The file names are timm's: ``model.safetensors``, else ``pytorch_model.bin``."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    cfg = _pretrained_cfg(name)
    repo, _, revision = str(cfg.hf_hub_id).partition("@")
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors",
                                                               "pytorch_model.bin"]
    cache = hf_hub_cache()
    for fname in files:
        hit = try_to_load_from_cache(repo, fname, cache_dir=cache, revision=revision or None)
        if isinstance(hit, str):
            return Path(hit)
    if _hf_offline():
        raise ConfigError(
            f"model.pretrained=imagenet: timm's weights of {name} (hub repo {repo}) are not in "
            f"the Hugging Face hub cache {cache} and HF_HUB_OFFLINE=1 forbids downloading them; "
            "run once with network access (without HF_HUB_OFFLINE), point HF_HUB_CACHE at a "
            "cache that holds them, or set model.pretrained=null to train from scratch")
    if not download:
        return cache  # fetched when the model is built (the config check does not download)
    for fname in files:
        try:
            return Path(hf_hub_download(repo, fname, revision=revision or None, cache_dir=cache))
        except EntryNotFoundError:
            continue
        except Exception as err:  # connection, HTTP and disk errors all mean "not fetched"
            raise ConfigError(
                f"model.pretrained=imagenet: cannot download timm's weights of {name} from the "
                f"Hugging Face hub ({repo}/{fname}: {_line(err)}) into {cache}; check the "
                "network, or set model.pretrained=null to train from scratch") from None
    raise ConfigError(f"model.pretrained=imagenet: the hub repo {repo} holds none of "
                      f"{', '.join(files)}; pass a weights file as model.pretrained=PATH")


def _weights(name: str, pretrained, download: bool) -> tuple[Path, str] | None:
    """None (from scratch), or the file ``pretrained`` names and what it is."""
    if pretrained is None or str(pretrained).strip().lower() in ("", "none", "null"):
        return None
    if isinstance(pretrained, str) and pretrained.strip().lower() == "imagenet":
        return timm_weights_file(name, download=download), "timm ImageNet weights"
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.pretrained={pretrained}: no such file; give a timm state dict "
                          f"of {name}, 'imagenet', or null to train from scratch")
    return path, "model.pretrained file"


def _read_weights(path: Path, what: str) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # a truncated or foreign file: its reader's own error types
            raise ConfigError(f"cannot read {what} {path} as safetensors: {_line(err)}") \
                from None
    from incseg.models.backbones import _read_state_dict

    return _read_state_dict(path, what)


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
            raise ConfigError(f"model.encoder={name}: {_line(err)}; list the tags with "
                              f"timm.list_pretrained('{name.split('.')[0]}*')") from None
        raise
    except TypeError as err:
        if "output_stride" in str(err) and output_stride is not None:
            native = _probe(name, None, frozen_kwargs).reductions[-1]
            raise ConfigError(f"model.output_stride={output_stride}: timm's {name} has no "
                              "dilated mode; set model.output_stride=null to run it at its "
                              f"native stride (1/{native})") from None
        raise ConfigError(f"model.encoder_kwargs: timm's {name} does not take them "
                          f"({_line(err)}); "
                          "check model.encoder_kwargs against the timm model's arguments") \
            from None
    except AssertionError as err:
        raise ConfigError(f"model.encoder={name} takes only its fixed input size "
                          f"({_line(err)}); pass "
                          "+model.encoder_kwargs.dynamic_img_size=true (timm's option for "
                          "Swin / ViT families) so it runs at any crop size") from None
    info = net.feature_info
    return EncoderInfo(info.channels(), info.reduction(),
                       any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()))


def encoder_info(name: str, output_stride: int | None = None,
                 encoder_kwargs: Mapping[str, Any] | None = None) -> EncoderInfo:
    """What ``timm.create_model(name, features_only=True, ...)`` gives, found without making a
    weight (meta device): channels and reductions of the four levels, whether any BatchNorm is
    in it. Raises ConfigError (one line) for a name, a stride or kwargs timm cannot build."""
    _check_output_stride(output_stride)
    kwargs = _kwargs(encoder_kwargs)
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
            setattr(module, name, _SplitNormAct(bn, child.drop, child.act))
            count += 1
        else:
            count += split_norm_act(child)
    return count


def _classifier(name: str):
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:
        return None
    return cfg.classifier if cfg is not None else None


class _LoadReport(logging.Handler):
    """What timm's loader reports about the keys it could not place. timm loads the weights of
    a ``features_only`` model non-strictly (its classifier is dropped) and only logs missing or
    unexpected keys; a file of another network would load partly and silently, so those log
    records are collected here and turned into an error."""

    def __init__(self, classifier: str | tuple | None = None):
        super().__init__(logging.INFO)
        # the ImageNet classifier, dropped on purpose: its keys are missing from the model
        self.classifier = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str)
                                                   else classifier or ()))
        self.problems: list[str] = []
        self._logger = logging.getLogger("timm.models._builder")

    def emit(self, record: logging.LogRecord) -> None:
        found = re.match(r"(Missing|Unexpected) keys \((.*)\) (discovered|found)",
                         record.getMessage())
        if not found:
            return
        keys = [k.strip() for k in found.group(2).split(",") if k.strip()]
        if found.group(1) == "Missing":
            keys = [k for k in keys if not k.startswith(self.classifier)]
        if keys:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            self.problems.append(f"{len(keys)} {found.group(1).lower()} keys ({shown})")

    def __enter__(self) -> _LoadReport:
        self._level = self._logger.level
        self._logger.addHandler(self)
        self._logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)


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
        found = _weights(name, pretrained, download=True)
        extra: dict[str, Any] = {"pretrained": False}
        if found is not None:
            path, what = found
            extra = {"pretrained": True,
                     "pretrained_cfg_overlay": {"state_dict": _read_weights(path, what),
                                                "source": None}}
        with _LoadReport(_classifier(name)) as report:
            try:
                self.net = _create(name, output_stride, _kwargs(encoder_kwargs), **extra)
            except RuntimeError as err:  # load_state_dict's shape report
                if found is None:
                    raise
                lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
                raise ConfigError(f"{found[1]} {found[0]} does not fit timm's {name}: "
                                  f"{' '.join(lines[:2])[:300]}") from None
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
            # .contiguous(): downstream convs and PLOP's pooling expect a dense NCHW tensor
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        return list(feats)


def _native_stride_note(model: str, encoder: TimmEncoder) -> None:
    if encoder.output_stride is None:
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
        _check_normalisation(encoder, pretrained)
        _weights(encoder, pretrained, download=False)

    def forward_features(self, x: Tensor) -> dict:
        """B x 3 x H x W -> ``encoder`` (C_d x H/s), ``stages`` (1/4 .. 1/s), ``decoder``
        (256 x H/s), ``stages_preact``."""
        stages = self.backbone(x)
        # timm's features_only returns each stage's output after its last activation (or
        # residual add); the value before it is not exposed, so PLOP's POD on the
        # pre-activation reads the stage outputs here
        return {"encoder": stages[-1], "stages": stages, "decoder": self.aspp(stages[-1]),
                "stages_preact": stages}

    def forward(self, x: Tensor) -> SegOutput:
        """B x 3 x H x W -> SegOutput (logits B x num_classes x H x W, no aux)."""
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
        _check_normalisation(encoder, pretrained)
        _weights(encoder, pretrained, download=False)

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

    def forward(self, x: Tensor) -> SegOutput:
        """B x 3 x H x W -> SegOutput (logits B x num_classes x H x W; aux in training)."""
        feats = self.forward_features(x)
        size = x.shape[-2:]
        small = self.head(feats["decoder"])
        feats["logits_small"] = small
        aux = []
        if self.training:
            aux = [_resize(self.aux1(feats["cx1"]), size), _resize(self.aux2(feats["cx2"]), size)]
        return SegOutput(logits=_resize(small, size), aux=aux, features=feats)


def _check_normalisation(name: str, pretrained) -> None:
    """ImageNet weights expect the images normalised as they were trained; the suite's loaders
    normalise with the ImageNet mean / std (``incseg.data.transforms``), so a tag trained with
    other statistics (CLIP's, Inception's 0.5) is refused rather than fed shifted inputs."""
    if not (isinstance(pretrained, str) and pretrained.strip().lower() == "imagenet"):
        return
    from incseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    cfg = _pretrained_cfg(name)
    close = all(abs(a - b) < 1e-3 for a, b in zip((*cfg.mean, *cfg.std),
                                                   (*IMAGENET_MEAN, *IMAGENET_STD)))
    if not close:
        raise ConfigError(f"model.pretrained=imagenet: timm's {name} was trained on images "
                          f"normalised with mean {tuple(cfg.mean)} / std {tuple(cfg.std)}, and "
                          "the suite normalises with ImageNet's (0.485, 0.456, 0.406) / (0.229, "
                          "0.224, 0.225); choose a tag trained with those (e.g. *.fb_in1k, "
                          "*.ms_in1k)")

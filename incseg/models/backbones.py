"""Context-path backbones for BiSeNet: torchvision ResNets without their ImageNet classifier.

The backbone keeps torchvision's attribute names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``),
so its ``state_dict`` keys are exactly torchvision's minus ``fc.*``: a torchvision ImageNet file
loads into it strictly once the classifier keys are dropped.
"""

from __future__ import annotations

import http.client
import os
import socket
import urllib.error
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision.models as tvm
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from incseg.errors import ConfigError
from incseg.io import is_storage_error, storage_error

__all__ = [
    "RESNETS", "ResNetBackbone", "imagenet_weights_path", "load_backbone_weights",
    "pretrained_file", "residual_sum",
]


@dataclass(frozen=True)
class _ResNetSpec:
    factory: Callable[..., tvm.ResNet]
    weights: tvm.WeightsEnum  # which ImageNet weights `pretrained=imagenet` means
    channels: tuple[int, int]  # (layer3, layer4) output channels


# IMAGENET1K_V1 for every depth: the classic torchvision weights that BiSeNet/MiB-era code used
# (torchvision's DEFAULT for r50/r101 is the later V2 recipe).
RESNETS: dict[str, _ResNetSpec] = {
    "resnet18": _ResNetSpec(tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, (256, 512)),
    "resnet50": _ResNetSpec(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1, (1024, 2048)),
    "resnet101": _ResNetSpec(tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V1, (1024, 2048)),
}


def imagenet_weights_path(name: str) -> Path:
    """Where torchvision's downloader would have cached the ImageNet file of backbone `name`.

    ``torch.hub.get_dir()/checkpoints/<basename of the weights URL>``, the same place
    ``torchvision``'s ``load_state_dict_from_url`` writes to, so a file fetched elsewhere with
    torchvision can be copied over as is.
    """
    url = RESNETS[name].weights.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its classifier, returning the output of every stage.

    Input ``x``: B x 3 x H x W. Output: ``[layer1, layer2, layer3, layer4]`` at 1/4, 1/8, 1/16
    and 1/32 of the input; ``out_channels`` = (C3, C4), the channels of the last two (256/512
    for r18, 1024/2048 for r50/r101), which BiSeNet's context path reads. The ImageNet ``fc``
    and ``avgpool`` are not registered: they would be unused parameters (DDP complains) and
    dead weight in every checkpoint.
    """

    def __init__(self, name: str = "resnet18", pretrained: str | os.PathLike | None = None):
        super().__init__()
        if name not in RESNETS:
            raise ConfigError(
                f"unknown backbone {name!r}; valid backbones: {', '.join(sorted(RESNETS))}"
            )
        spec = RESNETS[name]
        net = spec.factory(weights=None)  # never let torchvision download anything
        self.name = name
        self.out_channels: tuple[int, int] = spec.channels
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2 = net.layer1, net.layer2
        self.layer3, self.layer4 = net.layer3, net.layer4
        del net  # drops fc/avgpool with it
        load_backbone_weights(self, pretrained)

    def forward(self, x: Tensor) -> list[Tensor]:
        """B x 3 x H x W -> the four stages' outputs, shallow to deep (1/4 .. 1/32)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            stages.append(x)
        return stages

    def forward_preact(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """B x 3 x H x W -> (the four stages' outputs, the same before their final ReLU).

        A stage's pre-activation is its last residual block's sum (residual branch + shortcut)
        before the ReLU, negatives kept: what PLOP's local POD distils (arthurdouillard/
        CVPR2021_PLOP ``modules/residual.py``: the last block of each module returns ``act, x``
        and ``models/resnet.py`` collects the ``x`` as ``attentions``). The same modules run in
        the same order, so the outputs equal :meth:`forward`'s; the ReLU of the last block is
        not in place (the pre-activation must survive it), which costs one stage-sized tensor
        per stage: only a caller that reads them pays it.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages, preacts = [], []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            *blocks, last = layer
            for block in blocks:
                x = block(x)
            pre = residual_sum(last, x)
            x = torch.relu(pre)
            stages.append(x)
            preacts.append(pre)
        return stages, preacts


def residual_sum(block: nn.Module, x: Tensor) -> Tensor:
    """A torchvision ``BasicBlock`` / ``Bottleneck`` up to its final ReLU: residual branch +
    shortcut, the very operations of its ``forward`` in its order (torchvision
    ``models/resnet.py``), so ``relu(residual_sum(block, x))`` equals ``block(x)``."""
    if not isinstance(block, (BasicBlock, Bottleneck)):
        raise TypeError(f"residual_sum takes a torchvision BasicBlock or Bottleneck, not "
                        f"{type(block).__name__}")
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    if isinstance(block, Bottleneck):
        out = block.bn3(block.conv3(block.relu(out)))
    identity = x if block.downsample is None else block.downsample(x)
    return out + identity


def _read_state_dict(path: Path, what: str) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types; all mean "not a weights file"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot read {what} {path} as a torch state dict: {msg}") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # tolerate the common {"state_dict": ...} wrapper
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConfigError(f"{what} {path} is not a state dict (a mapping of names to tensors)")
    return dict(obj)


OFFLINE_ENV = "INCSEG_OFFLINE"  # set (not 0): never download, as HF_HUB_OFFLINE does for timm
DOWNLOAD_TIMEOUT_S = 60.0  # torch.hub's urlopen has none: a firewalled node would wait forever


def _download_imagenet(name: str, path: Path) -> None:
    """Fetch torchvision's ImageNet file of `name` into the torch hub cache, as torchvision's
    own ``weights=`` does: ``load_state_dict_from_url`` with ``check_hash=True`` (the file name
    carries the first hex digits of its sha256; a mismatch is deleted, never kept).

    Raises ConfigError (one line) when offline or the server cannot be reached (the file to
    place by hand, and where), or the download does not match its hash.
    """
    url = RESNETS[name].weights.url
    place = (f"place {path.name} (from {url}) in {path.parent}/, or set model.pretrained=null "
             "(or none) to train from scratch")
    why = None
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        why = f"{OFFLINE_ENV}={os.environ[OFFLINE_ENV]}"
    else:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            torch.hub.load_state_dict_from_url(url, model_dir=str(path.parent),
                                               map_location="cpu", check_hash=True,
                                               file_name=path.name, weights_only=True)
            return
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                TimeoutError) as err:
            why = str(getattr(err, "reason", None) or err)
        except RuntimeError as err:
            if "invalid hash value" not in str(err):
                raise
            raise ConfigError(
                f"model.pretrained=imagenet: the file downloaded from {url} does not match the "
                f"sha256 prefix in its name ({err}) and was not kept; rerun to download it "
                f"again, or {place}") from None
        except OSError as err:
            if not is_storage_error(err):
                raise
            raise storage_error(err, path) from None
        finally:
            socket.setdefaulttimeout(previous)
    raise ConfigError(
        f"model.pretrained=imagenet: the ImageNet weights of {name} are not in the torch hub "
        f"cache ({path} is missing) and cannot be downloaded ({why}); {place}")


def pretrained_file(name: str, pretrained: str | os.PathLike | None) -> tuple[Path, str] | None:
    """The weights file that ``model.pretrained`` names for backbone `name`, and what it is.

    None, "none" or "null": no file (train from scratch). "imagenet": torchvision's file in the
    torch hub cache, downloaded there (hash-checked) when missing, unless ``INCSEG_OFFLINE`` is
    set. Anything else: a path. Raises ConfigError (one line) when the file is not there and
    cannot be fetched. ``incseg.config.validate`` calls it before anything runs, so a download
    happens (or fails) before the run directory exists, not at step 0 of a queued job.
    """
    if pretrained is None or str(pretrained).strip().lower() in ("", "none", "null"):
        return None
    if isinstance(pretrained, str) and pretrained.strip().lower() == "imagenet":
        if name not in RESNETS:
            raise ConfigError(f"unknown backbone {name!r}; valid backbones: "
                              f"{', '.join(sorted(RESNETS))}")
        path = imagenet_weights_path(name)
        if not path.is_file():
            _download_imagenet(name, path)
        return path, "ImageNet weights"
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"model.pretrained={pretrained}: no such file; give a ResNet state dict path, "
            "'imagenet', or null to train from scratch"
        )
    return path, "model.pretrained file"


def load_backbone_weights(backbone: ResNetBackbone, pretrained: str | os.PathLike | None) -> None:
    """Load ``pretrained`` ("imagenet" or a file path) into `backbone`, strictly.

    None/"none" loads nothing. Accepts a backbone ``state_dict`` or a full torchvision ResNet one
    (``fc.*`` is ignored). Raises ConfigError (one line) for a missing file, an unreadable file,
    or mismatched keys or shapes.
    """
    found = pretrained_file(backbone.name, pretrained)
    if found is None:
        return
    path, what = found
    state = {k: v for k, v in _read_state_dict(path, what).items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    # torchvision's older ImageNet files predate BN's num_batches_tracked buffer; BatchNorm's
    # loader fills it in, so its absence is not a mismatch.
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"{what} {path} does not fit a {backbone.name} backbone: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:3]}"
        )
    bad = [k for k, v in state.items() if v.shape != own[k].shape]
    if bad:
        k = bad[0]
        raise ConfigError(
            f"{what} {path} does not fit a {backbone.name} backbone: {len(bad)} shape "
            f"mismatches, e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        )
    backbone.load_state_dict(state, strict=True)

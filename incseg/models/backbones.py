"""Context-path backbones for BiSeNet: torchvision ResNets without their ImageNet classifier.

The backbone keeps torchvision's attribute names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``),
so its ``state_dict`` keys are exactly torchvision's minus ``fc.*``: a torchvision ImageNet file
loads into it strictly once the classifier keys are dropped.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import socket
import urllib.error
import zipfile
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
    "RESNETS", "ResNetBackbone", "check_pretrained", "describe_unreadable",
    "imagenet_weights_path", "load_backbone_weights", "pretrained_file", "residual_sum",
]

log = logging.getLogger(__name__)


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


#: how to make a file this suite reads, for the messages
STATE_DICT_FIX = ("pass a ResNet state dict (torch.save(model.state_dict(), path)), "
                  "model.pretrained=imagenet, or model.pretrained=null to train from scratch")


def _unpickled_global(err: Exception) -> str | None:
    """The class that ``weights_only=True`` refused to rebuild, when its message names one."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return found.group(1) if found else None


def _is_lightning_zip(path: Path) -> bool:
    """A torch zip archive whose pickle names Lightning's version key: a Lightning checkpoint
    (read without unpickling anything)."""
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = [n for n in zf.namelist() if n.endswith("/data.pkl")]
            return bool(pkl) and b"pytorch-lightning_version" in zf.read(pkl[0])
    except (OSError, zipfile.BadZipFile):
        return False


def describe_unreadable(path: Path, err: Exception) -> str:
    """What a file that ``torch.load(weights_only=True)`` refused is, and what to pass instead:
    the part of a one-line message after the file's name. torch's own messages ("KeyError: 101",
    "Unsupported operand 149") describe its unpickler, not the file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as e:
        return f"cannot be read ({e.strerror or type(e).__name__}); check its permissions"
    cls = _unpickled_global(err)
    if not head:
        return f"is empty; {STATE_DICT_FIX}"
    if head.startswith(b"PK\x03\x04") and _is_lightning_zip(path):
        held = f" ({cls})" if cls else ""
        return (f"is a Lightning checkpoint holding Python objects{held} beyond its weights, "
                "which weights_only=True does not load; save its weights alone, where you trust "
                "the file (its 'state_dict' entry, written with torch.save to weights.pth), "
                "and pass that")
    if cls and (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        return (f"holds a pickled Python object ({cls}), e.g. a whole model saved with "
                "torch.save(model), which weights_only=True does not load (it would run code "
                "from the file); save its weights, where you trust the file: "
                "torch.save(model.state_dict(), 'weights.pth'), and pass that")
    if head.startswith(b"PK\x03\x04"):
        return (f"is a zip archive that torch.load cannot read (truncated, or not written by "
                f"torch.save: {type(err).__name__}); {STATE_DICT_FIX}")
    if head[:1] == b"\x80":
        return f"is a plain pickle, not a file torch.save wrote; {STATE_DICT_FIX}"
    if head.startswith(b"\x93NUMPY"):
        return f"is a NumPy array (.npy), not a torch file; {STATE_DICT_FIX}"
    if head.startswith(b"\x89HDF"):
        return f"is an HDF5 file (Keras/TensorFlow weights?), not a torch file; {STATE_DICT_FIX}"
    if len(head) >= 10 and head[8:10] == b'{"':
        return ("is a safetensors file, not a torch file; convert it: torch.save(safetensors."
                "torch.load_file(path), 'weights.pth'), and pass that")
    return f"is not a torch file at all; {STATE_DICT_FIX}"


def _read_state_dict(path: Path, what: str) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types; all mean "not a weights file"
        raise ConfigError(f"{what} {path} {describe_unreadable(path, e)}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # a Lightning or incseg checkpoint: {"state_dict": ...}
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConfigError(f"{what} {path} holds a {type(obj).__name__}, not a state dict (a "
                          f"mapping of names to tensors); {STATE_DICT_FIX}")
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
def _backbone_under(state: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> str | None:
    """The key prefix under which ``state`` holds every tensor of ``own`` ("" for a plain
    backbone or torchvision ResNet state dict; "model.backbone." in a Lightning checkpoint of
    incseg, "backbone." in a step checkpoint, "module." from DDP). None when there is none;
    several candidates (a checkpoint with two ResNets) are refused by the caller."""
    anchor = "conv1.weight"
    needed = {k for k in own if not k.endswith("num_batches_tracked")}
    found = []
    for key in state:
        if key == anchor or key.endswith("." + anchor):
            prefix = key[: len(key) - len(anchor)]
            if needed <= {k[len(prefix):] for k in state if k.startswith(prefix)}:
                found.append(prefix)
    return found[0] if len(found) == 1 else ("" if "" in found else None)


def _which_resnet(state: Mapping[str, Tensor]) -> str | None:
    """The torchvision ResNet whose keys and shapes ``state`` has (without ``fc``), if any."""
    for name, spec in RESNETS.items():
        ref = {k: v.shape for k, v in spec.factory(weights=None).state_dict().items()
               if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
        if all(k in state and state[k].shape == shape for k, shape in ref.items()):
            return name
    return None


#: ``model.pretrained`` words whose weights the protocol itself makes for ``shapes`` (and caches):
#: ``corpus`` (an image classifier on the procedural corpus, ``incseg.protocol.pretrain``) and
#: ``segmentation`` (a Joint segmenter on another generator stream, ``incseg.protocol.teachers``)
PROTOCOL_PRETRAINING = ("corpus", "segmentation")


def protocol_pretraining(pretrained) -> str | None:
    """The word of :data:`PROTOCOL_PRETRAINING` that ``pretrained`` is, else None."""
    if isinstance(pretrained, str) and pretrained.strip().lower() in PROTOCOL_PRETRAINING:
        return pretrained.strip().lower()
    return None


def check_pretrained_value(name: str, pretrained) -> None:
    """A model's config check: the weights ``pretrained`` names exist or can be fetched
    (``corpus`` and ``segmentation`` are made by the protocol itself, which checks its own
    settings)."""
    if protocol_pretraining(pretrained) is None:
        pretrained_file(name, pretrained)


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
    word = protocol_pretraining(pretrained)
    if word is not None:
        raise ConfigError(f"model.pretrained={word} names the backbone that `python -m "
                          f"incseg.run` pretrains for shapes and caches; to build the model by "
                          "hand, pass that file (<cache>/pretrain/<backbone>-<key>.pt)")
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

    None/"none" loads nothing. Accepts a backbone ``state_dict``, a full torchvision ResNet one
    (``fc.*`` is ignored), or a checkpoint that holds one under a key prefix (a Lightning or
    incseg checkpoint: ``model.backbone.``, ``backbone.``; DDP's ``module.``). Raises
    ConfigError (one line: what the file is, what to pass) for a missing or unreadable file, a
    pickled model, or the weights of another network.
    """
    found = pretrained_file(backbone.name, pretrained)
    if found is None:
        return
    path, what = found
    raw = _read_state_dict(path, what)
    own = backbone.state_dict()
    prefix = _backbone_under(raw, own)
    if prefix:
        log.info("%s %s: the %s weights under '%s'", what, path, backbone.name, prefix)
        raw = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    state = {k: v for k, v in raw.items() if not k.startswith("fc.")}
    # torchvision's older ImageNet files predate BN's num_batches_tracked buffer; BatchNorm's
    # loader fills it in, so its absence is not a mismatch.
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    bad = sorted(k for k, v in state.items() if k in own and v.shape != own[k].shape)
    if missing or unexpected or bad:
        other = _which_resnet(state)
        if other is not None and other != backbone.name:
            raise ConfigError(
                f"{what} {path} holds {other} weights, not {backbone.name} ones; choose a model "
                f"with a {other} backbone (model.backbone={other}, e.g. model=bisenet_r"
                f"{other[len('resnet'):]}) or pass {backbone.name} weights")
        if missing or unexpected:
            raise ConfigError(
                f"{what} {path} does not fit a {backbone.name} backbone (weights of another "
                f"network?): {len(missing)} missing keys {missing[:3]}, {len(unexpected)} "
                f"unexpected keys {unexpected[:3]}; pass a {backbone.name} state dict, "
                "model.pretrained=imagenet, or null")
        k = bad[0]
        raise ConfigError(
            f"{what} {path} does not fit a {backbone.name} backbone: {len(bad)} shape "
            f"mismatches, e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}; pass a "
            f"{backbone.name} state dict, model.pretrained=imagenet, or null")
    backbone.load_state_dict(state, strict=True)


#: (backbone, file, size, mtime) of weights already proven to load in this process
_CHECKED: set[tuple] = set()


def check_pretrained(backbone: str, pretrained: str | os.PathLike | None) -> None:
    """Load ``pretrained`` into a ``backbone`` once, to refuse a file that is not usable (one
    line: what the file is and what to pass) before a dataset is generated or a run folder is
    made, rather than when step 0 builds its model. Remembered per file in this process."""
    found = pretrained_file(backbone, pretrained)
    if found is None:
        return
    st = found[0].stat()
    key = (backbone, str(found[0].resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CHECKED:
        ResNetBackbone(backbone, pretrained)
        _CHECKED.add(key)

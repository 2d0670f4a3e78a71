"""timm's ImageNet weights (``model.pretrained=imagenet``) and weights files for timm encoders.

timm's weights live on the Hugging Face hub (``timm/<name>.<tag>``); timm's own
``pretrained=True`` fetches them into the hub cache with ``huggingface_hub``. Here the file is
found in that cache first (read offline), fetched when missing and allowed, and a one-line error
names the model and the cache when ``HF_HUB_OFFLINE`` forbids the fetch. The file then goes to
timm as a state dict, so timm's checkpoint filters (Swin's, ConvNeXt's) still apply.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from incseg.errors import ConfigError

__all__ = ["LoadReport", "check_normalisation", "classifier_of", "hf_hub_cache", "line",
           "pretrained_cfg", "read_weights", "resolve_weights", "timm_weights_file"]


def line(err: BaseException) -> str:
    """An exception's first line without its full stop, to quote inside a one-line error."""
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


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


def _offline() -> str | None:
    """What forbids a download, as ``NAME=value``: huggingface_hub's ``HF_HUB_OFFLINE`` (its
    truthy spellings), or the suite's ``INCSEG_OFFLINE`` (set, not 0), which also stops
    torchvision's downloads; None when neither does."""
    hf = os.environ.get("HF_HUB_OFFLINE", "").strip()
    if hf.upper() in ("1", "ON", "YES", "TRUE"):
        return f"HF_HUB_OFFLINE={hf}"
    own = os.environ.get("INCSEG_OFFLINE", "")
    if own not in ("", "0"):
        return f"INCSEG_OFFLINE={own}"
    return None


def pretrained_cfg(name: str):
    """timm's pretrained config of ``name`` (``arch.tag``; the arch alone means its default
    tag); ConfigError (one line) for an unknown tag or a tag without Hugging Face hub weights."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as err:  # an unknown pretrained tag
        raise ConfigError(f"model.encoder={name}: {line(err)}; list the tags with "
                          f"timm.list_pretrained('{name.split('.')[0]}*')") from None
    if cfg is None or not cfg.hf_hub_id:
        raise ConfigError(f"model.pretrained=imagenet: timm has no Hugging Face hub weights for "
                          f"{name}; name a tag that has (timm.list_pretrained()), pass a weights "
                          "file as model.pretrained=PATH, or set model.pretrained=null")
    return cfg


def timm_weights_file(name: str, download: bool = False) -> Path | None:
    """The local file of timm's ImageNet weights for ``name`` (``arch.tag``), from the Hugging
    Face hub cache; with ``download`` fetched into it when missing (what timm's
    ``pretrained=True`` would do). Raises ConfigError (one line) when the file is not there and
    ``HF_HUB_OFFLINE`` or ``INCSEG_OFFLINE`` forbids fetching it, or the download
    fails; without ``download``, None for a file still to be fetched. The file names are
    timm's: ``model.safetensors``, else ``pytorch_model.bin``."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    cfg = pretrained_cfg(name)
    repo, _, revision = str(cfg.hf_hub_id).partition("@")
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors",
                                                               "pytorch_model.bin"]
    cache = hf_hub_cache()
    for fname in files:
        hit = try_to_load_from_cache(repo, fname, cache_dir=cache, revision=revision or None)
        if isinstance(hit, str):
            return Path(hit)
    offline = _offline()
    if offline:
        raise ConfigError(
            f"model.pretrained=imagenet: timm's weights of {name} (hub repo {repo}) are not in "
            f"the Hugging Face hub cache {cache} and {offline} forbids downloading them; run "
            f"once with network access (without {offline.split('=')[0]}), point HF_HUB_CACHE at "
            "a cache that holds them, or set model.pretrained=null to train from scratch")
    if not download:
        return None  # fetched when the model is built (the config check does not download)
    for fname in files:
        try:
            # HF_ENDPOINT read now, like the cache: a mirror set after huggingface_hub's import
            return Path(hf_hub_download(repo, fname, revision=revision or None, cache_dir=cache,
                                        endpoint=os.environ.get("HF_ENDPOINT") or None))
        except LocalEntryNotFoundError as err:  # huggingface_hub's "check your connection"
            failed = err
        except EntryNotFoundError:  # the repo has no such file: timm's next candidate
            continue
        except Exception as err:  # HTTP and disk errors: not fetched
            failed = err
        raise ConfigError(
            f"model.pretrained=imagenet: cannot download timm's weights of {name} from the "
            f"Hugging Face hub ({repo}/{fname}: {line(failed)}) into {cache}; check the "
            "network, or set model.pretrained=null to train from scratch") from None
    raise ConfigError(f"model.pretrained=imagenet: the hub repo {repo} holds none of "
                      f"{', '.join(files)}; pass a weights file as model.pretrained=PATH")


def resolve_weights(name: str, pretrained, download: bool) -> tuple[Path | None, str] | None:
    """None (from scratch), or the file ``pretrained`` names and what it is (the path is None
    for ImageNet weights still to be fetched when ``download`` is off: the config check)."""
    if pretrained is None or str(pretrained).strip().lower() in ("", "none", "null"):
        return None
    if isinstance(pretrained, str) and pretrained.strip().lower() == "imagenet":
        return timm_weights_file(name, download=download), "timm ImageNet weights"
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.pretrained={pretrained}: no such file; give a timm state dict "
                          f"of {name}, 'imagenet', or null to train from scratch")
    return path, "model.pretrained file"


def read_weights(path: Path, what: str) -> dict[str, Tensor]:
    """The state dict in ``path`` (``.safetensors``, else a ``torch.save`` file read with
    ``weights_only=True``, optionally wrapped as ``{"state_dict": ...}``); ConfigError (one
    line) for a file that is neither."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # a truncated or foreign file: its reader's own error types
            raise ConfigError(f"cannot read {what} {path} as safetensors: {line(err)}") \
                from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle and zip errors come in many types
        raise ConfigError(f"cannot read {what} {path} as a torch state dict: {line(err)}") \
            from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConfigError(f"{what} {path} is not a state dict (a mapping of names to tensors)")
    return dict(obj)


def classifier_of(name: str):
    """The classifier's module name(s) in timm's pretrained config of ``name`` (None if none)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:
        return None
    return cfg.classifier if cfg is not None else None


class LoadReport(logging.Handler):
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

    def __enter__(self) -> LoadReport:
        self._level = self._logger.level
        self._logger.addHandler(self)
        self._logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)


def check_normalisation(name: str, pretrained) -> None:
    """ImageNet weights expect the images normalised as they were trained; the suite's loaders
    normalise with the ImageNet mean / std (``incseg.data.transforms``), so a tag trained with
    other statistics (CLIP's, Inception's 0.5) is refused rather than fed shifted inputs."""
    if not (isinstance(pretrained, str) and pretrained.strip().lower() == "imagenet"):
        return
    from incseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    cfg = pretrained_cfg(name)
    close = all(abs(a - b) < 1e-3 for a, b in zip((*cfg.mean, *cfg.std),
                                                   (*IMAGENET_MEAN, *IMAGENET_STD)))
    if not close:
        raise ConfigError(f"model.pretrained=imagenet: timm's {name} was trained on images "
                          f"normalised with mean {tuple(cfg.mean)} / std {tuple(cfg.std)}, and "
                          "the suite normalises with ImageNet's (0.485, 0.456, 0.406) / (0.229, "
                          "0.224, 0.225); choose a tag trained with those (e.g. *.fb_in1k, "
                          "*.ms_in1k)")

"""Model zoo: BiSeNet V1 with ResNet-18/50/101 context paths, and DeepLabV3 with a dilated
ResNet-50/101 (MiB / PLOP), each with incremental heads; both also on any timm encoder
(``timm_encoders``: ConvNeXt, Swin, ResNet-D, EfficientNet, ...).

A model is any ``nn.Module`` satisfying :class:`SegmentationModel` (``models/base.py``), built
from its YAML in ``conf/model/`` by ``_target_``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from incseg.models import backbones
from incseg.models.backbones import ResNetBackbone
from incseg.models.base import (
    FEATURE_KEYS,
    OPTIONAL_FEATURE_KEYS,
    SegmentationModel,
    SegOutput,
    model_output,
)
from incseg.models.bisenet import BiSeNet
from incseg.models.deeplab import DeepLabV3
from incseg.models.heads import IncrementalHead
from incseg.models.pooling import LSELBAPool, lse_lba_pool
from incseg.models.timm_encoders import TimmEncoder
from incseg.models.timm_models import TimmBiSeNet, TimmDeepLabV3

__all__ = [
    "FEATURE_KEYS", "OPTIONAL_FEATURE_KEYS", "BiSeNet", "DeepLabV3", "IncrementalHead",
    "LSELBAPool", "ResNetBackbone", "SegOutput", "SegmentationModel", "TimmBiSeNet",
    "TimmDeepLabV3", "TimmEncoder", "build_model", "check_pretrained", "lse_lba_pool",
    "model_config", "model_names", "model_output",
]


def model_names() -> list[str]:
    """The ``model=`` choices: the YAML files of ``conf/model``."""
    from incseg.config import CONF_DIR

    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def model_config(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """A model's config as a plain dict: ``spec`` itself, or ``conf/model/<spec>.yaml``."""
    from omegaconf import OmegaConf

    from incseg.config import CONF_DIR
    from incseg.config.build import plain

    if isinstance(spec, str):
        path = CONF_DIR / "model" / f"{spec}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown model {spec!r}; choose one of: {', '.join(model_names())}")
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return dict(plain(spec))


def build_model(spec: str | Mapping[str, Any], classes_per_step: Sequence[int],
                pretrained: Any = None) -> SegmentationModel:
    """The model ``spec`` names (a ``conf/model`` name or a config with ``_target_``) with
    ``classes_per_step`` outputs. ``pretrained`` replaces the config's own: a checkpoint's
    weights are loaded over a fresh model, so rebuilding one never needs the ImageNet file."""
    from incseg.config.build import instantiate

    node = model_config(spec)
    if "pretrained" in node or pretrained is not None:
        node["pretrained"] = pretrained
    return instantiate(node, classes_per_step=[int(c) for c in classes_per_step])


def check_pretrained(spec: str | Mapping[str, Any]) -> None:
    """Refuse now, with one line, a ``model.pretrained`` file that the model's ResNet
    ``backbone`` cannot load (not a torch file, a pickled model, another network's weights):
    the entry point calls this before the dataset is prepared or a run folder made. A model
    without a ResNet ``backbone`` key checks its own weights when it is built."""
    node = model_config(spec)
    if node.get("pretrained") is not None and node.get("backbone") in backbones.RESNETS:
        backbones.check_pretrained(node["backbone"], node["pretrained"])

"""The checks of a run that need the objects its config names, run once before anything
trains or is written: the model, the method and the replay term are built (or their class's own
``check_config`` is asked), and what they raise becomes one line naming the key.

The config layer (``incseg.config``) checks values only and imports none of the packages that
define these objects; this check sits above them, so each object validates its own arguments
where it is built, and a new method's or model's arguments are checked with no edit here.
``python -m incseg.run`` calls :func:`check_run` before Hydra starts the job and again in each
job of a sweep.
"""

from __future__ import annotations

import re

import torch
from omegaconf import DictConfig
from torch import nn

from incseg.config import validate
from incseg.config.build import constructor_kwargs, has_target, plain, target_class
from incseg.errors import ConfigError
from incseg.losses import REPLAY_LOSSES
from incseg.methods import build_method, is_joint, method_prediction
from incseg.protocol.teachers import student_model_config
from incseg.replay.settings import InversionSettings
from incseg.replay.term import ReplaySpec


def check_run(cfg: DictConfig) -> None:
    """The config's own values (:func:`incseg.config.validate`), then the objects it names."""
    validate(cfg)
    _check_model(cfg)
    _check_method(cfg)
    _check_replay(cfg)


def _check_model(cfg: DictConfig) -> None:
    node = cfg.model
    if not has_target(node):
        raise ConfigError(f"model {node.get('name')!r} names no _target_ class in conf/model")
    try:
        cls = target_class(node)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"model._target_={node._target_!r} cannot be imported ({err})") from None
    # e.g. "imagenet" must already be in the torch hub cache: fail now, not at step 0
    check = getattr(cls, "check_config", None)
    if check is not None:
        try:
            check(**constructor_kwargs(node))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model={node.get('name')}: {err}") from None


def _check_method(cfg: DictConfig) -> None:
    if is_joint(cfg.method):
        return
    try:
        build_method(cfg.method)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"method._target_={cfg.method.get('_target_')!r} cannot be imported "
                          f"({err})") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"method={cfg.method.get('name')}: {err}; check method.* "
                          "overrides against conf/method") from None


def _check_replay(cfg: DictConfig) -> None:
    """``replay.*`` and the generator settings are otherwise first read at step 1, after step
    0 has trained."""
    rc = cfg.get("replay")
    if rc is None or rc.get("name", "none") == "none":
        return
    if rc.get("loss") not in REPLAY_LOSSES:
        raise ConfigError(f"unknown replay.loss {rc.get('loss')!r}; choose one of: "
                          f"{', '.join(REPLAY_LOSSES)} (e.g. replay.loss=mse)")
    try:
        prediction = method_prediction(cfg.method)
    except (ImportError, AttributeError):
        prediction = "argmax"  # the method check names the missing class
    try:
        ReplaySpec.from_config(plain(rc), prediction)
    except ValueError as err:
        if re.match(r"\w+=", str(err)):  # a value out of range, named by its key
            raise ConfigError(f"replay.{err}") from None
        raise ConfigError(f"replay config: {err}; replay.weight and replay.temperature must be "
                          "numbers") from None
    except (TypeError, KeyError) as err:
        raise ConfigError(f"replay config: {err}; replay.weight and replay.temperature must be "
                          "numbers") from None
    if rc.get("name") == "deepinversion":
        check_replay_model(cfg)
    settings = InversionSettings.from_dict(plain(cfg.get("inversion")) or {})
    if settings.competition and rc.get("name") == "deepinversion":
        _check_competition_student(cfg)


def check_replay_model(cfg: DictConfig) -> None:
    """DeepInversion (Yin et al., CVPR 2020; NVlabs/DeepInversion) makes its images by matching
    the batch statistics of the teacher's BatchNorm inputs to their running statistics, layer by
    layer, the first one (next to the pixels) weighted x10. An encoder normalised otherwise
    (ConvNeXt's and Swin's LayerNorms) leaves that prior only the few BatchNorms outside it
    (three in MiB's ASPP), all far from the pixels: refused in one line rather than run as a
    much weaker method under DeepInversion's name. The model is built on the meta device (no
    weight made, nothing read or downloaded) to count its BatchNorms."""
    from incseg.models import build_model

    bn_type = nn.modules.batchnorm._BatchNorm
    try:
        with torch.device("meta"):
            model = build_model(cfg.model, [2], pretrained=None)
    except Exception:  # a user's model that needs real tensors to build: not judged here
        return
    encoder = getattr(model, "backbone", None)
    in_encoder = sum(isinstance(m, bn_type) for m in encoder.modules()) \
        if isinstance(encoder, nn.Module) else None
    total = sum(isinstance(m, bn_type) for m in model.modules())
    if total and in_encoder != 0:
        return
    name = cfg.model.get("name")
    what = cfg.model.get("encoder") or cfg.model.get("backbone") or name
    rest = f"; the {total} BatchNorms outside its encoder alone are too weak a prior" \
        if total else ""
    raise ConfigError(
        f"replay=deepinversion: model={name} has no BatchNorm in its encoder ({what}), and "
        "DeepInversion makes its images by matching the teacher's BatchNorm statistics "
        f"(Yin et al., CVPR 2020){rest}; use a BatchNorm encoder (model=deeplabv3_resnet50d, "
        "deeplabv3_efficientnet_b0, deeplabv3_r101, bisenet_r18) or another replay "
        "(replay=exemplars, replay=noise, replay=none)")


def _check_competition_student(cfg: DictConfig) -> None:
    """Adaptive DeepInversion's student is built at step 1, after step 0 has trained."""
    node = student_model_config(cfg)

    def arch(n) -> dict:
        return {k: v for k, v in plain(n).items() if k not in ("name", "label")}

    if arch(node) == arch(cfg.model):
        raise ConfigError(f"inversion.competition=true: the competition student would be "
                          f"model={cfg.model.get('name')} itself, at step 1 the teacher (no "
                          "competition); use a larger teacher (e.g. model=bisenet_r50) or name "
                          "another student with inversion.student_model=NAME")
    check = getattr(target_class(node), "check_config", None)
    if check is not None:
        try:
            check(**constructor_kwargs(node))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"inversion.student_model={node.get('name')}: {err}") from None

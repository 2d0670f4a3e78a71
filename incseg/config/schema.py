"""The one check of a composed config, run once before anything trains or is written.

Every user error ends here in one line that names the key and the fix (docs/errors.md); code
deeper down raises ``ValueError`` for values it cannot take and trusts this check for the rest.
Objects named by ``_target_`` (the method, the model) are checked by building them, or by the
model class's own ``check_config``, so a new method's or model's arguments are validated with no
edit here.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from incseg.config.build import constructor_kwargs, has_target, plain, target_class
from incseg.errors import ConfigError

CHOICES = {
    "resume": ("auto", "never"),
    "data.unseen_as": ("ignore", "background"),
    "data.test_mode": ("resize", "full"),
}


def _int(cfg: DictConfig, key: str, example: int = 16) -> int:
    value = OmegaConf.select(cfg, key)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a whole number; pass e.g. "
                          f"{key}={example}") from None


def validate(cfg: DictConfig) -> None:
    from incseg.config import task_from_cfg

    task_from_cfg(cfg)  # the split (one-line error on a bad one)
    _check_model(cfg)
    for key, valid in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in valid:
            raise ConfigError(f"{key}={value!r} is not valid; use "
                              f"{' or '.join(f'{key}={v}' for v in valid)}")
    for key in ("batch_size", "crop"):
        if _int(cfg, f"data.{key}") < (2 if key == "batch_size" else 8):
            raise ConfigError(f"data.{key}={cfg.data[key]} is too small (BatchNorm after global "
                              "pooling needs a batch of at least 2; crops of at least 8 px)")
    for key in ("epochs", "epochs_incremental"):
        if _int(cfg, f"train.{key}") < 1:
            raise ConfigError(f"train.{key} must be at least 1")
    _int(cfg, "seed")
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
    from incseg.methods import build_method, is_joint

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
    from incseg.losses import REPLAY_LOSSES
    from incseg.replay.term import ReplaySpec

    rc = cfg.get("replay")
    if rc is None or rc.get("name", "none") == "none":
        return
    if rc.get("loss") not in REPLAY_LOSSES:
        raise ConfigError(f"unknown replay.loss {rc.get('loss')!r}; choose one of: "
                          f"{', '.join(REPLAY_LOSSES)} (e.g. replay.loss=mse)")
    try:
        ReplaySpec.from_config(plain(rc))
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"replay config: {err}; replay.weight and replay.temperature must be "
                          "numbers") from None
    from incseg.replay import InversionSettings

    InversionSettings.from_dict(plain(cfg.get("inversion")) or {})

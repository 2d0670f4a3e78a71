"""The one check of a composed config, run once before anything trains or is written.

Every user error ends here in one line that names the key and the fix (docs/errors.md); code
deeper down raises ``ValueError`` for values it cannot take and trusts this check for the rest.
Objects named by ``_target_`` (the method, the model) are checked by building them, or by the
model class's own ``check_config``, so a new method's or model's arguments are validated with no
edit here.
"""

from __future__ import annotations

import re

from omegaconf import DictConfig, OmegaConf

from incseg.config.build import constructor_kwargs, has_target, plain, target_class
from incseg.errors import ConfigError

#: example values in messages
DEFAULTS = OmegaConf.create({"train": {"lr": 0.01, "lr_incremental": 0.001, "momentum": 0.9,
                                       "weight_decay": 1e-4, "poly_power": 0.9},
                             "data": {"augment": {"rotation": 0, "color_jitter": 0}},
                             "trainer": {"timeout_s": 1800}})

CHOICES = {
    "resume": ("auto", "never"),
    "data.unseen_as": ("ignore", "background"),
    "data.test_mode": ("resize", "full"),
    "data.val": ("split", "holdout", "none"),
    "train.loss_reduction": ("valid", "all"),
}
#: keys that only some dataset presets define (checked when present)
OPTIONAL_CHOICES = {
    "data.ade_class0": ("ignore", "score"),
}


def _int(cfg: DictConfig, key: str, example: int = 16) -> int:
    value = OmegaConf.select(cfg, key)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a whole number; pass e.g. "
                          f"{key}={example}") from None


#: keys that must be true or false (``overlap=maybe`` would otherwise run as some truth value)
BOOLEANS = ("overlap", "data.void_as_background", "data.augment.hflip", "train.nesterov",
            "protocol.step0_cache", "trainer.progress_bar")
#: numbers and the range they must be in: (key, lowest, lowest allowed?, below this)
NUMBERS = (("train.lr", 0.0, False, None), ("train.lr_incremental", 0.0, False, None),
           ("train.momentum", 0.0, True, 1.0), ("train.weight_decay", 0.0, True, None),
           ("train.poly_power", 0.0, True, None), ("data.augment.rotation", 0.0, True, None),
           ("data.augment.color_jitter", 0.0, True, None))


def _check_number(cfg: DictConfig, key: str, low: float, closed: bool, high) -> None:
    value = OmegaConf.select(cfg, key)
    try:
        x = float(value)
        ok = (x >= low if closed else x > low) and (high is None or x < high)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a number; pass e.g. "
                          f"{key}={OmegaConf.select(DEFAULTS, key)}") from None
    if not ok:
        rng = f"{'>=' if closed else '>'} {low:g}" + ("" if high is None else f" and < {high:g}")
        raise ConfigError(f"{key}={value} is out of range: it must be {rng}")


def _check_devices(cfg: DictConfig) -> None:
    """``trainer.devices``: a count >= 1, a list of device ids, or auto; ``num_nodes`` >= 1."""
    tc = cfg.trainer
    devices = tc.get("devices", 1)
    if isinstance(devices, str) and devices.strip() in ("auto", "-1"):
        return
    if OmegaConf.is_list(devices):
        if len(devices) == 0:
            raise ConfigError("trainer.devices=[] names no device; pass a count (e.g. "
                              "trainer.devices=2), a list of ids or auto")
    elif isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"trainer.devices={devices!r} is not valid; pass a count of at least 1 "
                          "(e.g. trainer.devices=2), a list of ids or auto")
    if "num_nodes" in tc and _int(cfg, "trainer.num_nodes", example=1) < 1:
        raise ConfigError(f"trainer.num_nodes={tc.num_nodes} must be at least 1")
    if "timeout_s" in tc:  # the DDP process group's timeout (docs/distributed.md)
        _check_number(cfg, "trainer.timeout_s", 0.0, False, None)


def validate(cfg: DictConfig) -> None:
    from incseg.config import task_from_cfg

    task_from_cfg(cfg)  # the split (one-line error on a bad one)
    _check_model(cfg)
    for key, valid in (*CHOICES.items(), *OPTIONAL_CHOICES.items()):
        value = OmegaConf.select(cfg, key)
        if value not in valid and not (key in OPTIONAL_CHOICES and value is None):
            raise ConfigError(f"{key}={value!r} is not valid; use "
                              f"{' or '.join(f'{key}={v}' for v in valid)}")
    _check_val_split(cfg)
    for key in BOOLEANS:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not a boolean; use {key}=true or "
                              f"{key}=false")
    for number in NUMBERS:
        _check_number(cfg, *number)
    _check_devices(cfg)
    for key in ("batch_size", "crop"):
        if _int(cfg, f"data.{key}") < (2 if key == "batch_size" else 8):
            raise ConfigError(f"data.{key}={cfg.data[key]} is too small (BatchNorm after global "
                              "pooling needs a batch of at least 2; crops of at least 8 px)")
    for key in ("epochs", "epochs_incremental"):
        if _int(cfg, f"train.{key}") < 1:
            raise ConfigError(f"train.{key} must be at least 1")
    _int(cfg, "seed", example=0)
    _check_method(cfg)
    _check_replay(cfg)
    _check_memory(cfg)


def _check_val_split(cfg: DictConfig) -> None:
    """``data.val=split`` reads the dataset's own validation list; VOC and ADE20K ship none
    (their val would be the test images)."""
    from incseg.data.sources import SOURCES

    source = SOURCES.get(str(cfg.dataset.name))
    if cfg.data.val == "split" and source is not None and not source.own_val:
        raise ConfigError(f"data.val=split: {cfg.dataset.name} has no validation split of its "
                          "own (its val images are the test images); use data.val=holdout "
                          "(1 in 20 training images, held out of training) or data.val=none")


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
    except ValueError as err:
        if re.match(r"\w+=", str(err)):  # a value out of range, named by its key
            raise ConfigError(f"replay.{err}") from None
        raise ConfigError(f"replay config: {err}; replay.weight and replay.temperature must be "
                          "numbers") from None
    except (TypeError, KeyError) as err:
        raise ConfigError(f"replay config: {err}; replay.weight and replay.temperature must be "
                          "numbers") from None
    from incseg.replay import InversionSettings

    settings = InversionSettings.from_dict(plain(cfg.get("inversion")) or {})
    if settings.competition and rc.get("name") == "deepinversion":
        _check_competition_student(cfg)


def _check_competition_student(cfg: DictConfig) -> None:
    """Adaptive DeepInversion's student is built at step 1, after step 0 has trained."""
    from incseg.protocol.teachers import student_model_config

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


def _check_memory(cfg: DictConfig) -> None:
    """The labelled exemplar memory (``memory.*``); whether the data hold ``memory.size``
    images is checked with the data (``incseg.protocol.memory.check_memory_size``)."""
    from incseg.data.memory import MEMORY_LABELS, MEMORY_MIX

    mem = cfg.get("memory")
    if mem is None:
        return
    size = mem.get("size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ConfigError(f"memory.size={size!r} is not valid; pass the number of images the "
                          "memory keeps, a whole number >= 0 (0: no memory), e.g. "
                          "memory.size=100")
    for key, valid in (("labels", MEMORY_LABELS), ("mix", MEMORY_MIX)):
        if mem.get(key) not in valid:
            raise ConfigError(f"memory.{key}={mem.get(key)!r} is not valid; use "
                              f"{' or '.join(f'memory.{key}={v}' for v in valid)}")

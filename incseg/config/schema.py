"""The check of a composed config's own values, run once before anything trains or is written.

Every user error ends in one line that names the key and the fix (docs/errors.md); code deeper
down raises ``ValueError`` for values it cannot take and trusts this check for the rest. This
layer reads values only: what needs the objects a config names by ``_target_`` (the model, the
method, the replay term) is checked by building them, in ``incseg.protocol.preflight``, above
the packages that define them, so a new method's or model's arguments are validated with no
edit here.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from incseg.config.inputs import task_from_cfg
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
    "eval.hiou": ("suite", "dkd"),  # in config.yaml; optional for a config saved before it
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
    task_from_cfg(cfg)  # the split (one-line error on a bad one)
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

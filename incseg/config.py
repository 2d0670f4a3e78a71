"""Configuration: the Hydra config tree, its resolvers, and early validation.

One option system: everything is a Hydra override. ``compose`` gives the same config as the
``@hydra.main`` entry for the data CLI and the tests.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from incseg.errors import ConfigError
from incseg.io import stable_hash

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _plain(x):
    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    return x


def task_dirname(name: str, steps) -> str:
    """Folder name of a task in run paths: the canonical split name (``15-1`` -> ``15-5s``), or
    ``<name>-<hash of the steps>`` for a custom split, so two custom splits never collide."""
    from incseg.tasks import ALIASES

    steps = _plain(steps)
    if steps in (None, "???"):
        return ALIASES.get(str(name), str(name))
    return f"{name}-{stable_hash(steps, 8)}"


def run_path(dataset: str, task: str, steps, method: str, replay: str, seed,
             replay_loss: str | None = None, replay_weight=None) -> str:
    """``<dataset>/<task>/<method>[+<replay>-<loss>[-w<weight>]]/seed<seed>`` (SPEC 8).

    Replay carries its distance in the name (``mib+deepinversion-kl``, ``mib+exemplars-mse``)
    and, when ``replay.weight`` is set, its weight (``mib+deepinversion-mse-w0.1``): a sweep
    over either would otherwise put several configs in one run directory, and a command-line
    ``replay.weight=...`` would meet the default run's directory (an error, not a resume).
    """
    def unset(v) -> bool:
        return v is None or str(v) in ("none", "None", "null")

    m = method if unset(replay) else f"{method}+{replay}"
    if not unset(replay) and not unset(replay_loss):
        m = f"{m}-{replay_loss}"
    if not unset(replay) and not unset(replay_weight):
        m = f"{m}-w{float(replay_weight):g}"
    return f"{dataset}/{task_dirname(task, steps)}/{m}/seed{seed}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_path"):
        OmegaConf.register_new_resolver("run_path", run_path)


register_resolvers()


def compose(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """The composed config for ``overrides``, as ``python -m incseg.run`` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides),
                                 return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(hydra_message(str(err))) from None


def one_line(msg: str) -> str:
    """Hydra's messages span several lines; keep the first meaningful one."""
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    return lines[0] if lines else msg


def hydra_message(msg: str) -> str:
    """A Hydra composition error as one line that says what to do.

    Hydra's advice for a misspelt key ("To append to your config use +foo=1") would silently add
    a key nothing reads; the useful fix is the spelling.
    """
    unknown = re.match(r"Could not override '([^']+)'", msg.strip())
    if unknown:
        key = unknown.group(1)
        return (f"unknown config key {key!r}; check its spelling (`python -m incseg.run --cfg "
                "job` prints every key)")
    lines = [ln.strip().rstrip(".") for ln in msg.strip().splitlines() if ln.strip()]
    if any("override_grammar" in ln for ln in lines):
        return (f"cannot parse an override ({lines[0]}); check its brackets and quotes, e.g. "
                "task.steps='[[0,1,2],[3]]' (grammar: "
                "https://hydra.cc/docs/advanced/override_grammar/basic/)")
    return "; ".join(lines) if lines else msg


def task_from_cfg(cfg: DictConfig):
    from incseg.tasks import get_task

    steps = _plain(cfg.task.get("steps"))
    if cfg.task.name == "custom" and steps in (None, "???"):
        raise ConfigError("task=custom needs task.steps, e.g. task.steps=[[0,1,2,3],[4,5]]")
    return get_task(cfg.dataset.name, str(cfg.task.name), steps)


def cache_dir_from_cfg(cfg: DictConfig) -> Path:
    from incseg.io import cache_dir

    return cache_dir(cfg.paths.cache_dir)


def source_from_cfg(cfg: DictConfig, progress: bool = True):
    """The dataset source; for ``shapes`` without ``data.root`` the cached generated copy."""
    from incseg.data.sources import make_source

    root = cfg.data.get("root")
    if cfg.dataset.name == "shapes" and root in (None, "", "null"):
        from incseg.data.shapes import ShapesParams, ensure_shapes

        params = ShapesParams.from_dict(_plain(cfg.dataset.get("generator")) or {})
        root = ensure_shapes(params, cache_dir_from_cfg(cfg), progress=progress)
    return make_source(cfg.dataset.name, root)


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines go to stderr, so a command's JSON on stdout stays clean."""
    root = logging.getLogger()
    if not root.handlers:  # under @hydra.main, Hydra's job_logging already sends them to stderr
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s",
                                               "%H:%M:%S"))
        handler._incseg = True
        root.addHandler(handler)
    root.setLevel(level)


#: config groups a user picks with ``group=option`` (SPEC 11)
GROUPS = ("dataset", "task", "model", "method", "replay", "trainer", "logger", "experiment")


def check_overrides(argv: Sequence[str]) -> None:
    """Reject an unknown group option (``task=bogus``) with one line listing the valid ones,
    before Hydra prints its multi-line composition error. Sweeps (``a,b``) are checked per value.
    """
    for arg in argv:
        if "=" not in arg or arg.startswith(("+", "~", "hydra")):
            continue
        key, value = arg.split("=", 1)
        if key not in GROUPS or value in ("", "null") or value.startswith(("choice(", "glob(")):
            continue
        folder = CONF_DIR / key
        options = sorted(str(p.relative_to(folder).with_suffix(""))
                         for p in folder.rglob("*.yaml"))
        for v in value.split(","):
            if v not in options:
                raise ConfigError(f"unknown {key} {v!r}; choose one of: {', '.join(options)}")


def _int(cfg: DictConfig, key: str) -> int:
    value = OmegaConf.select(cfg, key)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a whole number; pass e.g. {key}=16") from None


def validate(cfg: DictConfig) -> None:
    """Check the whole config before anything trains or is written (SPEC 9): task, model,
    pretrained weights, method, replay, data keys. Each failure is one line with its fix."""
    from incseg.models import MODELS
    from incseg.models.backbones import pretrained_file

    task_from_cfg(cfg)  # validates the split (one-line error on a bad one)
    if cfg.model.name not in MODELS:
        raise ConfigError(f"unknown model {cfg.model.name!r}; choose one of {', '.join(MODELS)}")
    # "imagenet" must already be in the torch hub cache: fail now, not at step 0 after the scan.
    pretrained_file(MODELS[cfg.model.name], cfg.model.get("pretrained"))
    if cfg.get("resume", "auto") not in ("auto", "never"):
        raise ConfigError(f"resume={cfg.resume!r} is not valid; use resume=auto or resume=never")
    if cfg.data.unseen_as not in ("ignore", "background"):
        raise ConfigError(f"data.unseen_as={cfg.data.unseen_as!r}: use ignore or background")
    if cfg.data.test_mode not in ("resize", "full"):
        raise ConfigError(f"data.test_mode={cfg.data.test_mode!r}: use resize or full")
    for key in ("batch_size", "crop"):
        if _int(cfg, f"data.{key}") < (2 if key == "batch_size" else 8):
            raise ConfigError(f"data.{key}={cfg.data[key]} is too small (BatchNorm after global "
                              "pooling needs a batch of at least 2; crops of at least 8 px)")
    for key in ("epochs", "epochs_incremental"):
        if _int(cfg, f"train.{key}") < 1:
            raise ConfigError(f"train.{key} must be at least 1")
    _int(cfg, "seed")
    from incseg.protocol import method_spec

    if not cfg.method.get("joint", False):
        method_spec(cfg)
    _validate_replay(cfg)


def _validate_replay(cfg: DictConfig) -> None:
    """``replay.loss`` and the inversion settings are otherwise first read at step 1, after
    step 0 has trained."""
    rc = cfg.get("replay")
    if rc is None or rc.get("name", "none") == "none":
        return
    from incseg.losses import REPLAY_LOSSES
    from incseg.protocol import replay_spec
    from incseg.replay import InversionSettings

    if rc.get("loss") not in REPLAY_LOSSES:
        raise ConfigError(f"unknown replay.loss {rc.get('loss')!r}; choose one of: "
                          f"{', '.join(REPLAY_LOSSES)} (e.g. replay.loss=mse)")
    try:
        replay_spec(cfg)
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"replay config: {err}; replay.weight and replay.temperature must be "
                          "numbers") from None
    InversionSettings.from_dict(_plain(cfg.get("inversion")) or {})

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

from omegaconf import DictConfig, OmegaConf

from incseg.config.build import plain as _plain
from incseg.config.inputs import cache_dir_from_cfg, source_from_cfg, task_from_cfg
from incseg.config.schema import validate
from incseg.errors import ConfigError
from incseg.io import stable_hash

__all__ = [
    "CONF_DIR", "GROUPS", "NAMED_KEYS", "cache_dir_from_cfg", "check_overrides", "compose",
    "hydra_message", "one_line", "overrides_hash", "register_resolvers", "run_path",
    "search_path_dirs", "setup_logging", "source_from_cfg", "task_dirname", "task_from_cfg",
    "validate",
]

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"



def task_dirname(name: str, steps) -> str:
    """Folder name of a task in run paths: the canonical split name (``15-1`` -> ``15-5s``), or
    ``<name>-<hash of the steps>`` for a custom split, so two custom splits never collide."""
    from incseg.tasks import ALIASES

    steps = _plain(steps)
    if steps in (None, "???"):
        return ALIASES.get(str(name), str(name))
    return f"{name}-{stable_hash(steps, 8)}"


#: overrides that never name a run directory: the readable part holds them already, or they do
#: not change the numbers (where things are written, logging, resuming, loader processes)
NAMED_KEYS = ("dataset", "task", "task.name", "task.steps", "method", "method.name", "replay",
              "replay.name", "replay.loss", "seed", "experiment", "resume", "logger",
              "trainer.progress_bar", "trainer.timeout_s", "data.num_workers")
UNNAMED_PREFIXES = ("paths.", "hydra.", "hydra/", "logger.", "+paths.", "+hydra.")


def overrides_hash(overrides) -> str | None:
    """A short hash of the command-line overrides that change a run but are not in the
    readable part of its directory name (None when there are none). ``a.b=1`` and ``a.b=1.0``
    differ: the hash is of the words typed, in sorted order."""
    keep = []
    for ov in _plain(overrides) or ():
        key = str(ov).split("=", 1)[0].lstrip("+~")
        if key in NAMED_KEYS or str(ov).startswith(UNNAMED_PREFIXES) or \
                key.startswith(UNNAMED_PREFIXES):
            continue
        keep.append(str(ov).lstrip("+"))
    return stable_hash(sorted(keep), 8) if keep else None


def run_path(dataset: str, task: str, steps, method: str, replay: str, seed,
             replay_loss: str | None = None, overrides=None) -> str:
    """``<dataset>/<task>/<method>[+<replay>-<loss>][-<hash>]/seed<seed>``.

    Replay carries its distance in the name (``mib+deepinversion-kl``). Any other override
    that changes the run (``replay.weight=0.1``, ``model=bisenet_r50``, ``method.kd_weight=100``,
    a new method's own hyperparameter) adds a short hash of those overrides, so a sweep over any
    key gets one directory per value without this function knowing the key; the run's
    ``.hydra/overrides.yaml`` and ``results.json`` say which values the hash stands for.
    """
    def unset(v) -> bool:
        return v is None or str(v) in ("none", "None", "null")

    m = method if unset(replay) else f"{method}+{replay}"
    if not unset(replay) and not unset(replay_loss):
        m = f"{m}-{replay_loss}"
    h = overrides_hash(overrides)
    if h:
        m = f"{m}-{h}"
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


#: config groups a user picks with ``group=option``
GROUPS = ("dataset", "task", "model", "method", "replay", "trainer", "logger", "experiment")


def search_path_dirs(argv: Sequence[str]) -> list[Path]:
    """The folders a user adds with ``hydra.searchpath=[file:///path/to/conf]`` or with Hydra's
    ``--config-dir DIR`` (``-cd DIR``): their ``method/``, ``model/`` ... YAMLs are choices like
    the suite's own (docs/extending.md)."""
    dirs = []
    for i, arg in enumerate(argv):
        if arg.startswith("hydra.searchpath="):
            for item in arg.split("=", 1)[1].strip("[]").split(","):
                item = item.strip().strip("'\"")
                if item.startswith("file://"):
                    dirs.append(Path(item[len("file://"):]))
        elif arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith(("--config-dir=", "-cd=")):
            dirs.append(Path(arg.split("=", 1)[1]))
    return dirs


def check_overrides(argv: Sequence[str]) -> None:
    """Reject an unknown group option (``task=bogus``) with one line listing the valid ones,
    before Hydra prints its multi-line composition error. Sweeps (``a,b``) are checked per value.
    """
    roots = [CONF_DIR, *search_path_dirs(argv)]
    for arg in argv:
        if "=" not in arg or arg.startswith(("+", "~", "hydra")):
            continue
        key, value = arg.split("=", 1)
        if key not in GROUPS or value in ("", "null") or value.startswith(("choice(", "glob(")):
            continue
        options = sorted({str(p.relative_to(root / key).with_suffix(""))
                          for root in roots for p in (root / key).rglob("*.yaml")})
        for v in value.split(","):
            if v not in options:
                raise ConfigError(f"unknown {key} {v!r}; choose one of: {', '.join(options)}")

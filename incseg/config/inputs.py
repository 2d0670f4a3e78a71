"""What a config's run reads: its task split, its dataset source and its cache folder.

These sit below the config's check (``incseg.config.schema`` builds the task to check the
split) and below everything that runs a config (the protocol, the data and report commands).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from incseg.config.build import plain as _plain
from incseg.errors import ConfigError


def task_from_cfg(cfg: DictConfig):
    """The config's class split (:class:`incseg.tasks.Task`); a bad one is a one-line
    ConfigError."""
    from incseg.tasks import get_task

    steps = _plain(cfg.task.get("steps"))
    if cfg.task.name == "custom" and steps in (None, "???"):
        raise ConfigError("task=custom needs task.steps, e.g. task.steps=[[0,1,2,3],[4,5]]")
    names = None
    if cfg.dataset.name == "folder":  # its classes (and their names) are in its classes.yaml
        from incseg.data.sources import make_source

        names = make_source("folder", cfg.data.get("root")).class_names
    return get_task(cfg.dataset.name, str(cfg.task.name), steps, names)


def cache_dir_from_cfg(cfg: DictConfig) -> Path:
    from incseg.io import cache_dir

    return cache_dir(cfg.paths.cache_dir)


def source_from_cfg(cfg: DictConfig, progress: bool = True):
    """The dataset source under the validation policy ``data.val``; for ``shapes`` without
    ``data.root`` the cached generated copy."""
    from incseg.data.sources import make_source

    root = cfg.data.get("root")
    if cfg.dataset.name == "shapes" and root in (None, "", "null"):
        from incseg.data.shapes import ShapesParams, ensure_shapes

        params = ShapesParams.from_dict(_plain(cfg.dataset.get("generator")) or {})
        root = ensure_shapes(params, cache_dir_from_cfg(cfg), progress=progress)
    return make_source(cfg.dataset.name, root, cfg.data.get("val"))

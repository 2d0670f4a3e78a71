"""``python -m incseg.run [overrides]``: the Hydra entry point (thin: validate, then run).

Returns the last step's all-mIoU on the *validation* images (``data.val``), so that a Hydra
sweeper that tunes (Optuna) optimises it: never a test-split figure, or the sweep would select
on the numbers it reports. A tuning sweep with no validation (``data.val=none``) is refused
before anything trains.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from incseg.cli import quote_overrides, report_errors
from incseg.config import (
    CONF_DIR,
    cache_dir_from_cfg,
    check_overrides,
    compose,
    setup_logging,
    source_from_cfg,
    task_from_cfg,
)
from incseg.errors import ConfigError
from incseg.heartbeat import heartbeat_interval, wait_grace
from incseg.io import ensure_writable_dir

RUN_DIR_FIX = "hydra.run.dir=DIR (or paths.runs_dir=DIR) with a writable DIR"
CACHE_DIR_FIX = "paths.cache_dir=DIR (or INCSEG_CACHE=DIR) with a writable DIR"


def check_data(cfg: DictConfig) -> None:
    """Scan the dataset and check every step's training images (and that they hold the
    labelled memory) before step 0 trains; the scans are cached, so the protocol reads them
    back for free."""
    from incseg.data.datamodule import check_steps
    from incseg.protocol.memory import check_memory_size, memory_active, memory_size

    task = task_from_cfg(cfg)
    if cfg.method.get("joint", False):
        task = task.joint()
    source = source_from_cfg(cfg, progress=bool(cfg.trainer.progress_bar))
    check_steps(source, task, bool(cfg.overlap), cache_dir_from_cfg(cfg),
                batch_size=int(cfg.data.batch_size), progress=bool(cfg.trainer.progress_bar))
    if memory_active(cfg):
        check_memory_size(source, task, bool(cfg.overlap), cache_dir_from_cfg(cfg),
                          memory_size(cfg))


def check_pretrained(cfg: DictConfig) -> None:
    """Load ``model.pretrained`` once before anything starts (no dataset generated, no run
    folder made): a file that is not a state dict of the backbone is refused with one line
    saying what the file is. ``corpus`` and ``segmentation`` are pretrained now if the cache
    holds none (a progress bar says so), as ``imagenet`` is downloaded now. The config check
    proves only that a file exists."""
    from incseg.models import check_pretrained as check
    from incseg.models.backbones import protocol_pretraining
    from incseg.protocol.teachers import resolved_model
    from incseg.protocol.trainer import quiet_lightning

    if protocol_pretraining(OmegaConf.select(cfg, "model.pretrained")) == "segmentation":
        setup_logging()  # the pretraining's lines, before Hydra sets up the job's logging
        quiet_lightning()
    check(resolved_model(cfg, cache_dir_from_cfg(cfg), bool(cfg.trainer.progress_bar)))


def tunes(sweeper_target: str | None) -> bool:
    """Whether a sweeper optimises what the jobs return: any but Hydra's basic one, which only
    launches them (Optuna, Nevergrad, Ax do)."""
    return bool(sweeper_target) and not str(sweeper_target).endswith(".BasicSweeper")


def _job_sweeper() -> str | None:
    """The ``_target_`` of the sweeper this Hydra job runs under (None outside Hydra)."""
    if not HydraConfig.initialized():
        return None
    return OmegaConf.select(HydraConfig.get(), "sweeper._target_")


def check_tuning(cfg: DictConfig, sweeper_target: str | None) -> None:
    """A tuning sweeper reads the last step's validation mIoU of the final model: refuse now
    (one line) a config that would leave none."""
    if not tunes(sweeper_target):
        return
    if cfg.data.val == "none":
        raise ConfigError("a tuning sweeper optimises the validation mIoU, and data.val=none "
                          "validates nothing (the test split is never tuned on); pass "
                          "data.val=holdout (or data.val=split where the dataset has one)")
    steps = 1 if cfg.method.get("joint", False) else task_from_cfg(cfg).num_steps
    key = "train.epochs" if steps == 1 else "train.epochs_incremental"
    epochs, every = int(OmegaConf.select(cfg, key)), int(cfg.train.val_every)
    if epochs % every:
        raise ConfigError(f"a tuning sweeper reads the validation of the final model, but "
                          f"train.val_every={every} skips the last of {key}={epochs} epochs; "
                          "pass train.val_every=1")


def sweeper_value(results: dict, tuning: bool) -> float | None:
    """What a job returns to its sweeper: the last step's ``val_miou_all`` (None without
    validation). A tuning sweep that got none is stopped (one line) rather than fed a test
    figure or a missing value."""
    value = results["steps"][-1].get("val_miou_all")
    if value is None and tuning:
        raise ConfigError("a tuning sweeper needs the validation mIoU, and the last step "
                          "recorded none (no val image holds a class seen by then, or "
                          "train.val_every skipped the last epoch); pass train.val_every=1, "
                          "or a data.val with more images")
    return value


@report_errors
def _main(cfg: DictConfig, run_dir: Path | None = None) -> float | None:
    from incseg.protocol.preflight import check_run

    setup_logging()
    check_run(cfg)
    check_pretrained(cfg)  # a sweep's job (one run was checked in precheck: remembered)
    sweeper = _job_sweeper()
    check_tuning(cfg, sweeper)
    from incseg.protocol import is_rank_zero, run_protocol
    from incseg.results import format_table

    run_dir = run_dir or Path(HydraConfig.get().runtime.output_dir)
    ensure_writable_dir(run_dir, "run directory", RUN_DIR_FIX)
    ensure_writable_dir(cache_dir_from_cfg(cfg), "cache directory", CACHE_DIR_FIX)
    check_data(cfg)
    results = run_protocol(cfg, run_dir)
    if is_rank_zero():
        print(format_table(results), flush=True)
    return sweeper_value(results, tunes(sweeper))


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    return _main(cfg)


def precheck(argv: list[str]) -> None:
    """Compose and validate the config, and prove the cache and run directories writable,
    before Hydra starts the job: Hydra reports its own failures (a misspelt key, a run
    directory it cannot create) as several lines with exit status 1, and creates the run
    directory first."""
    if any(a.startswith("-") for a in argv):
        return  # --multirun, --cfg, --help, ...: Hydra's own modes; _main validates each job
    from incseg.protocol.preflight import check_run  # torch and Lightning: not for --help

    try:
        cfg = compose(argv, return_hydra_config=True)
    except ConfigError as err:
        raise _missing_plugin(err) from None
    # a sweep (hydra.mode: MULTIRUN in an experiment) is checked on its first job: its base
    # config alone can be invalid where every job is fine (inversion.student_model set in the
    # experiment, inversion.competition=true among the swept values); _main validates each job
    multirun = str(OmegaConf.select(cfg, "hydra.mode")) == "RunMode.MULTIRUN"
    check_run(_first_job(argv, cfg) if multirun else cfg)
    if not multirun:  # a sweep's jobs may set other weights: each job checks its own
        check_pretrained(cfg)
    wait_grace()  # the DDP ranks read these when they first wait, hours in: refused now
    heartbeat_interval()
    check_tuning(cfg, OmegaConf.select(cfg, "hydra.sweeper._target_"))
    ensure_writable_dir(cache_dir_from_cfg(cfg), "cache directory", CACHE_DIR_FIX)
    try:
        # a sweep writes below its sweep dir; proving the single-run dir writable would create
        # an empty stray folder there
        run_dir = Path(str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir))
    except OmegaConfBaseException:  # e.g. ${hydra:...} that only a running job resolves
        return
    ensure_writable_dir(run_dir, "sweep directory" if multirun else "run directory",
                        RUN_DIR_FIX)


def _first_job(argv: list[str], cfg: DictConfig) -> DictConfig:
    """The config of a sweep's first job: each swept key at the first of its comma-separated
    values (the basic sweeper's order); a key the command line sets, or a value in the sweeper's
    own syntax (range(...), interval(...)), keeps the base config's value."""
    params = OmegaConf.select(cfg, "hydra.sweeper.params")
    given = {a.split("=", 1)[0].lstrip("+~") for a in argv}
    extra = [f"{k}={str(v).split(',')[0]}" for k, v in (params or {}).items()
             if k not in given and "(" not in str(v)]
    return compose([*argv, *extra], return_hydra_config=True) if extra else cfg


def _missing_plugin(err: ConfigError) -> ConfigError:
    """Hydra's "Could not find 'hydra/sweeper/optuna'" means a plugin that is not installed
    (the Optuna sweeper is the ``optuna`` extra): say so, instead of listing its search path."""
    found = re.search(r"Could not find 'hydra/(sweeper|launcher)/([\w.-]+)'", str(err))
    if not found:
        return err
    group, name = found.groups()
    return ConfigError(f"hydra/{group}={name} needs a Hydra plugin that is not installed; "
                       f"for the Optuna sweeper: pip install -e '.[optuna]'")


@report_errors
def main() -> None:
    # Hydra's own parse (and Lightning's relaunch of the other DDP ranks) reads sys.argv
    argv = sys.argv[1:] = quote_overrides(sys.argv[1:])
    check_overrides(argv)
    precheck(argv)
    _hydra_main()


if __name__ == "__main__":
    main()

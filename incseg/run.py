"""``python -m incseg.run [overrides]``: the Hydra entry point (thin: validate, then run).

Returns the final all-mIoU, so a Hydra sweeper (Optuna) can optimise it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from incseg.cli import report_errors
from incseg.config import (
    CONF_DIR,
    cache_dir_from_cfg,
    check_overrides,
    compose,
    setup_logging,
    source_from_cfg,
    task_from_cfg,
    validate,
)
from incseg.io import ensure_writable_dir

RUN_DIR_FIX = "hydra.run.dir=DIR (or paths.runs_dir=DIR) with a writable DIR"
CACHE_DIR_FIX = "paths.cache_dir=DIR (or INCSEG_CACHE=DIR) with a writable DIR"


def check_data(cfg: DictConfig) -> None:
    """Scan the dataset and check every step's training images before step 0 trains;
    the scans are cached, so the protocol reads them back for free."""
    from incseg.data.datamodule import check_steps

    task = task_from_cfg(cfg)
    if cfg.method.get("joint", False):
        task = task.joint()
    source = source_from_cfg(cfg, progress=bool(cfg.trainer.progress_bar))
    check_steps(source, task, bool(cfg.overlap), cache_dir_from_cfg(cfg),
                batch_size=int(cfg.data.batch_size), progress=bool(cfg.trainer.progress_bar))


@report_errors
def _main(cfg: DictConfig, run_dir: Path | None = None) -> float | None:
    setup_logging()
    validate(cfg)
    from incseg.protocol import is_rank_zero, run_protocol
    from incseg.results import format_table

    run_dir = run_dir or Path(HydraConfig.get().runtime.output_dir)
    ensure_writable_dir(run_dir, "run directory", RUN_DIR_FIX)
    ensure_writable_dir(cache_dir_from_cfg(cfg), "cache directory", CACHE_DIR_FIX)
    check_data(cfg)
    results = run_protocol(cfg, run_dir)
    if is_rank_zero():
        print(format_table(results), flush=True)
    return results["final"]["all"]


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
    cfg = compose(argv, return_hydra_config=True)
    validate(cfg)
    ensure_writable_dir(cache_dir_from_cfg(cfg), "cache directory", CACHE_DIR_FIX)
    try:
        # a sweep (hydra.mode: MULTIRUN in an experiment) writes below its sweep dir; proving
        # the single-run dir writable would create an empty stray folder there
        multirun = str(cfg.hydra.mode) == "RunMode.MULTIRUN"
        run_dir = Path(str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir))
    except OmegaConfBaseException:  # e.g. ${hydra:...} that only a running job resolves
        return
    ensure_writable_dir(run_dir, "sweep directory" if multirun else "run directory",
                        RUN_DIR_FIX)


@report_errors
def main() -> None:
    argv = sys.argv[1:]
    check_overrides(argv)
    precheck(argv)
    _hydra_main()


if __name__ == "__main__":
    main()

"""``python -m incseg.run [overrides]``: the Hydra entry point (thin: validate, then run).

Returns the final all-mIoU, so a Hydra sweeper (Optuna) can optimise it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from incseg.cli import report_errors
from incseg.config import CONF_DIR, check_overrides, setup_logging, validate


@report_errors
def _main(cfg: DictConfig, run_dir: Path | None = None) -> float | None:
    setup_logging()
    validate(cfg)
    from incseg.protocol import is_rank_zero, run_protocol
    from incseg.results import format_table

    run_dir = run_dir or Path(HydraConfig.get().runtime.output_dir)
    results = run_protocol(cfg, run_dir)
    if is_rank_zero():
        print(format_table(results), flush=True)
    return results["final"]["all"]


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    return _main(cfg)


@report_errors
def main() -> None:
    check_overrides(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()

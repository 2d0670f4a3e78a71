"""``python -m incseg.run [overrides]``: the Hydra entry point (thin: validate, then run)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from incseg.cli import report_errors
from incseg.config import CONF_DIR, check_overrides, setup_logging, task_from_cfg


@report_errors
def _main(cfg: DictConfig) -> None:
    setup_logging()
    task_from_cfg(cfg)
    print(OmegaConf.to_yaml(cfg, resolve=True))


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    _main(cfg)


@report_errors
def main() -> None:
    check_overrides(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()

"""The SLURM preset (hydra/launcher=slurm) composes onto the submitit launcher with one GPU
per task; skipped when the `slurm` extra (hydra-submitit-launcher) is not installed."""

from __future__ import annotations

import pytest

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

from incseg.config import compose  # noqa: E402


def test_slurm_launcher_preset_one_gpu_per_task():
    cfg = compose(["hydra/launcher=slurm", "experiment=paper/table2",
                   "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (1, 1, 1)
    assert launcher.partition == "gpu" and launcher.max_num_timeout >= 1
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.trainer.accelerator == "gpu"

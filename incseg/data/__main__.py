"""``python -m incseg.data {prepare,stats} <hydra overrides>``.

prepare: check a dataset's layout (and build VOC's train_aug from SBD).
stats:   per-step image counts of a task, as one JSON object on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from incseg.cli import report_errors
from incseg.config import (
    cache_dir_from_cfg,
    check_overrides,
    compose,
    setup_logging,
    source_from_cfg,
    task_from_cfg,
)
from incseg.errors import ConfigError

USAGE = "usage: python -m incseg.data {prepare,stats} dataset=NAME [data.root=DIR] [task=NAME] ..."


def stats(cfg) -> dict:
    from incseg.data.datamodule import check_steps

    task = task_from_cfg(cfg)
    source = source_from_cfg(cfg)
    steps = check_steps(source, task, bool(cfg.overlap), cache_dir_from_cfg(cfg))
    return {"dataset": source.name, "task": task.name, "overlap": bool(cfg.overlap),
            "steps": steps}


def prepare(cfg) -> dict:
    from incseg.data.prepare import prepare_ade, prepare_voc
    from incseg.data.sources import make_source

    name = cfg.dataset.name
    if name == "shapes":
        source = source_from_cfg(cfg)
        return {"dataset": "shapes", "root": str(source.root),
                **{s: len(source.check_split(s)) for s in ("train", "val", "test")}}
    root = make_source(name, cfg.data.root).root  # checks that data.root is set and exists
    if name == "voc":
        sbd = cfg.data.get("sbd_root")
        return prepare_voc(root, Path(sbd) if sbd else None)
    return prepare_ade(root)


@report_errors
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("prepare", "stats"):
        raise ConfigError(USAGE)
    setup_logging()
    check_overrides(argv[1:])
    cfg = compose(argv[1:])
    out = stats(cfg) if argv[0] == "stats" else prepare(cfg)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""``python -m incseg.data {prepare,stats,check} <hydra overrides>``.

prepare: check a dataset's layout (and build VOC's train_aug from SBD).
stats:   per-step image counts of a task, as one JSON object on stdout.
check:   every image and mask of every split read once; per class, its pixels and the images
         holding it, as one JSON object on stdout (a user's own data, seen before training).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from incseg.cli import quote_overrides, report_errors
from incseg.config import (
    cache_dir_from_cfg,
    check_overrides,
    compose,
    setup_logging,
    source_from_cfg,
    task_from_cfg,
)
from incseg.errors import ConfigError

COMMANDS = ("prepare", "stats", "check")
USAGE = ("usage: python -m incseg.data {prepare,stats,check} dataset=NAME [data.root=DIR] "
         "[task=NAME] ...")


def stats(cfg) -> dict:
    from incseg.data.datamodule import check_steps

    task = task_from_cfg(cfg)
    source = source_from_cfg(cfg)
    steps = check_steps(source, task, bool(cfg.overlap), cache_dir_from_cfg(cfg))
    if source.class_names is not None:
        for s in steps:
            s["names"] = [source.class_names[c] for c in s["classes"]]
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
    if name == "folder":  # nothing to build: list every split's files (check reads them)
        source = make_source(name, cfg.data.root)
        return {"dataset": "folder", "root": str(source.root),
                **{s: len(source.check_split(s)) for s in ("train", "val", "test")}}
    root = make_source(name, cfg.data.root).root  # checks that data.root is set and exists
    if name == "voc":
        sbd = cfg.data.get("sbd_root")
        return prepare_voc(root, Path(sbd) if sbd else None)
    return prepare_ade(root)


def check(cfg) -> dict:
    from incseg.data.index import class_counts

    source = source_from_cfg(cfg)
    names = source.class_names
    out: dict = {"dataset": source.name, "root": str(source.root),
                 "num_classes": source.num_classes, "splits": {}}
    warnings = []
    for split in ("train", "val", "test"):
        if not source.has_split(split):
            out["splits"][split] = None  # no list: no per-epoch validation
            continue
        n, pixels, images = class_counts(source, split)
        classes = []
        for c in range(source.num_classes):
            row = {"id": c, "pixels": int(pixels[c]), "images": int(images[c])}
            if names is not None:
                row = {"id": c, "name": names[c], **row}
            classes.append(row)
            if c and split in ("train", "test") and not images[c]:
                label = f"{c} ({names[c]})" if names is not None else str(c)
                warnings.append(f"class {label} is in no {split} image")
        out["splits"][split] = {"images": n, "void_pixels": int(pixels[255]),
                                "classes": classes}
    out["warnings"] = warnings
    return out


@report_errors
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise ConfigError(USAGE)
    setup_logging()
    overrides = quote_overrides(argv[1:])
    check_overrides(overrides)
    cfg = compose(overrides)
    out = {"stats": stats, "prepare": prepare, "check": check}[argv[0]](cfg)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

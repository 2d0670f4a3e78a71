"""``python -m incseg.data COMMAND <hydra overrides>`` (or ``incseg-data``): the dataset
commands, one JSON object on stdout each; ``--help`` lists them (from :data:`COMMANDS`).

download: fetch a benchmark's official archives (voc: VOC 2012 + SBD; ade: ADE20K), check their
         published checksums, unpack them into data.root, then run prepare.
prepare: check a dataset's layout (and build VOC's train_aug from SBD).
stats:   per-step image counts of a task, as one JSON object on stdout.
check:   every image and mask of every split read once; per class, its pixels and the images
         holding it, as one JSON object on stdout (a user's own data, seen before training).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from incseg.cli import help_text, quote_overrides, report_errors, wants_help
from incseg.config import (
    cache_dir_from_cfg,
    check_overrides,
    compose,
    setup_logging,
    source_from_cfg,
    task_from_cfg,
)
from incseg.errors import ConfigError


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


def download(cfg, table: str | None = None) -> dict:
    from incseg.data.download import download as fetch_all

    out = fetch_all(str(cfg.dataset.name), cfg.data.root, table)
    return {**out, "prepare": prepare(cfg)}  # so that the next command trains


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


#: the subcommands: name -> (function of the composed config, what it does); ``--help`` and the
#: usage line are built from this table
COMMANDS = {
    "download": (download, "fetch a benchmark's official archives (voc: VOC 2012 + SBD; ade: "
                           "ADE20K), check their published checksums, unpack them into "
                           "data.root, then run prepare (download.table=PATH: another table)"),
    "prepare": (prepare, "check a dataset's layout and list every split's files; for voc, build "
                         "train_aug from SBD (data.sbd_root=DIR)"),
    "stats": (stats, "per-step image counts of a task (which images each step trains on)"),
    "check": (check, "read every image and mask once: per class, its pixels and the images "
                     "holding it, per split (a dataset of your own, seen before training)"),
}
USAGE = (f"usage: python -m incseg.data {{{','.join(COMMANDS)}}} dataset=NAME [data.root=DIR] "
         "[task=NAME] ... (--help for more)")


def usage_help() -> str:
    return help_text(
        f"python -m incseg.data {{{','.join(COMMANDS)}}} [OVERRIDES]   (or: incseg-data ...)",
        "Dataset commands of the incseg suite. Each prints one JSON object on stdout (logs and "
        "progress on stderr). The overrides are the same Hydra key=value words as for "
        "`python -m incseg.run`, so a command sees exactly the data a run would.",
        [("commands", [(name, what) for name, (_, what) in COMMANDS.items()]),
         ("overrides (most used)", [
             ("dataset=NAME", "shapes (built in, generated on first use), voc, ade or folder "
                              "(your own: images/, masks/, train.txt, test.txt, classes.yaml)"),
             ("data.root=DIR", "the folder that holds the dataset (not needed for shapes)"),
             ("data.val=MODE", "validation images: split, holdout or none"),
             ("task=NAME", "the class split, e.g. 15-5, 15-5s, 10-1, 19-1 (stats)"),
             ("overlap=BOOL", "MiB's overlapped (true) or disjoint (false) setting (stats)"),
             ("paths.cache_dir=DIR", "where generated data and scans are cached "
                                     "(default $INCSEG_CACHE or ~/.cache/incseg)"),
         ])],
        ["python -m incseg.data download dataset=voc data.root=/data/voc",
         "python -m incseg.data stats task=15-5s",
         "python -m incseg.data prepare dataset=voc data.root=/data/voc",
         "python -m incseg.data check dataset=folder data.root=my_dataset"])


@report_errors
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(usage_help(), flush=True)
        return
    if not argv or argv[0] not in COMMANDS:
        raise ConfigError(USAGE)
    setup_logging()
    # download.* names the archive table, not the run: kept out of the composed config
    args = quote_overrides(argv[1:])
    table = [a.split("=", 1)[1] for a in args if a.startswith("download.table=")]
    overrides = [a for a in args if not a.startswith("download.table=")]
    if argv[0] != "download" and table:
        raise ConfigError("download.table=PATH is read by `python -m incseg.data download` only")
    check_overrides(overrides)
    cfg = compose(overrides)
    fn = COMMANDS[argv[0]][0]
    print(json.dumps(fn(cfg, table[-1] if table else None) if argv[0] == "download" else fn(cfg)))


if __name__ == "__main__":
    main()

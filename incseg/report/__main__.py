"""``python -m incseg.report DIR [--no-overlays] [--images N] [--order M1,M2,...]`` (or
``incseg-report``)."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from incseg.cli import report_errors
from incseg.config import setup_logging
from incseg.errors import ConfigError
from incseg.report.build import make_report

log = logging.getLogger("incseg.report")
USAGE = "python -m incseg.report DIR [--no-overlays] [--images N] [--order M1,M2,...]"
ABOUT = ("Tables and plots from incremental-segmentation runs: every results.json below DIR (one "
         "run, or a sweep of methods, tasks and seeds) is collected, seeds are averaged, and "
         "DIR/report/ gets table.md, table.csv, table.tex and the plots (mIoU per step, "
         "forgetting, per-class heatmap, confusion, prediction overlays). table.md is printed on "
         "stdout; runs that are missing or unfinished are listed, not guessed.")
EXAMPLES = """examples:
  python -m incseg.report runs/shapes/15-5s/mib/seed0
  python -m incseg.report runs/cpu/methods --order ft,lwf,ilt,mib
  python -m incseg.report runs/cpu/methods --no-overlays     (no checkpoints read: faster)"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``error:`` line and exit 2 like every incseg command."""

    def error(self, message: str):
        raise ConfigError(f"{message}; usage: {USAGE}")


def _method_list(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give method names, e.g. ft,lwf,mib")
    return names


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = _Parser(prog="python -m incseg.report", description=textwrap.fill(ABOUT, 79),
                epilog=EXAMPLES,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, help="a run directory or a sweep directory")
    p.add_argument("--no-overlays", action="store_true",
                   help="do not load checkpoints to draw prediction overlays")
    p.add_argument("--images", type=int, default=4, help="test images in the overlays (default: 4)")
    p.add_argument("--order", type=_method_list, default=None, metavar="M1,M2,...",
                   help="method names (as in results.json) whose rows come first, in this "
                        "order; default: the order the methods first appear among the runs, "
                        "jointly trained ones last")
    args = p.parse_args(list(argv))
    if args.images < 1:
        raise ConfigError(f"--images {args.images}: give at least 1")
    return args


@report_errors
def main(argv: Sequence[str] | None = None) -> None:
    setup_logging()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rep = make_report(args.dir, overlays=not args.no_overlays, n_images=args.images,
                      order=args.order)
    log.info("wrote %s (table.md, table.csv, table.tex, plots)", args.dir / "report")
    print(rep.tables_md(), flush=True)


if __name__ == "__main__":
    main()

"""How well a `shapes` methods table predicts the published PASCAL VOC ranking.

    python experiments/ranking.py           # the rankings of the committed methods tables

A screening benchmark is only useful if a method's rank on it predicts its rank on VOC. The
measure is Kendall's tau-b between the suite's all-class mIoU and the published VOC all-class
mIoU, over the methods that have a published figure for the task (tau-b, Kendall 1945, because
the published figures hold a tie group, below). 1 means the same order, -1 the reverse.

The published figures (overlapped, DeepLabV3-R101, ImageNet weights, all classes, %):
- MiB and PLOP: PLOP's tables (Douillard et al., CVPR 2021), 29.7 / 54.6 on 15-1 (MiB's own
  Table 1 has the same 29.7) and 12.7 / 30.5 on 10-1 (clovaai/SSUL's README: 12.65 / 30.45).
- DKD and DKD-M: DKD's paper (Baek et al., NeurIPS 2022), 69.7 / 72.5 (15-1), 60.4 / 65.8 (10-1).
- STAR and STAR-M: jinpeng0528/STAR's README, 72.90 / 74.03 (15-1), 64.86 / 66.60 (10-1).
- Joint: MiB's Table 1 (Cermelli et al., CVPR 2020), 77.4, the same for every task.
- FT, EWC, PI, RW, LwF, LwF-MC and ILT on 15-1: every one of them ends below 10 in MiB's and
  PLOP's tables, within a few points of each other and of zero. Their order among themselves
  is noise at that level, so they enter as one tie group below MiB (``TIED_BELOW``): tau-b
  counts a pair inside the group as neither agreeing nor disagreeing. On 10-1 neither paper
  reports them, so they are left out there.
The suite's 15-5s is VOC's 15-1 (five one-class steps after 15 classes), its 10-1 is 10-1.
MiB-M and PLOP-M have no published figure and are left out.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

#: the value the tie group of ``TIED_BELOW`` enters with: any number below every other figure
TIED_BELOW = 0.0
_OLDER = ("FT", "EWC", "PI", "RW", "LwF", "LwF-MC", "ILT")

#: published VOC overlap all-class mIoU by the suite's task name and report row label
PUBLISHED_VOC: dict[str, dict[str, float]] = {
    "15-5s": {**dict.fromkeys(_OLDER, TIED_BELOW), "MiB": 29.7, "PLOP": 54.6, "DKD": 69.7,
              "DKD-M": 72.5, "STAR": 72.90, "STAR-M": 74.03, "Joint": 77.4},
    "10-1": {"MiB": 12.7, "PLOP": 30.5, "DKD": 60.4, "DKD-M": 65.8, "STAR": 64.86,
             "STAR-M": 66.60, "Joint": 77.4},
}

#: published VOC 15-1 old (classes 0-15) / new (16-20) mIoU of the methods the diagnosis
#: compares: PLOP's Table 1 (MiB rerun by PLOP's authors)
PUBLISHED_VOC_OLD_NEW: dict[str, dict[str, tuple[float, float]]] = {
    "15-5s": {"MiB": (35.1, 13.5), "PLOP": (65.1, 21.1)},
}


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two paired sequences: (concordant - discordant) pairs over
    sqrt((n0 - ties in x) (n0 - ties in y)), n0 = n (n - 1) / 2. NaN when either side is
    constant (no pair to order)."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b needs paired sequences, got {len(x)} and {len(y)}")
    s = tx = ty = n0 = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            a, b = _sign(x[i] - x[j]), _sign(y[i] - y[j])
            s += a * b
            tx += a == 0
            ty += b == 0
            n0 += 1
    denom = math.sqrt((n0 - tx) * (n0 - ty))
    return s / denom if denom else float("nan")


def against_voc(task: str, suite: Mapping[str, float]) -> tuple[float, list[str]]:
    """tau-b between the suite's all-mIoU per method (``suite``: row label -> figure) and the
    published VOC figures of ``task``, and the methods it was computed over (in the published
    order)."""
    pub = PUBLISHED_VOC.get(task)
    if pub is None:
        raise ValueError(f"no published VOC figures for task '{task}'; known: "
                         f"{', '.join(PUBLISHED_VOC)}")
    common = sorted((m for m in suite if m in pub), key=lambda m: (pub[m], m))
    tau = kendall_tau_b([suite[m] for m in common], [pub[m] for m in common])
    return tau, common


def published_cell(task: str, method: str) -> str:
    value = PUBLISHED_VOC.get(task, {}).get(method)
    if value is None:
        return ""
    return "< 10" if method in _OLDER and value == TIED_BELOW else f"{value:g}"


def main(argv: Sequence[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tables
    print(tables.ranking_methods())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())

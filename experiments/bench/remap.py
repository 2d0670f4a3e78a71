"""Label remapping of masks: the 256-entry lookup table vs a per-class loop.

SPEC 3.4 asks for a lookup table, never a per-pixel or per-class Python loop; this measures what
that buys on VOC-sized (512 x 512) masks. The naive loop is the one people write first:
``out[mask == c] = new_id`` for each class present. Part of ``run.py``; alone:

    python experiments/bench/remap.py
"""

from __future__ import annotations

import json
import statistics
import timeit

import numpy as np

from incseg.tasks import get_task, remap


def naive_remap(mask: np.ndarray, lut: np.ndarray) -> np.ndarray:
    out = np.zeros_like(mask)
    for c in np.unique(mask):
        out[mask == c] = lut[c]
    return out


def main(size: int = 512, n_masks: int = 4, repeats: int = 7, number: int = 50,
         naive_number: int = 5) -> dict:
    """Seconds per mask of each way (median over ``repeats`` of ``number`` calls per mask)."""
    task = get_task("voc", "15-5s")
    lut = task.train_lut(3)
    rng = np.random.default_rng(0)
    # every class and void present, as in the worst VOC masks: the loop runs 22 times per mask
    masks = [rng.choice(np.r_[np.arange(21), 255].astype(np.uint8), size=(size, size))
             for _ in range(n_masks)]
    for m in masks:  # both ways give the same labels, or the timing means nothing
        if not (np.array_equal(remap(m, lut), lut[m]) and
                np.array_equal(naive_remap(m, lut), lut[m])):
            raise AssertionError("remap and the per-class loop disagree")

    def by_lut():
        for m in masks:
            remap(m, lut)

    def naive():
        for m in masks:
            naive_remap(m, lut)

    t_lut = statistics.median(timeit.repeat(by_lut, repeat=repeats, number=number))
    t_naive = statistics.median(timeit.repeat(naive, repeat=repeats, number=naive_number))
    t_lut /= number * n_masks
    t_naive /= naive_number * n_masks
    return {"mask_px": size, "masks": n_masks, "repeats": repeats,
            "lut_ms": t_lut * 1e3, "naive_ms": t_naive * 1e3, "lut_vs_naive": t_naive / t_lut}


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))

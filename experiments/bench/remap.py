"""Label remapping of 512x512 masks: the 256-entry lookup table vs a per-class loop.

    python experiments/bench/remap.py
"""

from __future__ import annotations

import json
import timeit

import numpy as np

from incseg.tasks import get_task, remap


def main(repeats: int = 7, number: int = 50) -> dict:
    task = get_task("voc", "15-5s")
    lut = task.train_lut(3)
    rng = np.random.default_rng(0)
    masks = [rng.choice(np.r_[np.arange(21), 255].astype(np.uint8), size=(512, 512))
             for _ in range(4)]

    def by_lut():
        for m in masks:
            remap(m, lut)

    def naive():
        for m in masks:
            out = np.zeros_like(m)
            for c in np.unique(m):
                out[m == c] = lut[c]

    t_lut = min(timeit.repeat(by_lut, repeat=repeats, number=number)) / (number * len(masks))
    t_naive = min(timeit.repeat(naive, repeat=repeats, number=5)) / (5 * len(masks))
    assert all(np.array_equal(remap(m, lut), lut[m]) for m in masks)
    return {"lut_ms": t_lut * 1e3, "naive_ms": t_naive * 1e3, "lut_vs_naive": t_naive / t_lut}


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))

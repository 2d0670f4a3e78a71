"""Checks the ``shapes`` tests share."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from matplotlib.colors import rgb_to_hsv

from incseg.data.shapes import ShapesParams, render_sample


def hues_sit_in_their_bands(p: ShapesParams, centre: Callable[[int], float], tol: float,
                            images: int = 40) -> int:
    """Assert that every object of the first ``images`` training images of ``p`` has its
    median hue (saturated pixels) within ``tol`` of its class's band ``centre(c)``; returns
    how many objects were checked."""
    checked = 0
    for i in range(images):
        image, mask, _ = render_sample(p, "train", i)
        hsv = rgb_to_hsv(image / 255.0)
        for c in set(np.unique(mask).tolist()) - {0, 255}:
            sel = (mask == c) & (hsv[..., 1] > 0.3)
            if sel.sum() < 10:
                continue
            d = np.abs((hsv[..., 0][sel] - centre(c) + 0.5) % 1.0 - 0.5)
            assert np.median(d) < tol, (i, c, float(np.median(d)))
            checked += 1
    return checked

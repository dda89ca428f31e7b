"""Tissue mask from a low-resolution level, and the tissue fraction of each tile.

Otsu on saturation alone calls every pixel of a blank, noisy slide tissue (docs/design.md): the
threshold is therefore never below an absolute floor on saturation, and a pixel must also absorb
some light (optical density floor), so glass, however noisy, has no tissue. Small holes and
specks are then removed; the threshold is also capped (SAT_CEIL) because
on a slide that is all tissue Otsu separates stroma from nuclei instead of tissue from glass. Small holes and
specks are then removed, at sizes given in microns so the result does not depend on the level.
"""
from __future__ import annotations

import numpy as np

SAT_FLOOR = 0.08  # H&E stroma has saturation ~0.15-0.3, glass with noise < 0.06
SAT_CEIL = 0.12  # Otsu on a slide that is all tissue splits stroma from nuclei: never threshold above this
OD_FLOOR = 0.05  # mean optical density; glass ~0.01
SPECK_UM2 = 150.0 * 150.0  # objects smaller than this are dust, not tissue
HOLE_UM2 = 100.0 * 100.0  # holes smaller than this are filled


def saturation(rgb: np.ndarray) -> np.ndarray:
    x = rgb.astype(np.float32)
    mx, mn = x.max(-1), x.min(-1)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1), 0.0).astype(np.float32)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    return (-np.log((rgb.astype(np.float32) + 1) / 256.0)).mean(-1)


def tissue_mask(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """A bool [H, W] tissue mask of an RGB uint8 image at ``mpp`` um/px."""
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    sat = saturation(rgb)
    od = optical_density(rgb)
    candidates = sat[::2, ::2]
    thr = SAT_FLOOR
    if candidates.size and float(candidates.max()) > float(candidates.min()):
        thr = min(max(float(threshold_otsu(candidates)), SAT_FLOOR), SAT_CEIL)
    mask = (sat > thr) & (od > OD_FLOOR)
    px_area = mpp * mpp
    mask = remove_small_objects(mask, max_size=max(1, int(SPECK_UM2 / px_area)))
    mask = remove_small_holes(mask, max_size=max(1, int(HOLE_UM2 / px_area)))
    return mask


def tile_fractions(mask: np.ndarray, scale: float, xs: np.ndarray, ys: np.ndarray, side: float) -> np.ndarray:
    """Tissue fraction of squares of ``side`` level-0 px at level-0 corners (xs, ys).

    ``scale`` = level-0 px per mask px. A summed-area table makes it O(1) per tile; the square is
    rounded to whole mask pixels (at least one).
    """
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, 0, dtype=np.int64), 1)
    x0 = np.clip(np.round(xs / scale).astype(np.int64), 0, w)
    y0 = np.clip(np.round(ys / scale).astype(np.int64), 0, h)
    x1 = np.clip(np.maximum(np.round((xs + side) / scale).astype(np.int64), x0 + 1), 0, w)
    y1 = np.clip(np.maximum(np.round((ys + side) / scale).astype(np.int64), y0 + 1), 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return (inside / area).astype(np.float32)

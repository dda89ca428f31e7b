"""H&E-like images made from a seed: the demo's and the tests' data when no slide is given.

Light pink stroma (eosin) with lumen-like pale holes and purple nuclei (haematoxylin) whose size
follows the magnification, on a near-white background where there is no tissue. Deterministic in
(seed, index), so a resumed run sees exactly the tiles it would have seen.
"""
from __future__ import annotations

import numpy as np

EOSIN = np.array([232, 170, 200], dtype=np.float32)
HEMATOXYLIN = np.array([88, 50, 130], dtype=np.float32)
BACKGROUND = np.array([243, 241, 244], dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid bilinearly upsampled to size x size."""
    coarse = rng.random((cells + 1, cells + 1)).astype(np.float32)
    pos = np.linspace(0, cells, size, dtype=np.float32)
    i = np.minimum(pos.astype(int), cells - 1)
    f = pos - i
    rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def he_image(rng: np.random.Generator, size: int, magnification: float = 20.0,
             tissue_fraction: float = 0.85) -> np.ndarray:
    """A [size, size, 3] uint8 RGB H&E-like image."""
    scale = magnification / 20.0  # nuclei are ~8 px across at 20x (0.5 um/px)
    tissue = _smooth_noise(rng, size, 3) < tissue_fraction
    stroma = _smooth_noise(rng, size, max(2, int(12 / max(scale, 0.25))))
    img = BACKGROUND + (EOSIN - BACKGROUND) * (0.55 + 0.45 * stroma[..., None])
    n_nuclei = int(rng.integers(40, 90) * (size / 224) ** 2 / max(scale, 0.25) ** 2)
    radius = np.clip(rng.normal(4.0 * scale, 0.8 * scale, n_nuclei), 1.0, None)
    cy, cx = rng.uniform(0, size, n_nuclei), rng.uniform(0, size, n_nuclei)
    stretch = rng.uniform(0.6, 1.0, n_nuclei)
    nuclei = np.zeros((size, size), dtype=np.float32)
    for y, x, r, s in zip(cy, cx, radius, stretch, strict=False):
        r_box = int(r + 2)
        y0, y1 = max(int(y) - r_box, 0), min(int(y) + r_box + 1, size)
        x0, x1 = max(int(x) - r_box, 0), min(int(x) + r_box + 1, size)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d = ((yy - y) / r) ** 2 + ((xx - x) / (r * s)) ** 2
        nuclei[y0:y1, x0:x1] = np.maximum(nuclei[y0:y1, x0:x1], np.clip(1.2 - d, 0, 1))
    img = img + (HEMATOXYLIN - img) * nuclei[..., None]
    img = np.where(tissue[..., None], img, BACKGROUND)
    img = img + rng.normal(0, 4.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)

"""iBOT block masks for the student's global crops (DINOv2's MaskingGenerator and collate rule).

Of the n_global * B global crops, ``round(mask_probability * n)`` get a mask; their target ratios
are spread over [ratio_min, ratio_max] (one draw in each of the equal sub-intervals), the others
get none, and the order is shuffled. A mask is a union of rectangular blocks with aspect ratio in
[aspect_min, 1 / aspect_min], each of about ``min_block_patches`` patches or more, except where
fewer remain to reach the target (:func:`block_mask`).
"""
from __future__ import annotations

import math

import numpy as np


def block_mask(rng: np.random.Generator, grid: int, n_target: int, min_block: int = 4,
               aspect_min: float = 0.3) -> np.ndarray:
    """A [grid, grid] bool mask of at most ``n_target`` patches, a union of rectangular blocks.

    DINOv2's MaskingGenerator rule: blocks are added while patches remain to be masked. A block's
    area is drawn uniformly between ``min_block`` and the number still to mask (so below
    ``min_block`` once fewer remain: masks of 1-3 patches exist, and small grids fill their
    target), its aspect ratio log-uniformly in [aspect_min, 1 / aspect_min]; its sides, rounded,
    must be shorter than the grid, and it must add between 1 and the remaining count of new
    patches. Each block gets 10 tries; a block that none of them places ends the mask.
    """
    mask = np.zeros((grid, grid), dtype=bool)
    log_aspect = (math.log(aspect_min), -math.log(aspect_min))
    count = 0
    while count < n_target:
        budget = n_target - count
        added = 0
        for _ in range(10):
            area = min_block + (budget - min_block) * rng.random()  # either order of the bounds
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h >= grid or w >= grid:
                continue
            top = int(rng.integers(0, grid - h + 1))
            left = int(rng.integers(0, grid - w + 1))
            region = mask[top:top + h, left:left + w]
            new = h * w - int(region.sum())
            if 0 < new <= budget:
                region[...] = True
                added = new
                break
        if added == 0:
            break
        count += added
    return mask


def collate_masks(rng: np.random.Generator, n_images: int, grid: int, mask_probability: float,
                  ratio_min: float, ratio_max: float, min_block: int = 4, aspect_min: float = 0.3) -> np.ndarray:
    """Masks for ``n_images`` global crops: [n_images, grid * grid] bool."""
    n_patches = grid * grid
    n_masked = int(round(n_images * mask_probability))
    bounds = np.linspace(ratio_min, ratio_max, n_masked + 1)
    masks = np.zeros((n_images, n_patches), dtype=bool)
    for i in range(n_masked):
        ratio = rng.uniform(bounds[i], bounds[i + 1])
        masks[i] = block_mask(rng, grid, int(n_patches * ratio), min_block, aspect_min).reshape(-1)
    return masks[rng.permutation(n_images)]


def step_masks(seed: int, step: int, n_global: int, batch: int, rank: int, world: int, grid: int,
               mask_probability: float, ratio_min: float, ratio_max: float, min_block: int = 4,
               aspect_min: float = 0.3) -> np.ndarray:
    """This rank's masks for a step, [n_global * batch, grid * grid] bool, crop-major.

    The collate rule above applied to the *global* batch (n_global * batch * world images): which
    images are masked and their ratios are drawn from (seed, step), each mask from (seed, step,
    global image index). Every rank computes only its own masks, and the masks of a global image do
    not depend on how the global batch is split into ranks: 1 process with batch 2B and 2
    processes with batch B see the same masks (so they give the same losses).
    """
    total = n_global * batch * world
    rng = np.random.default_rng([seed, step, 7])
    n_masked = int(round(total * mask_probability))
    bounds = np.linspace(ratio_min, ratio_max, n_masked + 1)
    ratios = np.zeros(total)
    ratios[:n_masked] = rng.uniform(bounds[:-1], bounds[1:])
    ratios = ratios[rng.permutation(total)]
    out = np.zeros((n_global, batch, grid * grid), dtype=bool)
    for c in range(n_global):
        for b in range(batch):
            g = (c * world + rank) * batch + b  # crop c of global tile rank * batch + b
            if ratios[g] > 0:
                mask_rng = np.random.default_rng([seed, step, g, 11])
                out[c, b] = block_mask(mask_rng, grid, int(grid * grid * ratios[g]), min_block, aspect_min).reshape(-1)
    return out.reshape(n_global * batch, grid * grid)

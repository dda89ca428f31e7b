"""iBOT block masks: how many images are masked, the ratio spread, and the block shapes."""
import math

import numpy as np
from scipy import ndimage

from virchow_fast.data.masks import block_mask, collate_masks, step_masks


def test_half_the_images_masked_with_ratios_spread_over_range():
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(40):
        masks = collate_masks(rng, 16, 16, 0.5, 0.1, 0.5)
        per_image = masks.mean(1)
        assert (per_image > 0).sum() == 8
        ratios.extend(sorted(per_image[per_image > 0]))
    ratios = np.asarray(ratios)
    assert ratios.min() >= 0.1 - 0.03 and ratios.max() <= 0.5 + 1e-9
    # one draw per sub-interval: the ratios cover [0.1, 0.5] evenly
    hist, _ = np.histogram(ratios, bins=4, range=(0.1, 0.5))
    assert hist.min() > 0.15 * len(ratios)


def test_masks_are_made_of_blocks():
    rng = np.random.default_rng(1)
    small = total = 0
    for _ in range(60):
        target = int(rng.integers(26, 128))
        m = block_mask(rng, 16, target, min_block=4, aspect_min=0.3)
        assert int(m.sum()) <= target
        labels, n = ndimage.label(m)
        sizes = ndimage.sum(m, labels, range(1, n + 1))
        small += sizes[sizes < 4].sum()
        total += m.sum()
    # blocks of under 4 patches only round off a mask (the last few patches, or a rounded area)
    assert small <= 0.05 * total


def test_masks_fill_their_target():
    """Blocks keep coming until the target is reached (DINOv2): most masks hit it exactly."""
    rng = np.random.default_rng(2)
    counts, targets = [], []
    for _ in range(100):
        target = int(rng.integers(26, 128))
        counts.append(int(block_mask(rng, 16, target).sum()))
        targets.append(target)
    counts, targets = np.asarray(counts), np.asarray(targets)
    assert (counts <= targets).all()
    assert (counts == targets).mean() >= 0.8
    assert counts.sum() >= 0.99 * targets.sum()


def test_small_grids_get_masks_of_one_to_three_patches():
    """On a small grid (small crops) a target under the smallest block still gets its patches."""
    for grid in (4, 7):
        for target in (1, 2, 3):
            counts = np.array([int(block_mask(np.random.default_rng(s), grid, target).sum()) for s in range(100)])
            assert counts.max() <= target, (grid, target)
            assert (counts == target).mean() >= 0.7, (grid, target, counts.mean())
    # a 5-patch target on a 4 x 4 grid: a block of 4 or less, then the rest
    counts = np.array([int(block_mask(np.random.default_rng(s), 4, 5).sum()) for s in range(100)])
    assert (counts == 5).mean() >= 0.9


class _Scripted:
    """An rng whose area draw is the top of its range and whose aspect is 1/3: every block is 1 x 3
    for a 3-patch target."""

    def random(self):
        return 1.0

    def uniform(self, lo, hi):
        return math.log(1 / 3)

    def integers(self, lo, hi):
        return lo


def test_a_block_is_smaller_than_the_grid():
    """As DINOv2: both sides of a block shorter than the grid's (a 1 x 3 block fits a 4 x 4 grid,
    not a 3 x 3 one; a 1 x 1 grid is never masked)."""
    assert block_mask(_Scripted(), 4, 3)[0, :3].all() and block_mask(_Scripted(), 4, 3).sum() == 3
    assert not block_mask(_Scripted(), 3, 3).any()
    assert not any(block_mask(np.random.default_rng(s), 1, 1).any() for s in range(20))


def test_collate_is_seeded():
    a = collate_masks(np.random.default_rng(5), 8, 16, 0.5, 0.1, 0.5)
    b = collate_masks(np.random.default_rng(5), 8, 16, 0.5, 0.1, 0.5)
    assert np.array_equal(a, b)


def test_step_masks_do_not_depend_on_the_rank_layout():
    args = dict(seed=3, step=5, n_global=2, grid=16, mask_probability=0.5, ratio_min=0.1, ratio_max=0.5)
    one = step_masks(batch=4, rank=0, world=1, **args).reshape(2, 4, -1)
    two = [step_masks(batch=2, rank=r, world=2, **args).reshape(2, 2, -1) for r in range(2)]
    assert np.array_equal(one, np.concatenate(two, axis=1))
    # the collate rule holds over the global batch: half of the 8 global crops masked
    assert (one.reshape(8, -1).sum(1) > 0).sum() == 4
    assert not np.array_equal(one, step_masks(batch=4, rank=0, world=1, **{**args, "step": 6}).reshape(2, 4, -1))

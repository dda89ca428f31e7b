"""iBOT block masks: how many images are masked, the ratio spread, and the block shapes."""
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
    for _ in range(30):
        target = int(rng.integers(26, 128))
        m = block_mask(rng, 16, target, min_block=4, aspect_min=0.3)
        assert abs(int(m.sum()) - target) <= 0.15 * target + 4
        labels, n = ndimage.label(m)
        sizes = ndimage.sum(m, labels, range(1, n + 1))
        assert sizes.min() >= 4  # no stray single patches: every component holds a >= 4-patch block


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

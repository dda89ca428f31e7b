"""The CLI as the multi-process tests launch it (``python tests/train/dist_driver.py train ...``).

Two test-only changes, both from the environment of the launched processes:
- iBOT masks are drawn per (global tile index, crop) instead of per (step, rank), so a batch of
  2B tiles on one process and two batches of B on two processes see the same masks (the loader's
  own masks depend on the rank layout; the tile pixels do not);
- ``VF_TEST_NAN=rank:step[,rank:step]`` turns that rank's loss at that step into NaN;
- ``VF_TEST_SLEEP=seconds`` sleeps in every step (time for a test to signal a run mid-training).
"""
import os
import sys
import time

import numpy as np
import torch

from virchow_fast.data import loader as _loader
from virchow_fast.data.masks import block_mask
from virchow_fast.train import step as _step

_getitem = _loader._StepDataset.__getitem__


def _getitem_tile_masks(self, step):
    batch = _getitem(self, step)
    cfg, b = self.cfg, self.cfg.batch_size
    grid = cfg.crops.global_size // self.patch
    n_global = batch.global_crops.shape[0] // b
    masks = np.zeros((n_global * b, grid * grid), dtype=bool)
    for c in range(n_global):
        for i in range(b):
            rng = np.random.default_rng([self.seed, (step * self.world + self.rank) * b + i, c, 99])
            if rng.random() < cfg.masks.mask_probability:
                n = max(1, int(grid * grid * rng.uniform(cfg.masks.ratio_min, cfg.masks.ratio_max)))
                masks[c * b + i] = block_mask(rng, grid, n, cfg.masks.min_block_patches,
                                              cfg.masks.aspect_min).reshape(-1)
    batch.masks = torch.from_numpy(masks)
    return batch


_loader._StepDataset.__getitem__ = _getitem_tile_masks

_NAN = {tuple(int(v) for v in item.split(":")) for item in os.environ.get("VF_TEST_NAN", "").split(",") if item}
_SLEEP = float(os.environ.get("VF_TEST_SLEEP", "0"))
if _NAN or _SLEEP:
    _forward = _step.SSLLoss.forward

    def _forward_test(self, student, teacher, batch, *args, **kwargs):
        out = _forward(self, student, teacher, batch, *args, **kwargs)
        if (int(os.environ.get("RANK", "0")), batch.step) in _NAN:
            out["loss"] = out["loss"] * float("nan")
        time.sleep(_SLEEP)
        return out

    _step.SSLLoss.forward = _forward_test

if __name__ == "__main__":
    from virchow_fast.cli import main

    sys.exit(main())

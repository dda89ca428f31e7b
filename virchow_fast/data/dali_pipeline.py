"""The DALI multi-crop graph: contexts in, normalised ECT crops out, CPU or GPU from one definition.

contexts (raw RGB from slide reads, or JPEG bytes from shards: ``cpu`` / ``mixed`` decode)
-> per crop: ECT region resized to its size (fn.resize with an absolute ROI) -> flips -> rotation
by a multiple of 90 degrees -> colour twist (brightness, contrast, saturation, hue; saturation 0
is grayscale) -> solarise -> optional blur -> normalise to CHW float32.

Every random number comes from the feed (:mod:`.sampling`), one parameter row per crop, so the
graph is a pure function of (seed, index): seeded, worker-count independent and resumable by
construction. :class:`DaliLoader` wraps the DALIGenericIterator output into :class:`.loader.Batch`.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import CropConfig, DataConfig
from . import sampling as S
from .loader import Batch
from .masks import collate_masks


def build_pipeline(feed, crops: CropConfig, batch_size: int, device: str = "cpu", encoded: bool = False,
                   num_threads: int = 1, device_id: int | None = None, seed: int = 0, prefetch: int = 2):
    """The DALI pipeline. ``device`` "cpu" runs with device_id=None; "gpu" decodes with "mixed"."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device == "gpu"
    n_crops = crops.n_global + crops.n_local
    mean = [255.0 * m for m in crops.mean]
    std = [255.0 * s for s in crops.std]

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=(device_id or 0) if gpu else None,
                  seed=seed, prefetch_queue_depth=prefetch, exec_dynamic=True)
    def graph():
        ctx, params, mags, steps = fn.external_source(source=feed, num_outputs=4, batch=True,
                                                      layout=["" if encoded else "HWC", "", "", ""])
        if encoded:
            img = fn.decoders.image(ctx, device="mixed" if gpu else "cpu", output_type=types.RGB)
        else:
            img = ctx.gpu() if gpu else ctx
        if gpu:
            params = params  # argument inputs stay on the CPU
        outs = []
        for c in range(n_crops):
            size = crops.global_size if c < crops.n_global else crops.local_size
            q = params[c]
            x = fn.resize(img, size=[size, size], roi_start=q[S.P_Y0:S.P_X0 + 1], roi_end=q[S.P_Y1:S.P_X1 + 1],
                          roi_relative=False, antialias=True, interp_type=types.INTERP_LINEAR)
            x = fn.flip(x, horizontal=fn.cast(q[S.P_HFLIP], dtype=types.INT32),
                        vertical=fn.cast(q[S.P_VFLIP], dtype=types.INT32))
            if crops.rot90:
                x = fn.rotate(x, angle=q[S.P_ANGLE], keep_size=True, interp_type=types.INTERP_NN)
            if crops.color_jitter > 0 or crops.grayscale > 0:
                x = fn.color_twist(x, brightness=q[S.P_BRIGHT], contrast=q[S.P_CONTRAST], saturation=q[S.P_SAT],
                                   hue=q[S.P_HUE])
            x = fn.cast(x, dtype=types.FLOAT)
            if c == 1 and crops.solarize > 0:
                x = x + q[S.P_SOLAR] * (x >= 128.0) * (255.0 - 2.0 * x)
            if crops.blur > 0:
                blurred = fn.gaussian_blur(x, sigma=q[S.P_SIGMA])
                x = x + q[S.P_BLUR] * (blurred - x)
            x = fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)
            outs.append(x)
        return (*outs, mags, steps)

    pipe = graph()
    pipe.build()
    return pipe


class TileFeed:
    """DALI external source: batch ``step`` of this rank from a tile getter, a step ahead.

    ``tiles(indices, rngs) -> list[(context, mag)]`` does the reading (and its retries); this class
    draws the per-crop parameters and stacks the batch.
    """

    def __init__(self, tiles, cfg: DataConfig, rank: int, world: int, seed: int, start_step: int):
        self.tiles, self.cfg, self.rank, self.world, self.seed = tiles, cfg, rank, world, seed
        self.step = start_step

    def __call__(self):
        b = self.cfg.batch_size
        idx = [S.index_of(self.step, self.rank, self.world, b, i) for i in range(b)]
        params = [np.stack(S.tile_params(np.random.default_rng([self.seed, j, 1]), self.cfg.crops)) for j in idx]
        got = self.tiles(self.step, idx)
        ctx = [c for c, _ in got]
        mags = [np.array(m, np.float32) for _, m in got]
        steps = [np.array(self.step, np.int64)] * b
        self.step += 1
        return ctx, params, mags, steps


class DaliLoader:
    """Iterator of :class:`Batch` from a DALI pipeline; ``state_dict`` is the next step."""

    def __init__(self, make_tiles, cfg: DataConfig, patch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 start_step: int = 0, device: str = "cpu", encoded: bool = False, num_threads: int = 1):
        self.make_tiles, self.cfg, self.patch = make_tiles, cfg, patch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.device, self.encoded, self.num_threads = device, encoded, num_threads
        self.next_step = start_step
        self._it = None
        self._pipe = None

    def _make_iter(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        feed = TileFeed(self.make_tiles(), self.cfg, self.rank, self.world, self.seed, self.next_step)
        c = self.cfg.crops
        self._pipe = build_pipeline(feed, c, self.cfg.batch_size, self.device, self.encoded, self.num_threads,
                                    seed=self.seed)
        names = [f"g{i}" for i in range(c.n_global)] + [f"l{i}" for i in range(c.n_local)] + ["mags", "steps"]
        return DALIGenericIterator([self._pipe], names, auto_reset=False)

    def __iter__(self) -> "DaliLoader":
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = self._make_iter()
        out = next(self._it)[0]
        c = self.cfg.crops
        step = int(out["steps"].reshape(-1)[0])
        g = torch.cat([out[f"g{i}"] for i in range(c.n_global)])  # crop-major
        if c.n_local:
            l = torch.cat([out[f"l{i}"] for i in range(c.n_local)])
        else:
            l = torch.zeros(0, 3, c.local_size, c.local_size)
        mk = self.cfg.masks
        grid = c.global_size // self.patch
        masks = collate_masks(np.random.default_rng([self.seed, step, self.rank, 7]), g.shape[0], grid,
                              mk.mask_probability, mk.ratio_min, mk.ratio_max, mk.min_block_patches, mk.aspect_min)
        self.next_step = step + 1
        return Batch(g, l, torch.from_numpy(masks), out["mags"].reshape(-1).float().cpu(), step)

    def state_dict(self) -> dict:
        return {"next_step": self.next_step}

    def load_state_dict(self, state: dict) -> None:
        self.next_step = int(state["next_step"])
        self._it = None
        self._pipe = None

"""The DALI multi-crop graph: contexts in, normalised ECT crops out, CPU or GPU from one definition.

contexts (raw RGB from slide reads, or JPEG bytes from shards: ``cpu`` / ``mixed`` decode)
-> per crop: ECT region resized to its size, flipped and rotated by a multiple of 90 degrees in one
bilinear fn.warp_affine (the map comes from sampling.crop_affine) -> colour jitter as one 3 x 4 colour matrix per crop
(brightness, contrast, saturation, hue; saturation 0 is grayscale; fn.coord_transform) -> solarise
-> optional blur -> normalise to CHW float32 (crop_mirror_normalize).

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
        # one external-source output per argument: per-crop subscripts/reshapes in the graph cost more
        # than the crops themselves on the CPU
        outs = fn.external_source(source=feed, num_outputs=3 + 3 * n_crops, batch=True,
                                  layout=["" if encoded else "HWC"] + [""] * (2 + 3 * n_crops))
        ctx, mags, steps = outs[:3]
        if encoded:
            img = fn.decoders.image(ctx, device="mixed" if gpu else "cpu", output_type=types.RGB)
        else:
            img = ctx.gpu() if gpu else ctx
        crops_out = []
        for c in range(n_crops):
            aff, mt, misc = outs[3 + 3 * c: 6 + 3 * c]
            size = crops.global_size if c < crops.n_global else crops.local_size
            # ECT crop, resize, flips and rotation: one bilinear warp (scale ~1, no antialias needed)
            x = fn.warp_affine(img, matrix=aff, size=[size, size], interp_type=types.INTERP_LINEAR, fill_value=255.0)
            if crops.color_jitter > 0 or crops.grayscale > 0:
                x = fn.coord_transform(x, MT=mt, dtype=types.UINT8)
            if c == 1 and crops.solarize > 0:
                x = fn.cast(x, dtype=types.FLOAT)
                x = x + misc[0] * (x >= 128.0) * (255.0 - 2.0 * x)
            if crops.blur > 0:
                x = fn.cast(x, dtype=types.FLOAT)
                blurred = fn.gaussian_blur(x, sigma=misc[2])
                x = x + misc[1] * (blurred - x)
            x = fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)
            crops_out.append(x)
        return (*crops_out, mags, steps)

    import warnings

    with warnings.catch_warnings():  # misc outputs are unused when solarise/blur are off: by design
        warnings.filterwarnings("ignore", message=".*outputs at the ind.*not used.*")
        warnings.filterwarnings("ignore", message=".*output at the index.*not used.*")
        pipe = graph()
        pipe.build()
    return pipe


def feed_outputs(contexts: list, params: list[np.ndarray], mags: list, steps: list) -> list:
    """The external source's outputs: contexts, mags, steps, then per crop (affine [2, 3], colour [3, 4],
    misc [solarise, blur, sigma]), each a list over the batch."""
    out = [contexts, mags, steps]
    for c in range(params[0].shape[0]):
        out.append([p[c, S.P_AFF:S.P_AFF + 6].reshape(2, 3) for p in params])
        out.append([p[c, S.P_MT:S.P_MT + 12].reshape(3, 4) for p in params])
        out.append([p[c, [S.P_SOLAR, S.P_BLUR, S.P_SIGMA]] for p in params])
    return out


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
        return feed_outputs(ctx, params, mags, steps)


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

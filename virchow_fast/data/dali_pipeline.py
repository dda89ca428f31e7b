"""The DALI multi-crop graph: contexts in, normalised ECT crops out, CPU or GPU from one definition.

contexts (raw RGB from slide reads, or JPEG bytes from shards: ``cpu`` / ``mixed`` decode)
-> per crop: the ECT box resized to the crop size (fn.resize with an absolute ROI; the scale is
within 5 % of 1, so no antialiasing) -> horizontal / vertical flips -> [optional blur] -> colour
jitter and normalisation as one 3 x 4 matrix per crop (brightness, contrast, saturation, hue;
saturation 0 is grayscale; fn.coord_transform to float32). Then, in torch on the output device
(:func:`finish`): the per-crop transposition that completes the rot90 group, the clamp to the valid
range, solarise on the second global crop, HWC -> CHW and the crop-major layout.

Every random number comes from the feed (:mod:`.sampling`), one parameter row per crop, so the
output is a pure function of (seed, index): seeded, worker-count independent and resumable by
construction. Measured on the CPU (benchmarks/bench_pipeline.py): a warp_affine per crop, or
rotate / color_twist ops, cost 2-4x more than this chain; the few elementwise steps are cheaper
in torch than as DALI arithmetic ops.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import CropConfig, DataConfig
from . import sampling as S
from .loader import Batch, batch_masks

N_PER_CROP = 6  # external-source outputs per crop: roi start, roi end, hflip, vflip, colour [3, 4], blur [2]


def build_pipeline(feed, crops: CropConfig, batch_size: int, device: str = "cpu", encoded: bool = False,
                   num_threads: int = 1, device_id: int | None = None, seed: int = 0, prefetch: int = 2,
                   webdataset: dict | None = None, checkpoint: str | None = None):
    """The DALI pipeline. ``device`` "cpu" runs with device_id=None; "gpu" decodes with "mixed".

    ``webdataset`` (paths, index_paths, shard_id, num_shards): the contexts and magnifications come
    from ``fn.readers.webdataset`` instead of the feed (which then omits them); the pipeline is
    checkpointable and ``checkpoint`` restores the reader's position.

    Outputs: one HWC float32 batch per crop (normalised, not yet clamped/transposed/solarised: see
    :func:`finish`), then flags [n_crops, 2] (transpose, solarise), mags, steps.
    """
    import warnings

    from nvidia.dali import fn, pipeline_def, types

    gpu = device == "gpu"
    n_crops = crops.n_global + crops.n_local
    if gpu and device_id is None:
        device_id = torch.cuda.current_device()  # the rank's device, set by the trainer

    extra = {"enable_checkpointing": True, "checkpoint": checkpoint} if webdataset else {}

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=(device_id or 0) if gpu else None,
                  seed=seed, prefetch_queue_depth=prefetch, exec_dynamic=True, **extra)
    def graph():
        # one external-source output per argument: per-crop subscripts/reshapes in the graph cost more
        # than the crops themselves on the CPU
        if webdataset:
            ctx, mags = fn.readers.webdataset(paths=webdataset["paths"], index_paths=webdataset["index_paths"],
                                              ext=["jpg", "mag"], dtypes=[types.UINT8, types.FLOAT],
                                              shard_id=webdataset["shard_id"], num_shards=webdataset["num_shards"],
                                              random_shuffle=True, initial_fill=256, seed=seed,
                                              missing_component_behavior="skip", name="shards")
            outs = fn.external_source(source=feed, num_outputs=2 + N_PER_CROP * n_crops, batch=True)
            flags, steps = outs[:2]
            outs = [None, None, None, None] + list(outs[2:])
        else:
            outs = fn.external_source(source=feed, num_outputs=4 + N_PER_CROP * n_crops, batch=True,
                                      layout=["" if encoded else "HWC"] + [""] * (3 + N_PER_CROP * n_crops))
            ctx, flags, mags, steps = outs[:4]
        if encoded or webdataset:
            img = fn.decoders.image(ctx, device="mixed" if gpu else "cpu", output_type=types.RGB)
        else:
            img = ctx.gpu() if gpu else ctx
        crops_out = []
        for c in range(n_crops):
            roi0, roi1, hflip, vflip, mt, blur = outs[4 + N_PER_CROP * c: 4 + N_PER_CROP * (c + 1)]
            size = crops.global_size if c < crops.n_global else crops.local_size
            x = fn.resize(img, size=[size, size], roi_start=roi0, roi_end=roi1, roi_relative=False,
                          antialias=False, interp_type=types.INTERP_LINEAR)
            x = fn.flip(x, horizontal=hflip, vertical=vflip)
            if crops.blur > 0:
                x = fn.cast(x, dtype=types.FLOAT)
                x = x + blur[0] * (fn.gaussian_blur(x, sigma=blur[1]) - x)
            crops_out.append(fn.coord_transform(x, MT=mt, dtype=types.FLOAT))
        return (*crops_out, flags, mags, steps)

    with warnings.catch_warnings():  # the blur outputs are unused when blur is off: by design
        warnings.filterwarnings("ignore", message=".*not used.*")
        # our feed restarts from the loader's next_step: its position is ours, not DALI's to save
        warnings.filterwarnings("ignore", message="Checkpointing enabled in a pipeline with external source")
        pipe = graph()
        pipe.build()
    return pipe


def feed_outputs(contexts: list | None, params: list[np.ndarray], mags: list | None, steps: list,
                 crops: CropConfig) -> list:
    """The external source's outputs from per-tile parameter rows [n_crops, N_PARAMS], batch-major lists.
    ``contexts=None``: the webdataset reader supplies contexts and magnifications."""
    flags = [np.ascontiguousarray(p[:, [S.P_TRANSPOSE, S.P_SOLAR]], dtype=np.float32) for p in params]
    out = [contexts, flags, mags, steps] if contexts is not None else [flags, steps]
    for c in range(params[0].shape[0]):
        out.append([p[c, [S.P_Y0, S.P_X0]] for p in params])
        out.append([p[c, [S.P_Y1, S.P_X1]] for p in params])
        out.append([np.array(p[c, S.P_HFLIP], np.int32) for p in params])
        out.append([np.array(p[c, S.P_VFLIP], np.int32) for p in params])
        out.append([S.normalising(p[c, S.P_MT:S.P_MT + 12].reshape(3, 4), crops.mean, crops.std) for p in params])
        out.append([p[c, [S.P_BLUR, S.P_SIGMA]] for p in params])
    return out


def _on(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A small host tensor on ``dev`` without waiting: a copy from pageable memory would sync the stream."""
    if dev.type != "cuda" or t.device == dev:
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


def finish(crops_hwc: list[torch.Tensor], flags: torch.Tensor, crops: CropConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """DALI's per-crop HWC outputs [B, S, S, 3] -> (globals [n_global * B, 3, G, G], locals), crop-major.

    flags [B, n_crops, 2]: transpose, solarise. Clamping in the normalised domain equals clamping
    the 0-255 values (normalisation is increasing per channel); solarise there is
    ``x -> (1 - 2 mean) / std - x`` where the raw value is >= 0.5. On a GPU nothing here waits for
    the device (per-tile choices are selects, not index lists): it runs while a step computes.
    """
    dev = crops_hwc[0].device
    b = crops_hwc[0].shape[0]
    mean = _on(torch.tensor(crops.mean), dev).view(1, 3, 1, 1)
    std = _on(torch.tensor(crops.std), dev).view(1, 3, 1, 1)
    lo, hi = -mean / std, (1 - mean) / std
    flags = _on(flags, dev) > 0.5
    g = torch.empty(crops.n_global * b, 3, crops.global_size, crops.global_size, device=dev)
    loc = torch.empty(crops.n_local * b, 3, crops.local_size, crops.local_size, device=dev)
    for c, x in enumerate(crops_hwc):
        dst = g[c * b:(c + 1) * b] if c < crops.n_global else loc[(c - crops.n_global) * b:(c - crops.n_global + 1) * b]
        y = x.permute(0, 3, 1, 2)
        # the one full copy: HWC -> CHW straight into the crop-major batch, transposed per tile (square crops)
        dst.copy_(torch.where(flags[:, c, 0].view(b, 1, 1, 1), y.transpose(2, 3), y))
        torch.clamp(dst, lo, hi, out=dst)
        if c == 1 and crops.solarize > 0:
            solar = flags[:, c, 1].view(b, 1, 1, 1) & (dst >= (0.5 - mean) / std)
            torch.where(solar, (1 - 2 * mean) / std - dst, dst, out=dst)
    return g, loc


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
        steps = [np.array(self.step, np.int64)] * b
        if self.tiles is None:  # the webdataset reader supplies the contexts
            self.step += 1
            return feed_outputs(None, params, None, steps, self.cfg.crops)
        got = self.tiles(self.step, idx)
        ctx = [c for c, _ in got]
        mags = [np.array(m, np.float32) for _, m in got]
        self.step += 1
        return feed_outputs(ctx, params, mags, steps, self.cfg.crops)


class DaliLoader:
    """Iterator of :class:`Batch` from a DALI pipeline; ``state_dict`` is the next step."""

    skips = None  # SkipCounters of the tile getters (set by the factory)

    def __init__(self, make_tiles, cfg: DataConfig, patch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 start_step: int = 0, device: str = "cpu", encoded: bool = False, num_threads: int = 1,
                 webdataset: dict | None = None):
        self.make_tiles, self.cfg, self.patch = make_tiles, cfg, patch_size
        self.webdataset, self._checkpoint = webdataset, None
        self.rank, self.world, self.seed = rank, world, seed
        self.device, self.encoded, self.num_threads = device, encoded, num_threads
        self.next_step = start_step
        self._it = None
        self._pipe = None

    def _make_iter(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.close()
        self._tiles = self.make_tiles() if self.make_tiles else None
        feed = TileFeed(self._tiles, self.cfg, self.rank, self.world, self.seed, self.next_step)
        c = self.cfg.crops
        self._pipe = build_pipeline(feed, c, self.cfg.batch_size, self.device, self.encoded, self.num_threads,
                                    seed=self.seed, webdataset=self.webdataset, checkpoint=self._checkpoint)
        names = [f"c{i}" for i in range(c.n_global + c.n_local)] + ["flags", "mags", "steps"]
        if self.webdataset:  # epochs of the reader roll over (auto_reset); never a short last batch
            from nvidia.dali.plugin.base_iterator import LastBatchPolicy

            return DALIGenericIterator([self._pipe], names, reader_name="shards", auto_reset=True,
                                       last_batch_policy=LastBatchPolicy.DROP)
        return DALIGenericIterator([self._pipe], names, auto_reset=False)

    def __iter__(self) -> "DaliLoader":
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = self._make_iter()
        try:
            out = next(self._it)[0]
        except StopIteration:  # webdataset: end of the reader's epoch; auto_reset started the next
            out = next(self._it)[0]
        c = self.cfg.crops
        step = int(out["steps"].reshape(-1)[0])
        g, loc = finish([out[f"c{i}"] for i in range(c.n_global + c.n_local)], out["flags"], c)
        masks = batch_masks(self.cfg, self.patch, self.seed, step, self.rank, self.world)
        self.next_step = step + 1
        return Batch(g, loc, torch.from_numpy(masks), out["mags"].reshape(-1).float().cpu(), step)

    def state_dict(self) -> dict:
        import base64

        state = {"next_step": self.next_step}
        cpt = self._it.checkpoints()[0] if (self.webdataset and self._it is not None) else self._checkpoint
        if self.webdataset and cpt:  # DALI's reader position, as text (checkpoint files stay plain)
            state["dali_checkpoint"] = base64.b64encode(cpt if isinstance(cpt, bytes) else cpt.encode()).decode()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.next_step = int(state["next_step"])
        import base64

        cpt = state.get("dali_checkpoint")
        self._checkpoint = base64.b64decode(cpt) if cpt else None
        self.close()

    def close(self) -> None:
        """Stop the pipeline and the reader processes (a new iterator starts them again)."""
        self._it = None
        self._pipe = None
        tiles, self._tiles = getattr(self, "_tiles", None), None
        if tiles is not None and hasattr(tiles, "close"):
            tiles.close()

"""Batches of multi-crop tiles, resumable at any step.

A *tile source* maps a global tile index and its generator to ``(context uint8 [C, C, 3],
magnification)``: generated tiles (:func:`synthetic_source`), or a tile getter's tiles
(:func:`.sources.torch_source`: the same draws, reads, retries and skips as the DALI path); the
loader turns indices into :class:`Batch` objects. Tile ``i`` of step ``s`` on rank ``r`` is the
global index ``(s * world + r) * B + i``, and every random draw for it is seeded by
``(seed, index)``: a run resumed at step ``s`` sees exactly what it would have seen, whatever
the number of workers. The data position saved in a checkpoint is just the next step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import DataConfig
from .masks import step_masks
from .multicrop import multicrop
from .synthetic import he_image

TileSource = Callable[[int, np.random.Generator], tuple[np.ndarray, float]]


@dataclass
class Batch:
    """One step's crops, crop-major: crop ``c`` of tile ``b`` is row ``c * B + b``.

    ``mask_indices`` and ``mask_weights`` are derived from ``masks`` where the batch is made (on
    the host, in the loader's worker): the training step selects the masked tokens with them, as
    a gather of known size, instead of a boolean index (which waits for the device to count).
    """

    global_crops: torch.Tensor  # [n_global * B, 3, G, G] float32, normalised
    local_crops: torch.Tensor  # [n_local * B, 3, L, L] float32, normalised
    masks: torch.Tensor  # [n_global * B, (G / patch) ** 2] bool, iBOT masks (student globals)
    mags: torch.Tensor  # [B] float32, magnification of each tile
    step: int  # the step this batch belongs to
    mask_indices: torch.Tensor | None = None  # [n_masked] int64: flat indices of masked patches, row-major
    mask_weights: torch.Tensor | None = None  # [n_masked] float32: iBOT weight of each (losses.ibot_weights)

    def __post_init__(self) -> None:
        if self.mask_indices is None:
            from ..losses.dino import ibot_weights

            flat = self.masks.reshape(-1)
            self.mask_indices = torch.nonzero(flat).reshape(-1)
            self.mask_weights = ibot_weights(self.masks)

    @property
    def n_tiles(self) -> int:
        return int(self.mags.shape[0])

    def tensors(self) -> list[torch.Tensor]:
        return [self.global_crops, self.local_crops, self.masks, self.mags, self.mask_indices, self.mask_weights]

    def map(self, fn) -> "Batch":
        """The same batch with ``fn`` applied to every tensor."""
        g, loc, m, mags, idx, w = (fn(t) for t in self.tensors())
        return Batch(g, loc, m, mags, self.step, idx, w)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self.map(lambda t: t.pin_memory())


def synthetic_source(cfg: DataConfig) -> TileSource:
    """H&E-like contexts at magnifications drawn with ``cfg.mag_weights``."""
    weights = np.asarray(cfg.mag_weights, dtype=np.float64)
    weights = weights / weights.sum()
    size = cfg.crops.context_size

    def source(index: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        mag = float(cfg.mags[int(rng.choice(len(weights), p=weights))])
        return he_image(rng, size, mag), mag

    return source


def batch_masks(cfg: DataConfig, patch_size: int, seed: int, step: int, rank: int, world: int) -> np.ndarray:
    """This rank's iBOT masks of a step [n_global * B, (G / patch) ** 2] bool (both augmentation paths)."""
    mk, c = cfg.masks, cfg.crops
    return step_masks(seed, step, c.n_global, cfg.batch_size, rank, world, c.global_size // patch_size,
                      mk.mask_probability, mk.ratio_min, mk.ratio_max, mk.min_block_patches, mk.aspect_min)


class _StepDataset(Dataset):
    """Item ``s`` = the whole batch of step ``s`` for this rank (one worker builds one batch)."""

    def __init__(self, source: TileSource, cfg: DataConfig, patch_size: int, rank: int, world: int, seed: int):
        self.source, self.cfg, self.patch = source, cfg, patch_size
        self.rank, self.world, self.seed = rank, world, seed

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, step: int) -> Batch:
        cfg, b = self.cfg, self.cfg.batch_size
        globals_, locals_, mags = [], [], []
        for i in range(b):
            index = (step * self.world + self.rank) * b + i
            rng = np.random.default_rng([self.seed, index])
            context, mag = self.source(index, rng)
            glob, loc = multicrop(context, rng, cfg.crops)
            globals_.append(glob)
            locals_.append(loc)
            mags.append(mag)
        # crop-major layout: [n_crops, B, ...] -> [n_crops * B, ...]
        g = torch.stack(globals_, 1).flatten(0, 1)
        loc = torch.stack(locals_, 1).flatten(0, 1)
        masks = batch_masks(cfg, self.patch, self.seed, step, self.rank, self.world)
        return Batch(g, loc, torch.from_numpy(masks), torch.tensor(mags, dtype=torch.float32), step)


class _From:
    """Sampler yielding step numbers from ``start`` on."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        step = self.start
        while True:
            yield step
            step += 1


class TileLoader:
    """Iterates over :class:`Batch` objects from ``start_step``; ``state_dict`` is the position."""

    skips = None  # SkipCounters of the tile getter (set by the factory; shared with the DataLoader workers)

    def __init__(self, source: TileSource, cfg: DataConfig, patch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, start_step: int = 0):
        self.dataset = _StepDataset(source, cfg, patch_size, rank, world, seed)
        self.num_workers = cfg.num_workers
        self.next_step = start_step
        self._it: Iterator[Batch] | None = None

    def _make_iter(self) -> Iterator[Batch]:
        loader = DataLoader(self.dataset, batch_size=None, sampler=_From(self.next_step),
                            num_workers=self.num_workers, persistent_workers=False,
                            prefetch_factor=2 if self.num_workers else None,
                            generator=torch.Generator())  # keep the global RNG untouched (exact resume)
        return iter(loader)

    def __iter__(self) -> "TileLoader":
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = self._make_iter()
        batch = next(self._it)
        self.next_step = batch.step + 1
        return batch

    def state_dict(self) -> dict:
        return {"next_step": self.next_step}

    def load_state_dict(self, state: dict) -> None:
        self.next_step = int(state["next_step"])
        self._it = None

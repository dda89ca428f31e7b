"""Tiles in, multi-crop batches out: synthetic H&E-like images, slides, or shards."""
from __future__ import annotations

from ..config import DataConfig
from .loader import Batch, TileLoader, synthetic_source


def build_loader(cfg: DataConfig, patch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 start_step: int = 0, run_dir: str | None = None):
    """The loader for ``cfg.source``; each yields :class:`Batch` and has state_dict/load_state_dict."""
    if cfg.source == "synthetic":
        return TileLoader(synthetic_source(cfg), cfg, patch_size, rank, world, seed, start_step)
    raise NotImplementedError(f"data.source={cfg.source!r} is not available in this build")


__all__ = ["Batch", "TileLoader", "build_loader", "synthetic_source"]

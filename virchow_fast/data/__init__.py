"""Tiles in, multi-crop batches out: synthetic H&E-like images, slides, shards, or generated demo slides."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..config import DataConfig


def __getattr__(name: str):
    # torch is imported lazily so that reader and indexing processes (spawned) start fast
    if name in ("Batch", "TileLoader", "synthetic_source"):
        from . import loader

        return getattr(loader, name)
    raise AttributeError(name)


def _dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _device(cfg: DataConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def _settings(cfg: DataConfig):
    from .index import IndexSettings

    return IndexSettings(tuple(cfg.mags), tuple(cfg.mag_mpp), cfg.crops.context_size, cfg.min_tissue, cfg.mpp or None)


def check_sources(cfg: DataConfig) -> None:
    """Fail before any work when ``data.paths`` names something that does not exist."""
    from ..config import ConfigError

    if cfg.source not in ("slides", "shards"):
        return
    for i, path in enumerate(cfg.paths):
        if not Path(path).exists():
            raise ConfigError(f"data.paths[{i}]: {path} does not exist")


def prepare_index(cfg: DataConfig, run_dir: str | None, rank: int = 0, wait_s: float = 1800.0) -> Path:
    """Index the configured slides (generating the demo slides first for source demo); returns the folder.

    Rank 0 generates and indexes, then writes ``<index>/READY``; the other ranks wait for that file
    (no process group is needed). Slides already indexed are skipped, so a restart costs little.
    """
    import time

    from .tiling import index_slides

    base = Path(run_dir or ".")
    index_dir = Path(cfg.index_dir) if cfg.index_dir else base / "tiles"
    ready = index_dir / "READY"
    if rank != 0:
        t0 = time.monotonic()
        while not ready.is_file():
            if time.monotonic() - t0 > wait_s:
                raise TimeoutError(f"{index_dir}: rank 0 did not finish the tile index in {wait_s:.0f} s")
            time.sleep(0.5)
        return index_dir
    ready.unlink(missing_ok=True)
    paths = list(cfg.paths)
    if cfg.source == "demo":
        from .testslides import make_demo_slides

        paths = [str(p) for p in make_demo_slides(base / "demo_slides", cfg.demo_slides)]
    rep = index_slides(paths, index_dir, _settings(cfg), workers=max(1, cfg.num_workers), progress=False)
    if rep.done:
        print(f"data: indexed {len(rep.done)} slides into {index_dir} ({len(rep.failed)} unreadable, "
              f"{len(rep.empty)} without tiles)", file=sys.stderr)
    ready.write_text("ok\n")
    return index_dir


def build_loader(cfg: DataConfig, patch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 start_step: int = 0, run_dir: str | None = None):
    """The loader for ``cfg.source``; each yields :class:`Batch` and has state_dict/load_state_dict.

    slides / demo / shards go through the DALI graph (CPU: ``device_id=None``; GPU: mixed decode)
    when DALI is installed, else through the torch reference multi-crop (``data.pipeline``).
    """
    from .loader import TileLoader, synthetic_source

    if cfg.source == "synthetic":
        return TileLoader(synthetic_source(cfg), cfg, patch_size, rank, world, seed, start_step)
    use_dali = cfg.pipeline == "dali" or (cfg.pipeline == "auto" and _dali_available())
    device = _device(cfg)
    from .sampling import MagSampler, TileTable

    if cfg.source in ("slides", "demo"):
        table = TileTable.from_index(prepare_index(cfg, run_dir, rank))
    else:
        from .sources import ShardTable

        table = ShardTable(cfg.paths[0])
    sampler = MagSampler(table, cfg)
    if not use_dali:
        return TileLoader(_torch_source(table, sampler, cfg), cfg, patch_size, rank, world, seed, start_step)
    from .dali_pipeline import DaliLoader

    if cfg.source == "shards" and cfg.shard_reader == "webdataset":
        tars = sorted(str(p) for p in Path(cfg.paths[0]).glob("shard-*.tar"))
        wds = {"paths": tars, "index_paths": [t[:-4] + ".idx" for t in tars], "shard_id": rank, "num_shards": world}
        return DaliLoader(None, cfg, patch_size, rank, world, seed, start_step, device, True, cfg.dali_threads, wds)
    if cfg.source == "shards":
        from .sources import ShardTiles

        encoded = device == "gpu"
        make = lambda: ShardTiles(table, sampler, seed, encoded=encoded)  # noqa: E731
    else:
        from .sources import SlideTiles
        from .workers import ReadPool

        encoded = False
        make = lambda: SlideTiles(table, sampler, ReadPool(max(1, cfg.num_workers)), seed, world)  # noqa: E731
    return DaliLoader(make, cfg, patch_size, rank, world, seed, start_step, device, encoded, cfg.dali_threads)


def _torch_source(table, sampler, cfg: DataConfig):
    """A TileSource for the torch reference path (reads in the loader's own processes)."""
    from .sources import ShardTable, ShardTiles
    from .workers import ReadFailure, SlideCache, read_task

    if isinstance(table, ShardTable):
        tiles = ShardTiles(table, sampler, 0)

        def shard_source(index: int, rng: np.random.Generator):
            for _ in range(16):
                mag, row = sampler.draw(rng)
                try:
                    return tiles._one(row), mag
                except Exception as exc:  # noqa: BLE001
                    print(f"data: skipped shard member {table.shards[table.shard[row]]}: {exc}", file=sys.stderr)
            raise RuntimeError("data: 16 shard members in a row failed")

        return shard_source
    cache = SlideCache()

    def slide_source(index: int, rng: np.random.Generator):
        for _ in range(16):
            mag, row = sampler.draw(rng)
            res = read_task(cache, table.task(row))
            if not isinstance(res, ReadFailure):
                return res, mag
            print(f"data: skipped tile: {res.message}", file=sys.stderr)
        raise RuntimeError("data: 16 reads in a row failed")

    return slide_source


__all__ = ["Batch", "TileLoader", "build_loader", "prepare_index", "synthetic_source"]

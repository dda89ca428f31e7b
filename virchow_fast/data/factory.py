"""The loader for a data config: which table, which tile getter, which augmentation path.

Sources: ``synthetic`` (generated in the loader), ``slides`` / ``demo`` (tile index + reader
processes), ``shards`` (catalogue + member reads, or DALI's webdataset reader). Augmentation: the
DALI graph (CPU or GPU) when DALI is installed, else the torch reference (``data.pipeline``).
Every loader yields :class:`.loader.Batch`, has state_dict / load_state_dict, and ``skips``
(:class:`.records.SkipCounters`, None for synthetic data).

Work on shared files (indexing slides, checking shards) happens on rank 0; the other ranks wait
in a collective for its result, or for its error, which they raise too (one line).
"""
from __future__ import annotations

import datetime
import logging
import tempfile
from pathlib import Path

from ..config import ConfigError, DataConfig
from ..logs import ensure_logging
from .records import DataError, SkipCounters

log = logging.getLogger("virchow_fast.data")

PREPARE_TIMEOUT_S = 7 * 24 * 3600.0  # how long the other ranks wait for rank 0's indexing (a corpus can take days)


def dali_available() -> bool:
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


def index_settings(cfg: DataConfig):
    from .index import IndexSettings

    return IndexSettings(tuple(cfg.mags), tuple(cfg.mag_mpp), cfg.crops.context_size, cfg.min_tissue, cfg.mpp or None)


def check_sources(cfg: DataConfig) -> None:
    """Fail before any work when ``data.paths`` names something that does not exist, or
    ``data.index_dir`` is not a folder."""
    if cfg.source not in ("slides", "shards", "demo"):
        return
    if cfg.index_dir and Path(cfg.index_dir).exists() and not Path(cfg.index_dir).is_dir():
        raise ConfigError(f"data.index_dir: {cfg.index_dir} is a file, not a folder")
    if cfg.source == "demo":
        return
    for i, path in enumerate(cfg.paths):
        if not Path(path).exists():
            raise ConfigError(f"data.paths[{i}]: {path} does not exist")
    if cfg.source == "shards" and not Path(cfg.paths[0]).is_dir():
        raise ConfigError(f"data.paths[0]: {cfg.paths[0]} is not a shard folder (write one with `tiles --shards`)")


def on_rank0(rank: int, work):
    """``work()`` on rank 0, its result broadcast to every rank of the process group.

    A failure on rank 0 reaches the other ranks as a :class:`DataError` with its line, so no rank
    waits for a result that never comes; rank 0 raises its own exception. Without a process group
    (one process, or a loader built alone as rank r) the caller does the work itself.
    """
    import torch.distributed as dist

    group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not group:
        return work()
    result, error, exc = None, None, None
    if rank == 0:
        try:
            result = work()
        except Exception as e:  # noqa: BLE001 (sent to the other ranks, then re-raised)
            exc, error = e, f"{type(e).__name__}: {e}".splitlines()[0]
    # a group of its own: rank 0 may index for hours, longer than the training group's timeout
    wait = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=PREPARE_TIMEOUT_S))
    box = [result, error]
    dist.broadcast_object_list(box, src=0, group=wait)
    dist.destroy_process_group(wait)
    result, error = box
    if exc is not None:
        raise exc
    if error is not None:
        raise DataError(f"rank 0 could not prepare the data: {error}")
    return result


def index_dir_of(cfg: DataConfig, run_dir: str | None) -> Path:
    return Path(cfg.index_dir) if cfg.index_dir else Path(run_dir or ".") / "tiles"


def prepare_index(cfg: DataConfig, run_dir: str | None, rank: int = 0) -> tuple[Path, list[Path]]:
    """(index folder, index files of the configured slides), made current on rank 0 first.

    Rank 0 generates the demo slides (source demo), then indexes every slide of ``data.paths`` whose
    index is missing, older than the slide, or built with other settings than the config's
    (context, magnifications and their mpp, min_tissue, mpp: the index file is rebuilt, the slides
    are never touched). Only these slides' indexes are used, whatever else the folder holds.
    """
    index_dir = index_dir_of(cfg, run_dir)
    if index_dir.exists() and not index_dir.is_dir():
        raise ConfigError(f"data.index_dir: {index_dir} is a file, not a folder")

    def work() -> list[Path]:
        from .tiling import index_slides

        paths = list(cfg.paths)
        if cfg.source == "demo":
            from .testslides import make_demo_slides

            paths = [str(p) for p in make_demo_slides(Path(run_dir or ".") / "demo_slides", cfg.demo_slides)]
        rep = index_slides(paths, index_dir, index_settings(cfg), workers=max(1, cfg.num_workers), progress=False,
                           exact=False)
        for _, line in rep.missing:
            log.warning("data: skipped %s", line)
        if rep.done or rep.failed:
            why = sorted({w for _, w in rep.rebuilt})
            rebuilt = f", {len(rep.rebuilt)} of them rebuilt ({why[0]}{', ...' if len(why) > 1 else ''})" \
                if rep.rebuilt else ""
            log.info("data: indexed %d slides into %s%s (%d unreadable, %d without tiles)",
                     len(rep.done), index_dir, rebuilt, len(rep.failed), len(rep.empty))
        files = rep.index_files(index_dir)
        if not files:
            raise DataError(f"{index_dir}: no slide of data.paths could be indexed ({len(rep.failed)} unreadable)")
        return files

    return index_dir, on_rank0(rank, work)


def _checked_shards(cfg: DataConfig, run_dir: str | None, rank: int) -> tuple[list[str], list[str], int]:
    from .shards import checked_indexes

    shard_dir = Path(cfg.paths[0])

    def work():
        tars = sorted(str(p) for p in shard_dir.glob("shard-*.tar"))
        if not tars:
            raise DataError(f"{shard_dir}: no shard-*.tar files (write them with `virchow-fast tiles --shards`)")
        out = Path(run_dir) / "shard_index" if run_dir else Path(tempfile.mkdtemp(prefix="virchow-shards-"))
        return checked_indexes(tars, out, shard_dir / "catalogue.npz")

    return on_rank0(rank, work)


def _shard_table(cfg: DataConfig):
    """The shard catalogue, refused in one line when its contexts are not ``data.crops.context_size``
    (DALI's crop boxes would reach outside a smaller context: it crashes the process)."""
    from .sources import ShardTable

    table = ShardTable(cfg.paths[0])
    if table.context != cfg.crops.context_size:
        raise DataError(f"{cfg.paths[0]}: shards of {table.context} px contexts, but data.crops.context_size is "
                        f"{cfg.crops.context_size}: write shards with `tiles --context {cfg.crops.context_size} "
                        "--shards` or change the config")
    return table


def build_loader(cfg: DataConfig, patch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 start_step: int = 0, run_dir: str | None = None):
    """The loader for ``cfg.source`` (see the module docstring). Its lines go to the ``virchow_fast`` logger."""
    from .loader import TileLoader, synthetic_source

    ensure_logging()

    if cfg.source == "synthetic":
        return TileLoader(synthetic_source(cfg), cfg, patch_size, rank, world, seed, start_step)
    use_dali = cfg.pipeline == "dali" or (cfg.pipeline == "auto" and dali_available())
    device = _device(cfg)
    skips = SkipCounters()
    if cfg.source == "shards" and cfg.shard_reader == "webdataset" and use_dali:
        from .dali_pipeline import DaliLoader

        _shard_table(cfg)
        tars, idxs, dropped = _checked_shards(cfg, run_dir, rank)
        skips.add("shard_samples_dropped", dropped)
        wds = {"paths": tars, "index_paths": idxs, "shard_id": rank, "num_shards": world}
        loader = DaliLoader(None, cfg, patch_size, rank, world, seed, start_step, device, True, cfg.dali_threads, wds)
        loader.skips = skips
        return loader
    from .sampling import MagSampler, TileTable
    from .sources import InProcessSlideTiles, ShardTable, ShardTiles, SlideTiles, torch_source

    if cfg.source in ("slides", "demo"):
        index_dir, files = prepare_index(cfg, run_dir, rank)
        table = TileTable.from_index(index_dir, files)
    else:
        table = _shard_table(cfg)
    sampler = MagSampler(table, cfg)
    shards = isinstance(table, ShardTable)
    if not use_dali:
        getter = ShardTiles(table, sampler, seed, counters=skips) if shards else \
            InProcessSlideTiles(table, sampler, seed, counters=skips)
        loader = TileLoader(torch_source(getter), cfg, patch_size, rank, world, seed, start_step)
    else:
        from .dali_pipeline import DaliLoader
        from .workers import ReadPool

        encoded = shards and device == "gpu"
        if shards:
            make = lambda: ShardTiles(table, sampler, seed, encoded=encoded, counters=skips)  # noqa: E731
        else:
            make = lambda: SlideTiles(table, sampler, ReadPool(max(1, cfg.num_workers), counters=skips),  # noqa: E731
                                      seed, world, counters=skips)
        loader = DaliLoader(make, cfg, patch_size, rank, world, seed, start_step, device, encoded, cfg.dali_threads)
    loader.skips = skips
    return loader

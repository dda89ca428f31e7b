"""Tiles in, multi-crop batches out: synthetic H&E-like images, slides, shards, or generated demo slides.

Where things live: :mod:`.factory` (the loader for a config), :mod:`.getter` (the tile-getter
protocol and its retry-and-skip policy), :mod:`.sources` (getters over slides and shards),
:mod:`.records` (read tasks, failures, skip counters, DataError), :mod:`.workers` (reader
processes), :mod:`.index` / :mod:`.tiling` (the tile index), :mod:`.shards`, :mod:`.loader` and
:mod:`.dali_pipeline` (the two augmentation paths).
"""
from __future__ import annotations

from .records import DataError

_LAZY = {"Batch": "loader", "TileLoader": "loader", "synthetic_source": "loader",
         "build_loader": "factory", "prepare_index": "factory", "check_sources": "factory"}


def __getattr__(name: str):
    # torch is imported lazily so that reader and indexing processes (spawned) start fast
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


__all__ = ["Batch", "DataError", "TileLoader", "build_loader", "check_sources", "prepare_index", "synthetic_source"]

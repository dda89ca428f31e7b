"""Tile getters for the DALI feed: slides (through reader processes) and shards.

A getter maps (step, global indices) to ``[(context, magnification)]``. The tile of index ``i`` is
drawn with ``default_rng([seed, i])``; when its read fails (one line naming the file, counted) the
same generator draws a replacement, so a run with the same failures is the same run. The getter
for slides submits the next step's reads before returning this one's, so reads overlap the graph;
the pool reads a step's tiles of one slide, level and size with one cuCIM batch read (workers.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .sampling import MagSampler, TileTable
from .workers import ReadFailure, ReadPool

MAX_RETRIES = 16


class SlideTiles:
    def __init__(self, table: TileTable, sampler: MagSampler, pool: ReadPool, seed: int, world: int = 1, log=None):
        self.table, self.sampler, self.pool, self.seed, self.world = table, sampler, pool, seed, world
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._pending: dict[int, tuple] = {}
        self.failures = 0

    def _submit(self, step: int, idx: list[int]) -> None:
        rngs = [np.random.default_rng([self.seed, i]) for i in idx]
        draws = [self.sampler.draw(r) for r in rngs]
        ids = self.pool.submit([self.table.task(row) for _, row in draws])
        self._pending[step] = (rngs, draws, ids)

    def __call__(self, step: int, idx: list[int]) -> list[tuple[np.ndarray, float]]:
        if step not in self._pending:
            self._submit(step, idx)
        rngs, draws, ids = self._pending.pop(step)
        # next step on this rank: index (s + 1) * world * B + ... = this index + world * B
        self._submit(step + 1, [i + self.world * len(idx) for i in idx])
        results = self.pool.collect(ids)
        out = []
        for rng, (mag, _), res in zip(rngs, draws, results):
            tries = 0
            while isinstance(res, ReadFailure):
                self.failures += 1
                tries += 1
                if tries > MAX_RETRIES:
                    raise RuntimeError(f"data: {MAX_RETRIES} reads in a row failed; last: {res.message}")
                mag, row = self.sampler.draw(rng)
                res = self.pool.map([self.table.task(row)])[0]
            out.append((res, mag))
        return out

    def close(self) -> None:
        self.pool.close()


# -- shards ------------------------------------------------------------------------------------

class ShardTable:
    """Samples of written shards: tar file, JPEG offset/size, magnification (from catalogue.npz)."""

    def __init__(self, shard_dir: str | Path):
        d = Path(shard_dir)
        cat = d / "catalogue.npz"
        if not cat.is_file():
            raise FileNotFoundError(f"{d}: no catalogue.npz (write shards with `virchow-fast tiles --shards`)")
        with np.load(cat) as z:
            self.shards = [str(d / s) for s in z["shards"]]
            self.shard, self.offset, self.size = z["shard"], z["offset"], z["size"]
            self.mag = z["mag"]
            self.key = z["key"]
        self.by_mag = {float(m): np.flatnonzero(self.mag == m) for m in np.unique(self.mag)}
        self.context = 0

    def __len__(self) -> int:
        return int(self.offset.shape[0])

    def read_bytes(self, row: int) -> bytes:
        with open(self.shards[self.shard[row]], "rb") as f:
            f.seek(int(self.offset[row]))
            return f.read(int(self.size[row]))


def decode_jpeg(data: bytes) -> np.ndarray:
    """RGB uint8 of a JPEG; raises on anything that is not one whole, decodable JPEG."""
    if len(data) < 4 or data[:2] != b"\xff\xd8" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        raise ValueError("not a complete JPEG (SOI/EOI markers)")
    import imagecodecs

    img = imagecodecs.jpeg8_decode(data)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"decoded to shape {img.shape}")
    return img


class ShardTiles:
    """Tile getter over shards: reads a member by offset; bad members are counted and replaced.

    ``encoded=False`` (CPU): decoded here, so a corrupt member never reaches DALI. ``encoded=True``
    (GPU, ``mixed`` decode): the bytes go to DALI after the marker check; shards are fully decoded
    once when written (shards.py), so a bad member there means the file changed since.
    """

    def __init__(self, table: ShardTable, sampler: MagSampler, seed: int, encoded: bool = False, log=None):
        self.table, self.sampler, self.seed, self.encoded = table, sampler, seed, encoded
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.failures = 0

    def _one(self, row: int):
        data = self.table.read_bytes(row)
        if self.encoded:
            decode_check = data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] == b"\xff\xd9"
            if not decode_check:
                raise ValueError("not a complete JPEG (SOI/EOI markers)")
            return np.frombuffer(data, np.uint8)
        return decode_jpeg(data)

    def __call__(self, step: int, idx: list[int]) -> list[tuple[np.ndarray, float]]:
        out = []
        for i in idx:
            rng = np.random.default_rng([self.seed, i])
            for _ in range(MAX_RETRIES):
                mag, row = self.sampler.draw(rng)
                try:
                    out.append((self._one(row), mag))
                    break
                except Exception as exc:  # noqa: BLE001
                    self.failures += 1
                    member = f"{self.table.key[row]}.jpg"
                    self.log(f"data: skipped shard member {self.table.shards[self.table.shard[row]]}:{member}: {exc}")
            else:
                raise RuntimeError(f"data: {MAX_RETRIES} shard members in a row failed")
        return out

"""Tile getters (:mod:`.getter`) over slides (through reader processes) and over shards.

The slide getter submits the next step's reads before returning this one's, so reads overlap the
graph; the pool reads a step's tiles of one slide, level and size with one cuCIM batch read
(workers.py). The shard getter reads members by offset and checks each against the CRC-32 the
writer recorded (a scrambled member can decode to plausible garbage; its checksum cannot lie).
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from .getter import DrawnTiles
from .records import DataError, ReadFailure
from .sampling import MagSampler, TileTable
from .workers import ReadPool


class SlideTiles(DrawnTiles):
    prefetch = True

    def __init__(self, table: TileTable, sampler: MagSampler, pool: ReadPool, seed: int, world: int = 1,
                 log=None, counters=None):
        super().__init__(sampler, seed, world, counters or pool.counters, log)
        self.table, self.pool = table, pool

    def _send(self, rows: list[int]):
        return self.pool.submit([self.table.task(r) for r in rows])

    def _collect(self, handle) -> list:
        return self.pool.collect(handle)

    def unit_of(self, row: int) -> int:
        return int(self.table.slide[row])

    def unit_name(self, unit: int) -> str:
        return self.table.slides[unit]

    def unit_size(self, unit: int) -> int:
        return int(np.count_nonzero(self.table.slide == unit))

    def close(self) -> None:
        super().close()
        self.pool.close()


class InProcessSlideTiles(SlideTiles):
    """Slide reads in this process (the torch path's DataLoader workers are the processes)."""

    prefetch = False

    def __init__(self, table: TileTable, sampler: MagSampler, seed: int, log=None, counters=None):
        super().__init__(table, sampler, ReadPool(0, counters=counters), seed, 1, log, counters)


# -- shards ------------------------------------------------------------------------------------

class ShardTable:
    """Samples of written shards: tar file, JPEG offset/size/CRC-32, magnification (from catalogue.npz)."""

    def __init__(self, shard_dir: str | Path):
        d = Path(shard_dir)
        cat = d / "catalogue.npz"
        if not cat.is_file():
            raise DataError(f"{d}: no catalogue.npz (write shards with `virchow-fast tiles --shards`)")
        try:
            with np.load(cat) as z:
                self.shards = [str(d / s) for s in z["shards"]]
                self.shard, self.offset, self.size = z["shard"], z["offset"], z["size"]
                self.mag, self.key = z["mag"], z["key"]
                self.crc = z["crc"] if "crc" in z.files else None  # shards written before checksums: decode check only
                self.context = int(z["context"]) if "context" in z.files else 0
        except Exception as exc:  # noqa: BLE001 (any unreadable catalogue is one line)
            msg = f"{cat}: unreadable shard catalogue ({type(exc).__name__}: {exc})"
            raise DataError(msg.splitlines()[0]) from None
        self.by_mag = {float(m): np.flatnonzero(self.mag == m) for m in np.unique(self.mag)}
        self.where = str(d)
        if not len(self):
            raise DataError(f"{cat}: the catalogue lists no samples")
        if not self.context:  # written before the catalogue recorded it: one member tells
            try:
                self.context = int(decode_jpeg(self.read_bytes(0)).shape[0])
            except Exception as exc:  # noqa: BLE001
                raise DataError(f"{d}: cannot tell the context size of its shards ({exc})") from None

    def __len__(self) -> int:
        return int(self.offset.shape[0])

    def read_bytes(self, row: int) -> bytes:
        """The member's bytes; raises ValueError when they are short or fail their checksum."""
        with open(self.shards[self.shard[row]], "rb") as f:
            f.seek(int(self.offset[row]))
            data = f.read(int(self.size[row]))
        if len(data) != int(self.size[row]):
            raise ValueError(f"{len(data)} of {int(self.size[row])} bytes (truncated shard)")
        if self.crc is not None and zlib.crc32(data) != int(self.crc[row]):
            raise ValueError("CRC-32 differs from the one written (the member changed since)")
        return data


def decode_jpeg(data: bytes) -> np.ndarray:
    """RGB uint8 of a JPEG; raises on anything that is not one whole, decodable JPEG."""
    if len(data) < 4 or data[:2] != b"\xff\xd8" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        raise ValueError("not a complete JPEG (SOI/EOI markers)")
    import imagecodecs

    img = imagecodecs.jpeg8_decode(data)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"decoded to shape {img.shape}")
    return img


class ShardTiles(DrawnTiles):
    """Tile getter over shards: reads a member by offset; bad members are counted, remembered and replaced.

    ``encoded=False`` (CPU): decoded here, so a corrupt member never reaches DALI. ``encoded=True``
    (GPU, ``mixed`` decode): the bytes go to DALI after the length, CRC and marker checks.
    """

    def __init__(self, table: ShardTable, sampler: MagSampler, seed: int, encoded: bool = False, log=None,
                 counters=None):
        super().__init__(sampler, seed, 1, counters, log)
        self.table, self.encoded = table, encoded

    def _one(self, row: int) -> np.ndarray:
        data = self.table.read_bytes(row)
        if self.encoded:
            if data[:2] != b"\xff\xd8" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
                raise ValueError("not a complete JPEG (SOI/EOI markers)")
            return np.frombuffer(data, np.uint8)
        return decode_jpeg(data)

    def _send(self, rows: list[int]):
        out = []
        for row in rows:
            where = f"{self.table.shards[self.table.shard[row]]}:{self.table.key[row]}.jpg"
            try:
                out.append(self._one(row))
            except FileNotFoundError:
                out.append(ReadFailure(f"{where}: the shard file is gone", whole_slide=True))
            except Exception as exc:  # noqa: BLE001 (any bad member is skipped with one line)
                out.append(ReadFailure(f"{where}: {exc}".splitlines()[0]))
        return out

    def _collect(self, handle) -> list:
        return handle

    def unit_of(self, row: int) -> int:
        return int(self.table.shard[row])

    def unit_name(self, unit: int) -> str:
        return self.table.shards[unit]

    def unit_size(self, unit: int) -> int:
        return int(np.count_nonzero(self.table.shard == unit))

    def remember(self, row: int, failure: ReadFailure) -> None:
        if failure.whole_slide:
            super().remember(row, failure)
            return
        self.counters.add("tiles_failed")
        if row not in self.bad_rows:  # shard skips keep their own wording: one line naming shard and member
            self.log(f"data: skipped shard member {failure.message}")
        self.bad_rows.add(row)


def torch_source(getter: DrawnTiles):
    """The torch reference path's tile source ``(index, rng) -> (context, mag)`` over a getter."""

    def source(index: int, rng: np.random.Generator):
        return getter.from_rngs([rng])[0]

    return source

"""The one tile-getter protocol and its one retry-and-skip policy.

A tile getter maps (step, global indices) to ``[(context, magnification)]``. The tile of index ``i``
is drawn with ``default_rng([seed, i])``; when its read fails, the same generator draws a
replacement, so a run with the same failures is the same run. Failures are remembered: a failed
tile is never read again, and a source that cannot be opened at all (a slide deleted or replaced
after indexing, a missing shard) is dropped whole, reported once. A draw of a remembered tile costs
no read: the generator simply draws again, exactly the draw a fresh failure would have made, so a
resumed run (which starts with no memory) still sees the same tiles.

Subclasses say how rows are read (``_send`` / ``_collect``, so reads can overlap the caller) and
which source a row belongs to (``unit_of``). The counts land in :class:`.records.SkipCounters`.
"""
from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from .records import DataError, ReadFailure, SkipCounters

MAX_FAILED_READS = 16  # fresh failures in a row for one tile before the run stops: the data is gone, not flaky
MAX_DRAWS = 4096  # draws of known-bad tiles in a row for one tile: nearly everything left is bad


class TileGetter(Protocol):
    counters: SkipCounters

    def __call__(self, step: int, idx: list[int]) -> list[tuple[np.ndarray, float]]: ...

    def close(self) -> None: ...

logger = logging.getLogger("virchow_fast.data")


class DrawnTiles:
    """Draw -> read -> on failure remember and redraw. ``prefetch``: submit step s + 1's reads
    before returning step s's tiles (for reads that run elsewhere: reader processes)."""

    prefetch = False

    def __init__(self, sampler, seed: int, world: int = 1, counters: SkipCounters | None = None, log=None):
        self.sampler, self.seed, self.world = sampler, seed, world
        self.counters = counters or SkipCounters()
        self.log = log or logger.warning  # its lines are all about skipped tiles
        self.bad_rows: set[int] = set()
        self.bad_units: set[int] = set()
        self._pending: dict[int, tuple] = {}

    # -- what subclasses provide ------------------------------------------------------------------

    def _send(self, rows: list[int]):
        """Start reading ``rows``; returns a handle for :meth:`_collect`."""
        raise NotImplementedError

    def _collect(self, handle) -> list:
        """Contexts (or :class:`ReadFailure`) of the rows of ``handle``, in order."""
        raise NotImplementedError

    def unit_of(self, row: int) -> int | None:
        """The source (slide, shard) a row belongs to, for whole-source failures."""
        return None

    def unit_name(self, unit: int) -> str:
        return str(unit)

    def unit_size(self, unit: int) -> int:
        return 0

    # -- the policy --------------------------------------------------------------------------------

    @property
    def failures(self) -> int:
        return self.counters["tiles_failed"]

    def known_bad(self, row: int) -> bool:
        return row in self.bad_rows or (bool(self.bad_units) and self.unit_of(row) in self.bad_units)

    def draw(self, rng: np.random.Generator) -> tuple[float, int]:
        for _ in range(MAX_DRAWS):
            mag, row = self.sampler.draw(rng)
            if not self.known_bad(row):
                return mag, row
            self.counters.add("tiles_known_bad")
        raise DataError(f"data: {MAX_DRAWS} draws in a row hit tiles known to be unreadable "
                        f"({len(self.bad_rows)} tiles, {len(self.bad_units)} whole sources); the data is gone")

    def remember(self, row: int, failure: ReadFailure) -> None:
        """Count a failed read; log it the first time its tile (or its whole source) fails."""
        self.counters.add("tiles_failed")
        unit = self.unit_of(row) if failure.whole_slide else None
        if unit is not None:
            if unit not in self.bad_units:
                self.bad_units.add(unit)
                self.counters.add("slides_unusable")
                self.log(f"data: skipped {self.unit_name(unit)} from now on ({self.unit_size(unit)} tiles): "
                         f"{failure.message}")
            return
        if row not in self.bad_rows and not self.known_bad(row):
            self.log(f"data: skipped tile: {failure.message}")
        self.bad_rows.add(row)

    def _start(self, rngs: list[np.random.Generator]) -> tuple:
        draws = [self.draw(r) for r in rngs]
        return rngs, draws, self._send([row for _, row in draws])

    def _finish(self, pending: tuple) -> list[tuple[np.ndarray, float]]:
        rngs, draws, handle = pending
        out = []
        for rng, (mag, row), res in zip(rngs, draws, self._collect(handle), strict=False):
            tries = 0
            while isinstance(res, ReadFailure):
                self.remember(row, res)
                tries += 1
                if tries >= MAX_FAILED_READS:
                    raise DataError(f"data: {MAX_FAILED_READS} reads in a row failed; last: {res.message}")
                mag, row = self.draw(rng)
                res = self._collect(self._send([row]))[0]
            out.append((res, mag))
        return out

    def _rngs(self, idx: list[int]) -> list[np.random.Generator]:
        return [np.random.default_rng([self.seed, i]) for i in idx]

    def __call__(self, step: int, idx: list[int]) -> list[tuple[np.ndarray, float]]:
        if not self.prefetch:  # reads in this process: one tile after the other, each knowing the failures before it
            return [t for rng in self._rngs(idx) for t in self._finish(self._start([rng]))]
        pending = self._pending.pop(step, None) or self._start(self._rngs(idx))
        self._pending.clear()
        out = self._finish(pending)
        # then the next step's reads (they overlap the graph's work on this step), drawn knowing this
        # step's failures; next step on this rank: index (s + 1) * world * B + ... = this index + world * B
        self._pending[step + 1] = self._start(self._rngs([i + self.world * len(idx) for i in idx]))
        return out

    def from_rngs(self, rngs: list[np.random.Generator]) -> list[tuple[np.ndarray, float]]:
        """Tiles drawn with the caller's generators (the torch path draws crops from them afterwards)."""
        return self._finish(self._start(rngs))

    def close(self) -> None:
        self._pending.clear()

"""The records the data package passes around: a read task, a failed read, the skip counters, the error.

Nothing here imports torch (reader processes import it).
"""
from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass
from typing import NamedTuple


class DataError(RuntimeError):
    """Bad data input (an index, a shard, a slide list); ``str()`` is one line naming the file or key."""


class ReadTask(NamedTuple):
    """One context read: level-0 top-left (x, y) at ``level``, ``read_px`` square, resized to ``out_px``."""

    path: str
    x: int
    y: int
    level: int
    read_px: int
    out_px: int
    mpp: float | None  # user-given mpp for a slide without one in its metadata
    stamp: tuple[int, float] | None = None  # (size, mtime) of the slide when indexed: a changed file is refused


@dataclass
class ReadFailure:
    message: str  # one line naming the file
    crashed: bool = False  # the reader process died on it
    whole_slide: bool = False  # the slide itself cannot be opened (deleted, replaced, truncated): every tile fails


COUNTERS = ("tiles_failed", "tiles_known_bad", "slides_unusable", "reader_crashes", "shard_samples_dropped")


class SkipCounters:
    """Counts of skipped data, in shared memory so that reader and DataLoader worker processes add to
    the same numbers the trainer logs (a spawned or forked child inherits the array)."""

    def __init__(self):
        self._a = mp.get_context("spawn").Array("q", len(COUNTERS))

    def add(self, name: str, n: int = 1) -> None:
        with self._a.get_lock():
            self._a[COUNTERS.index(name)] += n

    def __getitem__(self, name: str) -> int:
        return int(self._a[COUNTERS.index(name)])

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in zip(COUNTERS, self._a[:], strict=False)}

    def summary(self) -> str:
        """One line for the end of a run; empty when nothing was skipped."""
        d = self.as_dict()
        if not any(d.values()):
            return ""
        return ("data: " + f"{d['tiles_failed']} tile reads failed ({d['reader_crashes']} reader crashes), "
                f"{d['slides_unusable']} slides unusable, {d['tiles_known_bad']} draws of known-bad tiles skipped "
                f"unread, {d['shard_samples_dropped']} shard samples dropped")

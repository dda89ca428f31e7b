"""Slide reads in worker processes that may die.

cuCIM can take the whole process down (segfault) on a corrupt JPEG tile (shared/DESIGN.md), so
reads happen in child processes. Each worker answers tasks in order over its own pipe; when one
dies, the first task it had not answered is the one that killed it: that task fails ("reader
process crashed"), the worker is respawned, and its other tasks go to the new worker. Nothing here
imports torch, so a worker starts in about a second.

A task is ``(path, x, y, level, read_px, out_px, mpp)``; the answer is an RGB uint8 context
[out_px, out_px, 3] or a :class:`ReadFailure` with one line naming the file.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass
from multiprocessing.connection import wait

import numpy as np

TASK_TIMEOUT_S = 120.0
MAX_OPEN_SLIDES = 64


@dataclass
class ReadFailure:
    message: str  # one line naming the file
    crashed: bool = False


class SlideCache:
    """Open slides, least recently used closed first."""

    def __init__(self, size: int = MAX_OPEN_SLIDES):
        self.size, self.open = size, OrderedDict()

    def get(self, path: str, mpp: float | None):
        from .slides import Slide

        s = self.open.pop(path, None) or Slide(path, mpp=mpp)
        self.open[path] = s
        while len(self.open) > self.size:
            self.open.popitem(last=False)[1].close()
        return s

    def drop(self, path: str) -> None:
        s = self.open.pop(path, None)
        if s is not None:
            s.close()


def read_task(cache: SlideCache, task: tuple) -> np.ndarray | ReadFailure:
    """One context read with the sanity check; any failure becomes a ReadFailure (never raises)."""
    from .slides import SlideError, resize, sane_region

    path, x, y, level, read_px, out_px, mpp = task
    try:
        slide = cache.get(path, mpp)
        region = slide.read(int(x), int(y), int(level), int(read_px), int(read_px))
        why = sane_region(region, (int(read_px), int(read_px)))
        if why:
            cache.drop(path)  # the handle may be in a bad state after a bad decode
            return ReadFailure(f"{path}: bad region at ({x}, {y}) level {level}: {why}")
        return region if read_px == out_px else resize(region, int(out_px))
    except SlideError as exc:
        return ReadFailure(str(exc))
    except Exception as exc:  # noqa: BLE001 (any reader error is a failed read, not a dead run)
        cache.drop(path)
        return ReadFailure(f"{path}: read failed at ({x}, {y}) level {level}: {type(exc).__name__}: {exc}".splitlines()[0])


class DecoderLog:
    """The worker's C-level stdout, captured in a temp file.

    cuCIM reports a corrupt JPEG tile only by printing "ERROR ... while decompressing JPEG image:
    Corrupt JPEG data ..." on stdout and returns whatever it decoded (measured with cuCIM 26.10):
    the only reliable signal that a region is bad. After each read, C stdio is flushed and any new
    text turns the read into a failure.
    """

    def __init__(self):
        import ctypes
        import tempfile

        sys.stdout.flush()
        self.file = tempfile.TemporaryFile()
        os.dup2(self.file.fileno(), 1)
        self.libc = ctypes.CDLL(None)
        self.pos = 0

    def new_text(self) -> str:
        self.libc.fflush(None)
        end = os.lseek(1, 0, os.SEEK_END)
        if end == self.pos:
            return ""
        self.file.seek(self.pos)
        text = self.file.read(end - self.pos).decode(errors="replace")
        self.pos = end
        return text


def _serve(conn) -> None:
    cache = SlideCache()
    try:
        log = DecoderLog()
    except OSError:
        log = None
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        tid, task = msg
        result = read_task(cache, task)
        text = log.new_text() if log else ""
        if text and not isinstance(result, ReadFailure) and ("ERROR" in text or "Corrupt" in text):
            cache.drop(task[0])
            line = " ".join(t.strip() for t in text.strip().splitlines()[-2:])
            result = ReadFailure(f"{task[0]}: decoder error at ({task[1]}, {task[2]}) level {task[3]}: {line[:200]}")
        conn.send((tid, result))


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.pending: deque[tuple[int, tuple]] = deque()


class ReadPool:
    """``n`` reader processes; ``submit`` tasks, ``collect`` answers in order. ``n=0`` reads in-process
    (no crash protection: for tests and trusted files only)."""

    def __init__(self, n: int = 1, start_method: str = "spawn", log=None):
        self.n = n
        self.crashed = 0
        self.failed = 0
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._ids = itertools.count()
        self._done: dict[int, object] = {}
        self._ctx = mp.get_context(start_method)
        self._workers = [_Worker(self._ctx) for _ in range(n)]
        self._rr = 0
        self._cache = SlideCache() if n == 0 else None

    def submit(self, tasks: list[tuple]) -> list[int]:
        ids = []
        for task in tasks:
            tid = next(self._ids)
            ids.append(tid)
            if self.n == 0:
                self._done[tid] = read_task(self._cache, task)
                continue
            w = min(self._workers, key=lambda w: len(w.pending))
            w.pending.append((tid, task))
            try:
                w.conn.send((tid, task))
            except (BrokenPipeError, OSError):
                pass  # a dead worker: _poll sees its sentinel and hands its tasks to a new one
        return ids

    def collect(self, ids: list[int]) -> list[np.ndarray | ReadFailure]:
        want = set(ids)
        while not want <= self._done.keys():
            self._poll()
        out = [self._done.pop(t) for t in ids]
        for r in out:
            if isinstance(r, ReadFailure):
                self.failed += 1
                self.crashed += int(r.crashed)
                self.log(f"data: skipped tile: {r.message}")
        return out

    def map(self, tasks: list[tuple]) -> list[np.ndarray | ReadFailure]:
        return self.collect(self.submit(tasks))

    def _poll(self) -> None:
        busy = [w for w in self._workers if w.pending]
        if not busy:
            raise RuntimeError("ReadPool: waiting for answers no worker owes")
        ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=TASK_TIMEOUT_S)
        if not ready:  # a read hung: treat the oldest worker's task as fatal
            self._replace(busy[0], "reader process timed out")
            return
        for w in busy:
            if w.conn not in ready and w.proc.sentinel not in ready:
                continue
            dead = False
            try:
                while w.conn.poll():
                    tid, result = w.conn.recv()
                    w.pending.popleft()
                    self._done[tid] = result
            except (EOFError, OSError):
                dead = True
            if w.pending and (dead or not w.proc.is_alive()):
                self._replace(w, f"reader process crashed (exit {w.proc.exitcode})")

    def _replace(self, w: _Worker, why: str) -> None:
        tid, task = w.pending.popleft()
        self._done[tid] = ReadFailure(f"{task[0]}: {why} reading ({task[1]}, {task[2]}) level {task[3]}", crashed=True)
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(5)
        rest = list(w.pending)
        w.pending.clear()
        i = self._workers.index(w)
        nw = _Worker(self._ctx)
        self._workers[i] = nw
        for tid2, task2 in rest:
            nw.pending.append((tid2, task2))
            nw.conn.send((tid2, task2))
        self.log(f"data: {why}; reader process respawned ({self.crashed + 1} crashes so far)")

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for w in self._workers:
            w.proc.join(2)
            if w.proc.is_alive():
                w.proc.kill()
        self._workers = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

"""Slide reads in worker processes that may die.

cuCIM can take the whole process down (segfault) on a corrupt JPEG tile (docs/design.md), so
reads happen in child processes. Each worker answers tasks in order over its own pipe; when one
dies, the first task it had not answered is the one that killed it: that task fails ("reader
process crashed"), the worker is respawned, and its other tasks go to the new worker. Nothing here
imports torch, so a worker starts in about a second.

A task is a :class:`.records.ReadTask`; the answer is an RGB uint8 context [out_px, out_px, 3] or
a :class:`.records.ReadFailure` with one line naming the file (``whole_slide`` when the slide itself
cannot be opened). Failures are not logged here: the tile getter (getter.py) decides what to say.

Batches: :meth:`ReadPool.submit` groups its tasks by (slide, level, read size, output size) and
sends each group (split among the workers, at most ``MAX_BATCH``) as one message; the worker reads
a cuCIM group with one batch ``read_region`` (:meth:`.slides.Slide.read_batch`), the same pixels as
single reads. A batch that fails in any way (an exception, a decoder message, a region failing the
sanity check) is read again per region, so the bad region fails alone, exactly as a single read
would. A worker that dies inside a batch read (it says when it starts one) blames no region: the
group's regions go to the new worker one per message, and a repeated crash names the bad one.
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import signal
import sys
from collections import OrderedDict, deque
from multiprocessing.connection import wait

import numpy as np

from .records import ReadFailure, ReadTask, SkipCounters

TASK_TIMEOUT_S = 120.0
MAX_BATCH = 32  # regions per worker message
MAX_OPEN_SLIDES = 64


class SlideCache:
    """Open slides, least recently used closed first."""

    def __init__(self, size: int = MAX_OPEN_SLIDES):
        self.size, self.open = size, OrderedDict()

    def get(self, path: str, mpp: float | None, stamp: tuple[int, float] | None = None):
        """The open slide; opening it, a file whose (size, mtime) is not ``stamp`` is refused (the index
        describes another file: its tiles would read the wrong places)."""
        from .slides import Slide, SlideError

        s = self.open.pop(path, None)
        if s is None:
            if stamp is not None and os.path.isfile(path):
                st = os.stat(path)
                if (st.st_size, st.st_mtime) != (int(stamp[0]), float(stamp[1])):
                    raise SlideError(f"{path}: changed since it was indexed (size or time); index it again")
            s = Slide(path, mpp=mpp)
        self.open[path] = s
        while len(self.open) > self.size:
            self.open.popitem(last=False)[1].close()
        return s

    def drop(self, path: str) -> None:
        s = self.open.pop(path, None)
        if s is not None:
            s.close()


def read_task(cache: SlideCache, task: ReadTask) -> np.ndarray | ReadFailure:
    """One context read with the sanity check; any failure becomes a ReadFailure (never raises)."""
    from .slides import SlideError, resize, sane_region

    task = ReadTask(*task)
    path, x, y, level, read_px, out_px, mpp = task[:7]
    try:
        slide = cache.get(path, mpp, task.stamp)
    except Exception as exc:  # noqa: BLE001 (deleted, replaced or truncated since indexing: every tile fails)
        msg = str(exc) if isinstance(exc, SlideError) else f"{path}: {type(exc).__name__}: {exc}"
        return ReadFailure(msg.splitlines()[0], whole_slide=True)
    try:
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
        msg = f"{path}: read failed at ({x}, {y}) level {level}: {type(exc).__name__}: {exc}"
        return ReadFailure(msg.splitlines()[0])


def group_key(task: ReadTask) -> tuple:
    """Tasks with the same key can share one batch read: slide, level, read size, output size, mpp."""
    return (task.path, task.level, task.read_px, task.out_px, task.mpp)


def _decoder_failure(log, task: ReadTask) -> ReadFailure | None:
    """A failure when the decoder printed an error since the last look (the text is consumed)."""
    text = log.new_text() if log else ""
    if text and ("ERROR" in text or "Corrupt" in text):
        line = " ".join(t.strip() for t in text.strip().splitlines()[-2:])
        return ReadFailure(f"{task.path}: decoder error at ({task.x}, {task.y}) level {task.level}: {line[:200]}")
    return None


def read_checked(cache: SlideCache, task: ReadTask, log=None) -> np.ndarray | ReadFailure:
    """:func:`read_task`, then the decoder log: a read the decoder complained about is a failure."""
    result = read_task(cache, task)
    fail = _decoder_failure(log, task)
    if fail and not isinstance(result, ReadFailure):
        cache.drop(task.path)
        result = fail
    return result


def _read_batch(cache: SlideCache, tasks: list[ReadTask], log, note) -> list | None:
    """The group's contexts from one cuCIM batch read, or None (not cuCIM, or any sign of failure)."""
    from .slides import resize, sane_region

    path, _, _, level, read_px, out_px, mpp = tasks[0][:7]
    try:
        slide = cache.get(path, mpp, tasks[0].stamp)
    except Exception:  # noqa: BLE001 (the per-region reads report it, one line per tile)
        return None
    if slide.backend != "cucim":
        return None
    note("batch")
    try:
        regions = slide.read_batch([(int(t.x), int(t.y)) for t in tasks], int(level), int(read_px), int(read_px))
    except Exception:  # noqa: BLE001
        regions = None
    bad = _decoder_failure(log, tasks[0]) is not None or regions is None \
        or any(sane_region(r, (int(read_px), int(read_px))) for r in regions)
    if bad:
        cache.drop(path)  # the handle may be in a bad state; the per-region reads reopen it
        return None
    return [r if read_px == out_px else resize(r, int(out_px)) for r in regions]


def read_group(cache: SlideCache, tasks: list[ReadTask], log=None, note=lambda event: None):
    """Answers to tasks of one :func:`group_key`, in order (a generator: each answer as soon as it is known).

    Two or more regions of a cuCIM slide: one batch read; if it fails, ``note("single")`` and per-region
    reads (:func:`read_checked`), which isolate the bad region. ``note("batch")`` precedes a batch read.
    """
    if len(tasks) > 1:
        got = _read_batch(cache, tasks, log, note)
        if got is not None:
            yield from got
            return
        note("single")
    for task in tasks:
        yield read_checked(cache, task, log)


class DecoderLog:
    """The worker's C-level stdout, captured in a temp file.

    cuCIM reports a corrupt JPEG tile only by printing "ERROR ... while decompressing JPEG image:
    Corrupt JPEG data ..." on stdout and returns whatever it decoded (measured with cuCIM 26.10):
    the only reliable signal that a region is bad. After each read, C stdio is flushed and any new
    text turns the read into a failure. ``scoped``: for reads in the caller's process, which gets
    its stdout back from :meth:`close` (a reader process keeps the capture for its whole life).
    """

    def __init__(self, scoped: bool = False):
        import ctypes
        import tempfile

        sys.stdout.flush()
        self.libc = ctypes.CDLL(None)
        self.libc.fflush(None)
        self.saved = os.dup(1) if scoped else None
        self.file = tempfile.TemporaryFile()
        os.dup2(self.file.fileno(), 1)
        self.pos = 0

    def close(self) -> None:
        if self.saved is not None:
            self.libc.fflush(None)
            os.dup2(self.saved, 1)
            os.close(self.saved)
            self.saved = None
        self.file.close()

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
    # a terminal's Ctrl-C reaches this process too: the trainer stops with a checkpoint, then ends it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
        tids, tasks = msg
        answers = read_group(cache, tasks, log, note=lambda event: conn.send((event, None)))
        for tid, result in zip(tids, answers, strict=False):
            conn.send((tid, result))


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.pending: deque[tuple[int, ReadTask, int]] = deque()  # (task id, task, message id), in answer order
        self.in_batch = False  # the worker said it started a batch read and has not answered since


class ReadPool:
    """``n`` reader processes; ``submit`` tasks, ``collect`` answers in order. ``n=0`` reads in-process
    (no crash protection: for tests and trusted files only)."""

    def __init__(self, n: int = 1, start_method: str = "spawn", log=None, counters: SkipCounters | None = None):
        self.n = n
        self.crashed = 0  # reader processes that died (each counted when it dies)
        self.failed = 0
        self.counters = counters or SkipCounters()
        self.log = log or logging.getLogger("virchow_fast.data").warning  # reader crashes
        self._ids = itertools.count()
        self._done: dict[int, object] = {}
        self._ctx = mp.get_context(start_method)
        self._workers = [_Worker(self._ctx) for _ in range(n)]
        self._rr = 0
        self._cache = SlideCache() if n == 0 else None
        self._msgs = itertools.count()

    def submit(self, tasks: list[ReadTask]) -> list[int]:
        """Task ids, in order; the tasks go out grouped (:func:`group_key`), each group split among the workers."""
        tasks = [ReadTask(*t) for t in tasks]
        ids = [next(self._ids) for _ in tasks]
        groups: dict[tuple, list] = {}
        for tid, task in zip(ids, tasks, strict=False):
            groups.setdefault(group_key(task), []).append((tid, task))
        for items in groups.values():
            if self.n == 0:  # in this process, with the decoder's messages caught for the duration of the reads
                log = DecoderLog(scoped=True)
                try:
                    for (tid, _), res in zip(items, read_group(self._cache, [t for _, t in items], log), strict=True):
                        self._done[tid] = res
                finally:
                    log.close()
                continue
            size = min(MAX_BATCH, -(-len(items) // self.n))
            for k in range(0, len(items), size):
                self._send(min(self._workers, key=lambda w: len(w.pending)), items[k:k + size])
        return ids

    def _send(self, w: _Worker, items: list[tuple[int, ReadTask]]) -> None:
        mid = next(self._msgs)
        w.pending.extend((tid, task, mid) for tid, task in items)
        try:
            w.conn.send(([tid for tid, _ in items], [task for _, task in items]))
        except (BrokenPipeError, OSError):
            pass  # a dead worker: _poll sees its sentinel and hands its tasks to a new one

    def collect(self, ids: list[int]) -> list[np.ndarray | ReadFailure]:
        want = set(ids)
        while not want <= self._done.keys():
            self._poll()
        out = [self._done.pop(t) for t in ids]
        self.failed += sum(isinstance(r, ReadFailure) for r in out)
        return out

    def map(self, tasks: list[ReadTask]) -> list[np.ndarray | ReadFailure]:
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
                    w.in_batch = tid == "batch"
                    if isinstance(tid, str):  # "batch" / "single": what the worker is about to do
                        continue
                    w.pending.popleft()
                    self._done[tid] = result
            except (EOFError, OSError):
                dead = True
            if w.pending and (dead or not w.proc.is_alive()):
                self._replace(w, f"reader process crashed (exit {w.proc.exitcode})")

    def _replace(self, w: _Worker, why: str) -> None:
        head = w.pending[0][2]
        if w.in_batch:  # inside a batch read: the culprit is unknown; its group goes out one region per message
            n = sum(1 for p in w.pending if p[2] == head)
            note = f" in a batch read of {n} regions of {w.pending[0][1].path} (read again one by one)"
        else:
            tid, task, _ = w.pending.popleft()
            self._done[tid] = ReadFailure(f"{task.path}: {why} reading ({task.x}, {task.y}) level {task.level}",
                                          crashed=True)
            note = ""
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(5)
        rest = list(w.pending)
        w.pending.clear()
        i = self._workers.index(w)
        nw = _Worker(self._ctx)
        self._workers[i] = nw
        msgs: dict = {}
        for tid2, task2, mid in rest:
            key = ("single", tid2) if (w.in_batch and mid == head) else mid
            msgs.setdefault(key, []).append((tid2, task2))
        for items in msgs.values():
            self._send(nw, items)
        self.crashed += 1
        self.counters.add("reader_crashes")
        self.log(f"data: {why}{note} ({self.crashed} crashes so far); reader process respawned")

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

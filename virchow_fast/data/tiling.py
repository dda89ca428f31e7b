"""Index many slides in parallel processes; a crash or a bad file costs one slide, never the run.

Each slide is indexed in its own child process (a segfaulting reader takes only that child
down), up to ``workers`` at a time, with a progress bar. Finished slides (an index in the output
folder current for the file and the settings) are skipped; an index built from an older file or
with other settings is rebuilt (it is derived data: the slide is the source); unreadable slides,
missing paths and folders without slides are reported with one line naming them.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import sys
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

from .index import IndexSettings, index_file, index_state, write_index
from .records import DataError
from .slides import SlideError, gather_slides

logger = logging.getLogger("virchow_fast.data")

SLIDE_TIMEOUT_S = 1800.0


@dataclass
class TilingReport:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already indexed
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, one-line reason)
    empty: list[str] = field(default_factory=list)  # indexed, but no tile kept (tiny slide, no tissue)
    rebuilt: list[tuple[str, str]] = field(default_factory=list)  # (path, why): also in done or failed
    missing: list[tuple[str, str]] = field(default_factory=list)  # named paths that gave no slide: (path, line)

    def index_files(self, out_dir: str | Path) -> list[Path]:
        """The current index files of this run's slides (indexed now or before), in slide order."""
        return [index_file(p, out_dir) for p in self.done + self.skipped]


def _child(path: str, out_dir: str, settings: IndexSettings, conn) -> None:
    from .workers import DecoderLog

    try:
        log = DecoderLog()  # cuCIM prints a line per corrupt JPEG tile it decodes: counted, said once
    except OSError:
        log = None
    try:
        target = write_index(path, out_dir, settings)
        import numpy as np

        with np.load(target) as z:
            n = len(z["x"])
        text = log.new_text() if log else ""
        errors = sum("ERROR" in line for line in text.splitlines())  # "ERROR in line ... decompressing JPEG"
        if n == 0:
            conn.send(("empty", f"{path}: no tiles kept (smaller than a {settings.context} px context at every "
                                f"magnification, or no tissue >= {settings.min_tissue:.2f})"))
        elif errors:
            conn.send(("ok", f"{path}: {errors} decoder errors in the level read for the tissue mask (corrupt JPEG "
                             "tiles: tiles there may fail when read, and are then skipped)"))
        else:
            conn.send(("ok", ""))
    except SlideError as exc:
        conn.send(("err", str(exc)))
    except Exception as exc:  # noqa: BLE001 (any failure is this slide's, reported in one line)
        conn.send(("err", f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))


def index_slides(paths: list[str], out_dir: str | Path, settings: IndexSettings, workers: int = 2,
                 progress: bool = True, log=None, start_method: str = "spawn", exact: bool = True) -> TilingReport:
    """Index every slide in ``paths`` (files or folders) into ``out_dir``.

    ``exact=False`` (training): an index holding more magnifications than ``settings`` asks for is current.
    """
    report = TilingReport()
    files, report.missing = gather_slides(paths)
    todo, stale = [], {}
    for p in files:
        state = index_state(p, out_dir, settings, exact) if Path(p).is_file() else "missing"
        if state == "current":
            report.skipped.append(p)
        else:
            todo.append(p)
            if state != "missing":
                stale[p] = state
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{out_dir}: cannot create the index folder ({exc.strerror or exc})") from None
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="tiles", unit="slide", file=sys.stderr)
        log = (lambda line: bar.write(line, file=sys.stderr)) if log is None else log
    log = log or logger.warning  # every line is about a slide that failed or gave no tile
    ctx = mp.get_context(start_method)
    running: dict = {}  # sentinel -> (path, proc, conn)
    queue = list(todo)

    def finish(path: str, status: str, msg: str) -> None:
        if path in stale:
            report.rebuilt.append((path, stale[path]))
        if status == "ok":
            report.done.append(path)
            if msg:
                log(f"tiles: {msg}")
        elif status == "empty":
            report.done.append(path)
            report.empty.append(path)
            log(f"tiles: {msg}")
        else:
            report.failed.append((path, msg))
            log(f"tiles: skipped {msg}")
        if bar:
            bar.update(1)

    while queue or running:
        while queue and len(running) < max(1, workers):
            path = queue.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(path, str(out_dir), settings, child), daemon=True)
            proc.start()
            child.close()
            running[proc.sentinel] = (path, proc, parent)
        ready = wait(list(running), timeout=SLIDE_TIMEOUT_S)
        if not ready:
            for s, (path, proc, _) in list(running.items()):
                proc.kill()
                proc.join()
                del running[s]
                finish(path, "err", f"{path}: indexing timed out after {SLIDE_TIMEOUT_S:.0f} s")
            continue
        for s in ready:
            path, proc, conn = running.pop(s)
            proc.join()
            msg = None
            try:
                if conn.poll():
                    msg = conn.recv()
            except (EOFError, OSError):
                msg = None
            if msg is None:
                finish(path, "err", f"{path}: reader process crashed (exit {proc.exitcode})")
            else:
                finish(path, *msg)
    if bar:
        bar.close()
    return report


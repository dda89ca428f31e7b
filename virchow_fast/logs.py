"""The package's one logging setup: a stderr handler on the ``virchow_fast`` logger.

Every module logs to ``logging.getLogger("virchow_fast.<area>")``. The CLI calls
:func:`ensure_logging` with its ``--log-level``; the entry points (``train.loop.run``, tiles, embed,
eval, export) call it too, so a run started in-process (a test, a notebook) shows the same lines.
A handler someone installed already (or a level they set) is left as it is.
"""
from __future__ import annotations

import logging
import sys

ROOT = "virchow_fast"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (pytest's capture, a notebook's redirect),
    not to the stream that was current when the handler was made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass


def ensure_logging(level: str | int | None = None) -> logging.Logger:
    """Install the stderr handler on the ``virchow_fast`` logger unless it has a handler already.

    ``level`` (``"debug"``, ``"info"``, ... or a number) is set when given; without it the logger
    gets INFO only if no level was set on it before. Messages do not propagate to the root logger
    (they would print twice where the application configured the root too).
    """
    root = logging.getLogger(ROOT)
    if not root.handlers:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
    if level is not None:
        root.setLevel(level.upper() if isinstance(level, str) else level)
    elif root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return root

"""Errors a run ends with that the command line shows as one line (no traceback): the message says it all."""
from __future__ import annotations


class RunError(RuntimeError):
    """A run refused to start, or stopped, for a reason its message names (file, key or step)."""

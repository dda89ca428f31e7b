"""Errors a run ends with that the command line shows as one line (no traceback): the message says it all."""
from __future__ import annotations


class RunError(RuntimeError):
    """A run refused to start, or stopped, for a reason its message names (file, key or step)."""


class NonFiniteLossError(RunError):
    """``train.max_nonfinite_steps`` non-finite losses in a row."""


class NonFiniteWeightsError(RunError):
    """An update left NaN or infinity in the weights (found at the next step's statistics read)."""

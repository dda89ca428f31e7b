"""Which checkpoints a run keeps: a new one displaces older ones only once a finite step has run from it.

A diverging update can leave weights that are finite but useless (every later loss is NaN), so a
finite check of the weights alone cannot tell a good checkpoint from a poisoned one. Here a new
checkpoint is *pending* until the step after it comes out finite (loss terms, gradient norm and
weights); only then are the checkpoints older than it pruned to ``train.keep_checkpoints``. If the
run instead ends in non-finite steps, the pending checkpoint is renamed to
``suspect-step_XXXXXXXX`` (kept, never picked by --resume) and the newest confirmed one stays.
Rank 0 acts; the other ranks keep the same bookkeeping without touching files.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .checkpoint import list_checkpoints, step_of


class CheckpointKeeper:
    def __init__(self, run_dir: str | os.PathLike, keep: int, is_main: bool):
        self.run_dir, self.keep, self.is_main = Path(run_dir), keep, is_main
        self.pending: list[Path] = []

    def saved(self, path: Path) -> None:
        """``path`` was just written, unpruned: pending until a finite step runs from it."""
        self.pending.append(Path(path))

    def confirm(self) -> None:
        """A finite step ran from the newest pending checkpoint (or the run ended cleanly): prune up to it."""
        if not self.pending:
            return
        upto, self.pending = step_of(self.pending[-1]), []
        if not self.is_main:
            return
        older = [p for p in list_checkpoints(self.run_dir) if step_of(p) < upto]
        for old in older[:max(len(older) - (self.keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)

    def diverged(self) -> str:
        """The run ends in non-finite steps: set the pending checkpoints aside; returns what to tell the user."""
        pending, self.pending = self.pending, []
        for path in pending:
            if self.is_main and path.is_dir():
                os.replace(path, path.with_name(f"suspect-{path.name}"))
        good = [p for p in list_checkpoints(self.run_dir) if p not in pending]
        said = f"; kept as suspect-*: {', '.join(p.name for p in pending)} (no finite step ran from them)" \
            if pending else ""
        newest = f"--resume continues from {good[-1].name}" if good else "no checkpoint to resume from"
        return f"{said}; {newest}"

"""One run per run directory: a new run never writes over an earlier one.

A directory holds a run once it has a checkpoint (complete or half-written) or a non-empty
``metrics.jsonl``. Training into it again needs ``--resume`` (continue that run) or ``--overwrite``
(start a new run there: the earlier one is first renamed, whole, to ``<dir>.old-<UTC time>`` beside
it, so its checkpoints, metrics, tile index and generated slides stay together and nothing is
deleted). Rank 0 looks and renames; every rank receives its verdict, so all refuse or all go on.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .distributed import from_main
from .errors import RunError

log = logging.getLogger("virchow_fast.train")


def run_marks(run_dir: str | os.PathLike) -> list[str]:
    """What in ``run_dir`` shows an earlier run (empty when there is none)."""
    root = Path(run_dir)
    marks = []
    ckpts = root / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        marks.append("checkpoints/")
    metrics = root / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        marks.append("metrics.jsonl")
    return marks


def _aside_name(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while target.exists():  # two overwrites within a second
        target = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
        n += 1
    return target


def _decide(run_dir: Path, resume: bool, overwrite: bool) -> tuple[str, str | None]:
    if resume and overwrite:
        return "refuse", "--resume continues the run in train.output_dir and --overwrite starts a new one: give one"
    marks = run_marks(run_dir)
    if resume or not marks:
        return "ok", None
    if not overwrite:
        return "refuse", (f"{run_dir} holds an earlier run ({', '.join(marks)}): continue it with --resume, start a "
                          f"new run there with --overwrite (moves the earlier one to {run_dir.name}.old-<time>), "
                          "or choose another train.output_dir")
    here, whole = Path.cwd().resolve(), run_dir.resolve()
    if here == whole or whole in here.parents:  # a renamed working directory would still be "." here
        return "refuse", (f"--overwrite: {run_dir} is (or holds) the working directory and cannot be moved aside; "
                          "run from elsewhere or choose another train.output_dir")
    target = _aside_name(whole)
    try:
        os.rename(run_dir, target)
    except OSError as exc:
        return "refuse", (f"--overwrite: cannot move the earlier run in {run_dir} aside to {target} "
                          f"({exc.strerror}); choose another train.output_dir")
    return "moved", str(target)


def prepare_run_dir(run_dir: str | os.PathLike, resume: bool, overwrite: bool, is_main: bool) -> Path | None:
    """Refuse (:class:`RunError`, on every rank) or clear the way for this run; returns where an earlier run went.

    Call on every rank before anything is written into ``run_dir``.
    """
    verdict = from_main(_decide(Path(run_dir), resume, overwrite) if is_main else None)
    kind, detail = verdict
    if kind == "refuse":
        raise RunError(detail)
    if kind == "moved":
        if is_main:
            log.warning("--overwrite: the earlier run in %s is now %s", run_dir, detail)
        return Path(detail)
    return None

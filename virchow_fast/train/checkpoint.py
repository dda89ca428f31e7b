"""Checkpoints through torch.distributed.checkpoint (DCP), complete or absent.

A checkpoint is the folder ``<run>/checkpoints/step_XXXXXXXX``; it is written as
``.tmp-step_XXXXXXXX`` and renamed when every rank has finished, so a folder with the final name is
complete and a half-written one (killed mid-save) is never picked (and is removed by the next
save). Before the rename each checkpoint gets a ``manifest.json`` of sizes and checksums (see
train/integrity.py) and the files its caller adds (the loop: the resolved config and the schedules,
see train/resume.py).
A checkpoint whose weights are not finite is never written, and pruning removes only checkpoints
older than the one just written. The run directory must be on a filesystem every rank sees (rank 0
renames and prunes). Inside: the student, teacher, optimizer (sharded or not: DCP reshards on load,
also to another number of processes), the loss state (centers), the step, the data position and
each rank's RNG state.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .errors import RunError
from .integrity import nonfinite_count, write_manifest

log = logging.getLogger("virchow_fast.train")

_NAME = re.compile(r"^step_(\d{8})$")


class NonFiniteCheckpointError(RunError):
    """The weights to be saved hold NaN or infinity: nothing is written, the earlier checkpoints stay."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every save/load without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / ".metadata").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, as rank 0 sees it (broadcast, so every rank loads the same)."""
    found = list_checkpoints(run_dir) if _rank() == 0 else []
    choice = [str(found[-1]) if found else None]
    if dist.is_initialized() and _world() > 1:
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] is not None else None


def rng_state() -> dict:
    """This process's CPU RNG state and, when CUDA is in use, the current device's."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _app_state(student, teacher, optimizer, extra: dict) -> dict:
    opts = StateDictOptions()
    return {
        "student": get_model_state_dict(student, options=opts),
        "teacher": get_model_state_dict(teacher, options=opts),
        "optimizer": get_optimizer_state_dict(student, optimizer, options=opts),
        "extra": extra,
    }


def step_of(path: str | os.PathLike) -> int:
    return int(_NAME.match(Path(path).name).group(1))


def _nonfinite_weights(*modules) -> bool:
    bad = nonfinite_count([p for m in modules for p in m.parameters()])
    if dist.is_initialized() and _world() > 1:
        bad = bad.to(next(modules[0].parameters()).device)
        dist.all_reduce(bad)
    return bool(bad > 0)


def save_checkpoint(run_dir: str | os.PathLike, step: int, student, teacher, optimizer, losses: dict,
                    data_state: dict, keep: int, extras: dict[str, Callable[[Path], None]] | None = None,
                    prune: bool = True) -> Path:
    """Write the checkpoint of ``step`` (the next step to run) atomically; keep the newest ``keep`` up to it.

    ``prune=False`` leaves the older ones for the caller (the loop prunes once a finite step has run
    from the new one, train/keeper.py).
    ``extras``: file name -> writer(path), files rank 0 adds before the checkpoint is sealed. Raises
    :class:`NonFiniteCheckpointError`, on every rank, instead of saving non-finite weights.
    """
    if _nonfinite_weights(student, teacher):
        raise NonFiniteCheckpointError(f"step {step}: the weights hold NaN or infinity after the last update (lr "
                                       f"too high?); checkpoint not written, the earlier ones in "
                                       f"{checkpoint_dir(run_dir)} are kept: lower optim.base_lr and --resume")
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):  # this save's own, and any left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    rank = _rank()
    extra = {
        "step": step,
        "world_size": _world(),
        "losses": {name: {k: v.detach().cpu() for k, v in loss.state_dict().items()} for name, loss in losses.items()},
        # per-rank entries: rank r's data position and RNG (DCP stores non-tensor objects per rank)
        f"data_rank{rank}": json.dumps(data_state),  # a leaf object: DCP would flatten a dict
        f"rng_rank{rank}": rng_state(),
    }
    state = _app_state(student, teacher, optimizer, extra)
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=str(tmp))
    if rank == 0:
        for name, write in (extras or {}).items():
            write(tmp / name)
    write_manifest(tmp)  # a collective: every rank's files are in it when it returns on rank 0
    _barrier()
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        older = [p for p in list_checkpoints(run_dir) if step_of(p) < step] if prune else []
        for old in older[:max(len(older) - (keep - 1), 0)]:  # never one from beyond this step
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | os.PathLike, student, teacher, optimizer, losses: dict) -> dict:
    """Load ``path`` into the given objects; returns {"step", "data": this rank's data state or None}.

    Works across a change in the number of processes: model and optimizer shards are resharded by
    DCP; a rank that has no saved data position / RNG of its own starts them from the step.
    """
    rank = _rank()
    opts = StateDictOptions()
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    saved_keys = {k.split(".")[1] for k in meta.state_dict_metadata if k.startswith("extra.")}
    extra: dict = {"step": 0, "world_size": 1,
                   "losses": {name: {k: v.detach().cpu().clone() for k, v in loss.state_dict().items()}
                              for name, loss in losses.items()}}
    # placeholders of the saved structure: a JSON string, and RNG tensors of the right size
    if f"data_rank{rank}" in saved_keys:
        extra[f"data_rank{rank}"] = ""
    if f"rng_rank{rank}" in saved_keys:
        extra[f"rng_rank{rank}"] = rng_state()
    state = _app_state(student, teacher, optimizer, extra)
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(student, state["student"], options=opts)
    set_model_state_dict(teacher, state["teacher"], options=opts)
    set_optimizer_state_dict(student, optimizer, state["optimizer"], options=opts)
    extra = state["extra"]
    for name, loss in losses.items():
        loss.load_state_dict({k: v.to(next(iter(loss.buffers())).device) for k, v in extra["losses"][name].items()})
    same_world = int(extra["world_size"]) == _world()
    if not same_world and rank == 0:
        log.warning("checkpoint %s was written by %s process(es), resuming on %d: model and optimizer resharded, "
                    "data position taken from the step, per-rank RNG streams restarted",
                    path, extra["world_size"], _world())
    if same_world and extra.get(f"rng_rank{rank}") is not None:
        set_rng_state(extra[f"rng_rank{rank}"])
    data = json.loads(extra[f"data_rank{rank}"]) if same_world and extra.get(f"data_rank{rank}") else None
    return {"step": int(extra["step"]), "data": data}

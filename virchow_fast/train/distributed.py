"""Process-group setup from torchrun's environment, and the stop signal every rank agrees on.

A plain single process needs no process group, unless ``parallel.fsdp: on`` asks for FSDP2 on
one process: then a one-rank group is made in memory (no rendezvous variables needed).
"""
from __future__ import annotations

import datetime
import logging
import os
import signal
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config import Config, ConfigError

log = logging.getLogger("virchow_fast.train")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: object | None = field(default=None, repr=False)  # DeviceMesh when a process group exists: (shard,) or
    # (replicate, shard) for HSDP

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """In-place sum across ranks (the losses' hook); no-op for one process."""
        if self.world_size > 1:
            dist.all_reduce(tensor)

    @property
    def reducer(self):
        return self.all_reduce if self.world_size > 1 else None


def init_distributed(cfg: Config) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.train.device
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda, but no CUDA device is visible (torch.cuda.is_available() is False); "
                          "use auto or cpu")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=30)
        if world > 1:
            dist.init_process_group(backend=backend, timeout=timeout, device_id=device if use_cuda else None)
        elif cfg.parallel.fsdp == "on":
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                    device_id=device if use_cuda else None)
    mesh = None
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        mesh = device_mesh(device.type, world, shard_group_size(cfg.parallel.shard_size, world))
    return DistInfo(rank, world, local_rank, device, mesh)


def shard_group_size(configured: int, world: int) -> int:
    """Processes per FSDP shard group: ``parallel.shard_size``, or one node (LOCAL_WORLD_SIZE) for 0."""
    size = configured or min(int(os.environ.get("LOCAL_WORLD_SIZE", world)), world)
    if size <= 0 or size > world or world % size:
        raise ConfigError(f"parallel.shard_size: {size} does not divide the {world} processes of this launch")
    return size


def device_mesh(device_type: str, world: int, shard: int):
    """1-D mesh ("shard",) for plain FSDP; 2-D ("replicate", "shard") for HSDP, with each shard group a
    block of consecutive ranks (one node under torchrun), so parameter gathers stay inside a node."""
    from torch.distributed.device_mesh import init_device_mesh

    if shard == world:
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))


def from_main(value):
    """Rank 0's ``value`` on every rank (one pickled broadcast); ``value`` itself without a process group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def shutdown_distributed(barrier: bool = True) -> None:
    """Leave the process group; ``barrier=False`` after an error (the other ranks may never arrive)."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()  # gloo can abort ranks that leave while others are still in a collective
        dist.destroy_process_group()


class StopRequest:
    """Ctrl-C (SIGINT), SIGTERM / SIGUSR1 (SLURM preemption, torchrun shutdown) -> checkpoint and exit cleanly.

    The handler only records the signal. The loop sends ``pending`` through its per-step
    all-reduce, so every rank stops at the same step even when only one was signalled.
    Once a stop is pending, SIGINT gets the system's default action back: a second Ctrl-C ends
    the process at once (also inside a blocking collective or a checkpoint write; a half-written
    checkpoint is never picked). A repeated SIGTERM / SIGUSR1 is ignored: a preempting launcher
    is waiting for that checkpoint. Processes forked after ``install`` (reader workers) inherit the
    handler and ignore the first signal quietly: the main process ends them.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def install(self) -> "StopRequest":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an embedding application): no preemption support
                log.warning("cannot install a handler for %s outside the main thread", signal.Signals(sig).name)
        return self

    def _handle(self, signum, frame) -> None:
        if signal.SIGINT in self._previous:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C ends the process at once
        if os.getpid() != self._pid:  # a forked worker: the main process decides when it ends
            return
        if self.signum is None:
            self.signum = signum
            # A group-wide signal also kills data-loader workers (torch gives them a SIGTERM handler);
            # torch's SIGCHLD handler would then raise in the middle of a step. The loop fetches no
            # batch after a stop request, so worker deaths from here on are expected: stop watching.
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            # logging takes re-entrant locks: a handler that interrupts a log call in this thread still writes
            again = " (Ctrl-C again to quit at once, without one)" if signum == signal.SIGINT else ""
            log.warning("received %s: stopping after this step with a checkpoint%s", signal.Signals(signum).name, again)

    @property
    def pending(self) -> bool:
        return self.signum is not None

    def close(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


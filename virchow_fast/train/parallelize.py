"""Activation checkpointing -> torch.compile -> FSDP2 fully_shard, applied from outside the model.

The model (model/) is plain modules. This file decides, per ``ParallelConfig`` and the process
group, how the student and the teacher run:

- activation checkpointing per transformer block (off / full / every k-th block): the block's
  ``forward`` is replaced on the instance by a non-reentrant ``torch.utils.checkpoint`` call, so
  parameter names (and therefore checkpoints and optimizer groups) are identical with and without
  it; the RNG state is replayed on recompute, so drop path is exact;
- optional ``torch.compile`` of each block (``Module.compile``: in place, names unchanged);
- FSDP2 ``fully_shard`` per block, then at the root, with ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32, output_dtype=fp32)`` under ``mixed_precision: bf16``: the sharded parameters
  (the optimizer's master weights) stay fp32, compute runs on bf16 copies gathered per block and
  gradients are reduce-scattered in fp32. The heads stay in the root's group (the prototypes are
  read through ``normalized_prototypes`` inside the root's forward, see model/ssl.py).
- the teacher is sharded the same way (no gradients, no optimizer state; it reshards after its
  no-grad forward, so ``ema_update`` lerps the local fp32 shards without any gather).

One GPU runs the way FSDP runs: with ``mixed_precision: bf16`` and ``fsdp: auto`` a single process
gets FSDP2 over a one-rank group (made here when none exists): bf16 compute copies of the
parameters cast once per forward and backward, fp32 master weights, optimizer and gradient
reduction, a bf16 residual stream between blocks, the same numbers as a multi-GPU run. Only
``fsdp: off`` with bf16 runs the forward under ``torch.autocast(bf16)`` (fp32 weights re-cast by
every matmul, fp32 residual stream and norms: more memory traffic, close to but not identical
with FSDP's numbers).
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config import ParallelConfig
from .distributed import DistInfo

log = logging.getLogger("virchow_fast.train")


def use_fsdp(cfg: ParallelConfig, info: DistInfo) -> bool:
    """FSDP2 on: ``on``, or ``auto`` with more than one process or with bf16 (one GPU as FSDP runs it)."""
    return cfg.fsdp == "on" or (cfg.fsdp == "auto" and (info.world_size > 1 or cfg.mixed_precision == "bf16"))


def _one_rank_mesh(info: DistInfo):
    """A one-rank process group (in memory, no rendezvous) and its mesh, for FSDP2 on a single process."""
    import datetime

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        cuda = info.device.type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=datetime.timedelta(minutes=30), device_id=info.device if cuda else None)
    return init_device_mesh(info.device.type, (1,), mesh_dim_names=("shard",))


def checkpointed_blocks(cfg: ParallelConfig, depth: int) -> list[int]:
    """Indices of the blocks whose activations are recomputed in backward."""
    if cfg.activation_checkpointing == "full":
        return list(range(depth))
    if cfg.activation_checkpointing == "every_k":
        return [i for i in range(depth) if i % cfg.ac_every == 0]
    return []


def _apply_ac(block: nn.Module) -> None:
    forward = block.forward  # the bound class method

    @functools.wraps(forward)
    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():  # the teacher, evaluation: nothing to save
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

    block.forward = checkpointed


def _apply_autocast(net: nn.Module, dtype: torch.dtype, device_type: str) -> None:
    forward = net.forward

    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=dtype):
            out = forward(*args, **kwargs)
        return {k: v.float() if torch.is_floating_point(v) else v for k, v in out.items()}

    net.forward = autocast_forward


def _shard(net: nn.Module, info: DistInfo, bf16: bool, teacher: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    block_mp = root_mp = MixedPrecisionPolicy()
    if bf16:
        # blocks pass bf16 activations to each other; only the root's outputs (the losses' inputs) are fp32
        block_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        root_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                       output_dtype=torch.float32)
    for block in net.backbone.blocks:
        fully_shard(block, mesh=info.mesh, mp_policy=block_mp)
    # Root: the student keeps its root parameters gathered between forward and backward (FSDP's
    # default); the teacher has no backward, so it must reshard right after its forward, or the
    # EMA would update a gathered copy that is then thrown away.
    fully_shard(net, mesh=info.mesh, mp_policy=root_mp, reshard_after_forward=True if teacher else None)


def _mesh_text(mesh) -> str:
    if mesh is None or mesh.ndim == 1:
        return ""
    return f" (HSDP: {mesh.size(0)} replicas x {mesh.size(1)} shards)"


def parallelize(student: nn.Module, teacher: nn.Module, cfg: ParallelConfig, info: DistInfo):
    """Return (student, teacher) ready to train, modified in place.

    Call on modules already on ``info.device`` (FSDP2 shards the parameters where they are).
    Single process, fp32, no AC, no compile: unchanged.
    """
    depth = len(student.backbone.blocks)
    bf16 = cfg.mixed_precision == "bf16"
    ac = checkpointed_blocks(cfg, depth)
    for i in ac:
        _apply_ac(student.backbone.blocks[i])
    if cfg.compile:
        for net in (student, teacher):
            for block in net.backbone.blocks:
                block.compile()
    fsdp = use_fsdp(cfg, info)
    if fsdp and info.mesh is None:
        info.mesh = _one_rank_mesh(info)
    if fsdp:
        _shard(student, info, bf16, teacher=False)
        _shard(teacher, info, bf16, teacher=True)
    elif bf16:
        for net in (student, teacher):
            _apply_autocast(net, torch.bfloat16, info.device.type)
    if info.is_main:
        log.info("parallelize: fsdp=%s over %d process(es)%s, precision=%s%s, activation checkpointing on %d/%d "
                 "blocks, compile=%s", fsdp, info.world_size, _mesh_text(info.mesh) if fsdp else "", cfg.mixed_precision,
                 "" if fsdp or not bf16 else " (autocast)", len(ac), depth, cfg.compile)
    return student, teacher

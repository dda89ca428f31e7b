"""Activation checkpointing -> torch.compile -> FSDP2 fully_shard, applied from outside the model.

The model (model/) is plain modules. This file decides, per ``ParallelConfig`` and the process
group, how the student and the teacher run:

- activation checkpointing per transformer block (off / full / every k-th block): the block's
  ``forward`` is replaced on the instance by a non-reentrant ``torch.utils.checkpoint`` call, so
  parameter names (and therefore checkpoints and optimizer groups) are identical with and without
  it; the RNG state is replayed on recompute, so drop path is exact;
- optional ``torch.compile`` of each block (``Module.compile``: in place, names unchanged);
- FSDP2 ``fully_shard`` per block, then at the root, with ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)`` under ``mixed_precision: bf16`` (bf16 outputs, the losses' inputs): the sharded parameters
  (the optimizer's master weights) stay fp32, compute runs on bf16 copies gathered per block and
  gradients are reduce-scattered in fp32. The heads stay in the root's group (the prototypes are
  read through ``normalized_prototypes`` inside the root's forward, see model/ssl.py).
- the teacher is sharded the same way (no gradients, no optimizer state; it reshards after its
  no-grad forward, so ``ema_update`` lerps the local fp32 shards without any gather).

One GPU runs the way FSDP runs, without FSDP's copies: with ``mixed_precision: bf16`` and
``fsdp: auto`` a single process gets persistent bf16 compute copies of its fp32 parameters
(train/copies.py), swapped in per block as FSDP2 would gather them: fp32 master weights and
optimizer, bf16 gradients read by the optimizer as their exact fp32 casts, a bf16 residual stream,
the same numbers as a multi-GPU run; the fused update rewrites the copies as it updates the
masters. With ``compile: true`` (the compiled blocks would trace the swap) a single process gets
FSDP2 over a one-rank group instead (made here when none exists), which casts the copies in every
forward. Only ``fsdp: off`` with bf16 runs the forward under ``torch.autocast(bf16)`` (fp32 weights
re-cast by every matmul, fp32 residual stream and norms: more memory traffic, close to but not
identical with FSDP's numbers).
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


def use_compute_copies(cfg: ParallelConfig, info: DistInfo) -> bool:
    """One process, bf16, ``fsdp: auto``, no compile: bf16 compute copies (train/copies.py), no FSDP."""
    return (cfg.fsdp == "auto" and info.world_size == 1 and cfg.mixed_precision == "bf16"
            and not cfg.compile)


def use_fsdp(cfg: ParallelConfig, info: DistInfo) -> bool:
    """FSDP2 on: ``on``, or ``auto`` with more than one process, or one compiled bf16 process (one GPU as
    FSDP runs it; uncompiled, :func:`use_compute_copies` does that without FSDP's casts)."""
    return cfg.fsdp == "on" or (cfg.fsdp == "auto" and (
        info.world_size > 1 or (cfg.mixed_precision == "bf16" and cfg.compile)))


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
    """Indices of the blocks whose activations are recomputed in backward (all of them under selective)."""
    if cfg.activation_checkpointing in ("full", "selective"):
        return list(range(depth))
    if cfg.activation_checkpointing == "every_k":
        return [i for i in range(depth) if i % cfg.ac_every == 0]
    return []


# Selective checkpointing keeps what is expensive to recompute: the matmul outputs (qkv, proj, fc1,
# fc2) and the attention's output and log-sum-exp. The cheap memory-bound ops between them
# (LayerNorm, SwiGLU, residual + LayerScale, drop path) are recomputed in backward. A saved output
# must not be mutated later, so a selectively checkpointed block runs its residual GEMMs out of
# place (Block.inplace_residual off: addmm, whose copy of C costs a pass over the rows).
_KEEP = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
         torch.ops.aten.convolution.default}


def keeps_output(op) -> bool:
    """Whether selective checkpointing saves this op's output (else it is recomputed in backward)."""
    return op in _KEEP or "attention" in str(op)


def _keep_matmuls(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if keeps_output(op) else CheckpointPolicy.PREFER_RECOMPUTE


def recomputed_blocks(cfg: ParallelConfig, depth: int) -> list[int]:
    """Blocks whose matmuls run again in backward (selective checkpointing keeps them: none)."""
    return [] if cfg.activation_checkpointing == "selective" else checkpointed_blocks(cfg, depth)


def _apply_ac(block: nn.Module, selective: bool = False) -> None:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    forward = block.forward  # the bound class method
    extra = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)} if selective else {}
    if selective and hasattr(block, "inplace_residual"):
        block.inplace_residual = False  # selective checkpointing caches GEMM outputs: none may be mutated

    @functools.wraps(forward)
    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():  # the teacher, evaluation: nothing to save
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **extra, **kwargs)

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
        # everything passes bf16 activations, the root's outputs (the losses' inputs) too: the head loss
        # runs bf16 dots with fp32 accumulation (model/heads.py), the regulariser upcasts its own input
        block_mp = root_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = list(net.backbone.blocks)
    for i, block in enumerate(blocks):
        # The student's last block is the first one backward needs: keeping it gathered after the
        # forward saves one all-gather per step for one block's bf16 parameters of memory. The
        # teacher has no backward and must reshard (its EMA updates the local shards).
        # On a one-rank shard group (one GPU) resharding frees nothing: no block regathers for backward.
        keep = not teacher and (i == len(blocks) - 1 or info.mesh.size(info.mesh.ndim - 1) == 1)
        fully_shard(block, mesh=info.mesh, mp_policy=block_mp, reshard_after_forward=not keep)
    # Root: the student keeps its root parameters gathered between forward and backward (FSDP's
    # default); the teacher has no backward, so it must reshard right after its forward, or the
    # EMA would update a gathered copy that is then thrown away.
    fully_shard(net, mesh=info.mesh, mp_policy=root_mp, reshard_after_forward=True if teacher else None)
    prefetch(blocks, backward=not teacher)


def prefetch(blocks: list[nn.Module], backward: bool) -> None:
    """Explicit FSDP2 prefetch, one block ahead: block i's forward issues block i+1's all-gather (and
    backward block i's issues block i-1's), so each gather runs under the previous block's compute.
    The teacher's no-grad forward gets the same forward schedule; it has no backward."""
    for i, block in enumerate(blocks):
        if i + 1 < len(blocks):
            block.set_modules_to_forward_prefetch([blocks[i + 1]])
        if backward and i > 0:
            block.set_modules_to_backward_prefetch([blocks[i - 1]])


def _mesh_text(mesh) -> str:
    if mesh is None or mesh.ndim == 1:
        return ""
    return f" (HSDP: {mesh.size(0)} replicas x {mesh.size(1)} shards)"


def _choose_in_child(cfg, tiles: int, shards: int, device_bytes: float):
    from ..perf.memory import choose_policy

    return choose_policy(cfg, tiles, shards, device_bytes)


def resolve_activation_checkpointing(cfg, info: DistInfo) -> ParallelConfig:
    """``cfg.parallel`` with ``activation_checkpointing: auto`` replaced by a policy.

    On a CUDA device: the cheapest of off / selective / full whose estimated memory (perf/memory.py,
    from a data-free trace of the step, a few seconds in a fresh process on rank 0) fits the device
    with a 10 % margin; every rank takes rank 0's choice. Elsewhere ``off`` (no device to fit).
    """
    import dataclasses

    p = cfg.parallel
    if p.activation_checkpointing != "auto":
        return p
    choice, note = "off", "not a CUDA device"
    if info.device.type == "cuda":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        import torch.distributed as dist

        box = [None]
        if info.is_main:
            total = torch.cuda.get_device_properties(info.device).total_memory
            shards = info.mesh.size(info.mesh.ndim - 1) if info.mesh is not None else info.world_size
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                choice, estimates = pool.submit(_choose_in_child, cfg, cfg.data.batch_size, shards, total).result()
            box = [(choice, ", ".join(f"{k} {v / 1e9:.1f} GB" for k, v in estimates.items())
                    + f" of {total / 1e9:.1f} GB")]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        choice, note = box[0]
    if info.is_main:
        log.info("parallel.activation_checkpointing=auto -> %s (%s)", choice, note)
    return dataclasses.replace(p, activation_checkpointing=choice)


def parallelize(student: nn.Module, teacher: nn.Module, cfg: ParallelConfig, info: DistInfo):
    """Return (student, teacher) ready to train, modified in place.

    Call on modules already on ``info.device`` (FSDP2 shards the parameters where they are).
    Single process, fp32, no AC, no compile: unchanged.
    """
    depth = len(student.backbone.blocks)
    bf16 = cfg.mixed_precision == "bf16"
    ac = checkpointed_blocks(cfg, depth)
    copies = use_compute_copies(cfg, info)
    if copies:  # before checkpointing wraps the blocks: the recompute must swap the copies in too
        from .copies import ComputeCopies

        for net in (student, teacher):
            ComputeCopies(net, torch.bfloat16)
    for i in ac:
        _apply_ac(student.backbone.blocks[i], selective=cfg.activation_checkpointing == "selective")
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
    elif bf16 and not copies:
        for net in (student, teacher):
            _apply_autocast(net, torch.bfloat16, info.device.type)
    if info.is_main:
        how = "" if fsdp or not bf16 else " (compute copies)" if copies else " (autocast)"
        log.info("parallelize: fsdp=%s over %d process(es)%s, precision=%s%s, activation checkpointing %s on %d/%d "
                 "blocks, compile=%s", fsdp, info.world_size, _mesh_text(info.mesh) if fsdp else "",
                 cfg.mixed_precision, how, cfg.activation_checkpointing, len(ac), depth, cfg.compile)
    return student, teacher

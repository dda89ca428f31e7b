"""One GPU without FSDP: bf16 compute copies of the fp32 parameters, swapped in around each forward.

FSDP2 on a one-rank group gives a single GPU the multi-GPU numbers (bf16 compute, fp32 master
weights, optimizer and gradient reduction), but it pays for them every step: each forward casts
every fp32 shard to bf16 into an all-gather buffer and copies it out again (student and teacher),
and each backward copies every bf16 gradient into an fp32 reduce-scatter buffer and out again. On
one rank none of that moves data anywhere: it is 7.6 ms of a ViT-H step (the cost model's
"casts and copies").

:class:`ComputeCopies` keeps the numbers and drops the copies:

- each fp32 parameter (the master weight: what the optimizer updates, checkpoints save and the
  EMA reads) gets one persistent bf16 copy; the student's copies are autograd leaves, so backward
  leaves bf16 gradients on them (what the student's FSDP backward would reduce in fp32: the bf16 to
  fp32 cast is exact);
- the copies are swapped into the modules around each forward, FSDP's way: per transformer block
  (inside the block's forward, so activation checkpointing's recompute in backward sees them too)
  and at the root for the rest (embeddings, final norm, heads); floating inputs are cast to bf16,
  as FSDP's ``cast_forward_inputs`` does. Outside a forward the modules hold their fp32 masters,
  so ``state_dict``, checkpoints and ``named_parameters`` are exactly as without copies;
- the optimizer writes the new copies as it writes the masters (``FusedAdamW.update``: one pass,
  kernels/adamw_ema.py). Any other change of a master (a checkpoint loaded, ``model.init_from``,
  the torch reference update) bumps its version counter, and the next forward refreshes the copies
  first, so they are never stale.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map


class ComputeCopies:
    """Compute copies in ``dtype`` of ``net``'s floating-point parameters (``requires_grad`` as the masters)."""

    def __init__(self, net: nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        owner: dict[int, list] = {}  # id(block) -> [(module, name, master)]
        blocks = list(net.backbone.blocks)
        block_of = {}
        for b in blocks:
            for m in b.modules():
                block_of[id(m)] = b
        self.entries: list[tuple[nn.Module, str, nn.Parameter]] = []
        for module in net.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.is_floating_point():
                    entry = (module, name, p)
                    self.entries.append(entry)
                    owner.setdefault(id(block_of.get(id(module), net)), []).append(entry)
        self.copy: dict[int, torch.Tensor] = {}  # id(master) -> its compute copy
        with torch.no_grad():
            for _, _, p in self.entries:
                c = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
                self.copy[id(p)] = c
        self._versions = [p._version for _, _, p in self.entries]
        self.root_entries = owner.get(id(net), [])
        self.block_entries = [owner.get(id(b), []) for b in blocks]
        self._wrap(net, blocks)

    # -- what the optimizer and the step read -------------------------------------------------------
    def of(self, master: torch.Tensor) -> torch.Tensor | None:
        """The compute copy of ``master`` (None: not one of this net's floating parameters)."""
        return self.copy.get(id(master))

    def copies(self) -> list[torch.Tensor]:
        return [self.copy[id(p)] for _, _, p in self.entries]

    def masters(self) -> list[nn.Parameter]:
        return [p for _, _, p in self.entries]

    def zero_grad(self) -> None:
        for c in self.copy.values():
            c.grad = None

    def mark_synced(self) -> None:
        """The copies equal their masters (the fused update wrote both)."""
        self._versions = [p._version for _, _, p in self.entries]

    @torch.no_grad()
    def refresh(self) -> bool:
        """Recast the copies whose masters changed since they were last written; True if any was."""
        stale = [i for i, (_, _, p) in enumerate(self.entries) if p._version != self._versions[i]]
        if not stale:
            return False
        masters = [self.entries[i][2] for i in stale]
        torch._foreach_copy_([self.copy[id(p)] for p in masters], [p.detach() for p in masters])
        self.mark_synced()
        return True

    # -- swapping ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _swapped(self, entries):
        for module, name, p in entries:
            module._parameters[name] = self.copy[id(p)]
        try:
            yield
        finally:
            for module, name, p in entries:
                module._parameters[name] = p

    def _cast(self, tree):
        return tree_map(lambda v: v.to(self.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v,
                        tree)

    def _wrap(self, net: nn.Module, blocks: list[nn.Module]) -> None:
        for block, entries in zip(blocks, self.block_entries, strict=True):
            forward = block.forward

            @functools.wraps(forward)
            def block_forward(*args, _forward=forward, _entries=entries, **kwargs):
                with self._swapped(_entries):
                    return _forward(*self._cast(args), **self._cast(kwargs))

            block.forward = block_forward
        forward = net.forward

        @functools.wraps(forward)
        def root_forward(*args, **kwargs):
            self.refresh()
            with self._swapped(self.root_entries):
                return forward(*self._cast(args), **self._cast(kwargs))

        net.forward = root_forward
        net.compute_copies = self


def compute_copies_of(net: nn.Module) -> ComputeCopies | None:
    return getattr(net, "compute_copies", None)

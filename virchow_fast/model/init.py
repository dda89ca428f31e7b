"""Initial weights: one rule per kind of parameter, each parameter drawn from its own seeded generator.

Every parameter gets a generator seeded from (run seed, parameter name), so its initial value does not
depend on the order in which modules are built or on how the network is split. That is what lets a
sharded build (FSDP2 on the meta device) give every rank exactly the values a whole build gives:
each rank draws the full parameter, one at a time, on its device, and keeps its own shard
(:func:`init_parameters`). Peak memory is the rank's shards plus the largest single parameter.

The rules (DINOv2 / timm ViT): truncated normal (std 0.02) for linear, patch-embedding and prototype
weights and the position embedding; normal (std 1e-6) for the cls and register tokens; zeros for
biases and the iBOT mask token; LayerNorm 1 / 0; LayerScale its configured init.
"""
from __future__ import annotations

import zlib
from typing import Callable

import torch
import torch.nn as nn

Rule = Callable[[torch.Tensor, torch.Generator], None]


def _trunc_normal(std: float) -> Rule:
    return lambda t, g: nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0, generator=g)


def _normal(std: float) -> Rule:
    return lambda t, g: nn.init.normal_(t, std=std, generator=g)


def _constant(value: float) -> Rule:
    return lambda t, g: nn.init.constant_(t, value)


_ZEROS, _ONES = _constant(0.0), _constant(1.0)

# parameters a module owns directly, by its own attribute name
_TOKENS = {"pos_embed": _trunc_normal(0.02), "cls_token": _normal(1e-6), "reg_token": _normal(1e-6),
           "mask_token": _ZEROS, "prototypes": _trunc_normal(0.02)}


def _module_rules(module: nn.Module) -> dict[str, Rule]:
    from .vit import LayerScale

    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return {"weight": _trunc_normal(0.02), "bias": _ZEROS}
    if isinstance(module, nn.LayerNorm):
        return {"weight": _ONES, "bias": _ZEROS}
    if isinstance(module, LayerScale):
        return {"gamma": _constant(float(module.init))}
    return _TOKENS


def parameter_rules(net: nn.Module) -> dict[str, Rule]:
    """{parameter name: its init rule} for every parameter of ``net``; a parameter without a rule fails."""
    rules = {}
    for prefix, module in net.named_modules():
        own = _module_rules(module)
        for name, _ in module.named_parameters(recurse=False):
            if name not in own:
                raise KeyError(f"no init rule for {prefix + '.' if prefix else ''}{name} ({type(module).__name__})")
            rules[f"{prefix}.{name}" if prefix else name] = own[name]
    return rules


def parameter_seed(seed: int, name: str) -> int:
    """The seed of one parameter's generator: the run seed mixed with the parameter's name."""
    return (int(seed) * 0x9E3779B1 + zlib.crc32(name.encode())) % (2 ** 63)


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``param``: an FSDP2 DTensor's local shard, else ``param`` itself."""
    return param.to_local() if hasattr(param, "to_local") else param


@torch.no_grad()
def init_parameters(net: nn.Module, seed: int) -> None:
    """Initialise every parameter of ``net`` in place, whole or sharded (DTensor: each rank keeps its shard).

    Parameters still on the meta device are left alone (a meta build initialises after sharding).
    """
    rules = parameter_rules(net)
    for name, param in net.named_parameters():
        if param.is_meta:
            continue
        rule = rules[name]
        gen = torch.Generator(device=param.device).manual_seed(parameter_seed(seed, name))
        if not hasattr(param, "to_local"):
            rule(param.data, gen)
            continue
        full = torch.empty(param.shape, dtype=param.dtype, device=param.device)
        rule(full, gen)
        copy_full_into(param, full)


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write a full-size value into ``param``: in place, or only this rank's shard of a DTensor (no comms)."""
    if not hasattr(param, "to_local"):
        param.data.copy_(full)
        return
    from torch.distributed.tensor import distribute_tensor

    shard = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements,
                              src_data_rank=None)
    local_tensor(param).copy_(shard.to_local())


@torch.no_grad()
def copy_parameters(dst: nn.Module, src: nn.Module) -> None:
    """``dst`` = ``src`` parameter by parameter, shard by shard when both are sharded alike."""
    for d, s in zip(dst.parameters(), src.parameters(), strict=True):
        local_tensor(d).copy_(local_tensor(s))

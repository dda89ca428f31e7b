"""AdamW parameter groups: weight decay, layer-wise lr decay, patch-embed and prototype-layer lr.

Each group carries ``lr_mult`` and ``wd_mult``; every step sets ``lr = schedule_lr * lr_mult`` (or
the last-layer schedule for the prototypes) and ``weight_decay = schedule_wd * wd_mult``. No weight
decay on biases, norms, LayerScale and the cls/register/mask tokens and position embedding.
torch's fused AdamW is used on CUDA (apex is not installable from the package registries).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import OptimConfig
from ..model.vit import layer_id

_NO_DECAY_NAMES = ("cls_token", "reg_token", "pos_embed", "mask_token", "gamma")


def _group_key(name: str, param: nn.Parameter, depth: int, cfg: OptimConfig) -> tuple:
    """(lr_mult, wd_mult, is_last_layer, is_backbone) of one student parameter (name relative to the SSL net)."""
    short = name.split(".")[-1]
    no_decay = param.ndim <= 1 or short in _NO_DECAY_NAMES or name.endswith(".bias")
    wd_mult = 0.0 if no_decay else 1.0
    if name.startswith("backbone."):
        inner = name[len("backbone."):]
        lr_mult = cfg.layer_decay ** (depth + 1 - layer_id(inner, depth))
        if inner.startswith("patch_embed"):
            lr_mult *= cfg.patch_embed_lr_mult
    else:
        lr_mult = 1.0
    is_last = short == "prototypes"
    return round(lr_mult, 12), wd_mult, is_last, name.startswith("backbone.")


def param_groups(model: nn.Module, depth: int, cfg: OptimConfig) -> list[dict]:
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = _group_key(name, p, depth, cfg)
        group = groups.setdefault(key, {"params": [], "names": [], "lr_mult": key[0], "wd_mult": key[1],
                                        "is_last_layer": key[2], "is_backbone": key[3]})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, depth: int, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    fused = cfg.fused == "on" or (cfg.fused == "auto" and device_type == "cuda")
    groups = param_groups(model, depth, cfg)
    for g in groups:
        g.pop("names")
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=0.0,
                             fused=fused or None)


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, last_layer_lr: float,
                    backbone_lr: float | None = None) -> None:
    """backbone_lr (None = lr) drives the backbone's groups (0 while train.freeze_backbone_steps lasts)."""
    for g in optimizer.param_groups:
        base = lr if backbone_lr is None or not g.get("is_backbone") else backbone_lr
        g["lr"] = (last_layer_lr if g["is_last_layer"] else base) * g["lr_mult"]
        g["weight_decay"] = weight_decay * g["wd_mult"]

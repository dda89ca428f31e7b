"""Checkpoint exchange with timm's VisionTransformer (the layout Virchow 2 is published in).

Our parameter names are timm's, so conversion is a strict check of the key set: every timm key
must be ours and every one of ours but ``mask_token`` (iBOT's, not in timm) must be there, with
its shape. The one shape allowed to differ is the position embedding's patch grid (a model
trained at another crop size): it is resampled the way the model resamples it at run time.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .vit import VisionTransformer, mlp_ratio

OURS_ONLY = ("mask_token",)
TIMM_ARCH = "vit_huge_patch14_224"  # the architecture name Virchow 2 is published under


class StateDictMismatch(KeyError, ValueError):
    """Weights that do not fit the model; ``str()`` is one line naming every bad key."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def timm_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments for ``timm.models.vision_transformer.VisionTransformer`` of this shape."""
    import timm.layers
    import torch.nn as nn

    return dict(json_kwargs(cfg), mlp_layer=timm.layers.SwiGLUPacked, act_layer=nn.SiLU)


def json_kwargs(cfg: ModelConfig) -> dict:
    """The JSON-serialisable part of :func:`timm_kwargs` (timm's ``model_args``; the layer classes are
    passed in code, as for Virchow 2: ``mlp_layer=SwiGLUPacked, act_layer=SiLU``)."""
    return dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                num_heads=cfg.num_heads, mlp_ratio=mlp_ratio(cfg), qkv_bias=cfg.qkv_bias,
                reg_tokens=cfg.num_registers, init_values=cfg.layerscale_init or None, global_pool="",
                num_classes=0, dynamic_img_size=True)


def resample_pos_embed(pos_embed: torch.Tensor, num_prefix: int, grid: int) -> torch.Tensor:
    """[1, prefix + g^2, C] -> [1, prefix + grid^2, C]: bicubic, antialiased (as ``pos_embed_for``)."""
    prefix, patch = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = math.isqrt(patch.shape[1])
    if old == grid:
        return pos_embed
    c = patch.shape[-1]
    patch = patch.float().reshape(1, old, old, c).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, c).to(pos_embed.dtype)
    return torch.cat([prefix, patch], dim=1)


def _pos_embed_fits(value: torch.Tensor, mine: torch.Tensor, num_prefix: int) -> bool:
    """Same prefix and width, a square patch grid of another size: resamplable."""
    if value.ndim != 3 or value.shape[0] != 1 or value.shape[2] != mine.shape[2] or value.shape[1] <= num_prefix:
        return False
    n = value.shape[1] - num_prefix
    return math.isqrt(n) ** 2 == n


def fit_state_dict(model: VisionTransformer, state: dict[str, torch.Tensor],
                   source: str = "timm state dict") -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state ready for ``model.load_state_dict(strict=False)``, notes) or :class:`StateDictMismatch`.

    Strict: every key of ``model`` but ``mask_token`` must be in ``state`` and nothing else may be
    (``mask_token`` is taken when present); shapes must match, the position embedding's grid aside.
    The error is one line listing the missing, unexpected and mis-shaped keys (first 8 of each).
    """
    mine = model.state_dict()
    expected = {k for k in mine if k not in OURS_ONLY}
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - mine.keys())
    out, notes, shapes = {}, [], []
    for key in sorted(state.keys() & mine.keys()):
        value = state[key]
        if tuple(value.shape) != tuple(mine[key].shape):
            if key == "pos_embed" and _pos_embed_fits(value, mine[key], model.num_prefix):
                old = math.isqrt(value.shape[1] - model.num_prefix)
                value = resample_pos_embed(value, model.num_prefix, model.grid)
                notes.append(f"pos_embed resampled from a {old}x{old} to a {model.grid}x{model.grid} grid")
            else:
                shapes.append(f"{key} {tuple(value.shape)} (model: {tuple(mine[key].shape)})")
                continue
        out[key] = value
    if missing or unexpected or shapes:
        def part(name, items):
            more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
            return f"{name} {items[:8]}{more}"

        raise StateDictMismatch(f"{source} does not fit this ViT: {part('missing', missing)}, "
                                f"{part('unexpected', unexpected)}, {part('mis-shaped', shapes)}")
    return out, notes


def load_timm_state_dict(model: VisionTransformer, state: dict[str, torch.Tensor],
                         source: str = "timm state dict") -> list[str]:
    """Load a timm state dict into ``model`` strictly (see :func:`fit_state_dict`); returns the notes."""
    from .init import copy_full_into

    fitted, notes = fit_state_dict(model, state, source)
    with torch.no_grad():
        mine = model.state_dict()
        for key, value in fitted.items():
            copy_full_into(mine[key], value)  # a sharded model (FSDP2) keeps only its own shard
    return notes


def export_timm_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Our backbone's weights under timm's keys (what ``timm.create_model(...).load_state_dict`` takes)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in OURS_ONLY}

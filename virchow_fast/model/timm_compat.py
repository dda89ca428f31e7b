"""Checkpoint exchange with timm's VisionTransformer (the layout Virchow 2 is published in).

Our parameter names are timm's, so conversion is a strict check of the key set: every timm key
must be ours and every one of ours but ``mask_token`` (iBOT's, not in timm) must be there.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from .vit import VisionTransformer, mlp_ratio

OURS_ONLY = ("mask_token",)


def timm_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments for ``timm.models.vision_transformer.VisionTransformer`` of this shape."""
    import timm.layers
    import torch.nn as nn

    return dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                num_heads=cfg.num_heads, mlp_ratio=mlp_ratio(cfg), qkv_bias=cfg.qkv_bias,
                reg_tokens=cfg.num_registers, mlp_layer=timm.layers.SwiGLUPacked, act_layer=nn.SiLU,
                init_values=cfg.layerscale_init or None, global_pool="", num_classes=0, dynamic_img_size=True)


def load_timm_state_dict(model: VisionTransformer, state: dict[str, torch.Tensor]) -> None:
    """Load a timm state dict into ``model``; any missing or unexpected key is an error naming it."""
    expected = {k for k in model.state_dict() if k not in OURS_ONLY}
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        raise KeyError(f"timm state dict does not match this ViT: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for key, value in state.items():
        mine = model.state_dict()[key]
        if mine.shape != value.shape:
            raise ValueError(f"timm state dict: {key} has shape {tuple(value.shape)}, this ViT wants {tuple(mine.shape)}")
    model.load_state_dict(state, strict=False)


def export_timm_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Our backbone's weights under timm's keys (what ``timm.create_model(...).load_state_dict`` takes)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in OURS_ONLY}

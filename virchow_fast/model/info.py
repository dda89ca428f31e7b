"""What a config costs: parameters (counted on the meta device), tokens per crop, FLOPs per tile."""
from __future__ import annotations

import torch

from ..config import Config
from .ssl import SSLNetwork
from .vit import count_params


def backbone_forward_flops(cfg: Config, grid: int) -> float:
    """Forward FLOPs of the backbone for one crop of grid x grid patches (matmuls + attention)."""
    m = cfg.model
    c, p = m.embed_dim, m.patch_size
    tokens = grid * grid + 1 + m.num_registers
    linear = c * 3 * c + c * c + c * 2 * m.mlp_hidden + m.mlp_hidden * c  # qkv, proj, fc1, fc2 weights
    per_block = 2 * tokens * linear + 4 * tokens * tokens * c  # + QK^T and PV
    return m.depth * per_block + 2 * grid * grid * (3 * p * p) * c


def head_forward_flops(cfg: Config, bottleneck: int, prototypes: int) -> float:
    """Forward FLOPs of one head for one token (MLP + prototype logits)."""
    h = cfg.heads
    dims = [cfg.model.embed_dim] + [h.hidden_dim] * (h.num_layers - 1) + [bottleneck]
    return 2 * sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True)) + 2 * bottleneck * prototypes


def flops_per_tile(cfg: Config, recompute: bool = False) -> float:
    """Training FLOPs per tile per step: student fwd+bwd on all crops, teacher fwd on globals.

    Backward = 2x forward; ``recompute`` adds one more student forward (full checkpointing).
    iBOT heads are counted on the expected number of masked tokens.
    """
    m, c, h, mk = cfg.model, cfg.data.crops, cfg.heads, cfg.data.masks
    g_grid, l_grid = c.global_size // m.patch_size, c.local_size // m.patch_size
    student_fwd = c.n_global * backbone_forward_flops(cfg, g_grid) + c.n_local * backbone_forward_flops(cfg, l_grid)
    teacher_fwd = c.n_global * backbone_forward_flops(cfg, g_grid)
    dino = head_forward_flops(cfg, h.bottleneck_dim, h.dino_prototypes)
    ibot_b, ibot_k = ((h.ibot_bottleneck_dim, h.ibot_prototypes) if h.separate_ibot_head
                      else (h.bottleneck_dim, h.dino_prototypes))
    ibot = head_forward_flops(cfg, ibot_b, ibot_k)
    masked = c.n_global * g_grid ** 2 * mk.mask_probability * (mk.ratio_min + mk.ratio_max) / 2
    student_fwd += (c.n_global + c.n_local) * dino + masked * ibot
    teacher_fwd += c.n_global * dino + masked * ibot
    return (4.0 if recompute else 3.0) * student_fwd + teacher_fwd


def model_info(cfg: Config) -> dict:
    with torch.device("meta"):
        net = SSLNetwork(cfg.model, cfg.heads)
    m, c = cfg.model, cfg.data.crops
    prefix = 1 + m.num_registers
    g_grid, l_grid = c.global_size // m.patch_size, c.local_size // m.patch_size
    return {
        "name": cfg.name,
        "backbone_params": count_params(net.backbone),
        "dino_head_params": count_params(net.dino_head),
        "ibot_head_params": count_params(net.ibot_head) if net.ibot_head is not None else 0,
        "global_tokens": g_grid ** 2 + prefix,
        "local_tokens": l_grid ** 2 + prefix,
        "student_tokens_per_tile": c.n_global * (g_grid ** 2 + prefix) + c.n_local * (l_grid ** 2 + prefix),
        "teacher_tokens_per_tile": c.n_global * (g_grid ** 2 + prefix),
        "tflops_per_tile_step": flops_per_tile(cfg) / 1e12,
        "tflops_per_tile_step_full_ac": flops_per_tile(cfg, recompute=True) / 1e12,
    }


def format_info(info: dict) -> str:
    def human(n: int) -> str:
        return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"

    lines = [
        f"config:                {info['name']}",
        f"backbone parameters:   {human(info['backbone_params'])} ({info['backbone_params']:,})",
        f"DINO head parameters:  {human(info['dino_head_params'])}",
        f"iBOT head parameters:  {human(info['ibot_head_params'])}",
        f"tokens per crop:       global {info['global_tokens']}, local {info['local_tokens']}",
        f"tokens per tile:       student {info['student_tokens_per_tile']}, teacher {info['teacher_tokens_per_tile']}",
        f"TFLOP per tile/step:   {info['tflops_per_tile_step']:.3f} "
        f"({info['tflops_per_tile_step_full_ac']:.3f} with full activation checkpointing)",
    ]
    return "\n".join(lines)

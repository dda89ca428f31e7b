"""The reference multi-crop augmentation on the CPU: ECT crops, flips, colour, normalise.

Extended-context translation (Virchow 2): every crop is cut from the context region with area
scale in ``ect_scale`` and aspect ratio in ``ect_ratio`` around its own size, then resized to that
size, so crops are translated and almost never rescaled. The DALI pipeline (data/dali_pipeline.py)
implements the same graph for speed; this one is the readable specification and the fallback.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..config import CropConfig


def ect_box(rng: np.random.Generator, context: int, size: int, scale: tuple[float, float],
            ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of one ECT crop of nominal ``size`` inside a ``context`` square."""
    area = size * size * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = min(context, max(1, int(round(math.sqrt(area * aspect)))))
    h = min(context, max(1, int(round(math.sqrt(area / aspect)))))
    top = int(rng.integers(0, context - h + 1))
    left = int(rng.integers(0, context - w + 1))
    return top, left, h, w


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).expand(3, -1, -1)


def _rgb_to_hsv_hue_shift(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn) with the YIQ rotation (cheap, smooth)."""
    angle = 2 * math.pi * shift
    cos, sin = math.cos(angle), math.sin(angle)
    to_yiq = x.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rot = x.new_tensor([[1, 0, 0], [0, cos, -sin], [0, sin, cos]])
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq
    return torch.einsum("ij,jhw->ihw", m, x)


def color_augment(x: torch.Tensor, rng: np.random.Generator, cfg: CropConfig, solarize_p: float) -> torch.Tensor:
    """x: [3, S, S] float in [0, 1] -> same, with jitter / grayscale / solarise / blur per cfg."""
    if rng.random() < cfg.color_jitter:
        for op in rng.permutation(4):
            if op == 0 and cfg.brightness > 0:
                x = x * rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
            elif op == 1 and cfg.contrast > 0:
                mean = _gray(x).mean()
                x = (x - mean) * rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) + mean
            elif op == 2 and cfg.saturation > 0:
                g = _gray(x)
                x = (x - g) * rng.uniform(1 - cfg.saturation, 1 + cfg.saturation) + g
            elif op == 3 and cfg.hue > 0:
                x = _rgb_to_hsv_hue_shift(x, rng.uniform(-cfg.hue, cfg.hue))
            x = x.clamp(0, 1)
    if rng.random() < cfg.grayscale:
        x = _gray(x).contiguous()
    if rng.random() < cfg.blur:
        sigma = rng.uniform(0.1, 2.0)
        k = torch.arange(-3, 4, dtype=x.dtype)
        k = torch.exp(-k ** 2 / (2 * sigma ** 2))
        k = k / k.sum()
        x = F.conv2d(x[:, None], k.view(1, 1, 1, -1), padding=(0, 3))
        x = F.conv2d(x, k.view(1, 1, -1, 1), padding=(3, 0))[:, 0]
    if rng.random() < solarize_p:
        x = torch.where(x >= 0.5, 1 - x, x)
    return x


def crop_one(context: torch.Tensor, rng: np.random.Generator, size: int, cfg: CropConfig,
             solarize_p: float) -> torch.Tensor:
    """One augmented, normalised crop [3, size, size] from a context [3, C, C] float in [0, 1]."""
    top, left, h, w = ect_box(rng, context.shape[-1], size, tuple(cfg.ect_scale), tuple(cfg.ect_ratio))
    x = context[:, top:top + h, left:left + w]
    if (h, w) != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    if rng.random() < cfg.hflip:
        x = x.flip(-1)
    if rng.random() < cfg.vflip:
        x = x.flip(-2)
    if cfg.rot90:
        x = torch.rot90(x, int(rng.integers(0, 4)), dims=(-2, -1))
    x = color_augment(x.clamp(0, 1), rng, cfg, solarize_p)
    mean = x.new_tensor(cfg.mean).view(3, 1, 1)
    std = x.new_tensor(cfg.std).view(3, 1, 1)
    return (x - mean) / std


def multicrop(context_rgb: np.ndarray, rng: np.random.Generator, cfg: CropConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 [C, C, 3] context -> (globals [n_global, 3, G, G], locals [n_local, 3, L, L]).

    Solarise applies to the second global crop only (DINOv2's asymmetric global transforms).
    """
    ctx = torch.from_numpy(np.ascontiguousarray(context_rgb)).permute(2, 0, 1).float() / 255.0
    globals_ = torch.stack([crop_one(ctx, rng, cfg.global_size, cfg, cfg.solarize if i == 1 else 0.0)
                            for i in range(cfg.n_global)])
    if cfg.n_local:
        locals_ = torch.stack([crop_one(ctx, rng, cfg.local_size, cfg, 0.0) for _ in range(cfg.n_local)])
    else:
        locals_ = torch.zeros(0, 3, cfg.local_size, cfg.local_size)
    return globals_, locals_

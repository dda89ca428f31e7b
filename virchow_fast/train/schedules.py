"""Every schedule as an array indexed by step (DINOv2): resuming at step s is exact by construction."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import Config


def cosine(start: float, end: float, steps: int, warmup_steps: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Linear warmup from warmup_start to start over warmup_steps, then cosine from start to end."""
    warmup = np.linspace(warmup_start, start, warmup_steps, endpoint=False) if warmup_steps > 0 else np.zeros(0)
    n = max(steps - warmup_steps, 0)
    t = np.arange(n) / max(n - 1, 1) if n > 1 else np.zeros(n)
    body = end + 0.5 * (start - end) * (1 + np.cos(np.pi * t))
    return np.concatenate([warmup, body])[:steps]


@dataclass
class Schedules:
    lr: np.ndarray  # peak lr scaled by sqrt(global_batch / 1024)
    weight_decay: np.ndarray
    momentum: np.ndarray  # teacher EMA momentum
    teacher_temp: np.ndarray
    last_layer_lr: np.ndarray  # lr of the prototype layers: 0 while frozen
    backbone_lr: np.ndarray  # lr of the backbone: 0 for train.freeze_backbone_steps (heads-only start)

    def at(self, step: int) -> dict[str, float]:
        return {name: float(getattr(self, name)[step]) for name in
                ("lr", "weight_decay", "momentum", "teacher_temp", "last_layer_lr", "backbone_lr")}


def build_schedules(cfg: Config, peak_lr: float, total_steps: int) -> Schedules:
    o, lo, spe = cfg.optim, cfg.loss, cfg.train.steps_per_epoch
    warmup = min(int(o.warmup_epochs * spe), total_steps)
    lr = cosine(peak_lr, o.min_lr, total_steps, warmup)
    wd = cosine(o.weight_decay, o.weight_decay_end, total_steps)
    momentum = cosine(o.momentum_teacher, o.momentum_teacher_end, total_steps)
    temp_warmup = min(int(lo.warmup_teacher_temp_epochs * spe), total_steps)
    temp = np.concatenate([np.linspace(lo.warmup_teacher_temp, lo.teacher_temp, temp_warmup),
                           np.full(total_steps - temp_warmup, lo.teacher_temp)])
    last_layer = lr.copy()
    last_layer[:min(int(o.freeze_last_layer_epochs * spe), total_steps)] = 0.0
    backbone = lr.copy()
    backbone[:min(cfg.train.freeze_backbone_steps, total_steps)] = 0.0
    return Schedules(lr, wd, momentum, temp, last_layer, backbone)

"""Training from pretrained weights: ``model.init_from`` and ``train.freeze_backbone_steps``.

The weights go into the student's backbone before anything is sharded (every process reads the
full file, then FSDP keeps its shard), and the teacher is copied from that student, so both start
equal. Published backbones come without DINO / iBOT heads: for the first N steps only the heads
train (the backbone's lr schedule is 0, see train/schedules.py) and the teacher's backbone EMA is
paused, so a random head cannot drag good features around before it has learnt anything.
"""
from __future__ import annotations

import torch.nn as nn

from ..model.ssl import ema_update

HEADS = ("dino_head", "ibot_head")


def init_student(student: nn.Module, path: str) -> str:
    """Load ``path`` (see downstream/weights.py) into ``student.backbone``; returns the summary line."""
    from ..config import ConfigError
    from ..model.timm_compat import StateDictMismatch
    from .weights import WeightsError, init_backbone

    try:
        return init_backbone(student.backbone, path)
    except (WeightsError, StateDictMismatch) as exc:  # the user's file: one line naming it and the key
        raise ConfigError(f"model.init_from: {exc}") from None


def ema_step(teacher: nn.Module, student: nn.Module, momentum: float, backbone_frozen: bool) -> None:
    """The teacher EMA; with ``backbone_frozen`` only the heads move (FSDP2 or not: parameters are local)."""
    if not backbone_frozen:
        ema_update(teacher, student, momentum)
        return
    for name in HEADS:
        t, s = getattr(teacher, name, None), getattr(student, name, None)
        if t is not None and s is not None:
            ema_update(t, s, momentum)

"""DINO and iBOT losses over prototype scores, computed through ops.prototype_loss.

Both are a weighted sum of soft cross-entropies between teacher targets and student
predictions over (student row, teacher row) pairs; they differ only in which rows are paired and
how pairs are weighted. ``ops.prototype_loss`` computes the teacher targets (Sinkhorn-Knopp or
softmax centering) and the cross-entropies, eagerly (reference) or fused (no [N, K] logits).
Across ranks, ``all_reduce`` (an in-place sum) makes Sinkhorn's sums and the softmax center
global; the per-rank losses are then averaged by the gradient reduction as usual.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from .. import ops

AllReduce = Optional[Callable[[torch.Tensor], None]]


def dino_pairs(n_global: int, n_crops: int, batch: int, device=None):
    """Pairs of the DINO loss for crop-major rows (crop c of tile b is row c * batch + b).

    Every student crop s (globals first) of a tile is scored against every teacher global crop t
    of the same tile, except s == t (the same view). Weights 1 / (batch * n_pairs) make the loss
    the mean over pairs and tiles. Returns s_idx, t_idx [P] int64 and weights [P] fp32.
    """
    crop_pairs = [(s, t) for t in range(n_global) for s in range(n_crops) if s != t]
    if not crop_pairs:
        raise ValueError("DINO loss needs at least one (student crop, teacher crop) pair of different views")
    b = torch.arange(batch, device=device)
    s_idx = torch.cat([s * batch + b for s, _ in crop_pairs])
    t_idx = torch.cat([t * batch + b for _, t in crop_pairs])
    weights = torch.full((s_idx.numel(),), 1.0 / (batch * len(crop_pairs)), device=device)
    return s_idx, t_idx, weights


def ibot_weights(masks: torch.Tensor) -> torch.Tensor:
    """iBOT weight of each masked token, [n_masked] fp32 in row-major order of masks [n_images, P] bool.

    1 / (masked tokens in its image) / n_images: the loss is averaged per image over its masked
    tokens, then over all images (masked or not, as DINOv2). The loader computes these on the host
    (a boolean index on the device would wait for it).
    """
    n_images = masks.shape[0]
    per_image = masks.sum(dim=1).clamp(min=1).float()
    return (1.0 / per_image / n_images).unsqueeze(1).expand_as(masks)[masks]


def ibot_pairs(masks: torch.Tensor):
    """Pairs of the iBOT loss: masked token i of the student with the teacher's token i.

    masks [n_images, P] bool; rows of both sides are the masked tokens in row-major order.
    Returns s_idx, t_idx [n_masked] int64 and :func:`ibot_weights`.
    """
    weights = ibot_weights(masks)
    idx = torch.arange(weights.numel(), device=masks.device)
    return idx, idx, weights


class _PrototypeLoss(nn.Module):
    """Shared state: the softmax center (EMA of teacher logits) and the centering settings."""

    def __init__(self, prototypes: int, centering: str, student_temp: float, center_momentum: float,
                 sinkhorn_iters: int):
        super().__init__()
        self.centering = centering
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.sinkhorn_iters = sinkhorn_iters
        self.register_buffer("center", torch.zeros(prototypes))

    def _loss(self, student_z, student_w, teacher_z, teacher_w, s_idx, t_idx, weights, teacher_temp,
              all_reduce: AllReduce, total_rows: int | None):
        loss, logit_mean = ops.prototype_loss(
            student_z, student_w, teacher_z.detach(), teacher_w.detach(), s_idx, t_idx, weights,
            self.student_temp, teacher_temp, self.centering, self.center, self.sinkhorn_iters,
            all_reduce, total_rows)
        if self.centering == "softmax":
            self._update_center(logit_mean.detach(), teacher_z.shape[0], all_reduce)
        return loss

    @torch.no_grad()
    def _update_center(self, logit_mean: torch.Tensor, rows: int, all_reduce: AllReduce) -> None:
        if all_reduce is not None:
            # a rank without rows adds nothing (its mean over no rows is nan)
            mean_sum = logit_mean * rows if rows else torch.zeros_like(logit_mean)
            stats = torch.cat([mean_sum, logit_mean.new_full((1,), float(rows))])
            all_reduce(stats)
            logit_mean = stats[:-1] / stats[-1].clamp(min=1)
        self.center.mul_(self.center_momentum).add_(logit_mean, alpha=1 - self.center_momentum)


class DINOLoss(_PrototypeLoss):
    """Cross-entropy between teacher targets on global crops and student predictions on all crops."""

    def forward(self, student_z: torch.Tensor, student_w: torch.Tensor, teacher_z: torch.Tensor,
                teacher_w: torch.Tensor, n_global: int, teacher_temp: float,
                all_reduce: AllReduce = None, world_size: int = 1) -> torch.Tensor:
        """student_z [n_crops * B, b], teacher_z [n_global * B, b] (crop-major); prototypes [K, b]."""
        batch = teacher_z.shape[0] // n_global
        n_crops = student_z.shape[0] // batch
        s_idx, t_idx, weights = dino_pairs(n_global, n_crops, batch, student_z.device)
        return self._loss(student_z, student_w, teacher_z, teacher_w, s_idx, t_idx, weights, teacher_temp,
                          all_reduce, teacher_z.shape[0] * world_size)


class IBOTLoss(_PrototypeLoss):
    """Cross-entropy between teacher and student on the masked patch tokens of global crops."""

    def forward(self, student_z: torch.Tensor, student_w: torch.Tensor, teacher_z: torch.Tensor,
                teacher_w: torch.Tensor, masks: torch.Tensor, teacher_temp: float,
                all_reduce: AllReduce = None, weights: torch.Tensor | None = None) -> torch.Tensor:
        """student_z, teacher_z [n_masked, b] in row-major order of masks [n_images, P].

        weights: :func:`ibot_weights` of ``masks`` when the caller has them (the batch does).
        """
        n_masked = teacher_z.shape[0]
        if all_reduce is not None:
            # the global count of masked tokens enters the kernels as a host number (Sinkhorn's
            # row total): with several ranks that is one more read per step
            count = teacher_z.new_full((1,), float(n_masked), dtype=torch.float32)
            all_reduce(count)
            n_masked = int(count.item())
        if n_masked == 0:
            return student_w.sum() * 0.0
        if weights is None:
            weights = ibot_weights(masks)
        idx = torch.arange(weights.numel(), device=student_z.device)
        return self._loss(student_z, student_w, teacher_z, teacher_w, idx, idx, weights, teacher_temp,
                          all_reduce, n_masked)

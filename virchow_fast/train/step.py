"""One training step: DINOv2's losses, backward, clipping, the one statistics read, the update.

:func:`train_step` is the whole per-step body of ``virchow-fast train`` (the loop around it only
fetches batches, logs and checkpoints), so a benchmark that calls it measures exactly what the
trainer runs. On a GPU the step waits on the host once: where it reads its statistics (loss
terms, gradient norm and the stop flag, in one all-reduced vector). Nothing else in it reads a
device value: the iBOT mask indices and weights come with the batch, attention's segment offsets
are made on the device from the crops' shapes, and the next batch is staged while this one runs
(``prefetch``, see train/staging.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..config import Config, LossConfig
from ..data import Batch
from ..downstream.pretrained import ema_step
from ..losses import DINOLoss, IBOTLoss, kde_loss, koleo_loss
from .errors import NonFiniteWeightsError
from .integrity import nonfinite_count
from .optim import FusedAdamW, apply_schedules

TERMS = ("loss", "dino", "ibot", "reg")


class SSLLoss(torch.nn.Module):
    """DINO + iBOT + regulariser, with the centers as buffers (saved in checkpoints)."""

    def __init__(self, cfg: LossConfig, dino_prototypes: int, ibot_prototypes: int):
        super().__init__()
        self.cfg = cfg
        args = (cfg.centering, cfg.student_temp, cfg.center_momentum, cfg.sinkhorn_iters)
        self.dino = DINOLoss(dino_prototypes, *args)
        self.ibot = IBOTLoss(ibot_prototypes, *args)

    def regularizer(self, cls_tokens: torch.Tensor, n_global: int) -> torch.Tensor:
        """Sum over global crops of the regulariser on this rank's tiles."""
        if self.cfg.regularizer == "none":
            return cls_tokens.new_zeros(())
        c = self.cfg
        fn = (lambda x: kde_loss(x, c.kde_kappa, c.kde_self_term)) if c.regularizer == "kde" else koleo_loss
        return sum(fn(chunk) for chunk in cls_tokens.chunk(n_global))

    def forward(self, student, teacher, batch: Batch, teacher_temp: float,
                all_reduce: Optional[Callable[[torch.Tensor], None]] = None, world_size: int = 1) -> dict:
        n_global = batch.global_crops.shape[0] // batch.n_tiles
        with torch.no_grad():
            t = teacher(batch.global_crops, None, batch.masks, mask_inputs=False, mask_indices=batch.mask_indices)
        s = student(batch.global_crops, batch.local_crops, batch.masks, mask_inputs=True,
                    mask_indices=batch.mask_indices)
        cfg = self.cfg
        dino = self.dino(s["cls_z"], s["dino_w"], t["cls_z"], t["dino_w"], n_global, teacher_temp,
                         all_reduce, world_size)
        ibot = self.ibot(s["patch_z"], s["ibot_w"], t["patch_z"], t["ibot_w"], batch.masks, teacher_temp,
                         all_reduce, weights=batch.mask_weights)
        reg = self.regularizer(s["cls_tokens"], n_global)
        total = cfg.dino_weight * dino + cfg.ibot_weight * ibot + cfg.regularizer_weight * reg
        return {"loss": total, "dino": dino, "ibot": ibot, "reg": reg}


def fused_clip(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether ``optimizer`` applies the clip as it reads the gradients: ours (train/optim.py's
    FusedAdamW, whatever its mode) and torch's fused Adam / AdamW divide every gradient by their
    ``grad_scale`` tensor inside the update."""
    if isinstance(optimizer, FusedAdamW):
        return True
    return isinstance(optimizer, torch.optim.Adam) and bool(optimizer.defaults.get("fused"))


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``grads`` together as an fp32 scalar: accumulated in fp32 whatever their dtype
    (bf16 gradients of compute copies give the norm of their exact fp32 casts); FSDP2 DTensor shards
    give their global norm."""
    if hasattr(grads[0], "full_tensor"):  # FSDP2 (fp32 reduce dtype): a DTensor with a pending sum
        return torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False).full_tensor()
    norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float,
                   optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
    """Total gradient norm over all ranks (fp32 scalar on the gradients' device, plain tensor); clips when
    max_norm > 0. Never read on the host here: the step reads it with its statistics.

    Clipping scales every gradient by min(1, max_norm / (norm + 1e-6)) (torch's clip_grad_norm_). With a
    fused ``optimizer`` (:func:`fused_clip`) the gradients are left alone and the optimizer's
    ``grad_scale`` is set to the inverse factor, so its update reads each gradient once, already clipped,
    instead of after a multiply pass over all of them; the caller resets it after ``optimizer.step()``.
    Otherwise they are scaled in place. With :class:`FusedAdamW` the gradients are the optimizer's
    (the compute copies' bf16 ones on one GPU, see train/copies.py).
    """
    if isinstance(optimizer, FusedAdamW):
        grads = optimizer.gradients()
    else:
        grads = [p.grad for p in params if p.grad is not None]
    if optimizer is not None and fused_clip(optimizer):
        optimizer.grad_scale = None
    if not grads:
        return torch.zeros((), device=params[0].device if params else None)
    total = total_norm(grads)
    if max_norm > 0:
        if optimizer is not None and fused_clip(optimizer):
            optimizer.grad_scale = (total.float() + 1e-6).div(max_norm).clamp(min=1.0)
        else:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


@dataclass
class Trainee:
    """What a step updates: the networks, optimizer and losses from ``loop.build``, on ``info.device``."""

    cfg: Config
    info: object  # distributed.DistInfo
    student: torch.nn.Module
    teacher: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: SSLLoss
    params: list = field(default_factory=list)  # the student's trainable parameters (default: all of them)
    weights_bad: object = None  # NaN/inf tensors after the last update (device scalar), read with the next stats

    def __post_init__(self) -> None:
        if not self.params:
            self.params = [p for p in self.student.parameters() if p.requires_grad]


def update(t: Trainee, momentum: float, backbone_frozen: bool) -> torch.Tensor:
    """AdamW (the clip applied), the teacher EMA and the weights check: :meth:`FusedAdamW.update` (bound
    to the networks by ``loop.build``), else torch's step, ``ema_step`` and ``nonfinite_count``.
    Returns the non-finite weight count, left on the device (read with the next step's statistics)."""
    opt = t.optimizer
    if isinstance(opt, FusedAdamW):
        return opt.update(momentum, backbone_frozen)
    opt.step()  # with a fused optimizer the clip is applied here (its grad_scale)
    ema_step(t.teacher, t.student, momentum, backbone_frozen=backbone_frozen)
    return nonfinite_count(t.params)


@dataclass
class StepResult:
    terms: dict  # TERMS -> float, mean over ranks
    grad_norm: float  # global gradient norm before clipping
    stop: bool  # some rank asked to stop: the step was discarded (no update, loss centers as before)
    finite: bool  # every term and the gradient norm finite; else no update and loss centers as before
    schedule: dict  # the step's schedule values (Schedules.at)


def read_stats(out: dict, grad_norm: torch.Tensor, stop_pending: bool, info,
               weights_bad: torch.Tensor | None = None) -> tuple[dict, float, bool, float]:
    """The step's one host read: loss terms (mean over ranks), gradient norm, the stop flag (any rank) and
    the number of non-finite weight tensors the previous update left (``weights_bad``, any rank).

    One vector, one all-reduce, one device-to-host copy. The norm is global already, so only rank 0
    adds it (a non-finite norm stays non-finite: 0 * inf is nan); the flag is filled in on the
    device (no host tensor to copy in).
    """
    vals = [out[k].detach().float().reshape(()) for k in TERMS]
    vals.append(grad_norm.detach().float().reshape(()) * (1.0 if info.rank == 0 else 0.0))
    vals.append(vals[0].new_zeros(()) if weights_bad is None else weights_bad.to(vals[0].device))  # summed: any rank
    stats = torch.cat([torch.stack(vals), vals[0].new_full((1,), 1.0 if stop_pending else 0.0)])
    info.all_reduce(stats)
    host = stats.tolist()  # the synchronisation point
    terms = {k: v / info.world_size for k, v in zip(TERMS, host, strict=False)}
    return terms, host[len(TERMS)], host[len(TERMS) + 2] > 0, host[len(TERMS) + 1]


def train_step(t: Trainee, batch: Batch, step: int, sched, stop_pending: bool | Callable[[], bool] = False,
               prefetch: Callable[[], None] | None = None, sync: bool = False) -> StepResult:
    """Step ``step`` on ``batch`` (already on the device), with ``sched`` from ``build_schedules``.

    stop_pending: this rank's stop request, or a callable asked just before the statistics read (a
    signal that arrives during the step still stops it).

    prefetch: called once the forward and backward are queued, before the statistics read, so the
    next batch's fetch and host-to-device copy overlap this step's kernels.
    sync: wait for the device at the end (the update included), for per-step timing.
    A non-finite step and a stopped step change nothing but the gradients (set to None); the caller
    restores the RNG and data position of a stopped step.
    """
    cfg, info = t.cfg, t.info
    s = sched.at(step)
    apply_schedules(t.optimizer, s["lr"], s["weight_decay"], s["last_layer_lr"], s["backbone_lr"])
    centers = [b.clone() for b in t.loss_fn.buffers()]  # a skipped step must not move them
    out = t.loss_fn(t.student, t.teacher, batch, s["teacher_temp"], info.reducer, info.world_size)
    out["loss"].backward()
    grad_norm = clip_grad_norm(t.params, cfg.optim.clip_grad, t.optimizer)
    if prefetch is not None:
        prefetch()
    pending = stop_pending() if callable(stop_pending) else stop_pending
    terms, norm, stop, weights_bad = read_stats(out, grad_norm, pending, info, t.weights_bad)
    if weights_bad > 0:  # the previous update diverged: nothing from here on is worth keeping
        raise NonFiniteWeightsError(f"step {step}: the weights are non-finite after the update of step {step - 1} "
                                    "(lr too high?); stopped without saving them: lower optim.base_lr and --resume")
    finite = all(math.isfinite(v) for v in terms.values()) and math.isfinite(norm)
    if finite and not stop:
        t.weights_bad = update(t, s["momentum"], step < cfg.train.freeze_backbone_steps)
    else:
        with torch.no_grad():
            for b, saved in zip(t.loss_fn.buffers(), centers, strict=True):
                b.copy_(saved)
    t.optimizer.zero_grad(set_to_none=True)
    if fused_clip(t.optimizer):
        t.optimizer.grad_scale = None  # this step's clip factor: no later step() may reuse it
    if sync and info.device.type == "cuda":
        torch.cuda.synchronize(info.device)
    return StepResult(terms, norm, stop, finite, s)

"""AdamW parameter groups: weight decay, layer-wise lr decay, patch-embed and prototype-layer lr.

Each group carries ``lr_mult`` and ``wd_mult``; every step sets ``lr = schedule_lr * lr_mult`` (or
the last-layer schedule for the prototypes) and ``weight_decay = schedule_wd * wd_mult``. No weight
decay on biases, norms, LayerScale and the cls/register/mask tokens and position embedding.

The optimizer is :class:`FusedAdamW`: torch's AdamW (its groups, state and ``state_dict``, so DCP
checkpoints are those of ``torch.optim.AdamW`` and resume either way), whose :meth:`FusedAdamW.update`
is the step's whole update. On CUDA (``optim.fused: auto | on``) that is one multi-tensor Triton
kernel (kernels/adamw_ema.py) that reads each gradient once, already clipped, updates the fp32
master weight and both moments, moves the teacher's weight (EMA), writes the bf16 compute copies of
both (one GPU, train/copies.py) and flags non-finite weights: one pass instead of AdamW, EMA lerp,
weights check and the copies' casts. Elsewhere, and with ``optim.fused: off``, the same update
runs as torch's AdamW, ``torch._foreach_lerp_`` and a max-abs reduction (the reference the kernel is
tested against). apex is not installable from the package registries.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import OptimConfig
from ..model.vit import layer_id
from .copies import compute_copies_of

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


def build_optimizer(model: nn.Module, depth: int, cfg: OptimConfig, device_type: str) -> FusedAdamW:
    """The student's AdamW. ``optim.fused`` on (or auto on CUDA): the update is the fused kernel on CUDA
    (torch's fused AdamW elsewhere); off: torch's foreach AdamW, EMA and weights check."""
    fused = cfg.fused == "on" or (cfg.fused == "auto" and device_type == "cuda")
    groups = param_groups(model, depth, cfg)
    for g in groups:
        g.pop("names")
    return FusedAdamW(groups, betas=tuple(cfg.betas), eps=cfg.eps, kernel=fused and device_type == "cuda",
                      torch_fused=fused and device_type != "cuda")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class FusedAdamW(torch.optim.AdamW):
    """AdamW whose :meth:`update` also clips, moves the teacher, writes compute copies and checks weights.

    ``grad_scale`` (a device scalar or None, set by the step's clip): every gradient is divided by
    it. Gradients are read from the student's compute copies where it has them (train/copies.py),
    else from the parameters. ``step()`` alone is plain AdamW (what DCP calls to initialise state).

    kernel: run :meth:`update` as kernels/adamw_ema.py's one pass (CUDA, or the cost model's trace);
    torch_fused: torch's fused AdamW for the reference update (its CPU kernel).
    """

    def __init__(self, params, betas=(0.9, 0.999), eps=1e-8, kernel: bool = False, torch_fused: bool = False):
        super().__init__(params, lr=0.0, betas=betas, eps=eps, weight_decay=0.0,
                         fused=True if torch_fused else None, foreach=None if torch_fused else True)
        self.kernel = kernel
        self.grad_scale: torch.Tensor | None = None
        self._pairs = None  # bind(): student parameter -> (teacher parameter, is head)
        self._copies = self._teacher_copies = None
        self._others: list = []  # (teacher, student) pairs of parameters no group trains: EMA only

    def bind(self, student: nn.Module, teacher: nn.Module, heads: tuple[str, ...]) -> None:
        """Pair each trained student parameter with the teacher's (same name) for :meth:`update`."""
        t_params = dict(teacher.named_parameters())
        trained = {id(p) for g in self.param_groups for p in g["params"]}
        self._pairs = {}
        self._others = []
        for name, p in student.named_parameters():
            if name not in t_params:
                raise ValueError(f"optimizer: the teacher has no parameter {name!r}")
            if id(p) in trained:
                self._pairs[id(p)] = (t_params[name], name.split(".")[0] in heads)
            else:
                self._others.append((t_params[name], p, name.split(".")[0] in heads))
        self._copies, self._teacher_copies = compute_copies_of(student), compute_copies_of(teacher)

    def _grad(self, p: torch.Tensor) -> torch.Tensor | None:
        c = self._copies.of(p) if self._copies is not None else None
        return c.grad if c is not None and c.grad is not None else p.grad

    def gradients(self) -> list[torch.Tensor]:
        """The trained parameters' gradients (the compute copies' where they hold them)."""
        return [g for group in self.param_groups for p in group["params"] if (g := self._grad(p)) is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self._copies is not None:
            self._copies.zero_grad()

    def update(self, momentum: float, backbone_frozen: bool) -> torch.Tensor:
        """AdamW step, then teacher = lerp(teacher, student, 1 - momentum) (heads only while the backbone
        is frozen), the compute copies, and the number of non-finite weight tensors (0-dim, on the
        device, not read here)."""
        if self._pairs is None:
            raise RuntimeError("FusedAdamW.update before bind(student, teacher)")
        bad = self._update_kernel(momentum, backbone_frozen) if self.kernel else \
            self._update_reference(momentum, backbone_frozen)
        if self._others:
            moving = [(t, s) for t, s, head in self._others if head or not backbone_frozen]
            if moving:
                torch._foreach_lerp_([_local(t) for t, _ in moving], [_local(s).detach() for _, s in moving],
                                     1.0 - momentum)
        self.grad_scale = None  # this step's clip factor: no later update may reuse it
        return bad

    def _update_reference(self, momentum: float, backbone_frozen: bool) -> torch.Tensor:
        from .integrity import nonfinite_count

        params = [p for g in self.param_groups for p in g["params"]]
        if self._copies is not None:  # bf16 gradients on the compute copies -> fp32 on the masters (exact)
            for p in params:
                c = self._copies.of(p)
                if c is not None and c.grad is not None:
                    p.grad = c.grad.float()
        if self.grad_scale is not None and not self.defaults.get("fused"):
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                torch._foreach_div_(grads, self.grad_scale)
            self.grad_scale = None  # torch's foreach AdamW refuses one (its step reads this attribute)
        self.step()  # torch's fused AdamW divides by its grad_scale itself
        with torch.no_grad():
            moving = [(t, p) for p in params for t, head in [self._pairs[id(p)]] if head or not backbone_frozen]
            if moving:
                torch._foreach_lerp_([_local(t) for t, _ in moving], [_local(p).detach() for _, p in moving],
                                     1.0 - momentum)
        # the copies are recast from the changed masters by the next forward (their versions moved)
        return nonfinite_count(params)

    def _update_kernel(self, momentum: float, backbone_frozen: bool) -> torch.Tensor:
        from ..kernels import adamw_ema as fused

        beta1, beta2 = self.defaults["betas"]
        eps = self.defaults["eps"]
        params, grads, avgs, sqs, teachers, copies, t_copies, hyper, steps = [], [], [], [], [], [], [], [], []
        step = None
        for group in self.param_groups:
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            for p in group["params"]:
                g = self._grad(p)
                if g is None:
                    continue
                state = self.state[p]
                if not state:  # as torch's AdamW initialises it
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                steps.append(state["step"])
                if step is None:
                    step = int(state["step"].item()) + 1  # a CPU tensor: no device read
                t, head = self._pairs[id(p)]
                params.append(_local(p).detach())
                grads.append(_local(g))
                avgs.append(_local(state["exp_avg"]))
                sqs.append(_local(state["exp_avg_sq"]))
                teachers.append(_local(t).detach())
                if self._copies is not None:
                    copies.append(self._copies.of(p).detach())
                if self._teacher_copies is not None:
                    t_copies.append(self._teacher_copies.of(t).detach())
                hyper.append((lr, wd, 1.0 if head or not backbone_frozen else 0.0))
        if not params:
            return torch.zeros(())
        device = params[0].device
        table = torch.tensor(hyper, dtype=torch.float32)
        table = table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table.to(device)
        scale = self.grad_scale if self.grad_scale is not None else torch.ones((), device=device)
        bad = torch.zeros(1, dtype=torch.int32, device=device)
        fused.adamw_ema_(params, grads, avgs, sqs, teachers, copies, t_copies, table, _local(scale).float(),
                         bad, beta1, beta2, eps, step, momentum)
        torch._foreach_add_(steps, 1.0)  # CPU scalars, as torch's foreach AdamW keeps them
        for cc in (self._copies, self._teacher_copies):
            if cc is not None:
                cc.mark_synced()
        return bad.float().reshape(())


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, last_layer_lr: float,
                    backbone_lr: float | None = None) -> None:
    """backbone_lr (None = lr) drives the backbone's groups (0 while train.freeze_backbone_steps lasts)."""
    for g in optimizer.param_groups:
        base = lr if backbone_lr is None or not g.get("is_backbone") else backbone_lr
        g["lr"] = (last_layer_lr if g["is_last_layer"] else base) * g["lr_mult"]
        g["weight_decay"] = weight_decay * g["wd_mult"]

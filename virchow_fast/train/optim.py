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
from ..model.init import local_tensor
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
        self._nets = None  # bind(): (student, teacher)
        self._pairs: dict = {}  # id(student parameter) -> (teacher parameter, is a head's)
        self._others: list = []  # (teacher, student, is a head's) of parameters no group trains: EMA only
        self._copies = self._teacher_copies = None
        self._plan = None  # the kernel's per-tensor lists, built on its first update (see _kernel_plan)

    def bind(self, student: nn.Module, teacher: nn.Module, heads: tuple[str, ...]) -> None:
        """Pair each trained student parameter with the teacher's (same name) for :meth:`update`."""
        t_params = dict(teacher.named_parameters())
        trained = {id(p) for g in self.param_groups for p in g["params"]}
        self._nets = (student, teacher)
        self._pairs, self._others, self._plan = {}, [], None
        for name, p in student.named_parameters():
            if name not in t_params:
                raise ValueError(f"optimizer: the teacher has no parameter {name!r}")
            head = name.split(".")[0] in heads
            if id(p) in trained:
                self._pairs[id(p)] = (t_params[name], head)
            else:
                self._others.append((t_params[name], p, head))
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
        is frozen), the compute copies, and the number of non-finite weights (0-dim, on the device, not
        read here)."""
        if self._nets is None:
            raise RuntimeError("FusedAdamW.update before bind(student, teacher)")
        bad = self._update_kernel(momentum, backbone_frozen) if self.kernel else \
            self._update_reference(momentum, backbone_frozen)
        self.grad_scale = None  # this step's clip factor: no later update may reuse it
        return bad

    def _update_reference(self, momentum: float, backbone_frozen: bool) -> torch.Tensor:
        """torch's AdamW, the teacher's ``ema_step`` and ``nonfinite_count``: what the kernel is tested against."""
        from ..downstream.pretrained import ema_step
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
        ema_step(self._nets[1], self._nets[0], momentum, backbone_frozen)
        # the copies are recast from the changed masters by the next forward (their versions moved)
        return nonfinite_count(params)

    def _kernel_plan(self) -> dict:
        """The kernel's lists of everything but the gradients (persistent tensors: built once, on the first
        update, after which every trained parameter has its state), the teacher parameter of each, each
        one's group and whether it is a head's, and the steps' CPU counters."""
        plan = {k: [] for k in ("masters", "params", "exp_avgs", "exp_avg_sqs", "teachers", "copies",
                                "teacher_copies", "group", "head", "steps")}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                state = self.state[p]
                if not state:  # as torch's AdamW initialises it
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                t, head = self._pairs[id(p)]
                plan["masters"].append(p)
                plan["params"].append(local_tensor(p).detach())
                plan["exp_avgs"].append(local_tensor(state["exp_avg"]))
                plan["exp_avg_sqs"].append(local_tensor(state["exp_avg_sq"]))
                plan["teachers"].append(local_tensor(t).detach())
                if self._copies is not None:
                    plan["copies"].append(self._copies.of(p).detach())
                if self._teacher_copies is not None:
                    plan["teacher_copies"].append(self._teacher_copies.of(t).detach())
                plan["group"].append(gi)
                plan["head"].append(head)
                plan["steps"].append(state["step"])
        return plan

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._plan = None  # new state tensors: the kernel's lists are rebuilt

    def _update_kernel(self, momentum: float, backbone_frozen: bool) -> torch.Tensor:
        from ..kernels import adamw_ema as fused

        if self._plan is None:
            self._plan = self._kernel_plan()
        plan = self._plan
        grads = [self._grad(p) for p in plan["masters"]]
        keep = [i for i, g in enumerate(grads) if g is not None]  # torch's AdamW skips a parameter without one
        if not keep:
            return torch.zeros(())
        pick = (lambda xs: xs) if len(keep) == len(grads) else (lambda xs: [xs[i] for i in keep] if xs else xs)
        lr_wd = [(float(g["lr"]), float(g["weight_decay"])) for g in self.param_groups]
        hyper = [(*lr_wd[plan["group"][i]], 1.0 if plan["head"][i] or not backbone_frozen else 0.0) for i in keep]
        params = pick(plan["params"])
        device = params[0].device
        table = torch.tensor(hyper, dtype=torch.float32)
        table = table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table.to(device)
        scale = self.grad_scale if self.grad_scale is not None else torch.ones((), device=device)
        bad = torch.zeros(1, dtype=torch.int32, device=device)
        steps = pick(plan["steps"])
        beta1, beta2 = self.defaults["betas"]
        fused.adamw_ema_(params, [local_tensor(g) for g in pick(grads)], pick(plan["exp_avgs"]),
                         pick(plan["exp_avg_sqs"]), pick(plan["teachers"]), pick(plan["copies"]),
                         pick(plan["teacher_copies"]), table, local_tensor(scale).float(), bad, beta1, beta2,
                         self.defaults["eps"], int(steps[0].item()) + 1, momentum)  # a CPU counter: no device read
        torch._foreach_add_(steps, 1.0)  # CPU scalars, as torch's foreach AdamW keeps them
        moving = [(t, s) for t, s, head in self._others if head or not backbone_frozen]
        if moving:  # parameters no group trains still follow the EMA (as ema_step moves every one)
            torch._foreach_lerp_([local_tensor(t) for t, _ in moving],
                                 [local_tensor(s).detach() for _, s in moving], 1.0 - momentum)
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

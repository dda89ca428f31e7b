"""Every Triton kernel launch of a training step at the shipped models' shapes, for sm90.compile_launch.

Shapes come from the shipped configs (configs/vit_h14_virchow2.yaml at 32 tiles per GPU,
configs/vit_g14_virchow2g.yaml at 24): all crops of a step packed into one sequence (the
student's 2 global + 8 local crops per tile; cls + registers + patches per crop), in the dtypes
the trainer feeds (bf16 backbone activations and parameters, as FSDP's bf16 policy computes, plus
the fp32 residual stream of ``parallel.fsdp: off`` under autocast; head features fp32 and bf16).
Each case runs the public function of its kernel module forward and backward through autograd,
so the launches are exactly those of a training step; the optimizer family runs one fused AdamW +
EMA step (kernels/adamw_ema.py) over one transformer block's parameters.

Used by tests/kernels/test_sm90_compile.py and benchmarks/kernel_table.py.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
MODELS = {"vit_h14": ("configs/vit_h14_virchow2.yaml", 32), "vit_g14": ("configs/vit_g14_virchow2g.yaml", 24)}
IBOT_MASKED_FRACTION = 0.15  # mean masked patches per global crop: half the crops masked, ratio 0.1..0.5


@dataclasses.dataclass
class Case:
    name: str  # "<family>-<model>-<detail>", a pytest id
    family: str  # attention, layer_norm, swiglu, residual_weight, l2_normalize, head_loss, optimizer
    shape: str
    run: Callable[[], None]


@dataclasses.dataclass(frozen=True)
class ModelShape:
    model: str
    tiles: int
    width: int
    heads: int
    head_dim: int
    hidden: int
    segments: tuple[int, ...]  # tokens of each packed crop (student: all crops of all tiles)
    teacher_rows: int  # global crops (DINO teacher rows)
    student_rows: int  # all crops (DINO student rows)
    ibot_rows: int  # masked patch tokens of the global crops (an estimate)
    dino_b: int
    ibot_b: int
    prototypes: int

    @property
    def tokens(self) -> int:
        return sum(self.segments)


def model_shape(model: str) -> ModelShape:
    from virchow_fast.config import load_config

    path, tiles = MODELS[model]
    cfg = load_config(REPO / path)
    m, c, h = cfg.model, cfg.data.crops, cfg.heads
    prefix = 1 + m.num_registers
    glob, loc = (c.global_size // m.patch_size) ** 2, (c.local_size // m.patch_size) ** 2
    segments = (glob + prefix,) * (c.n_global * tiles) + (loc + prefix,) * (c.n_local * tiles)
    ibot_rows = int(c.n_global * tiles * glob * IBOT_MASKED_FRACTION)
    ibot_b = h.ibot_bottleneck_dim if h.separate_ibot_head else h.bottleneck_dim
    return ModelShape(model, tiles, m.embed_dim, m.num_heads, m.embed_dim // m.num_heads, m.mlp_hidden, segments,
                      c.n_global * tiles, (c.n_global + c.n_local) * tiles, ibot_rows, h.bottleneck_dim, ibot_b,
                      h.dino_prototypes)


def _grad(*shape, dtype):
    import torch
    return torch.empty(*shape, dtype=dtype).requires_grad_()


def _backbone_cases(s: ModelShape) -> list[Case]:
    import torch

    from virchow_fast.kernels import attention as A
    from virchow_fast.kernels import layer_norm as L
    from virchow_fast.kernels import residual_weight as RW
    from virchow_fast.kernels import swiglu as S
    from virchow_fast.model.vit import PAD

    bf16, T, C = torch.bfloat16, s.tokens, s.width
    seg = f"{len(s.segments)} crops, {T} tokens"
    seg_ids = torch.repeat_interleave(torch.arange(len(s.segments)), torch.tensor(s.segments))  # crop of each token

    def attention():
        getattr(A, "_chosen", {}).clear()  # a fresh process: the launcher times its candidates at these shapes
        qkv = _grad(T, 3, s.heads, s.head_dim, dtype=bf16)  # the model's qkv(x).view(T, 3, H, D)
        lengths = torch.tensor(s.segments, dtype=torch.int32)
        cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        o = A.attention(qkv, cu, max(s.segments), s.head_dim ** -0.5)
        o.backward(torch.empty_like(o))
        # the model's path (ops.attention_qkv): proj's rows for the residual GEMM ([T, C + PAD]), the
        # teacher's (no keep) and the student's (each crop's keep factor), and the backward that also
        # sums the qkv bias gradient
        for keep in (None, torch.empty(len(s.segments))):
            x = _grad(T, C, dtype=bf16)
            w, b = _grad(3 * C, C, dtype=bf16), _grad(3 * C, dtype=bf16)
            a = A.attention_qkv(x, w, b, s.heads, cu, max(s.segments), s.head_dim ** -0.5, keep=keep,
                                seg_ids=seg_ids if keep is not None else None, pad=PAD)
            a.backward(torch.empty_like(a))

    # bf16 residual stream and parameters (FSDP's bf16 compute copies, one GPU included), and the
    # fp32 residual stream with fp32 parameters of parallel.fsdp: off under autocast
    def layer_norm():  # the block's branch points (the residual gradient added in the backward) and the final norm
        for dt in (bf16, torch.float32):
            x, w, b = _grad(T, C, dtype=dt), _grad(C, dtype=dt), _grad(C, dtype=dt)
            y = L.layer_norm(x, w, b, 1e-6)
            y.backward(torch.empty_like(y))
            for copy in (False, True):  # copy: the stream's buffer for the residual GEMM's addmm_ (the model's)
                y, passed = L.layer_norm_branch(x, w, b, 1e-6, copy=copy)
                torch.autograd.backward([y, passed], [torch.empty_like(y), torch.empty_like(passed)])

    def swiglu():  # the model's call: fc1's bias, fc2's rows with the bias column; teacher, then student (keep)
        for keep in (None, torch.empty(len(s.segments))):
            x = _grad(T, 2 * s.hidden, dtype=bf16)
            y = S.swiglu(x, _grad(2 * s.hidden, dtype=bf16), keep, seg_ids if keep is not None else None, PAD)
            y.backward(torch.empty_like(y))

    def residual_weight():  # proj's and fc2's [gamma W | gamma b | 0] (bf16 compute copies; fp32 without)
        for dt in (bf16, torch.float32):
            for k in (C, s.hidden):
                w, g, b = _grad(C, k, dtype=dt), _grad(C, dtype=dt), _grad(C, dtype=dt)
                out = RW.residual_weight(w, g, b, PAD)
                out.backward(torch.empty_like(out))

    return [
        Case(f"attention-{s.model}", "attention", f"[{T}, 3, {s.heads}, {s.head_dim}] bf16, {seg}, "
             f"-> [{T}, {C}+{PAD}] +- keep", attention),
        Case(f"layer_norm-{s.model}", "layer_norm", f"[{T}, {C}] bf16 and fp32, plain and branch (+- copy)",
             layer_norm),
        Case(f"swiglu-{s.model}", "swiglu", f"[{T}, 2x{s.hidden}] bf16 + bias -> [{T}, {s.hidden}+{PAD}], "
             f"+- keep", swiglu),
        Case(f"residual_weight-{s.model}", "residual_weight",
             f"[{C}, {C}] and [{C}, {s.hidden}] bf16 and fp32 -> +{PAD} columns", residual_weight),
    ]


def _head_case(s: ModelShape, head: str, dtype_name: str) -> Case:
    import torch

    from virchow_fast.kernels import prototype_loss as P
    from virchow_fast.losses.dino import dino_pairs

    dtype = getattr(torch, dtype_name)
    if head == "dino":
        b, n, m = s.dino_b, s.student_rows, s.teacher_rows
    else:
        b, n, m = s.ibot_b, s.ibot_rows, s.ibot_rows

    def run():
        zs, ws = _grad(n, b, dtype=dtype), _grad(s.prototypes, b, dtype=dtype)
        zt, wt = torch.empty(m, b, dtype=dtype), torch.empty(s.prototypes, b, dtype=dtype)
        if head == "dino":
            s_idx, t_idx, w = dino_pairs(m // s.tiles, n // s.tiles, s.tiles, torch.device("cpu"))
        else:
            s_idx = t_idx = torch.arange(n)
            w = torch.full((n,), 1.0 / n)
        loss, _ = P.prototype_loss(zs, ws, zt, wt, s_idx, t_idx, w, 0.1, 0.04, "sinkhorn", None, 3)
        loss.backward()

    return Case(f"head_loss-{s.model}-{head}-{dtype_name}", "head_loss",
                f"{head}: N={n}, M={m}, K={s.prototypes}, b={b} {dtype_name}", run)


def _l2_normalize_case(s: ModelShape) -> Case:
    """The heads' prototype weight norm: [K, b] for the DINO and iBOT bottlenecks, bf16 (the compute copies)."""
    import torch

    from virchow_fast.kernels import l2_normalize as N

    def run():
        for b in sorted({s.dino_b, s.ibot_b}):
            w = _grad(s.prototypes, b, dtype=torch.bfloat16)
            y = N.l2_normalize(w)
            y.backward(torch.empty_like(y))

    return Case(f"l2_normalize-{s.model}", "l2_normalize",
                f"[{s.prototypes}, {s.dino_b}] and [{s.prototypes}, {s.ibot_b}] bf16", run)


def _optimizer_case(s: ModelShape) -> Case:
    """One optimizer step (kernels/adamw_ema.py) over one block's parameters: fp32 master weights,
    bf16 gradients of the matrices (FSDP's bf16 reduce) and fp32 ones of the biases and norms, with
    the bf16 compute copies of the student and the teacher, then again without copies."""
    import torch

    from virchow_fast.kernels import adamw_ema as O

    C, Hd = s.width, s.hidden
    shapes = [(3 * C, C), (3 * C,), (C, C), (C,), (2 * Hd, C), (2 * Hd,), (C, Hd), (C,), (C,), (C,)]
    grad_dtypes = [torch.bfloat16 if len(sh) == 2 else torch.float32 for sh in shapes]

    def run():
        f32 = lambda: [torch.empty(sh) for sh in shapes]
        bf16 = lambda: [torch.empty(sh, dtype=torch.bfloat16) for sh in shapes]
        grads = [torch.empty(sh, dtype=dt) for sh, dt in zip(shapes, grad_dtypes, strict=True)]
        hyper, scale, bad = torch.empty(len(shapes), 3), torch.empty(()), torch.zeros(1, dtype=torch.int32)
        for copies, teacher_copies in ((bf16(), bf16()), ([], [])):
            O.adamw_ema_(f32(), grads, f32(), f32(), f32(), copies, teacher_copies, hyper, scale, bad,
                         0.9, 0.999, 1e-8, 3, 0.996)

    return Case(f"optimizer-{s.model}", "optimizer",
                f"{len(shapes)} block tensors, [{3 * C}, {C}] .. [{C}] fp32, bf16 and fp32 grads, +- copies", run)


def cases() -> list[Case]:
    out = []
    for model in MODELS:
        s = model_shape(model)
        out += _backbone_cases(s)
        out.append(_optimizer_case(s))
        out.append(_l2_normalize_case(s))
        for head in ("dino", "ibot"):
            for dtype in ("float32", "bfloat16"):
                out.append(_head_case(s, head, dtype))
    return out


def case_names() -> list[str]:
    return [c.name for c in cases()]


def compile_all(names: list[str] | None = None) -> list[dict]:
    """[{case, family, shape, launches: [CompiledInfo.to_json()]}] (needs a process without TRITON_INTERPRET)."""
    import sm90

    out = []
    for c in cases():
        if names is None or c.name in names:
            out.append(dict(case=c.name, family=c.family, shape=c.shape,
                            launches=[i.to_json() for i in sm90.compile_launch(c.run)]))
    return out

"""One optimizer step in one pass over memory: AdamW, the gradient clip, the EMA teacher, the bf16
copies and a non-finite check, over lists of tensors (multi-tensor apply).

Spec: :func:`virchow_fast.ops.reference.adamw_ema_reference` (torch.optim.AdamW's single-tensor
step, amsgrad and maximize off, then ``torch.lerp(teacher, param, 1 - momentum)``). Eagerly the
step is many passes per tensor: the clip's scale of the gradient, AdamW's decay, lerp, mul,
addcmul, sqrt, div, add, addcdiv, the teacher's lerp and two ``.to(bf16)`` copies, each a full read
(and most a write) of the tensor. Here every element is read once (param, grad, exp_avg,
exp_avg_sq, teacher: 16 + e bytes, e = 2 for bf16 gradients) and written once (param, exp_avg,
exp_avg_sq, teacher and the two bf16 copies: 20 bytes), 36 + e bytes per parameter, all arithmetic
in fp32 after the loads.

Launch layout. One program per chunk of BLOCK elements of one tensor. The chunk schedule (per
program: tensor index, chunk index, element count) depends only on the tensors' sizes, which never
change between steps: it is built once per tuple of numels (and device), cached, and kept on the
device. The tensors' addresses are not static (the gradients are new every step), so each launch
gets a pointer table, [n, 8] int64 (param, grad, exp_avg, exp_avg_sq, teacher, copy, teacher copy,
hyper row), built on the host and copied to the device from a pinned buffer with
``non_blocking=True`` (no host synchronisation; the caching host allocator keeps the pinned block
alive until the copy has run); the kernel loads its row and casts each address with
``.to(tl.pointer_type(...))``. Gradients are grouped by dtype (bf16, fp32): one launch per dtype
present, never one per tensor. Zero-numel tensors get no chunk. The host side is a plan
(``_Plan``): the argument checks, the grouping, the schedule and every column of the table but the
gradients', made once and reused while no tensor but the gradients changes (the key: each other
tensor's address, size, dtype and contiguity); a call then checks and fills in only the
gradients: about 0.9 ms of host time per step for ViT-H's 470 tensors instead of 1.7 ms.

Per-tensor hyperparameters (lr, weight decay, EMA flag) live in a device tensor [N, 3], so a
scheduler changing lr costs no recompile and no host sync; the clip's divisor ``grad_scale`` is a
0-dim device tensor read by every program (never ``.item()``). The EMA flag is a runtime branch
(a frozen teacher tensor is neither read nor written unless its bf16 copy is wanted); absent copy
lists are a constexpr flag, not null pointers. Non-finite updated params add 1 to ``bad`` through
one masked atomic per program, so programs without a bad element do no atomic.

Rounding: bias corrections, ``1 - beta`` and the lerp weights are computed on the host in double
and passed as fp32, as torch does with its Python-float hyperparameters; the divisions and the
square root are IEEE round-to-nearest (``div_rn``, ``sqrt_rn``: Triton's ``/`` and ``sqrt`` are
approximate on a GPU), and ``torch.lerp``'s two-sided formula is kept, so the result matches
torch.optim.AdamW to a few ulps (FMA contraction, fp32 ``lr / bc1`` and ``1 - lr * wd``, and the
association of addcmul / addcdiv, which differs between torch's CPU and CUDA kernels, are the only
differences).

Vector width (128 bits: 4 fp32 or 8 bf16 per access) needs the compiler to know three things.
(1) Every address is 16-byte aligned: ``ALIGNED``, a constexpr checked on the host per launch
(CUDA allocations are; one view at an odd offset drops its whole launch to the unhinted variant);
the hint goes on the pointer after the cast (on the loaded integer it is lost). (2) Each chunk
starts at a multiple of BLOCK: the schedule holds the chunk index, multiplied by the constexpr
BLOCK in the kernel (a hint on a loaded start is lost too). (3) The mask is constant over each
vector: a full chunk (every one but a tensor's last) runs with the constexpr BLOCK as its limit,
an all-true mask, and a tensor's last chunk with its count, stored divided by COUNT_DIV (8 when
every size of the launch is a multiple of 8, as all of the models' are) and multiplied back by the
constexpr; otherwise only those tails are narrow. BLOCK = 4096 with 8 warps: 16 elements per
thread, 128 registers, no spills (tests/kernels/test_sm90_compile.py asserts widths and spills),
two CTAs (16 warps, ~150 KB of loads in flight) per SM; a 1.85B-parameter model is about 452k
programs, each moving ~150 KB, which amortises its few dependent scalar loads (schedule row,
pointer row, hyper row, grad_scale).

bf16 copies: ``.to(tl.bfloat16)`` rounds to nearest even on a GPU, as torch does; Triton 3.6's
interpreter truncates instead, so under TRITON_INTERPRET=1 the kernel rounds on the bits (the
``EXACT_BF16`` constexpr) and the copies equal ``param.to(torch.bfloat16)`` exactly either way.

Order: jit kernel -> schedule and pointer tables -> launcher -> custom op -> public function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting

BLOCK = 4096
NUM_WARPS = 8
_GRAD_DTYPES = (torch.bfloat16, torch.float32)

# ------------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------------


@triton.jit
def _lerp(a, b, w, FROM_END: tl.constexpr):
    """torch.lerp(a, b, w) with torch's formula: a + w (b - a) for |w| < 0.5, else b - (b - a)(1 - w)
    (FROM_END; the host passes w - 1 as ``w`` then)."""
    if FROM_END:
        return b + w * (b - a)
    else:
        return a + w * (b - a)


@triton.jit
def _to_bf16(x, EXACT: tl.constexpr):
    """fp32 -> bf16, round to nearest even (as torch's ``.to(torch.bfloat16)``). On a GPU that is the
    native conversion; Triton 3.6's interpreter truncates instead, so under TRITON_INTERPRET=1
    (EXACT) the rounding is done on the bits, which gives the same result."""
    if EXACT:
        bits = x.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(x != x, (bits >> 16) | 0x40, r)  # NaN stays a (quiet) NaN
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def _address(TABLE, row, col: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Column ``col`` of the pointer table's row ``row`` as a pointer to DTYPE; 16-byte aligned if ALIGNED
    (the hint goes on the pointer: on the integer before the cast it is lost)."""
    p = tl.load(TABLE + row * 8 + col).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _chunk(TABLE, row, start, limit, GRAD_SCALE, BAD, beta1_w, beta2, one_minus_beta2, eps, bc1, bc2_sqrt, ema_w,
           BLOCK: tl.constexpr, GRAD_BF16: tl.constexpr, HAS_COPY: tl.constexpr, HAS_TEACHER_COPY: tl.constexpr,
           ALIGNED: tl.constexpr, M_FROM_END: tl.constexpr, T_FROM_END: tl.constexpr, EXACT_BF16: tl.constexpr):
    """Elements start .. start + limit of tensor ``row``. ``limit`` is the constexpr BLOCK for a full
    chunk, so the mask is all-true at compile time, and a multiple of COUNT_DIV (8 when every size of
    the launch is) for a tensor's last chunk: the compiler moves as many elements per access as it
    knows the mask to be constant over (a mask against an arbitrary count: one)."""
    cols = tl.arange(0, BLOCK)
    mask = cols < limit
    offs = start + cols

    P = _address(TABLE, row, 0, tl.float32, ALIGNED) + offs
    if GRAD_BF16:
        G = _address(TABLE, row, 1, tl.bfloat16, ALIGNED) + offs
    else:
        G = _address(TABLE, row, 1, tl.float32, ALIGNED) + offs
    M = _address(TABLE, row, 2, tl.float32, ALIGNED) + offs
    V = _address(TABLE, row, 3, tl.float32, ALIGNED) + offs
    T = _address(TABLE, row, 4, tl.float32, ALIGNED) + offs
    HYPER = tl.load(TABLE + row * 8 + 7).to(tl.pointer_type(tl.float32))  # 12-byte rows: no hint
    lr = tl.load(HYPER)
    wd = tl.load(HYPER + 1)
    ema = tl.load(HYPER + 2)
    scale = tl.load(GRAD_SCALE)

    g = tl.div_rn(tl.load(G, mask=mask, other=0.0).to(tl.float32), scale)
    p = tl.load(P, mask=mask, other=0.0)
    m = tl.load(M, mask=mask, other=0.0)
    v = tl.load(V, mask=mask, other=0.0)

    p = p * (1.0 - lr * wd)  # decoupled weight decay
    m = _lerp(m, g, beta1_w, M_FROM_END)
    v = v * beta2 + one_minus_beta2 * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + (-tl.div_rn(lr, bc1)) * tl.div_rn(m, denom)  # addcdiv_(m, denom, value=-lr / bc1)

    tl.store(P, p, mask=mask)
    tl.store(M, m, mask=mask)
    tl.store(V, v, mask=mask)
    if HAS_COPY:
        C = _address(TABLE, row, 5, tl.bfloat16, ALIGNED) + offs
        tl.store(C, _to_bf16(p, EXACT_BF16), mask=mask)
    if HAS_TEACHER_COPY:
        TC = _address(TABLE, row, 6, tl.bfloat16, ALIGNED) + offs
        t = tl.load(T, mask=mask, other=0.0)
        if ema != 0.0:
            t = _lerp(t, p, ema_w, T_FROM_END)
            tl.store(T, t, mask=mask)
        tl.store(TC, _to_bf16(t, EXACT_BF16), mask=mask)
    else:
        if ema != 0.0:
            t = tl.load(T, mask=mask, other=0.0)
            tl.store(T, _lerp(t, p, ema_w, T_FROM_END), mask=mask)

    nonfinite = mask & ((p != p) | (tl.abs(p) == float("inf")))
    nbad = tl.max(nonfinite.to(tl.int32), axis=0)
    tl.atomic_add(BAD, nbad, mask=nbad > 0)  # only programs that found one


@triton.jit
def _adamw_ema_kernel(
    SCHEDULE,  # [P, 3] int64: tensor (row of TABLE), chunk (start / BLOCK), element count / COUNT_DIV
    TABLE,  # [n, 8] int64 addresses: param, grad, exp_avg, exp_avg_sq, teacher, copy, teacher copy, hyper row
    GRAD_SCALE,  # 0-dim fp32: gradients are divided by it
    BAD,  # [1] int32 (in/out): += 1 per program with a non-finite updated param
    beta1_w,  # lerp weight of exp_avg toward the gradient: 1 - beta1 (minus 1 with M_FROM_END)
    beta2, one_minus_beta2, eps,
    bc1,  # 1 - beta1 ** step
    bc2_sqrt,  # sqrt(1 - beta2 ** step)
    ema_w,  # lerp weight of the teacher toward the param: 1 - momentum (minus 1 with T_FROM_END)
    BLOCK: tl.constexpr, GRAD_BF16: tl.constexpr, HAS_COPY: tl.constexpr, HAS_TEACHER_COPY: tl.constexpr,
    ALIGNED: tl.constexpr, M_FROM_END: tl.constexpr, T_FROM_END: tl.constexpr, EXACT_BF16: tl.constexpr,
    COUNT_DIV: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(SCHEDULE + pid * 3)
    start = tl.load(SCHEDULE + pid * 3 + 1) * BLOCK  # a multiple of BLOCK the compiler can see
    count = tl.load(SCHEDULE + pid * 3 + 2) * COUNT_DIV  # as visibly a multiple of COUNT_DIV
    if count == BLOCK:  # every chunk but each tensor's last
        _chunk(TABLE, row, start, BLOCK, GRAD_SCALE, BAD, beta1_w, beta2, one_minus_beta2, eps, bc1, bc2_sqrt,
               ema_w, BLOCK, GRAD_BF16, HAS_COPY, HAS_TEACHER_COPY, ALIGNED, M_FROM_END, T_FROM_END, EXACT_BF16)
    else:
        _chunk(TABLE, row, start, count, GRAD_SCALE, BAD, beta1_w, beta2, one_minus_beta2, eps, bc1, bc2_sqrt,
               ema_w, BLOCK, GRAD_BF16, HAS_COPY, HAS_TEACHER_COPY, ALIGNED, M_FROM_END, T_FROM_END, EXACT_BF16)


# ------------------------------------------------------------------------------------------------
# Schedule and pointer tables
# ------------------------------------------------------------------------------------------------

_SCHEDULES: dict[tuple, torch.Tensor] = {}


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without synchronising the host (pinned buffer, non_blocking)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _count_div(numels: tuple[int, ...]) -> int:
    """8 when every size is a multiple of 8 (a tail chunk then moves 128 bits per access), else 1."""
    return 8 if all(n % 8 == 0 for n in numels) else 1


def _schedule(numels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[P, 3] int64 on ``device``: (tensor, chunk, count / _count_div) of every chunk (chunk c of a
    tensor starts at c * BLOCK); cached per numels."""
    key = (device, BLOCK, numels)
    s = _SCHEDULES.get(key)
    if s is None:
        div = _count_div(numels)
        rows = [(j, c, min(BLOCK, n - c * BLOCK) // div) for j, n in enumerate(numels)
                for c in range(triton.cdiv(n, BLOCK))]
        s = _SCHEDULES[key] = _to_device(torch.tensor(rows, dtype=torch.int64).view(-1, 3), device)
    return s


def _lerp_weight(w: float) -> tuple[float, bool]:
    """(weight the kernel uses, from the end?) for torch.lerp's formula at weight w."""
    return (w, False) if abs(w) < 0.5 else (w - 1.0, True)


# ------------------------------------------------------------------------------------------------
# Checks and launcher
# ------------------------------------------------------------------------------------------------

_LISTS = (("params", (torch.float32,)), ("grads", _GRAD_DTYPES), ("exp_avgs", (torch.float32,)),
          ("exp_avg_sqs", (torch.float32,)), ("teachers", (torch.float32,)), ("copies", (torch.bfloat16,)),
          ("teacher_copies", (torch.bfloat16,)))


def _check(params, grads, exp_avgs, exp_avg_sqs, teachers, copies, teacher_copies, hyper, grad_scale, bad,
           step, only_grads: bool = False) -> None:
    """Shapes, dtypes, contiguity and devices of every argument; one ValueError naming the list and index.

    only_grads: the lists other than grads are known good (a cached plan, see :class:`_Plan`): only
    grads, the per-call tensors and the step are checked (about 0.2 ms instead of 1.1 ms of host time
    for ViT-H's 470 tensors).
    """
    n = len(params)
    lists = (params, grads, exp_avgs, exp_avg_sqs, teachers, copies, teacher_copies)
    for (name, _), lst in zip(_LISTS[1:5], lists[1:5], strict=True):
        if len(lst) != n:
            raise ValueError(f"adamw_ema_: {name} has {len(lst)} tensors, params {n}")
    for (name, _), lst in zip(_LISTS[5:], lists[5:], strict=True):
        if len(lst) not in (0, n):
            raise ValueError(f"adamw_ema_: {name} has {len(lst)} tensors; expected 0 or {n} (one per param)")
    device = params[0].device if n else hyper.device
    if hyper.shape != (n, 3) or hyper.dtype != torch.float32 or not hyper.is_contiguous() or hyper.device != device:
        raise ValueError(f"adamw_ema_: hyper is {tuple(hyper.shape)} {hyper.dtype} on {hyper.device}; expected a "
                         f"contiguous [{n}, 3] float32 tensor (lr, weight_decay, ema flag) on {device}")
    if grad_scale.shape != () or grad_scale.dtype != torch.float32 or grad_scale.device != device:
        raise ValueError(f"adamw_ema_: grad_scale is {tuple(grad_scale.shape)} {grad_scale.dtype} on "
                         f"{grad_scale.device}; expected a 0-dim float32 tensor on {device}")
    if bad.shape != (1,) or bad.dtype != torch.int32 or bad.device != device:
        raise ValueError(f"adamw_ema_: bad is {tuple(bad.shape)} {bad.dtype} on {bad.device}; expected a [1] "
                         f"int32 tensor on {device}")
    if step < 1:
        raise ValueError(f"adamw_ema_: step {step}; expected >= 1 (the step count after incrementing)")
    checked = [(_LISTS[1], grads)] if only_grads else [(spec, lst) for spec, lst in zip(_LISTS, lists, strict=True)]
    for i, p in enumerate(params):
        for (name, dtypes), lst in checked:
            if not lst:
                continue
            t = lst[i]
            what = None
            if t.shape != p.shape:
                what = f"shape {tuple(t.shape)}, params[{i}] {tuple(p.shape)}"
            elif t.dtype not in dtypes:
                what = f"dtype {t.dtype}; expected {' or '.join(map(str, dtypes))}"
            elif t.device != device:
                what = f"on {t.device}; expected {device}"
            elif not t.is_contiguous():
                what = f"not contiguous (strides {t.stride()})"
            if what:
                raise ValueError(f"adamw_ema_: {name}[{i}] {what}")


def _static_key(params, exp_avgs, exp_avg_sqs, teachers, copies, teacher_copies, hyper, grads) -> tuple:
    """Everything a checked plan depends on but the gradients' addresses: each other tensor's address,
    size, dtype and contiguity (a tensor replaced, by a checkpoint load or a resize, changes them; the
    kernel works on flat elements, so a reshape in place does not matter), the device, hyper's address
    and the gradients' dtypes (the launches are grouped by them). About 0.4 ms for 470 tensors."""
    T = torch.Tensor
    lists = (params, exp_avgs, exp_avg_sqs, teachers, copies, teacher_copies)
    return (params[0].device, hyper.data_ptr(), tuple(g.dtype for g in grads),
            *(tuple(map(T.data_ptr, lst)) for lst in lists), *(tuple(map(T.numel, lst)) for lst in lists),
            *(tuple(t.dtype for t in lst) for lst in lists), *(tuple(map(T.is_contiguous, lst)) for lst in lists))


class _Plan:
    """The launches of one validated set of lists: per gradient dtype, the tensors, their chunk schedule
    and the pointer table with every column but the gradient's filled (host int64 [n, 8])."""

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, teachers, copies, teacher_copies, hyper):
        device = params[0].device
        hyper_addr = hyper.data_ptr()
        self.groups = []
        for dtype in _GRAD_DTYPES:
            idx = [i for i, g in enumerate(grads) if g.dtype == dtype and g.numel() > 0]
            if not idx:
                continue
            rows = [[params[i].data_ptr(), 0, exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                     teachers[i].data_ptr(), copies[i].data_ptr() if copies else 0,
                     teacher_copies[i].data_ptr() if teacher_copies else 0, hyper_addr + 12 * i] for i in idx]
            aligned = all(a % 16 == 0 for r in rows for a in r[:7] if a)
            numels = tuple(params[i].numel() for i in idx)
            self.groups.append((dtype, idx, torch.tensor(rows, dtype=torch.int64), aligned, numels,
                                _schedule(numels, device)))


_PLAN: dict[tuple, _Plan] = {}  # the last plan only (one optimizer per process in training)


def _plan(params, grads, exp_avgs, exp_avg_sqs, teachers, copies, teacher_copies, hyper, grad_scale, bad,
          step) -> _Plan:
    """The checked plan for these lists: cached while no tensor but the gradients changed (then only the
    gradients are checked again), else every argument is checked and a new plan made."""
    key = _static_key(params, exp_avgs, exp_avg_sqs, teachers, copies, teacher_copies, hyper, grads)
    plan = _PLAN.get(key)
    _check(params, grads, exp_avgs, exp_avg_sqs, teachers, copies, teacher_copies, hyper, grad_scale, bad, step,
           only_grads=plan is not None)
    if plan is None:
        plan = _Plan(params, grads, exp_avgs, exp_avg_sqs, teachers, copies, teacher_copies, hyper)
        _PLAN.clear()
        _PLAN[key] = plan
    return plan


def _launch(plan: _Plan, grads, grad_scale, bad, beta1, beta2, eps, step, momentum, copies: bool,
            teacher_copies: bool) -> None:
    m_w, m_end = _lerp_weight(1.0 - beta1)
    t_w, t_end = _lerp_weight(1.0 - momentum)
    bc1, bc2_sqrt = 1.0 - beta1 ** step, (1.0 - beta2 ** step) ** 0.5
    for dtype, idx, static, aligned, numels, schedule in plan.groups:
        rows = static.clone()
        grad_ptrs = [grads[i].data_ptr() for i in idx]
        rows[:, 1] = torch.tensor(grad_ptrs, dtype=torch.int64)
        table = _to_device(rows, schedule.device)
        _adamw_ema_kernel[(schedule.shape[0],)](
            schedule, table, grad_scale, bad, m_w, beta2, 1.0 - beta2, eps, bc1, bc2_sqrt, t_w,
            BLOCK=BLOCK, GRAD_BF16=dtype == torch.bfloat16, HAS_COPY=copies,
            HAS_TEACHER_COPY=teacher_copies, ALIGNED=aligned and all(a % 16 == 0 for a in grad_ptrs),
            M_FROM_END=m_end, T_FROM_END=t_end, EXACT_BF16=interpreting(), COUNT_DIV=_count_div(numels),
            num_warps=NUM_WARPS)


# ------------------------------------------------------------------------------------------------
# Custom op
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("virchow_fast_triton::adamw_ema_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "teachers", "copies", "teacher_copies",
                                       "bad"))
def _adamw_ema_op(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], teachers: list[torch.Tensor], copies: list[torch.Tensor],
                  teacher_copies: list[torch.Tensor], hyper: torch.Tensor, grad_scale: torch.Tensor,
                  bad: torch.Tensor, beta1: float, beta2: float, eps: float, step: int, momentum: float) -> None:
    if not params:
        _check(params, grads, exp_avgs, exp_avg_sqs, teachers, copies, teacher_copies, hyper, grad_scale, bad, step)
        return
    plan = _plan(params, grads, exp_avgs, exp_avg_sqs, teachers, copies, teacher_copies, hyper, grad_scale, bad,
                 step)
    _launch(plan, grads, grad_scale, bad, beta1, beta2, eps, step, momentum, bool(copies), bool(teacher_copies))


@_adamw_ema_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, teachers, copies, teacher_copies, hyper, grad_scale, bad,
      beta1, beta2, eps, step, momentum):
    _check(params, grads, exp_avgs, exp_avg_sqs, teachers, copies, teacher_copies, hyper, grad_scale, bad, step)
    return None


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------

def adamw_ema_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               exp_avg_sqs: list[torch.Tensor], teachers: list[torch.Tensor], copies: list[torch.Tensor],
               teacher_copies: list[torch.Tensor], hyper: torch.Tensor, grad_scale: torch.Tensor,
               bad: torch.Tensor, beta1: float, beta2: float, eps: float, step: int, momentum: float) -> None:
    """One AdamW step (torch.optim.AdamW, amsgrad / maximize off) of every tensor, then the EMA teacher.

    params, exp_avgs, exp_avg_sqs, teachers: N contiguous fp32 tensors each (updated in place);
    grads: N tensors of the same shapes, bf16 or fp32 (mixed allowed), divided by ``grad_scale``
    (0-dim fp32 on the device; 1.0 = no clip) before use; copies, teacher_copies: empty, or N bf16
    tensors receiving the updated params / teachers in bf16 (teacher copies for every tensor);
    hyper: [N, 3] fp32 on the device, per tensor (lr, weight_decay, ema flag 0 / 1): the teacher
    moves ``teacher.lerp_(param, 1 - momentum)`` only where the flag is 1; bad: [1] int32 on the
    device, increased when an updated param holds a NaN or inf. step: the step count after
    incrementing (>= 1), for the bias corrections. No host synchronisation.
    """
    torch.ops.virchow_fast_triton.adamw_ema_(params, grads, exp_avgs, exp_avg_sqs, teachers, copies, teacher_copies,
                                             hyper, grad_scale, bad, beta1, beta2, eps, step, momentum)

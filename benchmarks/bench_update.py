"""The step's whole optimizer update (AdamW with the clip, the EMA teacher, the bf16 compute copies,
the non-finite check), in GB/s against the copy bandwidth.

Tensor lists: the trainer's, from the model. The ViT-H/14 student of configs/vit_h14_virchow2.yaml
(``SSLNetwork(cfg.model, cfg.heads)`` built on the meta device: 470 tensors, ~730M parameters with
the heads) in the trainer's AdamW groups (layer-wise lr decay, no weight decay on biases / norms /
tokens); real tensors of those shapes are then allocated on the GPU.

- one_gpu: bf16 gradients (the compute copies'), with the bf16 copies of student and teacher.
  Ours must move 36 + 2 = 38 bytes per parameter: reads param, grad (bf16), exp_avg, exp_avg_sq,
  teacher; writes param, exp_avg, exp_avg_sq, teacher and the two bf16 copies.
- fsdp_rank: one FSDP2 rank's shard of 8: every shape with its first dim divided by 8, rounded up
  (torch.chunk's split), fp32 gradients, no copies: 36 bytes per parameter (20 read, 16 written).

Rows, side by side, each with its time, GB/s on the bytes ours must move (so the column compares
time for the same work), % of the measured copy bandwidth and its time over ours:
  1. ours: ``virchow_fast.kernels.adamw_ema.adamw_ema_``, one call;
  2. torch, the best outside library path (apex is not installable): the sequence the trainer ran
     before the kernel: the bf16 -> fp32 gradient cast (``torch._foreach_copy_`` into fp32 buffers,
     one_gpu only), ``torch._fused_adamw_`` per AdamW group (torch.optim.AdamW(fused=True); it
     divides by ``grad_scale`` itself), ``torch._foreach_lerp_`` (EMA), ``torch._foreach_copy_``
     into the two bf16 copy lists (one_gpu only) and ``torch._foreach_norm(params, inf)`` with the
     isfinite count; its own passes move the bytes in the ``B/param moved`` column;
  3. the eager reference ``adamw_ema_reference`` (per-tensor Python): skipped when one call takes
     over 30 s.
The step counter (``state_steps``) is held fixed: its increment is a scalar add either way.
In the CPU smoke mode the lists are a few tensors of awkward sizes and the script asserts that ours,
the torch sequence and the reference give the same params and teachers (rtol 1e-6, atol 1e-7)
after one update from the same state; on a GPU the largest differences are only recorded.

    python benchmarks/bench_update.py              # GPU
    python benchmarks/bench_update.py --cpu-smoke  # tiny shapes, Triton interpreter (automatic without CUDA)
"""
from __future__ import annotations

import math
import time

from _common import copy_bandwidth, report, setup, skip, time_fn, try_run

args, device = setup("bench_update", __doc__)

import torch  # noqa: E402

from virchow_fast.ops.reference import adamw_ema_reference  # noqa: E402

CONFIG = "configs/vit_h14_virchow2.yaml"
BETA1, BETA2, EPS, STEP, MOMENTUM, LR, WD = 0.9, 0.999, 1e-8, 7, 0.994, 2e-4, 0.04
REFERENCE_MAX_S = 30.0
SHARDS = 8
COLUMNS = ["case", "impl", "tensors", "params_M", "ms", "GB/s", "%copy", "x_ours", "B/param moved", "copy_GBs"]
rows, skipped = [], []


def model_groups() -> list[tuple[float, float, list[tuple[int, ...]]]]:
    """[(lr, weight_decay, [shape, ...])] of the trainer's AdamW groups of the ViT-H/14 student."""
    from pathlib import Path

    from virchow_fast.config import load_config
    from virchow_fast.model.ssl import SSLNetwork
    from virchow_fast.train.optim import param_groups

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / CONFIG, ["data.source=synthetic", "data.paths=[]"])
    with torch.device("meta"):
        net = SSLNetwork(cfg.model, cfg.heads)
    return [(LR * g["lr_mult"], WD * g["wd_mult"], [tuple(p.shape) for p in g["params"]])
            for g in param_groups(net, cfg.model.depth, cfg.optim)]


def smoke_groups() -> list[tuple[float, float, list[tuple[int, ...]]]]:
    """A few awkward sizes: odd, one past BLOCK (4096), a 1-element and a 3-D tensor; two groups."""
    return [(LR, WD, [(37, 5), (4097,), (3, 1, 7)]), (0.5 * LR, 0.0, [(1,), (13,), (2, 4099)])]


def shard(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (math.ceil(shape[0] / SHARDS),) + shape[1:] if shape else shape


class State:
    """One update's tensors (flat lists over all groups) and the per-group index lists for torch."""

    def __init__(self, groups, grad_dtype: torch.dtype, with_copies: bool, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        shapes = [s for _, _, ss in groups for s in ss]

        def rand(shape, scale=1.0, dtype=torch.float32):
            return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)

        self.params = [rand(s, 0.02) for s in shapes]
        self.grads = [rand(s, 1e-3, grad_dtype) for s in shapes]
        self.exp_avgs = [rand(s, 1e-4) for s in shapes]
        self.exp_avg_sqs = [rand(s, 1e-4).square_() for s in shapes]
        self.teachers = [p + rand(p.shape, 1e-3) for p in self.params]
        self.copies = [torch.empty(s, device=device, dtype=torch.bfloat16) for s in shapes] if with_copies else []
        self.teacher_copies = [torch.empty_like(c) for c in self.copies]
        # torch's fused AdamW reads fp32 gradients: the cast's destination buffers (the trainer's p.grad)
        self.grads32 = [torch.empty(s, device=device) for s in shapes] if grad_dtype != torch.float32 else []
        self.hyper = torch.tensor([(lr, wd, 1.0) for lr, wd, ss in groups for _ in ss], device=device)
        self.grad_scale = torch.tensor(1.7, device=device)  # a clip factor (the gradient norm / clip_grad)
        self.bad = torch.zeros(1, dtype=torch.int32, device=device)
        self.steps = [torch.tensor(float(STEP), device=device) for _ in shapes]
        self.groups, start = [], 0
        for lr, wd, ss in groups:
            self.groups.append((lr, wd, list(range(start, start + len(ss)))))
            start += len(ss)
        self.numel = sum(p.numel() for p in self.params)

    def kernel_args(self):
        return (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.teachers, self.copies,
                self.teacher_copies, self.hyper, self.grad_scale, self.bad, BETA1, BETA2, EPS, STEP, MOMENTUM)

    def clone(self) -> State:
        other = object.__new__(State)
        for k, v in vars(self).items():
            if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                v = [t.clone() for t in v]
            elif isinstance(v, torch.Tensor):
                v = v.clone()
            setattr(other, k, v)
        return other


def ours(s: State) -> None:
    from virchow_fast.kernels.adamw_ema import adamw_ema_

    adamw_ema_(*s.kernel_args())


def torch_sequence(s: State) -> torch.Tensor:
    """The trainer's update before the kernel: cast, fused AdamW per group, lerp, copies, isfinite."""
    grads = s.grads
    if s.grads32:
        torch._foreach_copy_(s.grads32, s.grads)
        grads = s.grads32
    for lr, wd, idx in s.groups:
        torch._fused_adamw_([s.params[i] for i in idx], [grads[i] for i in idx], [s.exp_avgs[i] for i in idx],
                            [s.exp_avg_sqs[i] for i in idx], [], [s.steps[i] for i in idx], lr=lr, beta1=BETA1,
                            beta2=BETA2, weight_decay=wd, eps=EPS, amsgrad=False, maximize=False,
                            grad_scale=s.grad_scale, found_inf=None)
    torch._foreach_lerp_(s.teachers, s.params, 1.0 - MOMENTUM)
    if s.copies:
        torch._foreach_copy_(s.copies, s.params)
        torch._foreach_copy_(s.teacher_copies, s.teachers)
    norms = torch._foreach_norm(s.params, float("inf"))
    return (~torch.isfinite(torch.stack(norms))).sum()


def reference(s: State) -> None:
    adamw_ema_reference(*s.kernel_args())


def torch_moved(e: int, copies: bool) -> int:
    """Bytes per parameter the torch sequence's own passes move."""
    cast = 2 + 4 if e == 2 else 0
    adamw = 16 + 12  # reads param, grad (fp32), exp_avg, exp_avg_sq; writes three
    lerp, cast_copies, norm = 12, (4 + 2) * 2 if copies else 0, 4
    return cast + adamw + lerp + cast_copies + norm


def check(base: State, case: str) -> dict:
    """One update from the same state by each path; the largest param / teacher differences to ours.
    In the smoke mode they must agree (rtol 1e-6, atol 1e-7) and ours must find no non-finite param."""
    results = {}
    for name, fn in (("ours", ours), ("torch", torch_sequence), ("reference", reference)):
        s = base.clone()
        fn(s)
        results[name] = s
    diffs = {}
    o = results["ours"]
    for name in ("torch", "reference"):
        r = results[name]
        diffs[name] = {k: max(float((a - b).abs().max()) for a, b in zip(getattr(o, k), getattr(r, k), strict=True))
                       for k in ("params", "teachers")}
        if args.smoke:
            for k in ("params", "teachers"):
                for i, (a, b) in enumerate(zip(getattr(o, k), getattr(r, k), strict=True)):
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m, k=k, i=i, name=name:
                                               f"{case}: ours vs {name}, {k}[{i}]: {m}")
    if args.smoke:
        assert int(o.bad) == 0, o.bad
        if o.copies:
            assert all(torch.equal(c, p.to(torch.bfloat16)) for c, p in zip(o.copies, o.params, strict=True))
            assert all(torch.equal(c, t.to(torch.bfloat16)) for c, t in zip(o.teacher_copies, o.teachers,
                                                                             strict=True))
    print(f"  check {case}: max |ours - torch| params {diffs['torch']['params']:.3g} teachers "
          f"{diffs['torch']['teachers']:.3g}; vs reference {diffs['reference']['params']:.3g} / "
          f"{diffs['reference']['teachers']:.3g}" + (" (asserted)" if args.smoke else ""), flush=True)
    return diffs


def bench_case(case: str, groups, grad_dtype: torch.dtype, with_copies: bool, copy_gbs: float) -> dict:
    s = State(groups, grad_dtype, with_copies)
    e = torch.tensor([], dtype=grad_dtype).element_size()
    per_param = 36 + e - (0 if with_copies else 4)  # the two bf16 copies: 4 bytes written
    nbytes = per_param * s.numel
    print(f"{case}: {len(s.params)} tensors, {s.numel / 1e6:.1f}M params, {grad_dtype} grads, "
          f"copies {with_copies}: ours moves {per_param} B/param = {nbytes / 1e9:.2f} GB", flush=True)
    diffs = check(s, case) if args.smoke or s.numel <= 200_000_000 else None
    impls = {"ours (adamw_ema_, one call)": (ours, per_param),
             "torch (cast, _fused_adamw_, _foreach_lerp_, copies, _foreach_norm)":
                 (torch_sequence, torch_moved(e, with_copies))}
    t0 = time.perf_counter()
    try_run(skipped, f"{case} reference (first call)", lambda: (reference(s), torch.cuda.synchronize()
                                                                 if device.type == "cuda" else None))
    ref_s = time.perf_counter() - t0
    if ref_s < REFERENCE_MAX_S:
        impls["eager reference (adamw_ema_reference)"] = (reference, None)
    else:
        skip(skipped, f"{case} eager reference", f"one call took {ref_s:.1f} s (> {REFERENCE_MAX_S:.0f} s)")
    case_rows = []
    for impl, (fn, moved) in impls.items():
        t = try_run(skipped, f"{case} {impl}", lambda fn=fn: time_fn(lambda: fn(s), device, args.iters, args.warmup))
        if t is None:
            continue
        gbs = nbytes / (t["ms"] * 1e-3) / 1e9
        case_rows.append({"case": case, "impl": impl, "tensors": len(s.params), "params_M": s.numel / 1e6,
                          "ms": t["ms"], "ms_min": t["ms_min"], "GB/s": gbs, "%copy": 100 * gbs / copy_gbs,
                          "B/param moved": moved, "copy_GBs": copy_gbs})
        print(f"  {impl}: {t['ms']:.3f} ms, {gbs:.1f} GB/s", flush=True)
    ours_ms = next((r["ms"] for r in case_rows if r["impl"].startswith("ours")), None)
    for r in case_rows:
        r["x_ours"] = r["ms"] / ours_ms if ours_ms else None
    rows.extend(case_rows)
    return {"tensors": sum(len(ss) for _, _, ss in groups), "bytes_per_param": per_param,
            "grad_dtype": str(grad_dtype), "copies": with_copies, "check_max_abs_diff": diffs}


groups = smoke_groups() if args.smoke else model_groups()
shard_groups = [(lr, wd, [shard(x) for x in ss]) for lr, wd, ss in groups]
copy_gbs = copy_bandwidth(device, (1 << 16) if args.smoke else (1 << 30), args.iters, args.warmup)
print(f"copy bandwidth {copy_gbs:.1f} GB/s", flush=True)
cases = {"one_gpu (bf16 grads, copies)": bench_case("one_gpu", groups, torch.bfloat16, True, copy_gbs),
         f"fsdp_rank (1/{SHARDS} shard, fp32 grads, no copies)":
             bench_case("fsdp_rank", shard_groups, torch.float32, False, copy_gbs)}

report("bench_update", rows, COLUMNS, skipped, args, device,
       {"config": None if args.smoke else CONFIG, "cases": cases,
        "hyper": {"beta1": BETA1, "beta2": BETA2, "eps": EPS, "step": STEP, "momentum": MOMENTUM, "lr": LR,
                  "weight_decay": WD}},
       goal="goal (H200): ours >= 80 % of copy bandwidth, one_gpu")
parts = [f"{r['case']} {r['impl'].split(' (')[0]} {r['%copy']:.0f}% copy ({r['x_ours']:.2f}x ours)" for r in rows
         if r.get("x_ours") is not None]
print(f"SUMMARY bench_update{' (CPU smoke)' if args.smoke else ''}: {', '.join(parts)}; {len(skipped)} skipped",
      flush=True)

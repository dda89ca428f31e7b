"""A block branch's end: its output Linear, the Linear's bias, LayerScale, per-crop drop path and the
residual add, forward and backward, at one GPU step's tokens.

Branches: the attention branch's proj (K = C) and the MLP's fc2 (K = SwiGLU hidden), ViT-H/14 at 32
tiles (30528 tokens, C 1280, hidden 3416) and ViT-G/14 at 24 (31808 tokens, C 1664, hidden 5464);
bf16 residual stream, activations and weights (the bf16 compute copies), a keep factor per crop
(drop path 0.4: 0 or 1 / 0.6) over the step's 2 x 261 + 8 x 54-token crops per tile.

Rows, side by side, each with its time and its time over ours:
  1. ours, the model's path (model/vit.py): ``x.addmm_([k a | k | 0], W_ext^T)`` with
     ``W_ext = residual_weight(W, gamma, b)``: the residual add, bias, LayerScale and drop path
     inside one cuBLAS GEMM, in place; the row factors and the bias column come from the kernel
     that wrote ``a`` (attention, SwiGLU) and the buffer x from the LayerNorm before it (the
     stream's copy it writes as it reads x), so their cost is not in this op (made once, untimed;
     the forward is timed on a scratch buffer);
  1b. the same out of place (``addmm``, as under selective checkpointing): CUDA's addmm first
     copies C into its output, a pass over the rows of its own;
  2. timm's composition, eager: ``x + keep[seg] * gamma * linear(a, W, b)``;
  3. the same under torch.compile (with --compile): Inductor fuses the elementwise tail;
  4. the GEMM alone, ``linear(a, W)`` without bias: the floor; ours over it is the cost of the rest.
The backward is autograd's for each (for ours: the GEMM's two products and residual_weight's pass
over dW_ext); its gradients are those of x, a, W, b and gamma. In the CPU smoke mode (tiny shapes,
fp32) the script asserts that ours and the eager composition give the same output and gradients.

    python benchmarks/bench_residual.py              # GPU
    python benchmarks/bench_residual.py --cpu-smoke  # tiny shapes, Triton interpreter (automatic without CUDA)
"""
from __future__ import annotations

from _common import report, setup, skip, time_fn, try_run

args, device = setup("bench_residual", __doc__)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from virchow_fast import ops  # noqa: E402
from virchow_fast.model.vit import PAD, residual_gemm  # noqa: E402
from virchow_fast.ops import reference  # noqa: E402

DTYPE = torch.float32 if args.smoke else torch.bfloat16
# model: (tiles, width, hidden)
MODELS = {"vit_tiny": (1, 64, 88)} if args.smoke else {"vit_h14": (32, 1280, 3416), "vit_g14": (24, 1664, 5464)}
CROPS = (2, 261), (8, 54)  # (crops per tile, tokens per crop): global, local
DROP = 0.4
COLUMNS = ["model", "branch", "impl", "fwd_ms", "bwd_ms", "total_ms", "x_ours", "TFLOP/s"]
rows, skipped = [], []


def eager(x, a, w, b, g, keep, seg):
    return x + keep[seg][:, None].to(x.dtype) * g * F.linear(a, w, b)


def ours_fn(x, a_ext, w, b, g, inplace=True):
    return residual_gemm(x, a_ext, ops.residual_weight(w, g, b, PAD), inplace)


IMPLS = {"ours: residual GEMM (addmm_ + residual_weight)": "ours",
         "ours out of place (addmm: + its copy of C)": "ours_oop", "timm composition, eager": "eager"}
if args.compile:
    IMPLS["timm composition, torch.compile"] = "compiled"
    compiled = torch.compile(eager)
else:
    skip(skipped, "torch.compile", "compile baselines off (--compile to run them)")
IMPLS["GEMM alone: linear(a, W), the floor"] = "gemm"

def bench_branch(model: str, branch: str, T: int, K: int, C: int, keep, seg, gen) -> None:
    """Rows of every impl for one branch end ([T, K] activations into [C, K] weights)."""
    print(f"{model} {branch}: T={T} K={K} C={C} {DTYPE}", flush=True)

    def mk(*shape):
        return torch.randn(*shape, generator=gen).to(device, DTYPE)

    x, a, w, b, g, dz = mk(T, C), mk(T, K), mk(C, K) * K ** -0.5, mk(C), mk(C).abs() + 0.1, mk(T, C)
    a_ext = reference.scale_rows(a, keep, seg, PAD)  # what the attention / SwiGLU kernel writes
    L = {n: t.clone().requires_grad_() for n, t in (("x", x), ("w", w), ("b", b), ("g", g))}
    a_leaf, a_ext_leaf = a.clone().requires_grad_(), a_ext.clone().requires_grad_()
    timm_inputs = [L["x"], a_leaf, L["w"], L["b"], L["g"]]
    scratch = x.clone()  # the forward's in-place target (its values drift; only the time counts)
    ours_inputs = [L["x"], a_ext_leaf] + timm_inputs[2:]
    calls = {
        # with autograd: a clone of the leaf (the LayerNorm's copy in the model; its backward is free)
        "ours": (lambda: ours_fn(L["x"].clone() if torch.is_grad_enabled() else scratch, a_ext_leaf, L["w"], L["b"],
                                 L["g"]), ours_inputs),
        "ours_oop": (lambda: ours_fn(L["x"], a_ext_leaf, L["w"], L["b"], L["g"], inplace=False), ours_inputs),
        "gemm": (lambda: F.linear(a_leaf, L["w"]), [a_leaf, L["w"]]),
        "eager": (lambda: eager(L["x"], a_leaf, L["w"], L["b"], L["g"], keep, seg), timm_inputs),
    }
    if args.compile:
        calls["compiled"] = (lambda: compiled(L["x"], a_leaf, L["w"], L["b"], L["g"], keep, seg), calls["eager"][1])
    results = {}
    for impl, kind in IMPLS.items():
        call, inputs = calls[kind]

        def fwd(call=call):
            with torch.no_grad():
                return call()
        t_f = try_run(skipped, f"{model} {branch} {impl} forward", lambda fwd=fwd: time_fn(fwd, device, args.iters,
                                                                                      args.warmup))
        out = try_run(skipped, f"{model} {branch} {impl} backward", call)
        if t_f is None or out is None:
            continue
        t_b = try_run(skipped, f"{model} {branch} {impl} backward", lambda out=out, inputs=inputs: time_fn(
            lambda: torch.autograd.grad(out, inputs, dz, retain_graph=True), device, args.iters, args.warmup))
        if args.smoke and kind in ("ours", "ours_oop", "eager"):
            grads = torch.autograd.grad(out, inputs, dz, retain_graph=True)
            if kind != "eager":  # the gradient of a_ext's first K columns is the row factor times a's
                grads = (grads[0], grads[1][:, :K] * keep[seg][:, None], *grads[2:])
            results[kind] = (out.detach(), grads)
        total = t_f["ms"] + (t_b["ms"] if t_b else float("nan"))
        flops = 3 * 2.0 * T * K * C  # forward product and the backward's two
        rows.append({"model": model, "branch": branch, "impl": impl, "fwd_ms": t_f["ms"],
                     "bwd_ms": t_b["ms"] if t_b else None, "total_ms": total,
                     "TFLOP/s": flops / (total * 1e-3) / 1e12, "kind": kind})
        print(f"  {impl}: fwd {t_f['ms']:.3f} ms" + (f", bwd {t_b['ms']:.3f} ms" if t_b else ""), flush=True)
    if args.smoke:
        out_e, g_e = results["eager"]
        for kind in ("ours", "ours_oop"):
            out_o, g_o = results[kind]
            torch.testing.assert_close(out_o, out_e, rtol=1e-5, atol=1e-5)
            for name, go, ge in zip(("x", "a", "W", "b", "gamma"), g_o, g_e, strict=True):
                # dropped crops: ours gives a's gradient times 0 exactly, eager too
                torch.testing.assert_close(go, ge, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")
        print("  smoke check: ours (in place and out of place) == eager composition (output and the five gradients)",
              flush=True)


for model, (tiles, C, hidden) in MODELS.items():
    seg_lens = [n for count, n in CROPS for _ in range(count * tiles)]
    seg = torch.repeat_interleave(torch.arange(len(seg_lens), device=device), torch.tensor(seg_lens, device=device))
    gen = torch.Generator(device="cpu").manual_seed(0)
    keep = ((torch.rand(len(seg_lens), generator=gen) >= DROP).float() / (1 - DROP)).to(device)
    for branch, K in (("proj", C), ("fc2", hidden)):
        bench_branch(model, branch, sum(seg_lens), K, C, keep, seg, gen)

for r in rows:
    base = next((o for o in rows if o["model"] == r["model"] and o["branch"] == r["branch"] and o["kind"] == "ours"),
                None)
    r["x_ours"] = r["total_ms"] / base["total_ms"] if base else None
for r in rows:
    r.pop("kind")

report("bench_residual", rows, COLUMNS, skipped, args, device,
       {"dtype": str(DTYPE), "models": MODELS, "crops": CROPS, "drop_path": DROP})

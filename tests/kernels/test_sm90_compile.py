"""Ahead-of-time compile of every Triton kernel for sm_90 (H100/H200), no GPU needed.

The interpreter checks numbers, not code generation: this runs Triton's real compiler (to PTX and
through the bundled ptxas to a cubin) with the launch configurations the launchers use, so layout,
dot-shape and type errors, and shared memory over the H200's 227 KiB, show up on a CPU box.
It runs in a subprocess: under TRITON_INTERPRET=1 (set for this whole test session on a CPU) every
@triton.jit function, triton's own included, is an interpreter object that cannot be compiled.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SMEM_LIMIT = 227 * 1024


def compile_all() -> None:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from virchow_fast.kernels import attention as A
    from virchow_fast.kernels import layer_norm as L
    from virchow_fast.kernels import layer_scale as R
    from virchow_fast.kernels import swiglu as S

    sm90 = GPUTarget("cuda", 90, 32)

    def build(fn, types: dict, consts: dict, **opts) -> None:
        """Compile fn for sm_90; ``types`` names pointer/float args (the rest are i32)."""
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
        kernel = triton.compile(src, target=sm90, options=opts)
        smem = kernel.metadata.shared
        print(f"  {fn.__name__:24s} {str(consts):80s} smem {smem:6d} B", flush=True)
        assert smem <= SMEM_LIMIT, f"{fn.__name__}: {smem} B of shared memory > {SMEM_LIMIT}"

    tt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    # every launch candidate (kernels/attention.py CANDIDATES); D = 80 and 104 both use a 128 block
    kernels = {"fwd": (A._attn_fwd_kernel, dict(O=None)), "dkdv": (A._attn_bwd_dkdv_kernel, dict(DO=None, DK=None, DV=None)),
               "dq": (A._attn_bwd_dq_kernel, dict(DO=None, DQ=None))}
    for dtype, D in [(torch.bfloat16, 80), (torch.float16, 64), (torch.float32, 128)]:
        t = f"*{tt[dtype]}"
        bd = triton.next_power_of_2(max(D, 16))
        common = dict(Q=t, K=t, V=t, CU="*i32", qk_scale="fp32", scale="fp32", LSE="*fp32", DELTA="*fp32")
        print(f"attention {dtype} D={D}")
        for kind, (fn, outs) in kernels.items():
            for bm, bn, warps, stages in A.candidates(kind, dtype):
                consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PREC=A._dot_prec(dtype))
                build(fn, dict(common, **{k: t for k in outs}), consts, num_warps=warps, num_stages=stages)
        build(A._attn_bwd_delta_kernel, dict(O=t, DO=t, DELTA="*fp32"), dict(BLOCK_M=64, BLOCK_D=bd))
    t = "*bf16"
    for C in (1280, 1664):
        bc = triton.next_power_of_2(C)
        f32 = dict(W="*fp32", B="*fp32", Mean="*fp32", Rstd="*fp32", eps="fp32")
        print(f"row kernels bf16 C={C}")
        build(L._ln_fwd_kernel, dict(f32, X=t, Y=t), dict(HAS_BIAS=True, BLOCK_C=bc), num_warps=L._warps(bc))
        build(L._ln_bwd_kernel, dict(f32, DY=t, X=t, DX=t, DW_partial="*fp32", DB_partial="*fp32"),
              dict(BLOCK_C=bc), num_warps=L._warps(bc))
        build(R._rls_fwd_kernel, dict(X="*fp32", Y=t, G="*fp32", Z="*fp32"), dict(BLOCK_C=R._block(C)), num_warps=4)
        build(R._rls_bwd_kernel, dict(DZ="*fp32", Y=t, G="*fp32", DY=t, DG_partial="*fp32"),
              dict(BLOCK_C=R._block(C)), num_warps=4)
    build(S._swiglu_fwd_kernel, dict(X=t, Y=t), dict(BLOCK=S._block(3416)), num_warps=4)
    build(S._swiglu_bwd_kernel, dict(DY=t, X=t, DX=t), dict(BLOCK=S._block(3416)), num_warps=4)


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


if __name__ == "__main__":
    compile_all()

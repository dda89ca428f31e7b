"""Every backend's custom ops load into one process and each op's fake (meta) kernel runs.

Each backend owns one torch.library namespace: ``virchow_fast_triton`` (kernels/, the head loss
included) and ``virchow_fast_cuda`` (csrc/ through virchow_fast/ops/cuda_ops.py). Two libraries
defining the same name abort the process (SIGABRT, "registered multiple times"), so the check with
the built extension runs in a subprocess and the test reads its exit status.

Fakes are called under FakeTensorMode with arguments built from each op's schema (by argument
name, one consistent small problem per op family), so an op added later without a fake, or with
an argument this table does not know, fails here by name.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NAMESPACES = {"triton": "virchow_fast_triton", "cuda": "virchow_fast_cuda"}

# The check, run as a script (argv[1]: the built extension, or "-" for the Triton backend alone).
_CHECK = r'''
import importlib.util, sys
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from virchow_fast import ops
for _name, _op in ops.TABLE.items():  # importing each kernel module registers its ops
    if _op.triton:
        ops.implementation(_name, "triton")
namespaces = ["virchow_fast_triton"]
if sys.argv[1] != "-":
    spec = importlib.util.spec_from_file_location("virchow_fast._C", sys.argv[1])
    mod = importlib.util.module_from_spec(spec); sys.modules["virchow_fast._C"] = mod; spec.loader.exec_module(mod)
    from virchow_fast.ops import cuda_ops  # noqa: F401  (fakes and autograd of the extension's ops)
    namespaces.append("virchow_fast_cuda")

T, C, H2, HEADS, D, S, R, K, B = 12, 16, 8, 2, 8, 3, 5, 32, 8
def rows(mode):
    e = lambda *s, dtype=torch.bfloat16: torch.empty(*s, dtype=dtype)
    return dict(x=e(T, C), y=e(T, C), dy=e(T, C), dz=e(T, C), dh=e(T, C), z=e(T, C), dres=e(T, C), weight=e(C),
                bias=e(C), ln_bias=e(C), gamma=e(C), mean=e(T, dtype=torch.float32), rstd=e(T, dtype=torch.float32),
                keep=e(S, dtype=torch.float32), seg_ids=e(T, dtype=torch.int32), eps=1e-6, x_dtype=torch.bfloat16)
def swiglu(mode):
    e = lambda *s: torch.empty(*s, dtype=torch.bfloat16)
    return dict(x=e(T, 2 * H2), dy=e(T, H2), bias=e(2 * H2))
def residual_weight(mode):
    e = lambda *s: torch.empty(*s, dtype=torch.bfloat16)
    return dict(weight=e(C, H2), gamma=e(C), bias=e(C), pad=8, dwe=e(C, H2 + 8))
def l2_normalize(mode):
    e = lambda *s: torch.empty(*s, dtype=torch.bfloat16)
    return dict(w=e(K, B), dy=e(K, B), inv=torch.empty(K), eps=1e-12)
def attention(mode):
    e = lambda *s: torch.empty(*s, dtype=torch.bfloat16)
    return dict(qkv=e(T, 3, HEADS, D), o=e(T, HEADS, D), do=e(T, HEADS, D),
                lse=torch.empty(HEADS, T), cu_seqlens=torch.empty(S + 1, dtype=torch.int32), max_seqlen=6,
                scale=0.3)
def head(mode, op):
    v = torch.empty(R, B) if op.startswith("head_col_reduce") else torch.empty(K, B)
    return dict(z=torch.empty(R, B), w=torch.empty(K, B), scale=2.0, beta=torch.empty(K), alpha=torch.empty(R),
                v=v, coef=0.5, out=torch.empty(K, B))
def centering(mode):
    return dict(logits=torch.empty(R, K), center=torch.empty(K), temp=0.04, q=torch.empty(R, K),
                col=torch.empty(K), col_scale=1.0 / K, row_target=1.0)
def family(op, mode):
    if op.startswith("attention"): return attention(mode)
    if op.startswith("head_"): return head(mode, op)
    if op.startswith("swiglu"): return swiglu(mode)
    if op.startswith("residual_weight"): return residual_weight(mode)
    if op.startswith("l2_normalize"): return l2_normalize(mode)
    if op.startswith(("softmax_center", "sinkhorn")): return centering(mode)
    return rows(mode)

checked = []
for ns in namespaces:
    ops = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith(ns + "::"))
    assert ops, f"no op registered in {ns}"
    for name in ops:
        schema = getattr(getattr(torch.ops, ns), name).default._schema
        with FakeTensorMode() as mode:
            pool = family(name, mode)
            args = []
            for a in schema.arguments:
                if a.name in pool:
                    args.append(pool[a.name])
                elif a.has_default_value():
                    break
                elif "Optional" in str(a.type):
                    args.append(None)
                else:
                    raise SystemExit(f"{ns}::{name}: no test value for argument {a.name!r} ({a.type})")
            getattr(getattr(torch.ops, ns), name)(*args)
        checked.append(f"{ns}::{name}")
print("checked", " ".join(checked))
'''


def _run(ext: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", _CHECK, ext], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_triton_ops_one_namespace_and_fakes():
    """Every kernels/ module registers into virchow_fast_triton only, and every fake runs."""
    res = _run("-")
    assert res.returncode == 0, res.stderr[-4000:]
    checked = res.stdout.split("checked", 1)[1].split()
    assert {c.split("::")[0] for c in checked} == {"virchow_fast_triton"}
    for op in ("layer_norm_fwd", "swiglu_fwd", "residual_weight_fwd", "attention_fwd", "head_row_lse"):
        assert f"virchow_fast_triton::{op}" in checked


def test_kernel_sources_name_only_their_namespace():
    """Source-level: no kernels/ file registers outside virchow_fast_triton, none of csrc/ outside
    virchow_fast_cuda (a stale name would only collide in a process that loads both)."""
    import re
    for path in glob.glob(str(ROOT / "kernels" / "*.py")):
        for ns in re.findall(r'custom_op\("([\w]+)::', Path(path).read_text()):
            assert ns == NAMESPACES["triton"], f"{path}: custom op in namespace {ns}"
    cpp = (ROOT / "csrc" / "bindings.cpp").read_text()
    assert set(re.findall(r"TORCH_LIBRARY(?:_IMPL)?\((\w+)", cpp)) == {NAMESPACES["cuda"]}
    py = (ROOT / "virchow_fast" / "ops" / "cuda_ops.py").read_text()
    assert set(re.findall(r'"(\w+)::\w+"', py)) == {NAMESPACES["cuda"]}


@pytest.mark.slow
def test_every_backend_in_one_process(built_extension):
    """Loads the built virchow_fast._C next to every Triton registration in one process and runs
    every op's fake from both namespaces."""
    res = _run(built_extension)
    assert res.returncode == 0, f"exit {res.returncode}:\n{res.stderr[-4000:]}"
    checked = res.stdout.split("checked", 1)[1].split()
    for op in ("layer_norm_fwd", "layer_norm_bwd", "softmax_center", "sinkhorn_col_sums", "sinkhorn_normalize_rows_"):
        assert f"virchow_fast_cuda::{op}" in checked
    assert "virchow_fast_triton::layer_norm_fwd" in checked

"""bench_profile's kernel categories and its time accounting on a hand-made trace."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_profile as bp  # noqa: E402


@pytest.mark.parametrize("name, category", [
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "GEMM"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "GEMM"),
    ("_attn_fwd_kernel", "attention"),
    ("_attn_bwd_dkdv_kernel", "attention"),
    ("_row_lse_kernel", "head loss (fused)"),
    ("_ln_fwd_kernel", "Triton glue"),
    ("_swiglu_bwd_kernel", "Triton glue"),
    ("triton_poi_fused_add_mul_0", "Triton glue"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>", "optimizer and EMA"),
    ("void at::native::_fused_adamw_kernel_cuda<float>", "optimizer and EMA"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"),
    ("Memcpy DtoD (Device -> Device)", "memcpy / memset"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "other elementwise"),
])
def test_classify(name, category):
    assert bp.classify(name) == category


def test_our_triton_kernels_are_found():
    ours = bp.triton_kernels()
    assert ours["_attn_fwd_kernel"] == "attention" and ours["_ln_bwd_kernel"] == "Triton glue"
    assert ours["_col_reduce_kernel"] == "head loss (fused)"


def test_breakdown_sums_and_idle():
    """Kernels at [0,10), [5,15) (overlap), [30,40) in a 50 us window: busy 25 us, idle 25 us."""
    ev = lambda name, ts, dur: {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}  # noqa: E731
    trace = {"traceEvents": [ev("nvjet_x", 100, 10), ev("_attn_fwd_kernel", 105, 10), ev("triton_poi_x", 130, 10),
                             {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 100, "dur": 50},
                             ev("outside_window", 400, 10)]}
    rows, top, wall = bp.breakdown_from_trace(trace, (100.0, 150.0))
    by = {r["category"]: r for r in rows}
    assert wall == 50
    assert by["GEMM"]["ms"] == pytest.approx(0.010) and by["attention"]["ms"] == pytest.approx(0.010)
    assert by["Triton glue"]["%step"] == pytest.approx(20.0)
    assert by["idle"]["ms"] == pytest.approx(0.025)
    assert [t["kernel"] for t in top] == ["nvjet_x", "_attn_fwd_kernel", "triton_poi_x"]

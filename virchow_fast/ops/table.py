"""The op table: the one list of fused ops, their implementations per backend and the ``auto`` order.

Everything else reads it: ``virchow_fast.ops`` (dispatch), the config (``ops.<name>`` fields, their
documentation and validation), the environment variables (``VIRCHOW_FAST_<NAME>``), the tests and
the benchmarks. An op's name is its function's name in ``virchow_fast.ops``. Implementations are
``"module:function"`` strings, imported on first use, so reading the table imports nothing (the
config reads it in processes that never touch a kernel).

Backends: ``torch`` is the pure PyTorch reference (``ops/reference.py``, the specification, and the
only backend on CPU tensors); ``triton`` is ``kernels/`` (also on CPU tensors under TRITON_INTERPRET=1,
for tests); ``cuda`` is the ``virchow_fast._C`` extension built from ``csrc/``.
"""
from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("torch", "triton", "cuda")


@dataclass(frozen=True)
class Op:
    name: str
    summary: str
    torch: str
    triton: str | None = None
    cuda: str | None = None
    auto: tuple[str, ...] = ("torch",)  # order tried on CUDA tensors; the first available one runs
    evidence: str = ""  # why ``auto`` is in this order

    def backends(self) -> tuple[str, ...]:
        return tuple(b for b in BACKENDS if getattr(self, b) is not None)

    @property
    def env(self) -> str:
        return f"VIRCHOW_FAST_{self.name.upper()}"


_NOT_MEASURED = ("expected order, not yet measured on a GPU (no device lent so far); "
                 "benchmarks/gpu_check.sh measures it")

TABLE: dict[str, Op] = {op.name: op for op in (
    Op("attention", "packed varlen attention of the [T, 3, H, D] qkv projection over cu_seqlens segments",
       torch="virchow_fast.ops.reference:attention",
       triton="virchow_fast.kernels.attention:attention",
       auto=("triton", "torch"),
       evidence=_NOT_MEASURED + "; sm_90a codegen checked by tests/kernels/test_sm90_compile.py"),
    Op("layer_norm", "LayerNorm over the last dim (and, at a block's branch points, the residual "
       "stream's gradient summed in its backward)",
       torch="virchow_fast.ops.reference:layer_norm",
       triton="virchow_fast.kernels.layer_norm:layer_norm",
       cuda="virchow_fast.ops.cuda_ops:layer_norm",
       auto=("triton", "cuda", "torch"), evidence=_NOT_MEASURED),
    Op("swiglu", "SiLU(first half) * second half of the packed fc1 output, fc1's bias added",
       torch="virchow_fast.ops.reference:swiglu",
       triton="virchow_fast.kernels.swiglu:swiglu",
       auto=("triton", "torch"), evidence=_NOT_MEASURED),
    Op("residual_weight", "[gamma * W | gamma * b | 0]: LayerScale and the bias folded into the weight of a "
       "block's residual GEMM (addmm with the residual stream as C)",
       torch="virchow_fast.ops.reference:residual_weight",
       triton="virchow_fast.kernels.residual_weight:residual_weight",
       auto=("triton", "torch"),
       evidence=_NOT_MEASURED + "; one pass over the weight instead of passes over the token rows "
                "(benchmarks/cost_model.py)"),
    Op("l2_normalize", "rows divided by their L2 norm: the DINO / iBOT prototypes' weight norm, one pass each way",
       torch="virchow_fast.ops.reference:l2_normalize",
       triton="virchow_fast.kernels.l2_normalize:l2_normalize",
       auto=("triton", "torch"),
       evidence=_NOT_MEASURED + "; 2 passes forward and 3 backward instead of about 10 (benchmarks/cost_model.py)"),
    Op("prototype_loss", "DINO / iBOT head loss from bottleneck features, logits never stored",
       torch="virchow_fast.ops.reference:prototype_loss",
       triton="virchow_fast.kernels.prototype_loss:prototype_loss",
       cuda="virchow_fast.ops.cuda_ops:prototype_loss",
       auto=("triton", "cuda", "torch"),
       evidence=_NOT_MEASURED + "; CPU peak memory of the fused loss: 0.03-0.08x eager "
                "(benchmarks/results/bench_head_loss_cpu_*.json)"),
    Op("teacher_probs", "materialised teacher targets [M, K]: Sinkhorn-Knopp or softmax centering",
       torch="virchow_fast.ops.reference:teacher_probs",
       cuda="virchow_fast.ops.cuda_ops:teacher_probs",
       auto=("cuda", "torch"), evidence=_NOT_MEASURED),
)}

# old config keys, so a config written for an earlier version fails with the new name in its line
RENAMED = {"head_loss": "prototype_loss", "centering": "teacher_probs",
           # the block's residual ops became its residual GEMMs (model/vit.py), whose fused op is this
           "residual_layer_scale": "residual_weight", "residual_layer_norm": "residual_weight"}

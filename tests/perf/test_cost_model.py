"""The step cost model: its counts against info.py's arithmetic, a LayerNorm's bytes, a hand count."""
from __future__ import annotations

import math

import pytest
import torch

from virchow_fast.config import load_config
from virchow_fast.model.info import backbone_forward_flops
from virchow_fast.perf.cost import H200, collective_times, op_time, summarize
from virchow_fast.perf.counter import COLLECTIVES, CostCounter, attention_launch_flops, split_segments
from virchow_fast.perf.memory import memory_estimate
from virchow_fast.perf.trace import cuda_backends, trace_step

pytest.importorskip("triton")

BASE = ["data.source=synthetic", "data.paths=[]", "model.drop_path=0.0"]
# a model small enough to count by hand: width 16, one block, 2 heads, SwiGLU hidden 24, no registers,
# 28 px global crops (2 x 2 patches of 14), 14 px local crops (1 patch), 2 + 2 crops, one tile
HAND = BASE + ["model.embed_dim=16", "model.depth=1", "model.num_heads=2", "model.mlp_hidden=24",
               "model.num_registers=0", "model.img_size=28", "data.crops.global_size=28",
               "data.crops.local_size=14", "data.crops.context_size=32", "data.crops.n_global=2",
               "data.crops.n_local=2", "data.masks.min_block_patches=1", "heads.dino_prototypes=64",
               "heads.ibot_prototypes=64", "heads.hidden_dim=32", "heads.bottleneck_dim=8",
               "heads.ibot_bottleneck_dim=8"]


def _flops(trace, categories, issued=False):
    return sum(r.issued_flops if issued else r.flops for r in trace.records if r.category in categories)


@pytest.fixture(scope="module")
def debug_trace():
    cfg = load_config("configs/debug.yaml", BASE)
    return cfg, trace_step(cfg, tiles=2, ac="off")


def test_flops_equal_info_arithmetic(debug_trace):
    """GEMM + attention FLOPs of the traced step = info.py's backbone count (student 3x fwd, teacher 1x),
    less the patch embedding's input gradient (images need none; info counts backward as 2x forward)."""
    cfg, trace = debug_trace
    m, c, tiles = cfg.model, cfg.data.crops, trace.tiles
    g, loc = c.global_size // m.patch_size, c.local_size // m.patch_size
    student = c.n_global * backbone_forward_flops(cfg, g) + c.n_local * backbone_forward_flops(cfg, loc)
    teacher = c.n_global * backbone_forward_flops(cfg, g)
    no_input_grad = 2 * (c.n_global * g * g + c.n_local * loc * loc) * 3 * m.patch_size ** 2 * m.embed_dim
    expected = tiles * (3 * student + teacher - no_input_grad)
    assert _flops(trace, {"GEMM", "attention"}) == pytest.approx(expected, rel=1e-12)


def test_full_checkpointing_adds_one_student_forward(debug_trace):
    """Full checkpointing recomputes the student's blocks once more, but each block's recompute stops
    before its last op, fc2's residual GEMM: nothing saved for the backward is its output (addmm keeps
    its inputs), and torch's non-reentrant checkpoint stops recomputing once every saved tensor is back."""
    cfg, off = debug_trace
    full = trace_step(cfg, tiles=2, ac="full")
    m, c = cfg.model, cfg.data.crops
    g, loc = c.global_size // m.patch_size, c.local_size // m.patch_size
    blocks_only = lambda grid: backbone_forward_flops(cfg, grid) - 2 * grid * grid * 3 * m.patch_size ** 2 * m.embed_dim  # noqa: E731
    prefix = 1 + m.num_registers
    tokens = 2 * (c.n_global * (g * g + prefix) + c.n_local * (loc * loc + prefix))  # the student's, 2 tiles
    last_gemm = m.depth * 2 * tokens * m.mlp_hidden * m.embed_dim
    extra = 2 * (c.n_global * blocks_only(g) + c.n_local * blocks_only(loc)) - last_gemm
    assert _flops(full, {"GEMM", "attention"}) - _flops(off, {"GEMM", "attention"}) == pytest.approx(extra, rel=1e-12)
    assert full.activation_bytes < off.activation_bytes


def test_layer_norm_bytes_are_its_reads_and_writes():
    """One LayerNorm forward (the Triton op a CUDA run takes): reads x, w, b; writes y, mean, rstd."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mod_tracker import ModTracker

    from virchow_fast import ops

    rows, cols = 300, 1280
    with cuda_backends(), FakeTensorMode() as mode:
        x = torch.empty(rows, cols, dtype=torch.bfloat16)
        w, b = torch.empty(cols, dtype=torch.bfloat16), torch.empty(cols, dtype=torch.bfloat16)
        tracker = ModTracker()
        with tracker, CostCounter(mode, tracker, []) as counter:
            ops.layer_norm(x, w, b, 1e-6)
    (rec,) = [r for r in counter.records if r.bytes]
    assert rec.op.endswith("layer_norm_fwd") and rec.category == "norms"
    assert rec.bytes == rows * cols * 2 + 2 * cols * 2 + rows * cols * 2 + 2 * rows * 4


def test_mixed_dtype_matmul_is_an_error_not_a_price():
    """Fake tensors run an mm of bf16 by fp32 (a CUDA kernel refuses it); the counter names it instead."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mod_tracker import ModTracker

    with FakeTensorMode() as mode:
        a, b = torch.empty(8, 16, dtype=torch.bfloat16), torch.empty(16, 4)
        tracker = ModTracker()
        with tracker, CostCounter(mode, tracker, []):
            torch.mm(a, b.bfloat16())  # same dtypes: counted
            with pytest.raises(RuntimeError, match=r"aten.mm on torch.bfloat16 and torch.float32 operands"):
                torch.mm(a, b)


def test_tiny_config_equals_hand_count():
    """Backbone FLOPs and AdamW bytes of a whole step of a hand-sized model, counted by hand."""
    cfg = load_config("configs/debug.yaml", HAND)
    trace = trace_step(cfg, tiles=1, ac="off")
    # per token and block: qkv 16x48, proj 16x16, fc1 16x48, fc2 24x16 multiply-adds = 2176, x2 FLOPs
    linear = 2 * (16 * 48 + 16 * 16 + 16 * 48 + 24 * 16)
    # tokens: global crops 4 + cls = 5, local 1 + cls = 2; attention 4 L^2 C per crop
    s_linear, t_linear = (2 * 5 + 2 * 2) * linear, 2 * 5 * linear
    s_attn, t_attn = 2 * 4 * 25 * 16 + 2 * 4 * 4 * 16, 2 * 4 * 25 * 16
    patch = 2 * 3 * 14 * 14 * 16  # per patch: 588-long dot products to 16 channels
    s_patch, t_patch = (2 * 4 + 2 * 1) * patch, 2 * 4 * patch
    student = (s_linear + s_attn + s_patch) + 2 * (s_linear + s_attn) + s_patch  # backward: no image gradient
    assert _flops(trace, {"GEMM", "attention"}) == student + t_linear + t_attn + t_patch == 767488
    # the fused update (kernels/adamw_ema.py), one call: reads param, grad, exp_avg, exp_avg_sq and the
    # teacher's weight, writes param, exp_avg, exp_avg_sq and the teacher (fp32: 36 bytes per parameter);
    # per tensor its (lr, weight decay, EMA flag) row; the grad_scale scalar (the clip, train/step.py)
    # and the int32 non-finite counter it reads and writes
    n = trace.param_counts["trainable"]
    n_tensors = trace.param_counts["trainable_tensors"]
    (update,) = [r for r in trace.records if r.op.endswith("adamw_ema_")]
    assert update.phase == "optimizer" and update.category == "optimizer and EMA"
    assert update.bytes == 36 * n + 12 * n_tensors + 4 + 8
    assert not [r for r in trace.records if r.op in ("aten._fused_adamw_", "aten._foreach_lerp_")]


def test_one_gpu_bf16_update_reads_bf16_gradients_and_writes_the_copies():
    """One GPU under bf16 (compute copies, no FSDP): the update reads the copies' bf16 gradients and writes
    both networks' bf16 copies (36 - 2 + 2 + 2 = 38 bytes per parameter); no FSDP casts or copies remain."""
    cfg = load_config("configs/debug.yaml", HAND + ["parallel.mixed_precision=bf16"])
    trace = trace_step(cfg, tiles=1, ac="off")
    assert trace.copies and not trace.fsdp
    n, n_tensors = trace.param_counts["trainable"], trace.param_counts["trainable_tensors"]
    (update,) = [r for r in trace.records if r.op.endswith("adamw_ema_")]
    assert update.bytes == 38 * n + 12 * n_tensors + 4 + 8
    (norm,) = [r for r in trace.records if r.op == "aten._foreach_norm"]
    assert norm.bytes == 2 * n + 4 * n_tensors  # bf16 gradients in, one fp32 norm per tensor out
    assert not [r for r in trace.records if r.op.startswith("fsdp.")]
    mem = memory_estimate(trace)
    assert mem["compute_copies"] == 2 * (trace.param_counts["student"] + trace.param_counts["teacher"])
    assert mem["gradients"] == 2 * n


def test_attention_issued_flops_from_tiles():
    """ViT-H's 261-token crops at head dim 80: rows and inner columns padded to whole tiles of the
    kernel's default launch, the head dim to its chunks (64 + 16 since the split; 128 before)."""
    from virchow_fast.kernels import attention as kernel

    useful, issued = attention_launch_flops([261], 1, 80, torch.bfloat16, backward=False)
    assert useful == 4 * 261 * 261 * 80
    bm, bn = kernel.candidates("fwd", torch.bfloat16, 80)[0][:2]
    padded_d = sum(kernel.head_chunks(80))
    assert issued == (math.ceil(261 / bm) * bm) * (math.ceil(261 / bn) * bn) * 2 * 2 * padded_d
    useful_b, issued_b = attention_launch_flops([261, 54], 2, 80, torch.bfloat16, backward=True)
    assert useful_b == 2 * 2 * 4 * (261 ** 2 + 54 ** 2) * 80
    assert issued_b > useful_b * 7 / 4  # the backward recomputes QK^T twice and dO V^T once


def test_split_segments():
    assert split_segments(2 * 261 + 8 * 54, 10, 261, [261, 54]) == [261] * 2 + [54] * 8
    assert split_segments(4 * 261, 4, 261, [261, 54]) == [261] * 4


def test_summary_prices_every_op_and_memory_parts(debug_trace):
    cfg, trace = debug_trace
    s = summarize(trace, cfg)
    priced = sum(op_time(r, H200) for r in trace.records if r.category != COLLECTIVES)
    assert s["step_seconds"] == pytest.approx(priced)
    assert s["tiles_per_s"] == pytest.approx(trace.tiles / priced)
    mem = memory_estimate(trace)
    assert mem["optimizer"] == 8 * trace.param_counts["trainable"]
    assert mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k != "total"))


def test_collectives_counted_under_fsdp():
    cfg = load_config("configs/debug.yaml", HAND + ["parallel.mixed_precision=bf16"])
    trace = trace_step(cfg, tiles=1, ac="off", world_size=4)
    comm = [r for r in trace.records if r.category == COLLECTIVES]
    assert any("allgather" in r.op for r in comm) and any("reduce_scatter" in r.op for r in comm)
    rows = collective_times(trace, (8,))
    # ring algorithms: a gather or reduce-scatter moves (N-1)/N of its full payload per GPU, an all-reduce twice that
    moved = sum(r.bytes * (2 if "allreduce" in r.op else 1) for r in comm) * 7 / 8
    assert rows[0]["bytes_per_gpu"] == pytest.approx(moved)
    gathered = sum(r.bytes for r in comm if "allgather" in r.op)
    student = trace.param_counts["student"]
    assert gathered >= 2 * student * 2  # bf16 weights gathered for the forward and again for the backward


def test_measured_profiles_match_model_batch_and_mode(tmp_path, debug_trace):
    """bench_profile.py's JSON is read beside the prediction when model, batch and AC mode match;
    every op lands in one of its categories."""
    import json
    import sys
    from pathlib import Path

    from virchow_fast.perf.cost import measured_profiles, profile_category

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_profile

    cfg = load_config("configs/vit_h14_virchow2.yaml", ["data.paths=[]", "data.source=synthetic"])
    rows = [{"category": "GEMM", "ms": 200.0, "%step": 60.0}]
    for name, payload in {"a": {"model": "vit_h14", "batch": 32, "ac": "off"},
                          "b": {"model": "vit_h14", "batch": 32, "ac": "full"},
                          "c": {"model": "vit_g14", "batch": 32, "ac": "off"},
                          "d": {"model": "vit_h14", "batch": 32, "ac": "off", "smoke": True}}.items():
        (tmp_path / f"bench_profile_h200_{name}.json").write_text(json.dumps({**payload, "rows": rows}))
    found = measured_profiles(tmp_path, cfg, 32, ("off", "auto"))
    assert [Path(f["path"]).name for f in found] == ["bench_profile_h200_a.json"]
    assert measured_profiles(tmp_path, cfg, 24, "off") == []
    _, trace = debug_trace
    assert {profile_category(r) for r in trace.records} <= set(bench_profile.CATEGORIES)


def test_cli_writes_json_and_last_line(tmp_path, capsys):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import cost_model

    out = tmp_path / "cost.json"
    assert cost_model.main(["--config", "configs/debug.yaml", "--tiles", "2", "--ac", "full", "--json", str(out),
                            "--results", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    data = json.loads(out.read_text())
    assert last == f"predicted: {data['tiles_per_s']:.1f} tiles/s, MFU {100 * data['mfu']:.1f} %"
    assert data["activation_checkpointing"] == "full" and data["tiles_per_gpu"] == 2
    assert cost_model.main(["--config", "configs/debug.yaml", "--ac", "sometimes"]) == 2  # one line, no traceback
    assert "parallel.activation_checkpointing" in capsys.readouterr().err

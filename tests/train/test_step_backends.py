"""One training step with every op on triton equals the step with every op on torch: losses and gradients.

The step is the trainer's: ``train.loop.build`` (model, heads, parallelisation, losses as a run
builds them) and the loss it calls each step (teacher and student forward on one batch from the
trainer's loader, DINO + iBOT + KDE), then backward. The only difference between the two runs is
``ops.<op>`` (every op that has a triton backend on triton, else torch); weights, batch and the drop
path draws are the same.

- GPU: two blocks at ViT-H/14's and ViT-G/14's real widths and head dims (80, 104), real crop
  sizes and heads at K=131072, bf16 compute as the shipped configs. Tolerance: the triton step's
  error against an fp32 torch step may be at most 3x the bf16 torch step's own error against it,
  or 2 % of the norm, per loss term and per gradient tensor.
- CPU: the tiny debug model (head dim 80), fp32, kernels in Triton's interpreter: equal to 1e-4.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from virchow_fast import ops  # noqa: E402
from virchow_fast.config import load_config  # noqa: E402
from virchow_fast.data import build_loader  # noqa: E402
from virchow_fast.ops import dispatch  # noqa: E402
from virchow_fast.ops.table import TABLE  # noqa: E402
from virchow_fast.train.distributed import init_distributed, shutdown_distributed  # noqa: E402
from virchow_fast.train.loop import build  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TERMS = ("loss", "dino", "ibot", "reg")
TRITON_OPS = tuple(name for name, op in TABLE.items() if op.triton is not None)
CPU_TINY = ["model.embed_dim=160", "model.depth=2", "model.num_heads=2", "model.mlp_hidden=96",
            "model.img_size=42", "heads.dino_prototypes=128", "heads.ibot_prototypes=128", "heads.hidden_dim=64",
            "heads.bottleneck_dim=32", "heads.ibot_bottleneck_dim=32", "data.crops.global_size=42",
            "data.crops.local_size=28", "data.crops.context_size=48", "data.crops.n_local=2",
            "data.masks.min_block_patches=1", "data.batch_size=2"]
GPU_SHAPES = {  # two blocks at the real width / head dim; batch kept small so the test takes seconds
    "vit_h14": ("configs/vit_h14_virchow2.yaml", ["model.depth=2", "data.batch_size=4"]),
    "vit_g14": ("configs/vit_g14_virchow2g.yaml", ["model.depth=2", "data.batch_size=4"]),
}


def _patch_interpreter() -> None:
    """The interpreter's bf16 dot fix lives in tests/kernels/conftest.py; load it for this folder too."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import warnings

    import numpy as np

    try:  # Triton 3.6's interpreter takes int() of 1-element arrays, which numpy 2.5 refuses
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            int(np.zeros(1, dtype=np.int32))
    except TypeError:
        pytest.skip(f"Triton's interpreter cannot run on numpy {np.__version__} (int() of a 1-element array); "
                    "the GPU case runs compiled kernels")
    spec = importlib.util.spec_from_file_location("_kernels_conftest", ROOT / "tests/kernels/conftest.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def _config(base: str, sets: list[str], device: str, precision: str, backend: str):
    sets = sets + ["data.source=synthetic", "data.paths=[]", "data.num_workers=0", f"train.device={device}",
                   f"parallel.mixed_precision={precision}", "parallel.fsdp=auto"]
    sets += [f"ops.{op}={backend if op in TRITON_OPS else 'torch'}" for op in ops.OPS]
    return load_config(ROOT / base, sets)


def _one_step(cfg, seen: set | None = None) -> tuple[dict, dict]:
    """Loss terms (float) and student gradients (fp32, on the CPU) of one step of ``cfg``.

    ``seen`` collects the (op, backend) pairs the step dispatched to.
    """
    info = init_distributed(cfg)
    backend_for = dispatch.backend_for

    def spy(op, device):
        choice = backend_for(op, device)
        if seen is not None:
            seen.add((op, choice))
        return choice

    ops.backend_for = dispatch.backend_for = spy  # the facade's name and the one dispatch calls
    try:
        student, teacher, _, loss_fn = build(cfg, info)
        batch = next(build_loader(cfg.data, cfg.model.patch_size, 0, 1, cfg.train.seed)).to(info.device)
        student.train()
        teacher.eval()
        torch.manual_seed(1234)  # the same drop-path draws in every run
        out = loss_fn(student, teacher, batch, 0.04, info.reducer, info.world_size)
        out["loss"].backward()
        terms = {k: float(out[k].detach()) for k in TERMS}
        grads = {n: p.grad.detach().float().cpu() for n, p in student.named_parameters() if p.grad is not None}
        return terms, grads
    finally:
        ops.backend_for = dispatch.backend_for = backend_for
        ops.configure({op: "auto" for op in ops.OPS})
        shutdown_distributed()


def _assert_triton_ran(seen: set) -> None:
    """The triton run really took the triton kernels (and no op fell back to torch)."""
    for op in ("attention", "layer_norm", "swiglu", "prototype_loss"):
        assert (op, "triton") in seen, f"ops.{op} never ran on triton: {sorted(seen)}"
    assert not {(op, "torch") for op in TRITON_OPS} & seen, sorted(seen)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_step_triton_equals_torch_cpu():
    """CPU (or any device in fp32): every op on triton (the interpreter here) equals torch to 1e-4."""
    if torch.cuda.is_available():
        pytest.skip("the GPU case below covers this")
    _patch_interpreter()
    ref_terms, ref_grads = _one_step(_config("configs/debug.yaml", CPU_TINY, "cpu", "fp32", "torch"))
    seen = set()
    terms, grads = _one_step(_config("configs/debug.yaml", CPU_TINY, "cpu", "fp32", "triton"), seen)
    _assert_triton_ran(seen)
    for k in TERMS:
        assert terms[k] == pytest.approx(ref_terms[k], rel=1e-4, abs=1e-5), k
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, g in ref_grads.items():
        if g.norm() > 0:
            assert _rel(grads[name], g) < 1e-4, f"{name}: relative gradient error {_rel(grads[name], g):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("model", sorted(GPU_SHAPES))
def test_step_triton_equals_torch_gpu(model):
    base, sets = GPU_SHAPES[model]
    truth_terms, truth = _one_step(_config(base, sets, "cuda", "fp32", "torch"))
    ref_terms, ref = _one_step(_config(base, sets, "cuda", "bf16", "torch"))
    seen = set()
    terms, grads = _one_step(_config(base, sets, "cuda", "bf16", "triton"), seen)
    _assert_triton_ran(seen)
    for k in TERMS:
        scale = max(abs(truth_terms[k]), 1e-3)
        err, ref_err = abs(terms[k] - truth_terms[k]), abs(ref_terms[k] - truth_terms[k])
        assert err <= max(3 * ref_err, 0.02 * scale), f"{k}: triton {terms[k]} torch-bf16 {ref_terms[k]} " \
                                                      f"fp32 {truth_terms[k]}"
    assert grads.keys() == truth.keys()
    worst = []
    for name, g in truth.items():
        if g.norm() == 0:
            continue
        err, ref_err = _rel(grads[name], g), _rel(ref[name], g)
        worst.append((err, ref_err, name))
        assert err <= max(3 * ref_err, 0.02), f"{name}: triton error {err:.2e}, torch bf16 error {ref_err:.2e}"
    worst.sort(reverse=True)
    print(f"{model}: largest relative gradient errors (triton, torch bf16): "
          + ", ".join(f"{n} {e:.1e}/{r:.1e}" for e, r, n in worst[:3]))

"""Activation checkpointing policies: same numbers as no checkpointing; auto picks what fits memory."""
from __future__ import annotations

import copy

import pytest
import torch

from virchow_fast.config import ParallelConfig, load_config
from virchow_fast.model.ssl import SSLNetwork, make_teacher
from virchow_fast.perf.memory import POLICIES, choose_policy, memory_estimate
from virchow_fast.perf.trace import trace_step
from virchow_fast.train.distributed import DistInfo
from virchow_fast.train.parallelize import parallelize, resolve_activation_checkpointing

TINY = ["data.source=synthetic", "data.paths=[]", "model.drop_path=0.3", "model.depth=2"]


def _grads(cfg, mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    student = SSLNetwork(cfg.model, cfg.heads)
    teacher = make_teacher(student)
    parallelize(student, teacher, ParallelConfig(activation_checkpointing=mode), DistInfo(0, 1, 0, torch.device("cpu")))
    student.train()
    g, loc = torch.randn(4, 3, 28, 28), torch.randn(4, 3, 14, 14)
    torch.manual_seed(1)  # drop path draws: replayed on recompute
    outs = student.backbone.forward_packed([g, loc])
    loss = sum((o.float() ** 2).mean() for o in outs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointing_policies_match_no_checkpointing(mode):
    cfg = load_config("configs/debug.yaml", TINY + ["model.img_size=28", "data.crops.global_size=28",
                                                   "data.crops.local_size=14"])
    ref_loss, ref = _grads(cfg, "off")
    loss, grads = _grads(cfg, mode)
    assert torch.equal(loss, ref_loss)
    assert ref.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def estimates():
    cfg = load_config("configs/debug.yaml", TINY)
    traces = {p: trace_step(cfg, 4, p, forward_only=True) for p in POLICIES}
    return cfg, {p: memory_estimate(t)["total"] for p, t in traces.items()}, traces


def test_policies_order_memory(estimates):
    _, totals, traces = estimates
    act = {p: t.activation_bytes for p, t in traces.items()}
    assert act["off"] > act["selective"] > act["full"] > 0
    assert totals["off"] > totals["selective"] > totals["full"]


def test_auto_picks_the_cheapest_that_fits(estimates):
    cfg, totals, traces = estimates
    fake = lambda c, t, a, w: traces[a]  # noqa: E731  (the traces above, not re-run)
    margin = 0.1
    fits = lambda total: total / (1 - margin) * 1.0001  # noqa: E731  (a device just big enough)
    assert choose_policy(cfg, 4, 1, fits(totals["off"]), margin, fake)[0] == "off"
    assert choose_policy(cfg, 4, 1, fits(totals["selective"]), margin, fake)[0] == "selective"
    assert choose_policy(cfg, 4, 1, fits(totals["full"]), margin, fake)[0] == "full"
    assert choose_policy(cfg, 4, 1, 1.0, margin, fake)[0] == "full"  # nothing fits: the smallest


def test_auto_on_cpu_is_off():
    cfg = load_config("configs/debug.yaml", TINY + ["parallel.activation_checkpointing=auto"])
    resolved = resolve_activation_checkpointing(copy.deepcopy(cfg), DistInfo(0, 1, 0, torch.device("cpu")))
    assert resolved.activation_checkpointing == "off"
    assert cfg.parallel.activation_checkpointing == "auto"  # the config itself is left as written


def test_selective_recomputes_no_matmul_flops():
    """HFU counts recomputed matmuls: full checkpointing adds a student forward, selective none."""
    from virchow_fast.train.metrics import flops_per_tile_step

    base = load_config("configs/debug.yaml", TINY)
    for mode, extra in (("off", False), ("selective", False), ("full", True)):
        cfg = copy.deepcopy(base)
        cfg.parallel.activation_checkpointing = mode
        model, hardware = flops_per_tile_step(cfg)
        assert (hardware > model) == extra, mode

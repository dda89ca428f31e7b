"""One GPU without FSDP: bf16 compute copies (train/copies.py) and FusedAdamW's reference update.

The copies path must give a one-rank FSDP2 run's numbers bit for bit (it is that run without the
gather/reduce copies), keep fp32 masters everywhere outside a forward, see the copies in
activation checkpointing's recompute, and never run on stale copies after a master changes.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from virchow_fast.config import load_config
from virchow_fast.data import Batch
from virchow_fast.data.masks import collate_masks
from virchow_fast.downstream.pretrained import HEADS
from virchow_fast.model.ssl import SSLNetwork
from virchow_fast.train import step as S
from virchow_fast.train.copies import ComputeCopies
from virchow_fast.train.distributed import DistInfo
from virchow_fast.train.loop import build
from virchow_fast.train.optim import FusedAdamW
from virchow_fast.train.schedules import build_schedules

TINY = ["model.embed_dim=48", "model.depth=2", "model.num_heads=2", "model.mlp_hidden=64", "model.img_size=42",
        "model.drop_path=0.3", "heads.dino_prototypes=128", "heads.ibot_prototypes=128", "heads.hidden_dim=64",
        "heads.bottleneck_dim=32", "heads.ibot_bottleneck_dim=32", "data.crops.global_size=42",
        "data.crops.local_size=14", "data.crops.n_local=2", "data.crops.context_size=48",
        "data.masks.min_block_patches=1", "data.batch_size=2", "data.source=synthetic", "data.paths=[]",
        "train.device=cpu", "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0", "optim.clip_grad=0.05"]


def _cfg(extra=()):
    return load_config("configs/debug.yaml", TINY + ["parallel.mixed_precision=bf16", *extra])


def _batch(cfg, i: int) -> Batch:
    b, c = cfg.data.batch_size, cfg.data.crops
    grid = c.global_size // cfg.model.patch_size
    g = torch.Generator().manual_seed(10 + i)
    masks = torch.from_numpy(collate_masks(np.random.default_rng(i), c.n_global * b, grid, 0.5, 0.2, 0.5, 1, 0.3))
    per = masks.sum(1, keepdim=True).clamp(min=1).float().expand_as(masks)
    return Batch(global_crops=torch.randn(c.n_global * b, 3, c.global_size, c.global_size, generator=g),
                 local_crops=torch.randn(c.n_local * b, 3, c.local_size, c.local_size, generator=g),
                 mags=torch.full((b,), 20.0), step=i, masks=masks, mask_indices=masks.reshape(-1).nonzero().reshape(-1),
                 mask_weights=(1.0 / per / masks.shape[0])[masks])


def _train(cfg, steps: int = 3):
    torch.manual_seed(0)
    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    student, teacher, opt, loss_fn = build(cfg, info)
    t = S.Trainee(cfg, info, student, teacher, opt, loss_fn)
    sched = build_schedules(cfg, 2e-3, 10)
    results = []
    for i in range(steps):
        torch.manual_seed(100 + i)  # the same drop-path draws in both runs
        results.append(S.train_step(t, _batch(cfg, i), i, sched))
    full = lambda v: v.full_tensor() if hasattr(v, "full_tensor") else v  # noqa: E731
    weights = {n: {k: full(v).detach().clone() for k, v in net.state_dict().items()} for n, net in
               (("student", student), ("teacher", teacher))}
    return results, weights, student, teacher


@pytest.fixture(scope="module")
def copies_run():
    return _train(_cfg())


def test_copies_path_is_chosen_and_equals_one_rank_fsdp_bit_for_bit(copies_run):
    got, weights, student, _ = copies_run
    assert student.compute_copies is not None and not hasattr(student.backbone.blocks[0].norm1.weight, "to_local")
    try:
        want, ref, fsdp_student, _ = _train(_cfg(["parallel.fsdp=on"]))
    finally:  # the one-rank group FSDP2 made here: later tests in this process expect none
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert hasattr(next(fsdp_student.parameters()), "to_local")  # really FSDP2
    assert any(r.grad_norm > 0.05 for r in got)  # the clip acted
    for a, b in zip(got, want, strict=True):
        assert a.terms == b.terms and a.grad_norm == b.grad_norm
    for net in ("student", "teacher"):
        for k, v in ref[net].items():
            assert torch.equal(weights[net][k], v), f"{net}.{k}"


def test_masters_outside_the_forward_copies_inside(copies_run):
    _, _, student, teacher = copies_run
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert all(v.dtype == torch.float32 for v in teacher.state_dict().values() if v.is_floating_point())
    seen = {}
    block = student.backbone.blocks[1]
    def record(key, value):
        seen.setdefault(key, value)  # a forward hook that returned a value would replace the output

    hidden = block.mlp.hidden  # what the block calls (fc1, SwiGLU): the weight it sees there

    def spy(*args, **kwargs):
        record("w", block.mlp.fc1.weight.dtype)
        return hidden(*args, **kwargs)

    block.mlp.hidden = spy
    root = student.dino_head.register_forward_hook(
        lambda m, a, o: record("head", next(m.parameters()).dtype))
    try:
        cfg = _cfg()
        b = _batch(cfg, 0)
        with torch.no_grad():
            student(b.global_crops, b.local_crops, b.masks, mask_inputs=True, mask_indices=b.mask_indices)
    finally:
        del block.mlp.hidden
        root.remove()
    assert seen["w"] == torch.bfloat16 and seen["head"] == torch.bfloat16
    assert block.mlp.fc1.weight.dtype == torch.float32  # restored after the forward


def _grads(ac: str):
    cfg = _cfg([f"parallel.activation_checkpointing={ac}"])
    torch.manual_seed(0)
    student, _, opt, loss_fn = build(cfg, DistInfo(0, 1, 0, torch.device("cpu"), None))
    b = _batch(cfg, 1)
    torch.manual_seed(7)
    s = student(b.global_crops, b.local_crops, b.masks, mask_inputs=True, mask_indices=b.mask_indices)
    (s["cls_z"].float().square().mean() + s["patch_z"].float().square().mean()).backward()
    assert all(p.grad is None for p in student.parameters())  # the gradients are the copies'
    return {id_: g.clone() for id_, g in enumerate(opt.gradients())}


@pytest.mark.parametrize("ac", ["full", "selective"])
def test_checkpointing_recomputes_with_the_copies(ac):
    """A recompute on the fp32 masters would put the gradients there (and change them)."""
    plain, checkpointed = _grads("off"), _grads(ac)
    assert len(plain) == len(checkpointed) > 0
    for k, g in plain.items():
        assert g.dtype == torch.bfloat16 and torch.equal(g, checkpointed[k])


def test_a_changed_master_is_recast_before_the_next_forward():
    cfg = _cfg()
    torch.manual_seed(0)
    net = SSLNetwork(cfg.model, cfg.heads)
    other = SSLNetwork(cfg.model, cfg.heads, seed=5)
    ref = copy.deepcopy(other)
    copies = ComputeCopies(net)
    net.load_state_dict(other.state_dict())  # as a checkpoint load does (in place)
    w = net.backbone.blocks[0].attn.qkv.weight
    assert not torch.equal(copies.of(w).float(), w.to(torch.bfloat16).float())  # stale until the forward
    b = _batch(cfg, 0)
    torch.manual_seed(3)
    with torch.no_grad():
        got = net(b.global_crops, None, b.masks, mask_inputs=False, mask_indices=b.mask_indices)
    assert torch.equal(copies.of(w), w.to(torch.bfloat16))
    ComputeCopies(ref)
    torch.manual_seed(3)
    with torch.no_grad():
        want = ref(b.global_crops, None, b.masks, mask_inputs=False, mask_indices=b.mask_indices)
    assert torch.equal(got["cls_z"], want["cls_z"])


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    student = torch.nn.Module()
    student.backbone = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8))
    student.dino_head = torch.nn.Linear(8, 4)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return student, teacher


@pytest.mark.parametrize("frozen", [False, True], ids=["all", "backbone_frozen"])
def test_fused_adamw_reference_update_equals_torch(frozen):
    """update(): clip by grad_scale, AdamW, then the EMA of the (heads' while frozen) teacher weights."""
    student, teacher = _pair()
    ref_s, ref_t = copy.deepcopy(student), copy.deepcopy(teacher)
    groups = [{"params": list(student.backbone.parameters()), "weight_decay": 0.05, "lr": 1e-2},
              {"params": list(student.dino_head.parameters()), "weight_decay": 0.0, "lr": 3e-3}]
    ref_groups = [{"params": list(ref_s.backbone.parameters()), "weight_decay": 0.05, "lr": 1e-2},
                  {"params": list(ref_s.dino_head.parameters()), "weight_decay": 0.0, "lr": 3e-3}]
    opt = FusedAdamW(groups, eps=1e-6)
    opt.bind(student, teacher, HEADS)
    ref = torch.optim.AdamW(ref_groups, eps=1e-6, foreach=False)
    for _ in range(3):
        grads = [torch.randn_like(p) * 5 for p in student.parameters()]
        for p, rp, g in zip(student.parameters(), ref_s.parameters(), grads, strict=True):
            p.grad, rp.grad = g.clone(), g.clone()
        norm = S.clip_grad_norm(list(student.parameters()), 1.0, opt)
        torch.nn.utils.clip_grad_norm_(list(ref_s.parameters()), 1.0)
        bad = opt.update(0.9, frozen)
        ref.step()
        with torch.no_grad():
            for (name, t), s in zip(ref_t.named_parameters(), ref_s.parameters(), strict=True):
                if not frozen or name.startswith("dino_head"):
                    t.lerp_(s, 0.1)
        opt.zero_grad()
        ref.zero_grad()
        assert float(norm) > 1.0 and float(bad) == 0.0 and opt.grad_scale is None
        for a, b in zip([*student.parameters(), *teacher.parameters()], [*ref_s.parameters(), *ref_t.parameters()],
                        strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(float(st["step"]) == 3.0 for st in opt.state.values())
    with torch.no_grad():
        student.backbone[0].weight.grad = torch.full_like(student.backbone[0].weight, float("inf"))
    assert float(opt.update(0.9, frozen)) >= 1.0  # the non-finite weights are counted

"""FusedAdamW.update on the kernel (kernels/adamw_ema.py; the interpreter on the CPU) against its torch
reference mode, on a tiny student / teacher with one GPU's bf16 compute copies (train/copies.py):
the same masters, moments, teacher, step counts and copies over three updates, with the clip acting
and the backbone frozen in the first."""
import copy

import pytest
import torch

pytest.importorskip("virchow_fast.kernels.adamw_ema")

from virchow_fast.config import load_config  # noqa: E402
from virchow_fast.downstream.pretrained import HEADS  # noqa: E402
from virchow_fast.model.ssl import SSLNetwork, make_teacher  # noqa: E402
from virchow_fast.train import step as S  # noqa: E402
from virchow_fast.train.copies import ComputeCopies  # noqa: E402
from virchow_fast.train.optim import apply_schedules, build_optimizer  # noqa: E402

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.mlp_hidden=48", "model.img_size=28",
        "heads.dino_prototypes=64", "heads.ibot_prototypes=64", "heads.hidden_dim=32", "heads.bottleneck_dim=16",
        "heads.ibot_bottleneck_dim=16", "data.crops.global_size=28", "data.crops.local_size=14",
        "data.crops.context_size=32"]


def _networks(device):
    cfg = load_config("configs/debug.yaml", TINY)
    torch.manual_seed(0)
    student = SSLNetwork(cfg.model, cfg.heads).to(device)
    teacher = make_teacher(student)
    with torch.no_grad():  # a teacher that is not the student yet, so the EMA visibly moves it
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ComputeCopies(student)
    ComputeCopies(teacher)
    opt = build_optimizer(student, cfg.model.depth, cfg.optim, device.type)
    opt.bind(student, teacher, HEADS)
    return cfg, student, teacher, opt


def _updates(kernel: bool, device, reload_after: int | None = None):
    cfg, student, teacher, opt = _networks(device)
    opt.kernel = kernel
    gen = torch.Generator().manual_seed(1)
    params = [p for p in student.parameters() if p.requires_grad]
    norms = []
    for step in range(3):
        if step == reload_after:  # as a resume loads it: new state tensors, which the kernel must then use
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        apply_schedules(opt, 2e-3, 0.04, 1e-3, backbone_lr=0.0 if step == 0 else None)
        for p in params:
            student.compute_copies.of(p).grad = (torch.randn(p.shape, generator=gen) * 4).to(device, torch.bfloat16)
        norms.append(S.clip_grad_norm(params, 1.0, opt))
        bad = opt.update(0.99, backbone_frozen=step == 0)
        assert float(bad) == 0.0
        opt.zero_grad()
        assert all(c.grad is None for c in student.compute_copies.copies())
    states = [(float(opt.state[p]["step"]), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]) for p in params]
    return student, teacher, states, norms


def test_kernel_update_equals_the_reference_update(device):
    ks, kt, kstate, knorms = _updates(True, device)
    rs, rt, rstate, rnorms = _updates(False, device)
    assert all(float(a) > 1.0 and torch.equal(a, b) for a, b in zip(knorms, rnorms, strict=True))  # clipped
    tol = dict(rtol=1e-6, atol=1e-7)  # rounding only (see tests/kernels/test_adamw_ema.py)
    for (name, a), b in zip(ks.named_parameters(), rs.parameters(), strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"student {name}: {m}")
    for (name, a), b in zip(kt.named_parameters(), rt.parameters(), strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"teacher {name}: {m}")
    for (s1, m1, v1), (s2, m2, v2) in zip(kstate, rstate, strict=True):
        assert s1 == s2 == 3.0
        torch.testing.assert_close(m1, m2, **tol)
        torch.testing.assert_close(v1, v2, **tol)
    # the kernel wrote both networks' copies: exactly the bf16 casts of the new masters, nothing stale
    for net in (ks, kt):
        cc = net.compute_copies
        assert not cc.refresh()  # every master's version matches its copy's
        for p in cc.masters():
            assert torch.equal(cc.of(p), p.detach().to(torch.bfloat16))


def test_kernel_update_after_loading_its_state_equals_the_uninterrupted_one(device):
    want = _updates(True, device)
    got = _updates(True, device, reload_after=2)
    for a, b in zip([*got[0].parameters(), *got[1].parameters()], [*want[0].parameters(), *want[1].parameters()],
                    strict=True):
        assert torch.equal(a, b)
    for (s1, m1, v1), (s2, m2, v2) in zip(got[2], want[2], strict=True):
        assert s1 == s2 == 3.0 and torch.equal(m1, m2) and torch.equal(v1, v2)


def test_kernel_update_counts_a_non_finite_weight(device):
    _, student, _, opt = _networks(device)
    opt.kernel = True
    apply_schedules(opt, 2e-3, 0.04, 1e-3)
    params = [p for p in student.parameters() if p.requires_grad]
    for p in params:
        student.compute_copies.of(p).grad = torch.zeros(p.shape, device=device, dtype=torch.bfloat16)
    student.compute_copies.of(params[3]).grad.view(-1)[0] = float("nan")
    assert float(opt.update(0.99, backbone_frozen=False)) >= 1.0
    before = copy.deepcopy([p.detach() for p in params])
    for p in params:
        student.compute_copies.of(p).grad = torch.zeros(p.shape, device=device, dtype=torch.bfloat16)
    opt.update(0.99, backbone_frozen=False)
    assert torch.isnan(params[3]).any() and not torch.isnan(before[2]).any()

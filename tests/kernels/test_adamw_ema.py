"""Fused AdamW + clip + EMA + bf16 copies + non-finite check (kernels/adamw_ema.py) and its reference
(ops/reference.py) against torch.optim.AdamW(foreach=False) followed by torch.lerp for the teacher,
over three steps (the bias corrections change), two param groups (per-tensor lr and weight decay),
awkward sizes, bf16 / fp32 / mixed gradients, a clip scale of 2.5 and a mix of EMA flags."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from virchow_fast.ops import reference

K = pytest.importorskip("virchow_fast.kernels.adamw_ema")

BETA1, BETA2, EPS, MOMENTUM, SCALE = 0.9, 0.999, 1e-8, 0.996, 2.5
GROUPS = ({"lr": 1e-2, "weight_decay": 0.05}, {"lr": 3e-2, "weight_decay": 0.0})
# Tolerance against torch.optim.AdamW, fp32 (atol, rtol). Both compute the same fp32 operations in
# the same order; what differs is rounding only: lr / bc1 and 1 - lr * wd in fp32 (torch: in double,
# then rounded), addcdiv's association (value * m) / d vs value * (m / d), addcmul's
# (value * g) * g vs value * (g * g), and FMA contraction (torch's CPU lerp / addcmul, the GPU
# kernel): a few ulps (6e-8 relative each) of p, m, v or the teacher per step, < 1e-6 after three
# steps; atol 1e-7 for elements near zero (v ~ 1e-7 g^2 early on), about 1e-4 of the smallest update.
TOL = (1e-7, 1e-6)
BLOCK = K.BLOCK
# sizes 0, 1, 7, a tail of 3 after a full chunk, 2-D, and a 0-row 2-D tensor (tail counts not a multiple of 8)
AWKWARD = [(0,), (1,), (7,), (1000,), (BLOCK + 3,), (33, 70), (2, 0)]
# every size a multiple of 8: the tail chunks take the 8-element-granular path (COUNT_DIV = 8)
DIV8 = [(8,), (BLOCK + 8,), (16, 3), (2 * BLOCK,)]


def _problem(shapes, grad_dtypes, device, steps=3, seed=0):
    """Initial params and teachers, per-step gradients, param group and EMA flag of every tensor."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda s: torch.randn(s, generator=gen).to(device)
    n = len(shapes)
    params = [rand(s) for s in shapes]
    teachers = [p + 0.1 * rand(p.shape) for p in params]
    grads = [[(rand(s) * 3).to(grad_dtypes[i % len(grad_dtypes)]) for i, s in enumerate(shapes)]
             for _ in range(steps)]
    group = [i % 2 for i in range(n)]
    ema = [float(i % 3 != 1) for i in range(n)]  # 1, 0, 1, 1, 0, 1, ...: some teachers frozen
    return params, teachers, grads, group, ema


def _expected(params, teachers, grads, group, ema, beta1=BETA1, momentum=MOMENTUM):
    """torch.optim.AdamW(foreach=False), two param groups, then lerp of the flagged teachers."""
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW([{"params": [p for p, g in zip(ps, group, strict=True) if g == k], **GROUPS[k]}
                             for k in (0, 1)], betas=(beta1, BETA2), eps=EPS, foreach=False)
    ts = [t.clone() for t in teachers]
    for step_grads in grads:
        for p, g in zip(ps, step_grads, strict=True):
            p.grad = g.float() / torch.tensor(SCALE, device=g.device)
        opt.step()
        with torch.no_grad():
            ts = [torch.lerp(t, p, 1 - momentum) if e else t for t, p, e in zip(ts, ps, ema, strict=True)]
    return ([p.detach() for p in ps], [opt.state[p]["exp_avg"] for p in ps],
            [opt.state[p]["exp_avg_sq"] for p in ps], ts)


def _run(fn, params, teachers, grads, group, ema, with_copies, beta1=BETA1, momentum=MOMENTUM, bad0=0):
    """Three steps of ``fn`` (the kernel or the reference) from zero state."""
    device = params[0].device
    ps, ts = [p.clone() for p in params], [t.clone() for t in teachers]
    ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    copies = [torch.empty(p.shape, dtype=torch.bfloat16, device=device) for p in ps] if with_copies else []
    tcopies = [torch.empty(p.shape, dtype=torch.bfloat16, device=device) for p in ps] if with_copies else []
    hyper = torch.tensor([[GROUPS[g]["lr"], GROUPS[g]["weight_decay"], e] for g, e in zip(group, ema, strict=True)],
                         dtype=torch.float32, device=device)
    scale = torch.tensor(SCALE, device=device)
    bad = torch.full((1,), bad0, dtype=torch.int32, device=device)
    for step, step_grads in enumerate(grads, start=1):
        fn(ps, step_grads, ms, vs, ts, copies, tcopies, hyper, scale, bad, beta1, BETA2, EPS, step, momentum)
    return ps, ms, vs, ts, copies, tcopies, bad


def _check(fn, shapes, grad_dtypes, with_copies, device, close, beta1=BETA1, momentum=MOMENTUM):
    params, teachers, grads, group, ema = _problem(shapes, grad_dtypes, device)
    ps, ms, vs, ts, copies, tcopies, bad = _run(fn, params, teachers, grads, group, ema, with_copies, beta1,
                                                momentum, bad0=3)
    ep, em, ev, et = _expected(params, teachers, grads, group, ema, beta1, momentum)
    for i in range(len(shapes)):
        close(ps[i], ep[i], TOL, f"params[{i}] {shapes[i]}")
        close(ms[i], em[i], TOL, f"exp_avgs[{i}]")
        close(vs[i], ev[i], TOL, f"exp_avg_sqs[{i}]")
        close(ts[i], et[i], TOL, f"teachers[{i}]")
        if not ema[i]:
            assert torch.equal(ts[i], teachers[i]), f"teachers[{i}]: EMA flag 0 but the teacher changed"
        if with_copies:  # exactly the updated fp32 tensors rounded to bf16 (NaN if never written)
            assert torch.equal(copies[i], ps[i].to(torch.bfloat16)), f"copies[{i}]"
            assert torch.equal(tcopies[i], ts[i].to(torch.bfloat16)), f"teacher_copies[{i}]"
    assert bad.item() == 3, "bad changed on finite input"


GRADS = {"fp32": [torch.float32], "bf16": [torch.bfloat16], "mixed": [torch.bfloat16, torch.float32]}


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("with_copies", [True, False], ids=["copies", "no_copies"])
@pytest.mark.parametrize("grads", list(GRADS))
@pytest.mark.parametrize("shapes", [AWKWARD, DIV8], ids=["awkward", "div8"])
def test_kernel_matches_torch_adamw(shapes, grads, with_copies, device, close):
    _check(K.adamw_ema_, shapes, GRADS[grads], with_copies, device, close)


@pytest.mark.usefixtures("poison_outputs")
def test_kernel_lerp_from_end(device, close):
    """1 - beta1 and 1 - momentum >= 0.5: torch.lerp's other formula, end - (end - start)(1 - w)."""
    _check(K.adamw_ema_, [(7,), (BLOCK + 3,)], GRADS["mixed"], True, device, close, beta1=0.3, momentum=0.2)


@pytest.mark.usefixtures("poison_outputs")
def test_kernel_unaligned_views(device, close):
    """Contiguous views at a 4-byte offset: no 16-byte alignment hint (the kernel's ALIGNED=False)."""
    shapes = [(BLOCK + 3,), (9,)]
    params, teachers, grads, group, ema = _problem(shapes, GRADS["mixed"], device, steps=1)
    shift = lambda t: torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape)
    assert shift(params[0]).data_ptr() % 16 != 0
    ps, ts = [shift(p) for p in params], [shift(t) for t in teachers]
    ms, vs = [shift(torch.zeros_like(p)) for p in ps], [shift(torch.zeros_like(p)) for p in ps]
    hyper = torch.tensor([[GROUPS[g]["lr"], GROUPS[g]["weight_decay"], e] for g, e in zip(group, ema, strict=True)],
                         device=device)
    bad = torch.zeros(1, dtype=torch.int32, device=device)
    K.adamw_ema_(ps, [shift(g) for g in grads[0]], ms, vs, ts, [], [], hyper, torch.tensor(SCALE, device=device),
                 bad, BETA1, BETA2, EPS, 1, MOMENTUM)
    ep, em, ev, et = _expected(params, teachers, grads, group, ema)
    for i in range(len(shapes)):
        close(ps[i], ep[i], TOL, f"params[{i}]")
        close(ts[i], et[i], TOL, f"teachers[{i}]")
    assert bad.item() == 0


@pytest.mark.parametrize("with_copies", [True, False], ids=["copies", "no_copies"])
def test_reference_matches_torch_adamw(with_copies, close):
    _check(reference.adamw_ema_reference, AWKWARD, GRADS["mixed"], with_copies, torch.device("cpu"), close)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf / inf
@pytest.mark.parametrize("fn", [K.adamw_ema_, reference.adamw_ema_reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("where", [(0, 0), (3, -1), (4, BLOCK + 2), (4, 2 * BLOCK + 4), (2, 6)],
                         ids=["bf16_first", "fp32_2d_last", "bf16_full_chunk", "bf16_tail", "bf16_short_last"])
def test_bad_counts_nonfinite_updates(fn, where, device, close):
    """An inf in one gradient element makes that param element NaN (inf / inf): bad > 0; the other
    tensors are updated as on finite input. On finite input bad keeps its value."""
    shapes = [(BLOCK + 3,), (1000,), (7,), (33, 70), (2 * BLOCK + 5,)]
    params, teachers, grads, group, ema = _problem(shapes, GRADS["mixed"], device, steps=1)
    i, j = where
    ps, ms, vs, ts, *_, bad = _run(fn, params, teachers, grads, group, ema, False)
    assert bad.item() == 0, "bad set on finite input"
    grads[0][i].view(-1)[j] = float("inf")
    ps, ms, vs, ts, *_, bad = _run(fn, params, teachers, grads, group, ema, False)
    assert bad.item() > 0, "an inf gradient (a NaN param element) was not reported"
    assert torch.isnan(ps[i].view(-1)[j]) and torch.isfinite(ps[i]).sum() == ps[i].numel() - 1
    ep, *_ = _expected(params, teachers, grads, group, ema)
    for k in range(len(shapes)):
        if k != i:
            close(ps[k], ep[k], TOL, f"params[{k}]")


def _args(n=3, device="cpu"):
    shapes = [(5,), (4, 3), (9,)]
    f = lambda dt=torch.float32: [torch.zeros(s, dtype=dt, device=device) for s in shapes[:n]]
    return dict(params=f(), grads=f(torch.bfloat16), exp_avgs=f(), exp_avg_sqs=f(), teachers=f(),
                copies=f(torch.bfloat16), teacher_copies=f(torch.bfloat16), hyper=torch.zeros(n, 3, device=device),
                grad_scale=torch.tensor(1.0, device=device), bad=torch.zeros(1, dtype=torch.int32, device=device),
                beta1=BETA1, beta2=BETA2, eps=EPS, step=1, momentum=MOMENTUM)


def _set(name, i, value):
    def edit(a):
        a[name] = list(a[name])
        a[name][i] = value(a[name][i])
    return edit


BAD_ARGS = {
    "grads_length": (lambda a: a.update(grads=a["grads"][:2]), r"grads has 2 tensors, params 3"),
    "teachers_length": (lambda a: a.update(teachers=a["teachers"][:1]), r"teachers has 1"),
    "copies_length": (lambda a: a.update(copies=a["copies"][:2]), r"copies has 2 tensors; expected 0 or 3"),
    "grad_shape": (_set("grads", 1, lambda t: t.view(3, 4)), r"grads\[1\] shape \(3, 4\)"),
    "grad_dtype": (_set("grads", 2, lambda t: t.half()), r"grads\[2\] dtype torch.float16"),
    "param_dtype": (_set("params", 0, lambda t: t.double()), r"params\[0\] dtype torch.float64"),
    "exp_avg_sq_shape": (_set("exp_avg_sqs", 1, lambda t: t.flatten()), r"exp_avg_sqs\[1\] shape"),
    "param_strided": (_set("params", 1, lambda t: torch.zeros(3, 4).t()), r"params\[1\] not contiguous"),
    "copy_dtype": (_set("copies", 0, lambda t: t.float()), r"copies\[0\] dtype torch.float32"),
    "teacher_device": (_set("teachers", 2, lambda t: t.to("meta")), r"teachers\[2\] on meta"),
    "teacher_copy_strided": (_set("teacher_copies", 1, lambda t: torch.zeros(3, 4, dtype=torch.bfloat16).t()),
                             r"teacher_copies\[1\] not contiguous"),
    "hyper_shape": (lambda a: a.update(hyper=torch.zeros(3, 2)), r"hyper is \(3, 2\)"),
    "hyper_dtype": (lambda a: a.update(hyper=torch.zeros(3, 3, dtype=torch.float64)), r"hyper .* torch.float64"),
    "grad_scale_shape": (lambda a: a.update(grad_scale=torch.ones(1)), r"grad_scale is \(1,\)"),
    "bad_dtype": (lambda a: a.update(bad=torch.zeros(1, dtype=torch.int64)), r"bad is \(1,\) torch.int64"),
    "step_zero": (lambda a: a.update(step=0), r"step 0"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_rejected(case):
    edit, message = BAD_ARGS[case]
    a = _args()
    edit(a)
    with pytest.raises(ValueError, match=message):
        K.adamw_ema_(**a)
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(ValueError, match=message):  # the fake checks too
        K.adamw_ema_(**a)


def test_plan_cached_while_only_gradients_change():
    """The host-side plan (checks, chunk schedule, pointer table) is made once per set of tensors: a
    call with new gradients reuses it, and still checks the gradients; a replaced state tensor (as a
    checkpoint load makes) gets a new plan, fully checked."""
    a = _args()
    a["hyper"][:, 0] = 0.1  # lr: zero gradients move nothing, the next call's ones do
    K.adamw_ema_(**a)
    (plan,) = K._PLAN.values()
    a["grads"] = [torch.ones_like(g) for g in a["grads"]]  # new gradients each step, as backward makes them
    K.adamw_ema_(**a)
    assert list(K._PLAN.values()) == [plan]
    assert all(float(p.abs().sum()) > 0 for p in a["params"])  # the new gradients were read
    bad = dict(a, grads=[a["grads"][0], torch.ones(3, 4, dtype=torch.bfloat16), a["grads"][2]])
    with pytest.raises(ValueError, match=r"grads\[1\] shape \(3, 4\), params\[1\] \(4, 3\)"):
        K.adamw_ema_(**bad)
    with pytest.raises(ValueError, match=r"grads\[2\] dtype torch.float16"):
        K.adamw_ema_(**dict(a, grads=a["grads"][:2] + [a["grads"][2].half()]))
    replaced = dict(a, exp_avgs=[a["exp_avgs"][0], a["exp_avgs"][1].to(torch.bfloat16), a["exp_avgs"][2]])
    with pytest.raises(ValueError, match=r"exp_avgs\[1\] dtype torch.bfloat16"):
        K.adamw_ema_(**replaced)
    fresh = dict(a, exp_avgs=[m.clone() for m in a["exp_avgs"]])
    K.adamw_ema_(**fresh)
    assert list(K._PLAN.values()) != [plan]


def test_empty_lists_and_fake():
    """No tensors: nothing to do; the fake (torch.compile's trace) returns None and writes nothing."""
    a = _args(0)
    K.adamw_ema_(**a)
    with FakeTensorMode() as mode:
        fake = {k: ([mode.from_tensor(t) for t in v] if isinstance(v, list) else
                    mode.from_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in _args().items()}
        assert torch.ops.virchow_fast_triton.adamw_ema_(*fake.values()) is None


@pytest.mark.gpu  # large tensors at the ViT-H block's shapes; skipped without CUDA (tests/conftest.py)
@pytest.mark.parametrize("with_copies", [True, False], ids=["copies", "no_copies"])
def test_kernel_matches_torch_adamw_gpu(with_copies, close):
    device = torch.device("cuda")
    shapes = [(3840, 1280), (3840,), (6832, 1280), (1280, 3416), (1280,), (BLOCK + 3,), (7,), (0,), (257, 1280)]
    _check(K.adamw_ema_, shapes, GRADS["mixed"], with_copies, device, close)


@pytest.mark.gpu
def test_kernel_does_not_sync_gpu():
    """No host synchronisation in a step, the first (schedule built and cached) and later ones: the
    pointer tables go up from pinned memory with non_blocking; grad_scale is read on the device."""
    a = _args(3, "cuda")
    a["grads"][2] = a["grads"][2].float()  # two launches: bf16 and fp32 gradients
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (1, 2):
            K.adamw_ema_(**dict(a, step=step))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert a["bad"].item() == 0

"""One training step of a config, run on tensors that hold no data, as a CUDA run would run it.

The step is the trainer's own (``train.loop.build`` and the loop's step: teacher forward, student
forward, DINO + iBOT + regulariser, backward, gradient clipping, AdamW, EMA) on FakeTensorMode
tensors of the CPU device: the autograd engine cannot run backward on fake CUDA tensors without a
CUDA context, so the device stays ``cpu`` and everything that would differ on CUDA is set as CUDA
sets it:

- every op in ``virchow_fast.ops`` takes the backend ``auto`` picks for CUDA tensors (Triton where
  it is registered; their custom ops' fake kernels give the output shapes);
- ``optim.fused: auto`` becomes the fused update (CUDA's choice: kernels/adamw_ema.py's custom op,
  whose fake kernel the trace runs);
- FSDP2 runs over a fake process group of ``world_size`` ranks (collectives move no data but are
  counted); ``world_size=1`` is one GPU;
- the iBOT masks are real (the loader's own mask generator), so boolean indexing gets its real size.

Also counted: the bytes autograd saves for backward in the forward (the activations), per policy.
A warm-up forward and optimizer step run first, uncounted, so one-time work (FSDP's lazy
initialisation, AdamW's state allocation) stays out of the step.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mod_tracker import ModTracker

from .. import ops
from ..config import Config
from ..model.vit import PAD
from .counter import CostCounter, OpRecord


@dataclass
class StepTrace:
    records: list[OpRecord]
    tiles: int
    world_size: int
    activation_bytes: int  # saved for backward by the student forward (unique storages)
    param_counts: dict = field(default_factory=dict)  # student, teacher, trainable, root, largest_unit
    ac_mode: str = "off"
    fsdp: bool = False  # parameters sharded and gathered as bf16 / fp32 compute copies
    bf16: bool = False
    copies: bool = False  # one GPU: persistent bf16 compute copies (train/copies.py), bf16 gradients


@contextlib.contextmanager
def cuda_backends():
    """Make ``ops`` dispatch as for CUDA tensors whatever the tensors' device."""
    try:  # the module whose ``_dispatch`` the op functions call
        module = importlib.import_module("virchow_fast.ops.dispatch")
    except ModuleNotFoundError:
        module = ops
    original = module._dispatch
    module._dispatch = lambda op, device: original(op, torch.device("cuda"))
    try:
        yield
    finally:
        module._dispatch = original


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """A fake process group (collectives return at once, untouched) and its 1-D mesh, for the trace."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("cost trace: a process group exists already; trace in a fresh process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


class _SavedBytes:
    """saved_tensors_hooks that sum the unique storages autograd keeps for backward (not parameters)."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        base = t._base if t._base is not None else t
        if not isinstance(base, torch.nn.Parameter) and not isinstance(t, torch.nn.Parameter):
            st = t.untyped_storage()
            self.storages.setdefault(st._cdata, st.nbytes())
        return t

    @staticmethod
    def unpack(t):
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def trace_config(cfg: Config, tiles: int | None = None, ac: str | None = None, world_size: int = 1) -> Config:
    """The config the trace runs: the batch, the AC mode and CUDA's choices made explicit."""
    cfg = copy.deepcopy(cfg)
    if tiles is not None:
        cfg.data.batch_size = tiles
    if ac is not None:
        cfg.parallel.activation_checkpointing = ac
    if cfg.optim.fused == "auto":
        cfg.optim.fused = "on"
    cfg.train.device = "cpu"
    return cfg


def _units(net: torch.nn.Module) -> tuple[int, int]:
    """Parameters of the root's own FSDP unit (embeddings, final norm, heads) and of the biggest block."""
    blocks = net.backbone.blocks
    in_blocks = {id(p) for p in blocks.parameters()}
    root = sum(p.numel() for p in net.parameters() if id(p) not in in_blocks)
    return root, max(sum(p.numel() for p in b.parameters()) for b in blocks)


@contextlib.contextmanager
def _phase(counter: CostCounter, name: str):
    previous, counter.phase = counter.phase, name
    try:
        yield
    finally:
        counter.phase = previous


def _marked(counter: CostCounter, name: str, fn):
    """``fn`` with the ops it runs recorded under phase ``name``."""
    def wrapped(*args, **kwargs):
        with _phase(counter, name):
            return fn(*args, **kwargs)
    return wrapped


def _train_step(cfg, info, student, teacher, optimizer, loss_fn, params, batch, counter) -> None:
    """The loop's own step (train/step.py's ``train_step``), its update parts marked by phase.

    Clipping, AdamW and the weight check are "optimizer", the teacher update "ema" (the fused update,
    which does all of them in one pass, is "optimizer"); the rest is
    "forward" or "backward" by whether autograd's engine is running. Scalar reads on data-free
    tensors read 0: finite terms, no stop, no bad weights, so the step takes its update path.
    """
    from unittest import mock

    from ..train import step as step_module
    from ..train.schedules import build_schedules

    step = cfg.train.freeze_backbone_steps  # the first step that trains the backbone
    sched = build_schedules(cfg, 1e-4, step + 2)
    trainee = step_module.Trainee(cfg, info, student, teacher, optimizer, loss_fn, params)
    optimizer.step = _marked(counter, "optimizer", optimizer.step)
    patches = [mock.patch.object(step_module, name, _marked(counter, phase, getattr(step_module, name)))
               for name, phase in (("clip_grad_norm", "optimizer"), ("nonfinite_count", "optimizer"),
                                   ("ema_step", "ema"), ("update", "optimizer")) if hasattr(step_module, name)]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        step_module.train_step(trainee, batch, step, sched)
    del optimizer.step  # the class's method again


def trace_step(cfg: Config, tiles: int | None = None, ac: str | None = None, world_size: int = 1,
               forward_only: bool = False) -> StepTrace:
    """Trace one training step of ``cfg`` at ``tiles`` per GPU with checkpointing mode ``ac``."""
    from ..data import Batch
    from ..data.masks import collate_masks
    from ..train.distributed import DistInfo
    from ..train.loop import build
    from ..train.optim import apply_schedules
    from ..train.parallelize import keeps_output, use_compute_copies, use_fsdp

    cfg = trace_config(cfg, tiles, ac, world_size)
    b, c, mk = cfg.data.batch_size, cfg.data.crops, cfg.data.masks
    grid, patch = c.global_size // cfg.model.patch_size, cfg.model.patch_size
    prefix = 1 + cfg.model.num_registers
    lengths = [grid ** 2 + prefix, (c.local_size // patch) ** 2 + prefix]
    real_masks = torch.from_numpy(collate_masks(np.random.default_rng(0), c.n_global * b, grid, mk.mask_probability,
                                                mk.ratio_min, mk.ratio_max, mk.min_block_patches, mk.aspect_min))
    real = {"masks": real_masks}
    if "mask_indices" in {f.name for f in dataclasses.fields(Batch)}:  # the loader's gather indices, made on the host
        real["mask_indices"] = real_masks.reshape(-1).nonzero().reshape(-1)
        per_image = real_masks.sum(1, keepdim=True).clamp(min=1).float().expand_as(real_masks)
        real["mask_weights"] = (1.0 / per_image / real_masks.shape[0])[real_masks]
    tracker = ModTracker()
    saved = _SavedBytes()
    with fake_process_group(world_size) as mesh, cuda_backends(), warnings.catch_warnings(), \
            FakeTensorMode(allow_non_fake_inputs=True) as mode:
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")  # deepcopy's check
        info = DistInfo(0, world_size, 0, torch.device("cpu"), mesh)
        student, teacher, optimizer, loss_fn = build(cfg, info)
        if cfg.optim.fused != "off" and hasattr(optimizer, "kernel"):
            optimizer.kernel = True  # CUDA's update: the fused kernel (its custom op's fake kernel here)
        params = [p for p in student.parameters() if p.requires_grad]
        counts = {"student": sum(p.numel() for p in student.parameters()),
                  "teacher": sum(p.numel() for p in teacher.parameters()),
                  "trainable": sum(p.numel() for p in params), "trainable_tensors": len(params)}
        counts["root"], counts["largest_unit"] = _units(student)
        apply_schedules(optimizer, 1e-5, 0.04, 1e-5)
        fake = {k: mode.from_tensor(v) for k, v in real.items()}
        batch = Batch(global_crops=torch.empty(c.n_global * b, 3, c.global_size, c.global_size),
                      local_crops=torch.empty(c.n_local * b, 3, c.local_size, c.local_size),
                      mags=torch.full((b,), 20.0), step=0, **fake)
        m = cfg.model
        pad = {m.embed_dim + PAD: m.embed_dim, m.mlp_hidden + PAD: m.mlp_hidden}
        counter = CostCounter(mode, tracker, lengths, {fake[k]: v for k, v in real.items()}, gemm_pad=pad)
        student.train()
        teacher.eval()
        with counter:  # warm-up, not counted: FSDP's lazy init (first forward), AdamW's state (first step)
            with torch.no_grad():
                loss_fn(student, teacher, batch, 0.07, info.reducer, world_size)
            for m in [*student.modules(), *teacher.modules()]:  # as after a backward: every unit resharded
                if hasattr(m, "reshard") and hasattr(m, "unshard"):
                    m.reshard()
            if not forward_only:
                for p in params:
                    p.grad = torch.zeros_like(p)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        counter.records.clear()
        if cfg.parallel.activation_checkpointing == "selective":
            counter.keeps_output = keeps_output
        with tracker, counter, torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            if forward_only:
                loss_fn(student, teacher, batch, 0.07, info.reducer, world_size)
            else:
                _train_step(cfg, info, student, teacher, optimizer, loss_fn, params, batch, counter)
    return StepTrace(counter.records, b, world_size, saved.total + counter.kept_bytes, counts,
                     cfg.parallel.activation_checkpointing, use_fsdp(cfg.parallel, info),
                     cfg.parallel.mixed_precision == "bf16", use_compute_copies(cfg.parallel, info))

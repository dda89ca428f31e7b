"""A dispatch mode that records, per op, its FLOPs, the bytes it moves and where it belongs.

Runs on tensors that hold no data (FakeTensorMode): nothing is computed, only shapes flow. Per op:

- **FLOPs** of matmuls and convolutions (torch's own ``flop_counter`` formulas), of our attention
  kernels (useful: 4 L^2 D per head and segment forward, twice that backward; issued: what the
  launch's tiles and head-dim block compute) and of the fused head-loss passes (their logit and
  value products);
- **bytes** read and written: every tensor input read once, every output and mutated argument
  written once; views and metadata ops move nothing; a tensor's bytes are the memory span its
  strides cover (a broadcast bias counts once); a fused custom op counts its real inputs and outputs;
- **category** from the op and the module it runs in (``ModTracker``'s module stack, forward and
  backward) or the phase the caller sets (``optimizer``, ``ema``); "GEMM" is the backbone's
  matmuls, "heads" holds the heads and the losses (their matmuls included);
- collectives (c10d) as payload bytes, kept apart from the compute stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.distributed._tools.mod_tracker import ModTracker
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import flop_registry

CATEGORIES = ("GEMM", "attention", "norms", "SwiGLU", "residual/LayerScale/drop path", "heads",
              "casts and copies", "optimizer and EMA", "other")
COLLECTIVES = "collectives"

# how an op's time is priced (cost.py): library GEMM rate, our Triton MMA kernels' rate, bandwidth, network
GEMM, KERNEL_MMA, MEMORY, COMM = "gemm", "kernel_mma", "memory", "comm"

_FREE = {"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.new_empty", "aten.new_empty_strided",
         "aten.detach", "aten.alias", "aten.lift_fresh", "aten._local_scalar_dense", "aten.set_", "aten.resize_",
         "aten.record_stream", "aten._has_compatible_shallow_copy_type", "aten.is_same_size", "aten.sym_size",
         "aten.sym_stride", "aten.sym_numel", "aten.sym_storage_offset", "aten.is_nonzero"}
_COPIES = ("aten._to_copy", "aten.copy_", "aten.clone", "aten.cat", "aten.stack", "aten._foreach_copy_",
           "aten.contiguous", "aten.split_with_sizes_copy", "aten.constant_pad_nd", "fsdp.")
_OVERWRITE = {"aten.copy_", "aten._foreach_copy_", "aten.fill_", "aten.zero_", "aten._foreach_zero_"}
# mutable in the schema but only read by the kernel (CUDA's fused Adam reads the gradients)
_READ_ONLY = {"aten._fused_adamw_": {"grads"}, "aten._fused_adam_": {"grads"}}
# mutable arguments a kernel only writes (the fused update writes the bf16 compute copies, never reads them)
_WRITE_ONLY = {"virchow_fast_triton.adamw_ema_": {"copies", "teacher_copies"}}
_CONST_NUMEL = 1 << 20  # host-made index tensors are small; activations never get a value
_GATHER = {"aten.index", "aten.index_select", "aten.gather", "aten.embedding"}


@dataclass
class OpRecord:
    op: str
    category: str
    kind: str  # GEMM | KERNEL_MMA | MEMORY | COMM
    flops: float = 0.0  # useful
    issued_flops: float = 0.0  # as the kernel issues them (tile and head-dim padding)
    bytes: float = 0.0  # read + written (COMM: payload)
    phase: str = "forward"
    fp32: bool = False  # an MMA op on fp32 operands (TF32 tensor cores: half the bf16 rate)


def span_bytes(t: torch.Tensor) -> int:
    """Bytes of memory a tensor's view covers (stride 0 dims count once)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride(), strict=True))
    return min(span, t.numel()) * t.element_size()


def _tensors(tree) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def attention_launch_flops(lengths: list[int], heads: int, head_dim: int, dtype: torch.dtype,
                           backward: bool) -> tuple[float, float]:
    """(useful, issued) FLOPs of our packed attention over segments ``lengths``.

    Useful: forward 4 L^2 D per head (QK^T and PV), backward twice that. Issued: what the kernels'
    default launch computes on padded tiles and head-dim chunks (kernels/attention.py's
    ``launch_plan``, or its 64 x 64 tiles on a power-of-two head-dim block where that is missing).
    """
    useful = sum(4.0 * L * L * head_dim * heads for L in lengths) * (2.0 if backward else 1.0)
    try:
        from ..kernels import attention as _attn
    except ImportError:  # no triton
        _attn = None
    plan = getattr(_attn, "launch_plan", None)
    if plan is not None:
        return useful, float(plan(list(lengths), heads, head_dim, dtype)["bwd" if backward else "fwd"]["flops_issued"])
    block_d = _pow2(max(head_dim, 16))
    dots = 7 if backward else 2  # backward: dK/dV kernel QK^T, dO V^T, dV, dK; dQ kernel QK^T, dO V^T, dQ
    return useful, sum(_cdiv(L, 64) ** 2 * dots * 2.0 * 64 * 64 * block_d for L in lengths) * heads


def split_segments(total: int, n_seg: int, max_len: int, known: list[int]) -> list[int]:
    """Segment lengths of a packed sequence from its total, count and longest length.

    All equal when ``n_seg * max_len == total``; else two lengths, the longest and one of ``known``
    (the config's crop token counts). Falls back to equal lengths (the mean) when nothing fits.
    """
    if n_seg <= 0:
        return []
    if n_seg * max_len == total:
        return [max_len] * n_seg
    for short in sorted(set(known)):
        if short >= max_len:
            continue
        n_long, rem = divmod(total - n_seg * short, max_len - short)
        if rem == 0 and 0 < n_long < n_seg:
            return [max_len] * n_long + [short] * (n_seg - n_long)
    return [total / n_seg] * n_seg


def _head_pass_flops(name: str, args) -> float:
    """Logit product 2 R C D of a fused head-loss pass, plus its value product 2 R C E when it has one."""
    if name.endswith("head_col_reduce_add_"):
        args = args[1:]
    z, w = args[0], args[1]
    flops = 2.0 * z.shape[0] * w.shape[0] * z.shape[1]
    values = [a for a in args[3:] if isinstance(a, torch.Tensor) and a.dim() == 2]
    if values:
        flops += 2.0 * z.shape[0] * w.shape[0] * values[-1].shape[1]
    return flops


# matmuls whose two operands must share a dtype on a device (fake tensors do not check it)
_OPERANDS = {"aten.mm": (0, 1), "aten.bmm": (0, 1), "aten.addmm": (1, 2), "aten.addmm_": (1, 2),
             "aten.baddbmm": (1, 2), "aten.convolution": (0, 1)}
# in-place matmuls torch's flop counter does not list: the FLOPs of their out-of-place form
_FLOP_ALIASES = {torch.ops.aten.addmm_: torch.ops.aten.addmm}


def _check_operand_dtypes(name: str, args) -> None:
    """A matmul on operands of two dtypes fails on CUDA ("expected ... the same dtype") but runs on data-free
    tensors; the trace would price it (at TF32) instead of reporting the bug, so it stops here."""
    pos = _OPERANDS.get(name)
    if pos is None or len(args) <= max(pos):
        return
    a, b = args[pos[0]], args[pos[1]]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype != b.dtype:
        raise RuntimeError(f"cost trace: {name} on {a.dtype} and {b.dtype} operands "
                           f"{tuple(a.shape)} x {tuple(b.shape)}: a CUDA run fails here")


class CostCounter(TorchDispatchMode):
    """Records an :class:`OpRecord` per op that runs under it (use with ``ModTracker`` active).

    ``segment_lengths``: the crop token counts of the config (to split packed attention).
    Ops whose output size depends on values (boolean indexing, ``repeat_interleave``, ``tolist``)
    cannot run on data-free tensors; small tensors made on the host (segment offsets, the masks,
    given as ``constants``: fake -> real) keep their real values through the ops that use them, so
    those ops get their real sizes. ``phase`` is set by the caller.
    """

    def __init__(self, fake_mode: FakeTensorMode, tracker: ModTracker, segment_lengths: list[int],
                 constants: dict | None = None, gemm_pad: dict[int, int] | None = None):
        super().__init__()
        # {padded width: useful width} of the blocks' residual GEMMs (model/vit.py's PAD columns: the
        # bias column and zeros), so their useful FLOPs leave the padding out; issued FLOPs keep it
        self.gemm_pad = dict(gemm_pad or {})
        self.fake_mode = fake_mode
        self.tracker = tracker
        self.segment_lengths = list(segment_lengths)
        self.phase = "step"  # "step": forward or backward, by whether autograd's engine runs
        self.records: list[OpRecord] = []
        # selective checkpointing keeps these ops' outputs outside autograd's saved tensors: counted here
        self.keeps_output = None
        self.kept_bytes = 0
        # id(fake tensor) -> (fake, real value): host-made index tensors (segment offsets, masks)
        self._const: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for fake, real in (constants or {}).items():
            self._const[id(fake)] = (fake, real)

    # -- values of small host-made tensors, followed through the ops that use them ----------------
    def _real(self, t: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(t, FakeTensor):
            return t
        hit = self._const.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else None

    def _fold(self, func, args, kwargs):
        """The op run on real values when every tensor input has one (None when one has not)."""
        flat, spec = tree_flatten((args, kwargs))
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        if not tensors or any(t.numel() > _CONST_NUMEL for t in tensors):
            return None
        real = [self._real(x) if isinstance(x, torch.Tensor) else x for x in flat]
        if any(r is None for r, x in zip(real, flat, strict=True) if isinstance(x, torch.Tensor)):
            return None
        with unset_fake_temporarily():
            r_args, r_kwargs = tree_unflatten(real, spec)
            return func(*r_args, **r_kwargs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
            folded = self._fold(func, args, kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            folded = self._fold(func, args, kwargs)
            if folded is None:
                if func is torch.ops.aten._local_scalar_dense.default:  # a value the cost does not depend on
                    return 0.0 if args[0].is_floating_point() else 0
                raise
            if not isinstance(folded, torch.Tensor):  # a scalar read (item, tolist)
                return folded
            out = self.fake_mode.from_tensor(folded)
        if folded is not None:
            for o, r in zip(_tensors(out), _tensors(folded), strict=False):
                if isinstance(o, FakeTensor):
                    self._const[id(o)] = (o, r)
        self._record(func, args, kwargs, out)
        return out

    def _useful_share(self, name: str, args) -> float:
        """Useful / issued FLOPs of a block's own GEMM (the residual GEMMs are the only ones a Block
        issues outside its Linear modules): each of m, k, n that is a padded width counts its useful part."""
        module = self._module()
        if ".blocks." not in module or not module.rsplit(".", 1)[-1].isdigit():
            return 1.0
        a, b = (args[1], args[2]) if name.startswith("aten.addmm") else (args[0], args[1])
        share = 1.0
        for d in (a.shape[0], a.shape[1], b.shape[1]):
            if d in self.gemm_pad:
                share *= self.gemm_pad[d] / d
        return share

    # -- classification ---------------------------------------------------------------------------
    def _module(self) -> str:
        parents = [p for p in self.tracker.parents if p != "Global"]
        return max(parents, key=len) if parents else ""

    @property
    def current_phase(self) -> str:
        if self.phase != "step":
            return self.phase
        return "backward" if self.tracker.is_bw else "forward"

    def _category(self, name: str, flops: float, module: str) -> str:
        if self.phase in ("optimizer", "ema"):
            return "optimizer and EMA"
        if "attention" in name:
            return "attention"
        if "layer_norm" in name:
            return "norms"
        if "swiglu" in name:
            return "SwiGLU"
        if "residual_weight" in name:  # LayerScale and the bias folded into the residual GEMM's weight
            return "residual/LayerScale/drop path"
        if name.startswith(_COPIES):
            return "casts and copies"
        if "head_" in name or "prototype" in name or "l2_normalize" in name or (module and "backbone" not in module):
            return "heads"  # the heads and the losses (everything of a network or loss outside the backbone)
        if flops:
            return "GEMM"
        leaf = module.rsplit(".", 1)[-1]
        if leaf in ("qkv", "proj", "fc1", "fc2"):
            return "GEMM"  # a linear layer's own elementwise work: the bias gradient's reduction over tokens
        if ".mlp" in module:
            return "SwiGLU"
        if leaf.startswith("norm"):
            return "norms"
        if ".blocks." in module and (leaf.isdigit() or leaf.startswith("ls")):
            return "residual/LayerScale/drop path"
        return "other"

    def _record(self, func, args, kwargs, out) -> None:
        name = func._overloadpacket._qualified_op_name.replace("::", ".")
        if name in _FREE or name.startswith(("prim.", "profiler.")) or (func.is_view and not name.endswith("_")):
            return
        if name.startswith(("c10d.", "_c10d_functional.", "c10d_functional.")):
            if "wait" in name:
                return
            payload = max((span_bytes(t) for t in _tensors((args, kwargs, out))), default=0)
            self.records.append(OpRecord(name, COLLECTIVES, COMM, bytes=float(payload), phase=self.current_phase))
            return
        flops = issued = 0.0
        kind = MEMORY
        packet = _FLOP_ALIASES.get(func._overloadpacket, func._overloadpacket)
        operands = _tensors(args)[:2]
        if packet in flop_registry:
            flops = issued = float(flop_registry[packet](*args, **kwargs, out_val=out))
            kind = GEMM
            _check_operand_dtypes(name, args)
            if self.gemm_pad and name in ("aten.mm", "aten.addmm", "aten.addmm_"):
                flops *= self._useful_share(name, args)
        elif name.endswith(("attention_fwd", "attention_bwd", "attention_bwd_bias")):
            backward = "bwd" in name  # attention_bwd_bias: the backward that also sums the qkv bias gradient
            qkv = args[1] if backward else args[0]  # [T, 3, H, D]
            cu, max_len = (args[4], args[5]) if backward else (args[1], args[2])
            lengths = split_segments(qkv.shape[0], cu.numel() - 1, int(max_len), self.segment_lengths)
            flops, issued = attention_launch_flops(lengths, qkv.shape[2], qkv.shape[3], qkv.dtype, backward)
            kind = KERNEL_MMA
        elif ".head_row" in name or ".head_col" in name:
            flops = issued = _head_pass_flops(name, args)
            kind = KERNEL_MMA
            operands = _tensors(args[1:] if name.endswith("_add_") else args)[:2]  # z, w (not the out= buffer)
        module = self._module()
        fp32 = kind != MEMORY and any(t.dtype == torch.float32 for t in operands)
        if name == "aten.addmm" and isinstance(args[0], torch.Tensor) and args[0].dim() == 2:
            # out of place with a full C: CUDA's addmm first copies C into the output (a kernel of its
            # own: read C, write the output), then runs the GEMM with beta = 1 on it; only a 1-D bias
            # (cuBLASLt's epilogue) or the in-place addmm_ skips the copy
            self.records.append(OpRecord("aten.addmm (copy of C)", self._category("", 0.0, module), MEMORY,
                                         bytes=2.0 * span_bytes(args[0]), phase=self.current_phase))
        self.records.append(OpRecord(name, self._category(name, flops, module), kind, flops, issued,
                                     float(self._bytes(func, name, args, kwargs, out)), self.current_phase, fp32))
        if (self.keeps_output is not None and self.current_phase == "forward" and torch.is_grad_enabled()
                and ".blocks." in module and self.keeps_output(func)):
            self.kept_bytes += sum(span_bytes(t) for t in _tensors(out))

    @staticmethod
    def _bytes(func, name: str, args, kwargs, out) -> int:
        schema = func._schema
        written: dict[int, torch.Tensor] = {}
        overwrite_only: set[int] = set()
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write or arg.name in _READ_ONLY.get(name, ()):
                continue
            in_kwargs = arg.kwarg_only or arg.name in kwargs
            value = kwargs.get(arg.name) if in_kwargs else (args[i] if i < len(args) else None)
            for t in _tensors(value):
                written[id(t)] = t
                if name in _OVERWRITE or not name.endswith("_") or arg.name in _WRITE_ONLY.get(name, ()):
                    # out= / copy targets are not read
                    overwrite_only.add(id(t))
        outs = _tensors(out)
        if name == "fsdp.all_gather_copy_in":  # its second output is only allocated (the gather fills it)
            outs = outs[:1]
        out_bytes = sum(span_bytes(t) for t in outs if id(t) not in written)
        if name in _GATHER:  # reads what it gathers, plus the indices
            idx = sum(span_bytes(t) for t in _tensors((args[1:], kwargs)) if not t.is_floating_point())
            return 2 * out_bytes + idx
        seen: set[int] = set()
        reads = 0
        for t in _tensors((args, kwargs)):
            if id(t) in seen or id(t) in overwrite_only:
                continue
            seen.add(id(t))
            reads += span_bytes(t)
        return reads + out_bytes + sum(span_bytes(t) for t in written.values())

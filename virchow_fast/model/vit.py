"""The ViT backbone of Virchow 2: registers, SwiGLU, LayerScale, stochastic depth, packed crops.

Parameter names and layout follow timm's ``VisionTransformer`` (``cls_token``, ``reg_token``,
``pos_embed`` covering cls + registers + patch grid, ``blocks.N.{norm1, attn.qkv, attn.proj,
ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}``, ``norm``), so timm checkpoints load with strict
keys (see model/timm_compat.py). ``mask_token`` (iBOT) is ours.

Tokens run *packed*: every crop of a step (2 x 224 + 8 x 98 for the student) is concatenated into
one [T, C] sequence and each block runs once; attention is restricted to each crop through
``cu_seqlens`` (block-diagonal). Everything token-wise (norms, MLP, residuals) is oblivious to
the packing. No parallelism, checkpointing or compilation here (train/parallelize.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..config import ModelConfig
from .init import init_parameters


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed through ops.layer_norm (backend switch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def branch(self, x: torch.Tensor, copy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x), x) at a pre-norm branch point; x's two gradients are summed in the norm's backward.

        copy: x comes back as a new buffer (written as the norm reads x) that the caller may update in place.
        """
        return ops.layer_norm_branch(x, self.weight, self.bias, self.eps, copy=copy)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.init = init
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


# Columns a branch's last activation gets for its residual GEMM: the bias column (each row's
# drop-path factor) and zeros, so rows stay 16-byte aligned for cuBLAS (see Block.forward).
PAD = 8


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def core(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
             host_offsets: tuple[int, ...] | None = None, keep: torch.Tensor | None = None,
             seg_ids: torch.Tensor | None = None, pad: int = 0) -> torch.Tensor:
        """Attention before proj: x [T, C] packed tokens -> o [T, C] (or, with keep / pad, proj's
        input as the block's residual GEMM takes it, [T, C + pad]: see ops.attention_qkv).
        host_offsets: cu_seqlens as ints (see ops.attention)."""
        # qkv packed [T, 3, H, D], not unbound: the backward returns one gradient (no stack of dq, dk, dv);
        # projection and attention are one op, so the qkv bias gradient comes from the attention kernels
        o = ops.attention_qkv(x, self.qkv.weight, self.qkv.bias, self.num_heads, cu_seqlens, max_seqlen,
                              self.head_dim ** -0.5, host_offsets=host_offsets, keep=keep, seg_ids=seg_ids, pad=pad)
        return o if pad else o.reshape(x.shape[0], -1)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                host_offsets: tuple[int, ...] | None = None) -> torch.Tensor:
        """x: [T, C] packed tokens -> [T, C] (timm's Attention on packed crops)."""
        return self.proj(self.core(x, cu_seqlens, max_seqlen, host_offsets))


class SwiGLU(nn.Module):
    """fc1 emits [gate, value] packed (timm SwiGLUPacked); fc2 maps SiLU(gate) * value back.

    fc1's bias is added inside ops.swiglu (its backward returns the bias gradient from the pass it
    makes anyway, instead of a separate reduction over the [T, 2H] gradient).
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def hidden(self, x: torch.Tensor, keep: torch.Tensor | None = None, seg_ids: torch.Tensor | None = None,
               pad: int = 0) -> torch.Tensor:
        """fc2's input: SiLU(gate) * value [T, H] (or, with keep / pad, [T, H + pad]: see ops.swiglu)."""
        return ops.swiglu(F.linear(x, self.fc1.weight), self.fc1.bias, keep, seg_ids, pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(x))


def residual_gemm(x: torch.Tensor, a: torch.Tensor, w_ext: torch.Tensor, inplace: bool = True) -> torch.Tensor:
    """x + a @ w_ext^T as one GEMM with x as its C operand (cuBLAS adds it in the epilogue).

    inplace: written into x, the in-place ``addmm_`` (x must be a buffer the caller owns); else the
    out-of-place addmm, which on CUDA first copies x into its output (a pass over the rows of its
    own). Under autocast (``fsdp: off`` with bf16) the fp32 residual stream stays fp32: the product
    is taken in bf16 and added outside, out of place (addmm would cast x to bf16 too).
    """
    if torch.is_autocast_enabled(x.device.type):
        return x + torch.mm(a, w_ext.t())
    return x.addmm_(a, w_ext.t()) if inplace else torch.addmm(x, a, w_ext.t())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, drop_path: float):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = LayerNorm(dim, eps=cfg.ln_eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias)
        self.ls1 = LayerScale(dim, cfg.layerscale_init) if cfg.layerscale_init > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=cfg.ln_eps)
        self.mlp = SwiGLU(dim, cfg.mlp_hidden)
        self.ls2 = LayerScale(dim, cfg.layerscale_init) if cfg.layerscale_init > 0 else nn.Identity()
        self.drop_path = drop_path
        # the residual GEMMs add into the stream's buffer in place (off under selective activation
        # checkpointing, which caches GEMM outputs and so forbids mutating them: train/parallelize.py)
        self.inplace_residual = True

    def _keep(self, n_segments: int, x: torch.Tensor) -> torch.Tensor | None:
        """Per-crop stochastic depth: each crop's keep factor [S] (0 or 1 / (1 - p)), or None when inactive."""
        if not self.training or self.drop_path == 0.0:
            return None
        return (torch.rand(n_segments, device=x.device) >= self.drop_path).float() / (1.0 - self.drop_path)

    @staticmethod
    def _gamma(ls: nn.Module) -> torch.Tensor | None:
        """LayerScale's gamma, or None where the block has none (layerscale_init 0)."""
        return ls.gamma if isinstance(ls, LayerScale) else None

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                seg_ids: torch.Tensor, host_offsets: tuple[int, ...] | None = None,
                inplace: bool = False) -> torch.Tensor:
        """Pre-norm block; same values as timm's ``x + drop_path(ls(branch(norm(x))))`` twice.

        Each branch ends in one GEMM that also does its residual add, output bias, LayerScale and
        drop path: ``x + keep * gamma * (a W^T + b) = addmm(x, [keep * a | keep | 0], [gamma W |
        gamma b | 0]^T)``. The attention / SwiGLU kernel that writes a also writes each row's factor
        and the bias column (ops.attention_qkv / ops.swiglu with pad), ops.residual_weight folds
        gamma and b into the weight (a pass over the weight, not over the tokens), and the residual
        stream's gradient passes through the GEMM untouched. The norms return (norm(x), x) from one
        op, so the residual stream's gradient and the norm's are summed in the norm's backward. The
        only passes over the token rows outside GEMMs and attention are the two norms and SwiGLU.

        The GEMMs add into the stream's buffer in place (``addmm_``): with autograd recording, that
        buffer is a copy of x the norm writes as it reads x (x itself is saved for the norm's
        backward); without (the teacher, evaluation) and ``inplace`` (the caller's x is not needed
        after the call: VisionTransformer passes its own stream), x itself, so no copy at all.
        """
        n_seg = cu_seqlens.numel() - 1
        own = inplace and not torch.is_grad_enabled()
        # a copy to update in place; not under autocast (out-of-place adds) or without in-place GEMMs
        copy = not own and self.inplace_residual and not torch.is_autocast_enabled(x.device.type)
        mutate = own or copy
        h, x = (self.norm1(x), x) if own else self.norm1.branch(x, copy=copy)
        keep = self._keep(n_seg, x)
        a = self.attn.core(h, cu_seqlens, max_seqlen, host_offsets, keep, seg_ids if keep is not None else None, PAD)
        proj = self.attn.proj
        x = residual_gemm(x, a, ops.residual_weight(proj.weight, self._gamma(self.ls1), proj.bias, PAD), mutate)
        h, x = (self.norm2(x), x) if own else self.norm2.branch(x, copy=copy)
        keep = self._keep(n_seg, x)
        a = self.mlp.hidden(h, keep, seg_ids if keep is not None else None, PAD)
        fc2 = self.mlp.fc2
        return residual_gemm(x, a, ops.residual_weight(fc2.weight, self._gamma(self.ls2), fc2.bias, PAD), mutate)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.grid = cfg.img_size // cfg.patch_size
        self.num_prefix = 1 + cfg.num_registers
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.num_registers, dim)) if cfg.num_registers else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix + self.grid ** 2, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([Block(cfg, r) for r in rates])
        self.norm = LayerNorm(dim, eps=cfg.ln_eps)
        self.init_weights()

    def init_weights(self) -> None:
        """The initial weights (model/init.py's rules), seeded by torch's current seed."""
        init_parameters(self, torch.initial_seed())

    def pos_embed_for(self, grid: int) -> torch.Tensor:
        """Position embedding [1, prefix + grid^2, C] for a grid x grid crop (timm's bicubic resample)."""
        if grid == self.grid:
            return self.pos_embed
        prefix, patch = self.pos_embed[:, :self.num_prefix], self.pos_embed[:, self.num_prefix:]
        c = patch.shape[-1]
        patch = patch.float().reshape(1, self.grid, self.grid, c).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
        patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, c).to(self.pos_embed.dtype)
        return torch.cat([prefix, patch], dim=1)

    def prepare_tokens(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """images [N, 3, S, S] (+ iBOT masks [N, (S/p)^2] bool) -> tokens [N, prefix + (S/p)^2, C]."""
        n, _, h, w = images.shape
        if h != w or h % self.patch_size:
            raise ValueError(f"crop of {h}x{w} px: expected a square multiple of the patch size {self.patch_size}")
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)  # [N, P, C]
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        prefix = [self.cls_token.expand(n, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(n, -1, -1))
        x = torch.cat(prefix + [x], dim=1)
        return x + self.pos_embed_for(h // self.patch_size)

    def forward_packed(self, crops: list[torch.Tensor],
                       masks: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """Run groups of crops (each [N_g, 3, S_g, S_g]) through the blocks in one packed sequence.

        Returns the final-normed tokens of each group, [N_g, L_g, C]. Attention never crosses crops.
        """
        masks = masks if masks is not None else [None] * len(crops)
        tokens = [self.prepare_tokens(c, m) for c, m in zip(crops, masks, strict=True)]
        shapes = [(int(t.shape[0]), int(t.shape[1])) for t in tokens]
        cu_seqlens, seg_ids, host_offsets = packed_segments(shapes, tokens[0].device)
        if not torch.compiler.is_compiling() and ops.backend_for("attention", tokens[0].device) != "torch":
            host_offsets = None  # only the torch reference needs them (and compiled blocks would guard on each)
        max_seqlen = max(length for _, length in shapes)
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in tokens], dim=0)
        for block in self.blocks:  # x is this stream's own buffer: without autograd the blocks update it in place
            x = block(x, cu_seqlens, max_seqlen, seg_ids, host_offsets, inplace=True)
        x = self.norm(x)
        out, start = [], 0
        for n, length in shapes:
            out.append(x[start:start + n * length].view(n, length, -1))
            start += n * length
        return out

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """images [N, 3, S, S] -> final-normed tokens [N, prefix + (S/p)^2, C] (cls, registers, patches)."""
        return self.forward_packed([images], [masks])[0]


def packed_segments(groups: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Segment offsets of groups of equal-length crops packed back to back ([(n crops, length)]).

    Returns cu_seqlens [S + 1] int32 and seg_ids [T] int64 (crop of each token), made on ``device``
    from the shapes alone (no host tensor to copy, no wait), and the same offsets as ints.
    """
    cu, seg, host = [torch.zeros(1, dtype=torch.int32, device=device)], [], [0]
    tokens = crops = 0
    for n, length in groups:
        cu.append(torch.arange(1, n + 1, dtype=torch.int32, device=device) * length + tokens)
        seg.append(torch.arange(n * length, device=device) // length + crops)
        host.extend(tokens + length * i for i in range(1, n + 1))
        tokens, crops = tokens + n * length, crops + n
    return torch.cat(cu), torch.cat(seg), tuple(host)


def tile_embedding(tokens: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Virchow's tile embedding: concat(cls token, mean of patch tokens) -> [N, 2C]."""
    return torch.cat([tokens[:, 0], tokens[:, num_prefix:].mean(dim=1)], dim=-1)


def layer_id(name: str, depth: int) -> int:
    """Layer index for layer-wise lr decay: embeddings 0, block i -> i + 1, the rest depth + 1."""
    if name.startswith(("cls_token", "reg_token", "pos_embed", "mask_token", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def mlp_ratio(cfg: ModelConfig) -> float:
    """timm's mlp_ratio for the packed SwiGLU (fc1 width / embed_dim)."""
    return 2 * cfg.mlp_hidden / cfg.embed_dim


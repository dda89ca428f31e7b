"""DINO / iBOT projection heads: MLP -> L2 normalisation -> weight-normalised prototypes.

The head returns the normalised bottleneck features z [.., b]; the prototypes W [K, b] are
returned separately (unit rows: DINOv2's weight norm with g fixed at 1), so the loss can fuse
z @ W^T with its softmax and cross-entropy without ever storing the [N, K] logits.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, prototypes: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        # the prototype layer ("last layer" in DINOv2): frozen for the first epoch by the schedule
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck_dim))
        self.init_weights()

    def init_weights(self) -> None:
        """The initial weights (model/init.py's rules), seeded by torch's current seed."""
        from .init import init_parameters

        init_parameters(self, torch.initial_seed())

    def normalized_prototypes(self) -> torch.Tensor:
        """W [K, b] with unit rows, in the parameters' compute dtype (bf16 under FSDP's bf16 policy)."""
        return ops.l2_normalize(self.prototypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., in_dim] -> L2-normalised bottleneck features [.., b], in the compute dtype.

        Under bf16 compute the loss gets bf16 features and prototypes: its fused kernels then run
        bf16 tensor-core dots with fp32 accumulation (fp32 features would run TF32, at half the
        rate and twice the bytes). Rounding the unit vectors to bf16 moves the DINO loss by ~1e-7
        relative and its gradients by ~3e-3, inside the 5e-3 the bf16 tests allow.
        """
        return F.normalize(self.mlp(x), dim=-1, eps=1e-6)

"""One DINOv2 network (backbone + DINO head + iBOT head): the student, and the teacher as its EMA.

Everything a step needs comes out of ``forward`` (so FSDP's hooks see every parameter use): the
student's cls features of all crops, the features of its masked patch tokens, its backbone cls
tokens (for the KDE / KoLeo regulariser), and the normalised prototypes of each head.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..config import HeadConfig, ModelConfig
from .heads import DINOHead
from .init import init_parameters, local_tensor
from .vit import VisionTransformer


class SSLNetwork(nn.Module):
    def __init__(self, model_cfg: ModelConfig, head_cfg: HeadConfig, seed: int | None = None):
        """Every parameter is drawn from its own generator seeded by (``seed``, its name in this network)
        (model/init.py): the same values whole or sharded. ``seed`` None: torch's current seed."""
        super().__init__()
        self.backbone = VisionTransformer(model_cfg)
        dim = model_cfg.embed_dim
        self.dino_head = DINOHead(dim, head_cfg.dino_prototypes, head_cfg.hidden_dim, head_cfg.bottleneck_dim,
                                  head_cfg.num_layers)
        if head_cfg.separate_ibot_head:
            self.ibot_head = DINOHead(dim, head_cfg.ibot_prototypes, head_cfg.hidden_dim,
                                      head_cfg.ibot_bottleneck_dim, head_cfg.num_layers)
        else:
            self.ibot_head = None
        init_parameters(self, torch.initial_seed() if seed is None else seed)

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None,
                masks: torch.Tensor | None = None, mask_inputs: bool = True,
                mask_indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """global_crops [Ng*B, 3, G, G], local_crops [Nl*B, 3, L, L] or None, masks [Ng*B, P] bool.

        mask_inputs: replace masked patches by the mask token (student) or only select the
        masked positions for the iBOT head (teacher).
        mask_indices: [n_masked] int64, the flat (row-major) indices of ``masks``' set entries; given
        (the batch has them), the masked tokens are gathered without a host synchronisation.
        Returns cls_z [(Ng + Nl) * B, b] (global rows first), patch_z [n_masked, b'] (masked patch
        tokens in row-major order of ``masks``), cls_tokens [Ng*B, C] (backbone, final-normed),
        dino_w [K, b], ibot_w [K', b'].
        """
        crops = [global_crops] + ([local_crops] if local_crops is not None and local_crops.numel() else [])
        crop_masks = [masks if mask_inputs else None] + [None] * (len(crops) - 1)
        outs = self.backbone.forward_packed(crops, crop_masks)
        prefix = self.backbone.num_prefix
        cls = torch.cat([o[:, 0] for o in outs], dim=0)
        ibot_head = self.ibot_head if self.ibot_head is not None else self.dino_head
        result = {
            "cls_z": self.dino_head(cls),
            "cls_tokens": outs[0][:, 0],
            "dino_w": self.dino_head.normalized_prototypes(),
            "ibot_w": ibot_head.normalized_prototypes(),
        }
        if masks is not None:
            if mask_indices is None:
                mask_indices = torch.nonzero(masks.reshape(-1)).reshape(-1)
            tokens = outs[0]  # [N, prefix + P, C], contiguous
            n_patches = tokens.shape[1] - prefix
            rows = mask_indices // n_patches * tokens.shape[1] + prefix + mask_indices % n_patches
            result["patch_z"] = ibot_head(tokens.reshape(-1, tokens.shape[-1]).index_select(0, rows))
        return result


def make_teacher(student: SSLNetwork) -> SSLNetwork:
    """A copy of the student that never receives gradients."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, parameter by parameter.

    Works on whatever the parameters are (full tensors, or FSDP2 DTensor shards, updated locally).
    """
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if not t_params:
        return
    torch._foreach_lerp_([local_tensor(p) for p in t_params], [local_tensor(p) for p in s_params], 1.0 - momentum)

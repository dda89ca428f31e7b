"""One DINOv2 step's losses: teacher on the global crops, student on all crops, three terms."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..config import LossConfig
from ..data import Batch
from ..losses import DINOLoss, IBOTLoss, kde_loss, koleo_loss


class SSLLoss(torch.nn.Module):
    """DINO + iBOT + regulariser, with the centers as buffers (saved in checkpoints)."""

    def __init__(self, cfg: LossConfig, dino_prototypes: int, ibot_prototypes: int):
        super().__init__()
        self.cfg = cfg
        args = (cfg.centering, cfg.student_temp, cfg.center_momentum, cfg.sinkhorn_iters)
        self.dino = DINOLoss(dino_prototypes, *args)
        self.ibot = IBOTLoss(ibot_prototypes, *args)

    def regularizer(self, cls_tokens: torch.Tensor, n_global: int) -> torch.Tensor:
        """Sum over global crops of the regulariser on this rank's tiles."""
        if self.cfg.regularizer == "none":
            return cls_tokens.new_zeros(())
        fn = (lambda x: kde_loss(x, self.cfg.kde_kappa, self.cfg.kde_self_term)) if self.cfg.regularizer == "kde" else koleo_loss
        return sum(fn(chunk) for chunk in cls_tokens.chunk(n_global))

    def forward(self, student, teacher, batch: Batch, teacher_temp: float,
                all_reduce: Optional[Callable[[torch.Tensor], None]] = None, world_size: int = 1) -> dict:
        n_global = batch.global_crops.shape[0] // batch.n_tiles
        with torch.no_grad():
            t = teacher(batch.global_crops, None, batch.masks, mask_inputs=False)
        s = student(batch.global_crops, batch.local_crops, batch.masks, mask_inputs=True)
        cfg = self.cfg
        dino = self.dino(s["cls_z"], s["dino_w"], t["cls_z"], t["dino_w"], n_global, teacher_temp,
                         all_reduce, world_size)
        ibot = self.ibot(s["patch_z"], s["ibot_w"], t["patch_z"], t["ibot_w"], batch.masks, teacher_temp,
                         all_reduce)
        reg = self.regularizer(s["cls_tokens"], n_global)
        total = cfg.dino_weight * dino + cfg.ibot_weight * ibot + cfg.regularizer_weight * reg
        return {"loss": total, "dino": dino, "ibot": ibot, "reg": reg}

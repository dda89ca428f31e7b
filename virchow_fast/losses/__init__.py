"""DINO (softmax-center or Sinkhorn-Knopp teacher), iBOT, and the KDE / KoLeo regularisers."""
from .dino import DINOLoss, IBOTLoss, dino_pairs, ibot_pairs
from .regularizers import kde_loss, koleo_loss

__all__ = ["DINOLoss", "IBOTLoss", "dino_pairs", "ibot_pairs", "kde_loss", "koleo_loss"]

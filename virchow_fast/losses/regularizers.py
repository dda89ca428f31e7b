"""Regularisers that spread the student's cls features over the sphere.

KoLeo (DINOv2): -mean_i log(min_j ||x_i - x_j|| + eps); it blows up on near-duplicates, which
pathology tiles often are. KDE (Virchow 2): mean_i log sum_{j != i} exp(kappa x_i . x_j), a
kernel density estimate of the features; minimising it lowers the density at each feature,
i.e. spreads them (a uniformity loss that stays bounded for duplicates). Both act per global
crop on the L2-normalised features of this rank's tiles and are summed over crops.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kde_loss(x: torch.Tensor, kappa: float = 5.0, self_term: bool = False) -> torch.Tensor:
    """x [N, C] (N >= 2), normalised here -> scalar mean_i log sum_{j != i} exp(kappa cos(x_i, x_j)).

    ``self_term`` keeps j = i in the sum, as the one public implementation does. That term is the
    constant e^kappa, so it has no gradient of its own but divides everyone else's: the gradient
    shrinks by (e^kappa + S_i) / S_i with S_i the sum over j != i (about 5x for 32 spread tiles at
    kappa 5). That code also minimises the negative of this (a density it raises: collapse), so
    with ``self_term`` this is exactly minus its loss (up to its 1e-9 inside the log).
    """
    z = F.normalize(x.float(), dim=-1, eps=1e-8)
    sim = kappa * (z @ z.t())
    if not self_term:
        eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
        sim = sim.masked_fill(eye, -math.inf)
    return torch.logsumexp(sim, dim=1).mean()


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x [N, C] (N >= 2), normalised here -> scalar -mean_i log(distance to nearest neighbour + eps)."""
    z = F.normalize(x.float(), dim=-1, eps=1e-8)
    with torch.no_grad():
        sim = z @ z.t()
        sim.fill_diagonal_(-2.0)
        nn_idx = sim.argmax(dim=1)
    dist = (z - z[nn_idx]).norm(dim=-1)
    return -torch.log(dist + eps).mean()

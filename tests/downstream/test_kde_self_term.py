"""loss.kde_self_term: both KDE forms against a hand formula, and the self term's effect on the gradient."""
import math

import pytest
import torch
import torch.nn.functional as F

from virchow_fast.config import load_config
from virchow_fast.losses import kde_loss


def _hand(x: torch.Tensor, kappa: float, self_term: bool) -> float:
    z = [[c / math.sqrt(sum(a * a for a in v)) for c in v] for v in x.double().tolist()]
    n = len(z)
    total = 0.0
    for i in range(n):
        dots = [sum(a * b for a, b in zip(z[i], z[j], strict=True)) for j in range(n)]
        s = sum(math.exp(kappa * dots[j]) for j in range(n) if self_term or j != i)
        total += math.log(s)
    return total / n


@pytest.mark.parametrize("self_term", [False, True])
def test_kde_forms_match_hand_formula(self_term):
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(1)) * 2.5
    assert kde_loss(x, 5.0, self_term).item() == pytest.approx(_hand(x, 5.0, self_term), rel=1e-6)


def test_self_term_is_minus_the_public_loss():
    """The public code: z = normalize(x); -mean(log(sum_j exp(kappa z z^T) + 1e-9)), j = i included."""
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    z = F.normalize(x, dim=-1)
    public = -torch.log(torch.exp(5.0 * z @ z.T).sum(dim=1) + 1e-9).mean()
    assert kde_loss(x, 5.0, self_term=True).item() == pytest.approx(-public.item(), rel=1e-6)
    assert kde_loss(x, 5.0, self_term=False).item() < kde_loss(x, 5.0, self_term=True).item()


def test_self_term_shrinks_gradient_by_density_ratio():
    """Per tile, d/dx log(e^k + S) = S'/(e^k + S) and d/dx log S = S'/S: ours is (e^k + S)/S larger.

    With one varying tile (the rest frozen) and its own row only, the ratio is exact."""
    torch.manual_seed(3)
    others = F.normalize(torch.randn(31, 16), dim=-1)
    x = F.normalize(torch.randn(1, 16), dim=-1).requires_grad_(True)

    def row_loss(self_term):
        z = F.normalize(x, dim=-1)
        sim = 5.0 * torch.cat([z, others]) @ z.t()  # [32, 1]: row 0 is the self term
        sim = sim if self_term else sim[1:]
        return torch.logsumexp(sim[:, 0], dim=0)

    g_ours = torch.autograd.grad(row_loss(False), x)[0]
    g_public = torch.autograd.grad(row_loss(True), x)[0]
    s = torch.exp(5.0 * others @ F.normalize(x, dim=-1).detach().t()).sum().item()
    assert (g_ours.norm() / g_public.norm()).item() == pytest.approx((math.exp(5.0) + s) / s, rel=1e-4)


def test_config_switch_reaches_the_step_loss():
    from virchow_fast.train.step import SSLLoss

    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(4))
    for flag in (False, True):
        cfg = load_config(None, [f"loss.kde_self_term={str(flag).lower()}"])
        loss = SSLLoss(cfg.loss, 16, 16)
        assert loss.regularizer(x, 2).item() == pytest.approx(
            kde_loss(x[:4], 5.0, flag).item() + kde_loss(x[4:], 5.0, flag).item(), rel=1e-6)
    assert load_config(None).loss.kde_self_term is False

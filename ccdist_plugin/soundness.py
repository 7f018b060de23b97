"""Empirical soundness checks: the worst margins that sampling and attacks find in a ball.

A sound lower bound on z_j = f_y − f_j never exceeds a margin observed at a point of the ball.
These helpers find such points — uniformly sampled and PGD-found — so that tests and
``benchmarks/soundness_sweep.py`` can compare any bound against them. Use them on your own
networks the same way: ``assert (margin_lower_bound(net, x, y, eps) <= sampled.z_min).all()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ccdist_plugin.attacks import pgd_attack
from ccdist_plugin.bounds import input_box
from ccdist_plugin.losses import CCIBPLoss
from ccdist_plugin.models import CertifiedNet

__all__ = ["SampledExtremes", "sampled_extremes", "attacked_margins", "worst_margins", "briefly_trained"]


@dataclass
class SampledExtremes:
    """Over the sampled points: the smallest margins z_min (B, k) and the feature range
    h_min, h_max (B, w); ``points`` is the number of points evaluated."""

    z_min: Tensor
    h_min: Tensor
    h_max: Tensor
    points: int


@torch.no_grad()
def sampled_extremes(
    net: CertifiedNet, x: Tensor, y: Tensor, eps: float, samples: int, generator: torch.Generator
) -> SampledExtremes:
    """Evaluate ``net`` at ``samples`` uniform points of the ball ∩ [0, 1] around each input."""
    lo, hi = input_box(x, eps)
    z_min = h_min = h_max = None
    for _ in range(samples):
        h = net.features(lo + (hi - lo) * torch.rand(x.shape, generator=generator))
        out = net.head(h)
        z = out.gather(1, y.view(-1, 1)) - out
        z_min = z if z_min is None else torch.minimum(z_min, z)
        h_min = h if h_min is None else torch.minimum(h_min, h)
        h_max = h if h_max is None else torch.maximum(h_max, h)
    return SampledExtremes(z_min, h_min, h_max, samples * x.shape[0])


class _PairLogits(nn.Module):
    """The logits (f_y, f_j) of ``net``: PGD on their margin attacks the difference z_j."""

    def __init__(self, net: nn.Module, y: Tensor, j: int):
        super().__init__()
        # Not registered as a submodule: PGD's eval()/train() on this wrapper must leave the
        # attacked network's mode (and so its BatchNorm behaviour) alone.
        object.__setattr__(self, "net", net)
        self.y, self.j = y, j

    def forward(self, v: Tensor) -> Tensor:
        out = self.net(v)
        return torch.stack([out.gather(1, self.y.view(-1, 1)).squeeze(1), out[:, self.j]], 1)


def attacked_margins(net: CertifiedNet, x: Tensor, y: Tensor, eps: float, steps: int = 20) -> Tensor:
    """Smallest margins z (B, k) seen at PGD points that attack each class j in turn."""
    z_min = torch.full((x.shape[0], net.num_classes), float("inf"))
    for j in range(net.num_classes):
        pair = _PairLogits(net, y, j)
        x_adv = pgd_attack(pair, x, torch.zeros_like(y), eps, steps=steps, objective="margin")
        with torch.no_grad():
            out = net(x_adv)
        z_min = torch.minimum(z_min, out.gather(1, y.view(-1, 1)) - out)
    return z_min


def worst_margins(
    net: CertifiedNet, x: Tensor, y: Tensor, eps: float, samples: int, generator: torch.Generator
) -> tuple[Tensor, int]:
    """Smallest margins (B, k) over ``samples`` uniform points of each ball and PGD points attacking
    each class (:func:`sampled_extremes`, :func:`attacked_margins`), and how many points were evaluated:
    a sound lower bound on a margin is never above it."""
    sampled = sampled_extremes(net, x, y, eps, samples, generator)
    attacked = attacked_margins(net, x, y, eps)
    return torch.minimum(sampled.z_min, attacked), sampled.points + net.num_classes * x.shape[0]


def briefly_trained(model: CertifiedNet, x: Tensor, y: Tensor, eps: float, steps: int = 30) -> CertifiedNet:
    """A few CC-IBP (α = 0.5) steps on random batches of 64, so that a network under test is not
    a random one (its BatchNorm statistics move too). Deterministic given the model's state."""
    loss_fn = CCIBPLoss(alpha=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        out = loss_fn(model, x[idx], y[idx], eps)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model

"""SABR's small box, as the authors' training code computes it (expressive-losses, utils.py,
compute_sabr_perturbation, commit 3df64fa997e2): the centre clamped inside the already clipped ball."""

from __future__ import annotations

import pytest
import torch

from ccdist_plugin.losses import SABRLoss


def _reference_box(x, x_adv, eps, lam, mean, std):
    """The authors' formula, in the normalized space where they compute it: the ε-ball clipped to the
    normalized image of [0, 1], the centre torch.clamp-ed into it shrunk by λε, the box clipped."""
    data_min, data_max = (0 - mean) / std, (1 - mean) / std
    xn, advn = (x - mean) / std, (x_adv - mean) / std
    norm_eps, norm_small = eps / std, eps * lam / std
    data_ub = torch.min(xn + norm_eps, data_max)
    data_lb = torch.max(xn - norm_eps, data_min)
    centre = torch.clamp(advn, data_lb + norm_small, data_ub - norm_small)
    return torch.max(centre - norm_small, data_min), torch.min(centre + norm_small, data_max)


def _pixels(seed: int, n: int = 256):
    """Pixels of which about a third lie within ε of 0 or 1 (as in CIFAR-10's saturated regions), and
    adversarial points anywhere in the clipped ball."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 4, 4, generator=g)
    edge = torch.rand(n, 3, 4, 4, generator=g) < 0.33
    x = torch.where(edge, torch.where(x < 0.5, x * 0.05, 1 - x * 0.05), x)
    return x, g


@pytest.mark.parametrize("lam", [0.1, 0.4, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("eps", [2 / 255, 8 / 255, 0.1])
def test_sabr_box_equals_the_authors_formula(lam, eps):
    x, g = _pixels(int(lam * 100 + eps * 1e4))
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    x_adv = lower + (upper - lower) * torch.rand(x.shape, generator=g)
    x_adv = torch.where(torch.rand(x.shape, generator=g) < 0.3, torch.where(x_adv < x, lower, upper), x_adv)
    mean = torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1)
    lo, hi = SABRLoss(lam=lam).box(x, x_adv, eps)
    ref_lo, ref_hi = _reference_box(x, x_adv, eps, lam, mean, std)
    # our box lives in pixel space; mapped through the normalization it is the authors' box
    torch.testing.assert_close((lo - mean) / std, ref_lo, rtol=0, atol=1e-5)
    torch.testing.assert_close((hi - mean) / std, ref_hi, rtol=0, atol=1e-5)
    assert bool((lo <= hi).all()) and bool((lo >= 0).all()) and bool((hi <= 1).all())
    if lam <= 0.5:  # the clipped ball is always at least ε ≥ 2λε wide: the box lies inside it
        assert bool((lo >= lower - 1e-7).all()) and bool((hi <= upper + 1e-7).all())


def test_sabr_box_keeps_its_width_near_the_pixel_limits():
    """Where the clipped ball is at least 2λε wide the box is exactly 2λε wide, also for pixels near
    0 or 1, where centring in the unclipped ball and clipping afterwards would cut it (up to half)."""
    eps, lam = 0.1, 0.4
    x = torch.tensor([0.01, 0.02, 0.5, 0.97, 0.995]).view(1, 1, 1, 5)
    x_adv = torch.tensor([0.0, 0.0, 0.6, 1.0, 1.0]).view(1, 1, 1, 5)  # attack pushed to the limit
    lo, hi = SABRLoss(lam=lam).box(x, x_adv, eps)
    torch.testing.assert_close(hi - lo, torch.full_like(x, 2 * lam * eps), rtol=0, atol=1e-6)
    torch.testing.assert_close(lo[..., 0], torch.tensor([[[0.0]]]))
    torch.testing.assert_close(hi[..., 4], torch.tensor([[[1.0]]]))
    # the former construction (centre in [x − ε + λε, x + ε − λε], then clipped) halves the first box
    small = lam * eps
    centre = torch.minimum(torch.maximum(x_adv, x - eps + small), x + eps - small)
    old_width = (centre + small).clamp(0, 1) - (centre - small).clamp(0, 1)
    assert float(old_width[..., 0]) < float(hi[..., 0] - lo[..., 0]) - 0.02

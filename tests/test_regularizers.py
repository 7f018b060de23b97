"""Shi et al. (2021) regularizer on a hand-made example, ℓ1 penalty, and the IBP pre-activation bounds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ccdist_plugin.models import cnn3, mlp
from ccdist_plugin.regularizers import (
    ibp_preactivation_bounds,
    l1_penalty,
    normalized_input_box,
    shi_regularizer,
)


def _t(values):
    return torch.tensor([values], dtype=torch.float64)


def test_shi_regularizer_hand_example():
    tau = 0.5
    # layer A: Δ = 1 everywhere, c = (2, 3, -3, 0): two active, one inactive neuron
    a = (_t([1.0, 2.0, -4.0, -1.0]), _t([3.0, 4.0, -2.0, 1.0]))
    # layer B: Δ = (0.1, 0.5, 0.5, 0.5), c = (1.1, -1.5, -1.5, -1.5): one active, three inactive
    b = (_t([1.0, -2.0, -2.0, -2.0]), _t([1.2, -1.0, -1.0, -1.0]))
    # layer C: every neuron unstable: the balance ratios are 0/0 (NaN) and must be skipped
    c = (_t([-1.0] * 4), _t([1.0] * 4))
    in_lb, in_ub = torch.zeros(1, 4, dtype=torch.float64), torch.full((1, 4), 0.4, dtype=torch.float64)
    out = shi_regularizer([a, b, c], in_lb, in_ub, tau)

    radius_in = 0.2
    tight = [
        max(tau - radius_in / 1.0, 0) / tau,
        max(tau - radius_in / 0.4, 0) / tau,
        max(tau - radius_in / 1.0, 0) / tau,
    ]
    # layer A balance: r_m = (5/4) / (3/4); spread about mean(c) = 0.5: act (2.25 + 6.25)/4, inact 12.25/4
    r_m_a, r_v_a = (5 / 4) / (3 / 4), (8.5 / 4) / (12.25 / 4)
    # layer B: r_m = (1.1/4) / (4.5/4); mean(c) = -0.85: act 1.95^2/4, inact 3 * 0.65^2 / 4
    r_m_b, r_v_b = (1.1 / 4) / (4.5 / 4), (1.95**2 / 4) / (3 * 0.65**2 / 4)

    def bal(r_m, r_v):
        return (max(tau - min(r_m, 1 / r_m), 0) + max(tau - min(r_v, 1 / r_v), 0)) / tau

    expected_tight = sum(tight) / 3
    expected_balance = (bal(r_m_a, r_v_a) + bal(r_m_b, r_v_b)) / 3  # layer C skipped, still counted
    assert bal(r_m_b, r_v_b) > 0.8  # the example exercises the balance term
    assert float(out.tightness) == pytest.approx(expected_tight, rel=1e-12)
    assert float(out.relu_balance) == pytest.approx(expected_balance, rel=1e-12)
    assert float(out.total) == pytest.approx(expected_tight + expected_balance, rel=1e-12)


def test_shi_regularizer_is_differentiable_and_finite():
    lb = torch.randn(8, 16, requires_grad=True)
    width = torch.rand(8, 16)
    ub = lb + width
    out = shi_regularizer([(lb, ub)], torch.zeros(8, 3), torch.full((8, 3), 0.01))
    assert torch.isfinite(out.total)
    out.total.backward()
    assert lb.grad is not None and torch.isfinite(lb.grad).all()
    with pytest.raises(ValueError, match="no pre-activation bounds"):
        shi_regularizer([], torch.zeros(1), torch.zeros(1))


def test_l1_penalty_weights_only():
    model = cnn3(1, 8, 10, width=16, channels=(4, 4))
    expected = sum(
        float(m.weight.detach().abs().sum()) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    )
    assert float(l1_penalty(model).detach()) == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.weight.fill_(100.0)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.fill_(100.0)
    assert float(l1_penalty(model).detach()) == pytest.approx(expected, rel=1e-5)


def test_preactivation_bounds_contain_sampled_preactivations():
    torch.manual_seed(0)
    model = mlp(1, 4, 3, width=12, depth=2, mean=[0.5], std=[0.25]).eval()
    x, eps = torch.rand(5, 1, 4, 4), 0.05
    bounds, (in_lb, in_ub) = ibp_preactivation_bounds(model, x, eps)
    relus = [m for m in model.features if isinstance(m, nn.ReLU)]
    assert len(bounds) == len(relus) == 2
    assert torch.allclose(in_ub - in_lb, ((x + eps).clamp(0, 1) - (x - eps).clamp(0, 1)) / 0.25)
    for _ in range(20):
        x_s = (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1)
        h, k = x_s, 0
        for layer in model.features:
            if isinstance(layer, nn.ReLU):
                lb, ub = bounds[k]
                assert bool((h >= lb - 1e-6).all() and (h <= ub + 1e-6).all())
                k += 1
            h = layer(h)


def test_normalized_input_box_clips_to_pixel_range():
    model = mlp(1, 2, 2, width=4, mean=[0.5], std=[0.5])
    x = torch.tensor([[[[0.0, 1.0], [0.5, 0.98]]]])
    lo, hi = normalized_input_box(model, x, 0.05)
    assert torch.allclose(lo, (torch.tensor([[[[0.0, 0.95], [0.45, 0.93]]]]) - 0.5) / 0.5)
    assert torch.allclose(hi, (torch.tensor([[[[0.05, 1.0], [0.55, 1.0]]]]) - 0.5) / 0.5)

"""PGD: stays in the ball ∩ [0, 1], finds a known counterexample, restores the mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ccdist_plugin.attacks import PGD, pgd_attack
from ccdist_plugin.models import cnn3


def linear_model(w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return nn.Sequential(nn.Flatten(), lin)


@pytest.mark.parametrize("eps", [0.0, 0.01, 0.1, 0.5])
@pytest.mark.parametrize("objective", ["ce", "margin"])
def test_pgd_stays_in_ball_and_pixel_box(eps, objective):
    torch.manual_seed(0)
    model = cnn3(1, 8, 10, width=16, channels=(4, 8))
    x = torch.rand(16, 1, 8, 8)
    x[:4] = 0.0
    x[4:8] = 1.0
    y = torch.randint(0, 10, (16,))
    model.train()
    x_adv = PGD(steps=5, step_size=0.5, restarts=2, objective=objective)(model, x, y, eps)
    assert model.training  # restored
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


def test_pgd_finds_the_counterexample_of_a_linear_model():
    # f(x) = [x0 - x1, 0]: class 0 at x = (0.6, 0.5); with eps 0.1 the corner (0.5, 0.6) flips it.
    model = linear_model(torch.tensor([[1.0, -1.0], [0.0, 0.0]]), torch.zeros(2))
    x = torch.tensor([[0.6, 0.5]]).view(1, 1, 1, 2)
    y = torch.tensor([0])
    x_adv = pgd_attack(model, x, y, 0.1, steps=10, step_size=0.05, random_start=False)
    torch.testing.assert_close(x_adv.flatten(), torch.tensor([0.5, 0.6]))
    assert int(model(x_adv).argmax(1)) == 1
    # ... and none exists at eps 0.04: the point stays correctly classified.
    x_adv = pgd_attack(model, x, y, 0.04, steps=10, restarts=3)
    assert int(model(x_adv).argmax(1)) == 0


def test_enlarged_ball_and_early_stop():
    torch.manual_seed(0)
    model = cnn3(1, 8, 10, width=16, channels=(4, 8)).eval()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    x_adv = PGD(steps=8, step_size=0.25, eps_factor=2.1)(model, x, y, 0.02)
    assert float((x_adv - x).abs().max()) <= 2.1 * 0.02 + 1e-6
    x_adv = pgd_attack(model, x, y, 0.3, steps=20, early_stop=True)
    assert float((x_adv - x).abs().max()) <= 0.3 + 1e-6


def test_no_parameter_gradients_and_bad_settings():
    model = cnn3(1, 8, 10, width=16, channels=(4, 8))
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    pgd_attack(model, x, y, 0.1, steps=2)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError):
        PGD(objective="hinge")
    with pytest.raises(ValueError, match="eps must be"):
        pgd_attack(model, x, y, -1.0)
    with pytest.raises(ValueError, match="labels"):
        pgd_attack(model, x, y[:2], 0.1)

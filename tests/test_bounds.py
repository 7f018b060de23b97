"""Soundness of the bound engine: IBP and CROWN against sampling, PGD and auto_LiRPA."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import briefly_trained, requires_auto_lirpa, small_models
from torch import nn

from ccdist_plugin.attacks import pgd_attack
from ccdist_plugin.bounds import (
    UnsupportedLayerError,
    certify,
    crown_margin_lower_bound,
    elided_margin_lower_bound,
    feature_bounds,
    interval_bounds,
    margin_lower_bound,
    propagate_intervals,
    with_batch_statistics,
)
from ccdist_plugin.models import cnn3
from ccdist_plugin.soundness import attacked_margins, sampled_extremes

EPS = {"mlp": 0.05, "cnn3": 0.05, "cnn7": 0.01}
SAMPLES = 400  # per input: 8 inputs x 400 = 3,200 sampled points per (model, state, mode)


def sampled_margins(net: nn.Module, x, y, eps, n: int, seed: int = 0):
    """Minimum over ``n`` uniform points of the ball of z_j = f_y − f_j, and the feature range."""
    ext = sampled_extremes(net, x, y, eps, n, torch.Generator().manual_seed(seed))
    return ext.z_min, ext.h_min, ext.h_max


def _cases():
    for state in ("random", "trained"):
        for name in ("mlp", "cnn3", "cnn7"):
            for mode in ("eval", "train"):
                yield state, name, mode


@pytest.fixture(scope="module")
def trained_models(digits):
    x, y = digits
    models = small_models(seed=1)
    out = {}
    for name, m in models.items():
        if name == "cnn7":
            xx = torch.nn.functional.interpolate(x[:512], size=16).repeat(1, 3, 1, 1)
            out[name] = briefly_trained(m, xx, y[:512], EPS[name])
        else:
            out[name] = briefly_trained(m, x, y, EPS[name])
    return out


def _inputs(name, digits, n=8):
    x, y = digits
    x, y = x[100 : 100 + n], y[100 : 100 + n]
    if name == "cnn7":
        x = torch.nn.functional.interpolate(x, size=16).repeat(1, 3, 1, 1)
    return x, y


@pytest.mark.parametrize("state,name,mode", list(_cases()))
def test_ibp_and_crown_contain_sampled_and_pgd_points(state, name, mode, digits, trained_models):
    torch.manual_seed(0)
    model = trained_models[name] if state == "trained" else small_models(seed=2)[name]
    if state == "random":
        # Give the running statistics something other than (0, 1).
        model.train()
        with torch.no_grad():
            model(_inputs(name, digits, n=64)[0])
    x, y = _inputs(name, digits)
    eps = EPS[name]
    model.train(mode == "train")
    reference_net = with_batch_statistics(model, x) if mode == "train" else copy.deepcopy(model).eval()

    h_lb, h_ub = feature_bounds(model, x, eps)
    z_ibp = margin_lower_bound(model, x, y, eps)
    z_samp, h_min, h_max = sampled_margins(reference_net, x, y, eps, SAMPLES)
    z_pgd = attacked_margins(reference_net, x, y, eps)
    tol = 1e-5
    assert bool((h_lb <= h_min + tol).all()) and bool((h_max <= h_ub + tol).all())
    assert bool((z_ibp <= z_samp + tol).all()), "IBP margin bound above a sampled margin"
    assert bool((z_ibp <= z_pgd + tol).all()), "IBP margin bound above a PGD margin"
    # Train-mode bounds are the bounds of the network with the reference batch's statistics.
    z_frozen = margin_lower_bound(reference_net, x, y, eps)
    torch.testing.assert_close(z_ibp, z_frozen, rtol=1e-4, atol=1e-4)

    z_crown = crown_margin_lower_bound(reference_net, x, y, eps)
    assert bool((z_crown <= z_samp + tol).all()), "CROWN margin bound above a sampled margin"
    assert bool((z_crown <= z_pgd + tol).all()), "CROWN margin bound above a PGD margin"
    off_diag = torch.ones_like(z_ibp, dtype=torch.bool).scatter(1, y.view(-1, 1), False)
    tighter = (z_crown >= z_frozen - 1e-5)[off_diag].float().mean()
    assert tighter >= 0.75, f"CROWN tighter than IBP on only {tighter:.0%} of the margins"


def test_crown_ibp_intermediates_is_sound_and_no_tighter_than_crown(digits, trained_models):
    model = trained_models["cnn3"].eval()
    x, y = _inputs("cnn3", digits, n=16)
    full = crown_margin_lower_bound(model, x, y, 0.05)
    cibp = crown_margin_lower_bound(model, x, y, 0.05, intermediate="ibp")
    z_samp, _, _ = sampled_margins(model, x, y, 0.05, 200)
    assert bool((cibp <= z_samp + 1e-5).all())
    assert float((full - cibp).mean()) >= -1e-6


def test_certified_points_resist_pgd(digits, trained_models):
    """No point we certify may fall to an attack (and certify is float64 and side-effect free)."""
    x, y = digits
    x, y = x[:300], y[:300]
    for name in ("mlp", "cnn3"):
        model = trained_models[name].eval()
        before = copy.deepcopy(model.state_dict())
        for method in ("ibp", "crown"):
            res = certify(model, x, y, EPS[name], method=method)
            assert res.margin_lb.dtype == torch.float64
            assert bool((res.certified <= res.correct).all())
            if res.certified.any():
                xc, yc = x[res.certified], y[res.certified]
                x_adv = pgd_attack(
                    model, xc, yc, EPS[name], steps=40, step_size=2.5 * EPS[name] / 40, restarts=3
                )
                with torch.no_grad():
                    assert bool((model(x_adv).argmax(1) == yc).all()), (
                        f"{name}/{method}: a certified point fell"
                    )
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, before[k])


def test_elision_is_tighter_than_differencing_logit_bounds(digits, trained_models):
    model = trained_models["mlp"].eval()
    x, y = _inputs("mlp", digits, n=16)
    h_lb, h_ub = feature_bounds(model, x, 0.05)
    z_elided = elided_margin_lower_bound(model.head, h_lb, h_ub, y)
    f_lb, f_ub = interval_bounds(model.head, h_lb, h_ub)
    z_naive = f_lb.gather(1, y.view(-1, 1)) - f_ub
    z_naive = z_naive.scatter(1, y.view(-1, 1), 0.0)
    assert bool((z_elided >= z_naive - 1e-5).all())
    assert bool((z_elided.gather(1, y.view(-1, 1)) == 0).all())


def test_bn_negative_scale_and_train_mode_reference():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([-2.0, 1.0, -0.5, 3.0, -1.0, 0.1]))
    x = torch.rand(32, 4)
    lo, hi = (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1)
    net.train()
    running = net[1].running_mean.clone()
    lb, ub = interval_bounds(net, lo, hi, reference=x)
    torch.testing.assert_close(net[1].running_mean, running)  # pure: no running-stat update
    g = torch.Generator().manual_seed(1)
    frozen = with_batch_statistics(net, x)
    with torch.no_grad():
        for _ in range(200):
            out = frozen(lo + (hi - lo) * torch.rand(x.shape, generator=g))
            assert bool((out >= lb - 1e-5).all()) and bool((out <= ub + 1e-5).all())
    # update_running_stats moves them exactly as a forward pass would.
    ref_net = copy.deepcopy(net)
    ref_net(x)
    prop = propagate_intervals(net, lo, hi, reference=x, update_running_stats=True)
    torch.testing.assert_close(net[1].running_mean, ref_net[1].running_mean)
    torch.testing.assert_close(net[1].running_var, ref_net[1].running_var)
    assert int(net[1].num_batches_tracked) == int(ref_net[1].num_batches_tracked)
    torch.testing.assert_close(prop.value, ref_net(x).detach(), rtol=1e-5, atol=1e-5)


def _reference_train_intervals(net: nn.Module, lo, hi, x):
    """Train-mode IBP with the BatchNorm statistics written out in plain autograd (var_mean):
    the definition that the engine's fused BatchNorm must match in values and gradients."""
    c, r, v = (hi + lo) / 2, (hi - lo) / 2, x
    for layer in net:
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            w = layer.weight
            fn = nn.functional.linear if isinstance(layer, nn.Linear) else nn.functional.conv2d
            extra = {} if isinstance(layer, nn.Linear) else {"padding": layer.padding}
            v, c, r = fn(v, w, layer.bias, **extra), fn(c, w, layer.bias, **extra), fn(r, w.abs(), **extra)
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            dims = [d for d in range(v.ndim) if d != 1]
            var, mean = torch.var_mean(v, dim=dims, unbiased=False)
            shape = (1, -1) + (1,) * (v.ndim - 2)
            scale = (layer.weight / torch.sqrt(var + layer.eps)).view(shape)
            shift = layer.bias.view(shape) - mean.view(shape) * scale
            v, c, r = v * scale + shift, c * scale + shift, r * scale.abs()
        elif isinstance(layer, nn.ReLU):
            lb, ub = torch.relu(c - r), torch.relu(c + r)
            v, c, r = torch.relu(v), (ub + lb) / 2, (ub - lb) / 2
        elif isinstance(layer, nn.Flatten):
            v, c, r = layer(v), layer(c), layer(r)
    return v, c - r, c + r


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_train_mode_bounds_and_gradients_match_plain_autograd(kind):
    """The fused train-mode BatchNorm (statistics, normalization and running-average update in one
    kernel, with a hand-written backward) gives the values and gradients of the plain definition."""
    torch.manual_seed(0)
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
        x = torch.rand(16, 5, dtype=torch.float64)
    else:
        net = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 3)
        )
        x = torch.rand(8, 2, 5, 5, dtype=torch.float64)
    net = net.double().train()
    with torch.no_grad():
        net[1].weight.copy_(torch.linspace(-2, 2, net[1].weight.numel()))  # negative scales too
    lo, hi = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(lo, hi).requires_grad_(True)
    weights = torch.randn(3, 3, dtype=torch.float64)

    def objective(value, lower, upper):
        return (value @ weights).sin().sum() + (lower * upper).sum() + upper.pow(2).sum()

    prop = propagate_intervals(net, lo, hi, reference=x_adv)
    ours = objective(prop.value, prop.lower, prop.upper)
    grads = torch.autograd.grad(ours, [x_adv, *net.parameters()])
    ref_v, ref_lo, ref_hi = _reference_train_intervals(net, lo, hi, x_adv)
    reference = objective(ref_v, ref_lo, ref_hi)
    ref_grads = torch.autograd.grad(reference, [x_adv, *net.parameters()])
    torch.testing.assert_close(prop.value, ref_v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(prop.lower, ref_lo, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(prop.upper, ref_hi, rtol=1e-10, atol=1e-10)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-8, atol=1e-10)
    # without a reference, the centre's own statistics: compare with the same definition
    no_ref = propagate_intervals(net, lo, hi)
    centre = ((lo + hi) / 2).requires_grad_(False)
    _, ref_lo2, ref_hi2 = _reference_train_intervals(net, lo, hi, centre)
    torch.testing.assert_close(no_ref.lower, ref_lo2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(no_ref.upper, ref_hi2, rtol=1e-10, atol=1e-10)


def test_unsupported_layer_raises():
    net = nn.Sequential(nn.Linear(4, 4), nn.MaxPool1d(2))
    x = torch.rand(2, 4)
    with pytest.raises(UnsupportedLayerError, match="MaxPool1d"):
        interval_bounds(net, x, x)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, x, y: margin_lower_bound(m, x, y, -0.1), "eps must be finite and >= 0"),
        (
            lambda m, x, y: margin_lower_bound(m, x[:, :, :4], y, 0.1),
            "does not match the model's input shape",
        ),
        (lambda m, x, y: margin_lower_bound(m, x, y[:3], 0.1), "labels of shape"),
        (lambda m, x, y: margin_lower_bound(m, x * 255, y, 0.1), "pixel space"),
        (lambda m, x, y: margin_lower_bound(m, x, y + 10, 0.1), "labels must lie in"),
        (lambda m, x, y: certify(m, x, y, 0.1, method="lp"), "method must be"),
    ],
)
def test_bad_input_gives_one_clear_error(call, match):
    m = cnn3(1, 8, 10, width=16, channels=(4, 8)).eval()
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 10, (5,))
    with pytest.raises(ValueError, match=match):
        call(m, x, y)


@requires_auto_lirpa
@pytest.mark.autolirpa
@pytest.mark.parametrize("name", ["mlp", "cnn3", "cnn7"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_ibp_equals_auto_lirpa(name, mode, digits, trained_models):
    from ccdist_plugin.bounds.crown import _auto_lirpa_margin

    model = trained_models[name]
    model.train(mode == "train")
    x, y = _inputs(name, digits, n=16)
    ours = margin_lower_bound(model, x, y, EPS[name])
    theirs = _auto_lirpa_margin(model, x, y, EPS[name], "IBP")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.detach().abs().max()))


@requires_auto_lirpa
@pytest.mark.autolirpa
@pytest.mark.parametrize("name", ["mlp", "cnn3", "cnn7"])
def test_crown_is_sound_against_auto_lirpa_crown(name, digits, trained_models):
    model = trained_models[name].eval()
    x, y = _inputs(name, digits, n=8)
    ours = crown_margin_lower_bound(model, x, y, EPS[name])
    theirs = crown_margin_lower_bound(model, x, y, EPS[name], backend="auto_lirpa")
    z_samp, _, _ = sampled_margins(model, x, y, EPS[name], 200)
    assert bool((theirs <= z_samp + 1e-5).all()) and bool((ours <= z_samp + 1e-5).all())
    # With IBP intermediate bounds the two are the same algorithm and agree to rounding. (With
    # CROWN intermediates ours also intersects each with IBP; tighter intermediates can change
    # CROWN's adaptive slopes, so the final bounds may then differ either way, both sound.)
    ours_ibp = crown_margin_lower_bound(model, x, y, EPS[name], intermediate="ibp")
    theirs_ibp = crown_margin_lower_bound(model, x, y, EPS[name], intermediate="ibp", backend="auto_lirpa")
    torch.testing.assert_close(ours_ibp, theirs_ibp, rtol=1e-4, atol=1e-4)


@requires_auto_lirpa
@pytest.mark.autolirpa
def test_full_crown_equals_auto_lirpa_on_random_networks():
    for seed in range(4):
        torch.manual_seed(seed)
        model = small_models(seed)["mlp"].eval()
        x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
        ours = crown_margin_lower_bound(model, x, y, 0.05)
        theirs = crown_margin_lower_bound(model, x, y, 0.05, backend="auto_lirpa")
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

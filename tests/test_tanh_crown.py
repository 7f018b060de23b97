"""The native CROWN through tanh: the relaxation's lines enclose tanh on every interval, the bounds are
sound by sampling and PGD, and they are auto_LiRPA's CROWN bounds (equal when the tangent points are
rounded to auto_LiRPA's grid; otherwise as tight or tighter, within a measured gap)."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import requires_auto_lirpa
from torch import nn

import ccdist_plugin.bounds.crown as crown_module
import ccdist_plugin.bounds.patches as patches_module
from ccdist_plugin.bounds import (
    UnsupportedLayerError,
    certify,
    crown_margin_lower_bound,
    resolve_crown_intermediate,
)
from ccdist_plugin.bounds.alpha_crown import alpha_crown_margin_lower_bound
from ccdist_plugin.bounds.relaxations import (
    RELAXED_ACTIVATIONS,
    activation_relaxation,
    relu_relaxation,
    tanh_relaxation,
)
from ccdist_plugin.models import cnn3, cnn7, mlp
from ccdist_plugin.soundness import attacked_margins, sampled_extremes


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These small networks run fastest on one thread (many threads on a shared CPU spin for ages)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: auto_LiRPA's tanh looks its tangent points up on a grid of this step (of u, and of −l)
AUTO_LIRPA_GRID = 0.01


def _intervals(n: int = 400) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random and adversarial float64 intervals [l, u] (each family n neurons)."""
    g = torch.Generator().manual_seed(0)

    def rand(scale: float = 1.0) -> torch.Tensor:
        return torch.rand(n, generator=g, dtype=torch.float64) * scale

    centre = torch.randn(n, generator=g, dtype=torch.float64) * 3
    lo = torch.randn(n, generator=g, dtype=torch.float64) * 3
    one_ulp = torch.nextafter(centre, centre + 1)
    return {
        "random": (lo, lo + rand(6)),
        "point": (centre, centre.clone()),
        "one ulp": (centre, one_ulp),
        "inverted by an ulp": (one_ulp, centre),
        "tiny": (centre, centre + rand(1e-10)),
        "around 0, tiny": (-rand(1e-7), rand(1e-7)),
        "zero at an end": (-rand(3), torch.zeros(n, dtype=torch.float64)),
        "all negative": (-3 - rand(3), -rand(3)),
        "all positive": (rand(3), 3 + rand(3)),
        "straddling": (-rand(4), rand(4)),
        "lopsided": (-rand(0.05), rand(30)),
        "wide": (-rand(1e4), rand(1e4)),
        "huge": (-1e3 - rand(1e8), 1e3 + rand(1e8)),
        "saturated high": (18 + rand(30), 50 + rand(30)),
        "saturated low": (-80 - rand(30), -18 - rand(3)),
        "into saturation": (-rand(1), 15 + rand(20)),
    }


@pytest.mark.parametrize("family", list(_intervals()))
def test_tanh_lines_enclose_tanh_on_dense_grids(family):
    l, u = _intervals()[family]
    r = tanh_relaxation(l, u)
    lo, hi = torch.minimum(l, u), torch.maximum(l, u)
    grid = torch.linspace(0, 1, 4001, dtype=torch.float64)
    z = torch.cat(
        [lo[:, None] + (hi - lo)[:, None] * grid, lo[:, None], hi[:, None], (lo / 2 + hi / 2)[:, None]], 1
    )
    z = torch.minimum(torch.maximum(z, lo[:, None]), hi[:, None])
    f = torch.tanh(z)
    low = r.lower_slope[:, None] * z + r.lower_intercept[:, None]
    up = r.upper_slope[:, None] * z + r.upper_intercept[:, None]
    assert bool((low <= f).all()), f"lower line above tanh by {(low - f).max():.3g}"
    assert bool((up >= f).all()), f"upper line below tanh by {(f - up).max():.3g}"
    assert bool(((r.lower_slope >= 0) & (r.upper_slope >= 0)).all())
    # not loose: each line touches tanh on [l, u] (to the few ulps of the soundness shift), at an end
    # or where tanh' equals its slope, z = ±arcosh(1/√slope)
    for slope, icpt in ((r.lower_slope, r.lower_intercept), (r.upper_slope, r.upper_intercept)):
        a = torch.acosh(1 / slope.sqrt())
        touch = torch.stack([lo, hi, a.clamp(min=lo, max=hi), (-a).clamp(min=lo, max=hi)], 1)
        gap = (torch.tanh(touch) - slope[:, None] * touch - icpt[:, None]).abs().min(1).values
        assert float(gap.max()) < 1e-9 * float(1 + hi.abs().max())


def test_tanh_lines_enclose_tanh_in_float32_and_at_infinite_bounds():
    l32, u32 = (t.float() for t in _intervals()["random"])
    r = tanh_relaxation(l32, u32)
    z = l32[:, None] + (u32 - l32)[:, None] * torch.linspace(0, 1, 2001)
    assert bool((r.lower_slope[:, None] * z + r.lower_intercept[:, None] <= torch.tanh(z)).all())
    assert bool((r.upper_slope[:, None] * z + r.upper_intercept[:, None] >= torch.tanh(z)).all())
    inf = torch.tensor([float("-inf"), -2.0, float("-inf")], dtype=torch.float64)
    sup = torch.tensor([float("inf"), float("inf"), 1.0], dtype=torch.float64)
    r = tanh_relaxation(inf, sup)  # the constant lines tanh(l) and tanh(u)
    assert torch.equal(r.lower_slope, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(r.upper_slope, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(r.lower_intercept, torch.tanh(inf))
    torch.testing.assert_close(r.upper_intercept, torch.tanh(sup))


def test_tanh_lines_touch_tanh_where_crown_draws_them():
    """Chord ends and tangent points are on tanh (to the few ulps of the soundness shift)."""
    l = torch.tensor([-3.0, 0.5, -0.05, -2.5], dtype=torch.float64)
    u = torch.tensor([-0.5, 3.0, 0.3, 2.0], dtype=torch.float64)
    r = tanh_relaxation(l, u)
    mid = (l + u) / 2
    # convex piece: chord above (through both ends), tangent at the midpoint below; concave: mirrored
    torch.testing.assert_close(
        r.upper_slope[0] * u[0] + r.upper_intercept[0], torch.tanh(u[0]), atol=1e-13, rtol=0
    )
    torch.testing.assert_close(
        r.lower_slope[0] * mid[0] + r.lower_intercept[0], torch.tanh(mid[0]), atol=1e-13, rtol=0
    )
    torch.testing.assert_close(
        r.lower_slope[1] * l[1] + r.lower_intercept[1], torch.tanh(l[1]), atol=1e-13, rtol=0
    )
    torch.testing.assert_close(
        r.upper_slope[1] * mid[1] + r.upper_intercept[1], torch.tanh(mid[1]), atol=1e-13, rtol=0
    )
    # a straddling interval mostly right of 0: the chord stays below tanh (its slope under tanh'(l))
    chord = (torch.tanh(u[2]) - torch.tanh(l[2])) / (u[2] - l[2])
    torch.testing.assert_close(r.lower_slope[2], chord)
    assert float(r.upper_slope[2]) != float(chord)  # but crosses tanh near u: a tangent above
    # wide straddling interval: the lower tangent passes through (u, tanh u), the upper through (l, tanh l)
    torch.testing.assert_close(
        r.lower_slope[3] * u[3] + r.lower_intercept[3], torch.tanh(u[3]), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        r.upper_slope[3] * l[3] + r.upper_intercept[3], torch.tanh(l[3]), atol=1e-12, rtol=0
    )


def test_tanh_is_registered_and_takes_no_optimized_slopes():
    assert nn.Tanh in RELAXED_ACTIVATIONS
    l, u = _intervals()["random"]
    r = activation_relaxation(nn.Tanh(), l, u)
    torch.testing.assert_close(r.upper_intercept, tanh_relaxation(l, u).upper_intercept)
    torch.testing.assert_close(
        activation_relaxation(nn.ReLU(), l, u).upper_slope, relu_relaxation(l, u).upper_slope
    )
    with pytest.raises(TypeError, match="ReLU only"):
        activation_relaxation(nn.Tanh(), l, u, lower_slope=torch.ones_like(l))


@requires_auto_lirpa
def test_tanh_lines_with_auto_lirpas_grid_are_auto_lirpas_lines():
    """The relaxation makes auto_LiRPA's choices: with its tangent-point grid, its very lines."""
    from types import SimpleNamespace

    from auto_LiRPA.operators.s_shaped import BoundTanh

    l, u = _intervals()["random"]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # its tangent table is built in the default dtype
    try:
        op = BoundTanh(attr={}, inputs=[], output_index=0, options={})
        op.opt_stage = None  # plain CROWN, no optimized tangent points
        op.bound_relax(SimpleNamespace(lower=l, upper=u), init=True)
    finally:
        torch.set_default_dtype(default)
    ours = tanh_relaxation(l, u, tangent_grid=AUTO_LIRPA_GRID)
    for mine, theirs in ((ours.lower_slope, op.lw), (ours.upper_slope, op.uw)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)
    for mine, theirs in ((ours.lower_intercept, op.lb), (ours.upper_intercept, op.ub)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)  # ours: a few ulps lower/higher


def _tanh_nets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    nets = {
        "mlp": mlp(1, 8, 10, width=16, depth=3, batch_norm=True, mean=[0.3], std=[0.4], activation="tanh"),
        "cnn3": cnn3(1, 8, 10, width=16, channels=(4, 8), mean=[0.3], std=[0.4], activation="tanh"),
        "cnn7": cnn7(1, 8, 10, width=16, channels=(2, 2, 4, 4, 4), mean=[0.3], std=[0.4], activation="tanh"),
    }
    for net in nets.values():  # running statistics other than (0, 1)
        net.train()
        with torch.no_grad():
            net(torch.rand(64, 1, 8, 8))
        net.eval()
    return nets


def _points(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10


@pytest.mark.parametrize("name", ["mlp", "cnn3", "cnn7"])
def test_native_tanh_crown_is_sound_by_sampling_and_pgd(name):
    net = _tanh_nets()[name]
    x, y = _points()
    for eps in (0.02, 0.1):
        lb = certify(net, x, y, eps, method="crown", intermediate="crown").margin_lb.float()
        sampled = sampled_extremes(net, x, y, eps, 300, torch.Generator().manual_seed(2)).z_min
        attacked = attacked_margins(net, x, y, eps, steps=10)
        off = torch.ones_like(lb, dtype=torch.bool).scatter(1, y.view(-1, 1), False)
        assert bool(torch.isfinite(lb[off]).all())
        assert bool((lb <= sampled + 1e-5)[off].all()), "CROWN bound above a sampled margin"
        assert bool((lb <= attacked + 1e-5)[off].all()), "CROWN bound above a PGD margin"
        # CROWN-IBP (IBP pre-activation bounds) is sound too, and full CROWN no looser on the whole
        cibp = certify(net, x, y, eps, method="crown", intermediate="ibp").margin_lb.float()
        assert bool((cibp <= sampled + 1e-5)[off].all())
        assert float((lb - cibp)[off].mean()) >= 0


def test_tanh_networks_certify_natively_by_default(monkeypatch):
    """No auto_LiRPA needed: the default backend bounds a tanh network with the native CROWN."""
    net = _tanh_nets()["cnn3"]
    x, y = _points(2)
    assert resolve_crown_intermediate(net) == "crown"
    monkeypatch.setitem(sys.modules, "auto_LiRPA", None)  # importing it now fails
    res = certify(net, x, y, 0.02, method="crown")
    off = torch.ones_like(res.margin_lb, dtype=torch.bool).scatter(1, y.view(-1, 1), False)
    assert bool(torch.isfinite(res.margin_lb[off]).all())
    native = crown_margin_lower_bound(net.double(), x.double(), y, 0.02, backend="native")
    torch.testing.assert_close(res.margin_lb.scatter(1, y.view(-1, 1), 0.0), native)


def test_alpha_crown_still_refuses_tanh_and_points_to_crown():
    net = _tanh_nets()["mlp"]
    x, y = _points(2)
    with pytest.raises(UnsupportedLayerError, match="Tanh.*ReLU|ReLU.*Tanh") as info:
        alpha_crown_margin_lower_bound(net, x, y, 0.02)
    assert "CROWN" in str(info.value) and "auto_LiRPA" not in str(info.value)


def _with_auto_lirpas_grid(monkeypatch) -> None:
    """Make the native CROWN relax tanh with auto_LiRPA's tangent-point grid."""

    def relaxation(layer, l, u, lower_slope=None):
        if isinstance(layer, nn.Tanh):
            return tanh_relaxation(l, u, tangent_grid=AUTO_LIRPA_GRID)
        return activation_relaxation(layer, l, u, lower_slope)

    # both CROWN engines (dense back-substitution and patches) take their relaxations by this name
    monkeypatch.setattr(crown_module, "activation_relaxation", relaxation)
    monkeypatch.setattr(patches_module, "activation_relaxation", relaxation)


@requires_auto_lirpa
@pytest.mark.autolirpa
@pytest.mark.parametrize("name", ["mlp", "cnn7"])
def test_native_tanh_crown_against_auto_lirpa(name, monkeypatch):
    """With auto_LiRPA's grid the native CROWN is auto_LiRPA's CROWN (1e-6 relative). With its own
    solved tangent points it differs by the grid's rounding: two tangents of a convex piece cross, so
    neither set of lines is tighter everywhere, and a margin's bound moves either way (measured on
    these networks at ε = 0.1: up to 6e-3 relative, 86-100% of the entries tighter, tighter on
    average; at ε = 0.01 up to 3e-4)."""
    net = _tanh_nets()[name]
    x, y = _points()
    eps = 0.1
    theirs = certify(net, x, y, eps, method="crown", backend="auto_lirpa").margin_lb
    ours = certify(net, x, y, eps, method="crown", intermediate="crown").margin_lb
    off = torch.isfinite(theirs)
    scale = theirs[off].abs()
    assert bool(((ours - theirs)[off].abs() <= 2e-2 * scale + 1e-6).all())
    assert float((ours - theirs)[off].mean()) >= 0, "ours looser than auto_LiRPA's on average"
    _with_auto_lirpas_grid(monkeypatch)
    gridded = certify(net, x, y, eps, method="crown", intermediate="crown").margin_lb
    assert bool(((gridded - theirs)[off].abs() <= 1e-6 * scale + 1e-12).all())

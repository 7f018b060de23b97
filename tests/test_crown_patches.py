"""The patches-form CROWN back-substitution (ccdist_plugin/bounds/patches.py): equal to the dense
engine and to auto_LiRPA's full CROWN, sound by sampling and PGD, memory-budgeted, refusing what it
cannot take with one clear error."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_auto_lirpa
from torch import nn

from ccdist_plugin.bounds import crown_margin_lower_bound
from ccdist_plugin.bounds.crown import crown_relaxation
from ccdist_plugin.bounds.layers import UnsupportedLayerError
from ccdist_plugin.bounds.patches import PatchBudgetError, patch_preact_bounds, patches_supported
from ccdist_plugin.models import CertifiedNet, Normalize, Residual
from ccdist_plugin.soundness import attacked_margins, sampled_extremes

#: (stride, padding, dilation) of the three convolutions of each test network
CONVS = {
    "s1p1": [(1, 1, 1), (1, 1, 1), (1, 1, 1)],
    "s2p1": [(1, 1, 1), (2, 1, 1), (1, 0, 1)],
    "s2p0": [(2, 0, 1), (1, 1, 1), (2, 1, 1)],
    "dilated": [(1, 2, 2), (2, 1, 1), (1, 1, 1)],
}


def _cnn(convs, seed: int = 0, size: int = 10, bn: bool = True, dtype=torch.float64) -> CertifiedNet:
    """A small random CNN (Normalize, then conv-BN-ReLU blocks, Flatten, Linear-ReLU, head) with
    BatchNorm statistics from random inputs, in eval mode."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [Normalize([0.4, 0.5], [0.3, 0.2])]
    c_in, side = 2, size
    for i, (stride, pad, dil) in enumerate(convs):
        c_out = 3 + i
        layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=pad, dilation=dil)]
        layers += [nn.BatchNorm2d(c_out)] if bn else []
        layers += [nn.ReLU()]
        c_in, side = c_out, (side + 2 * pad - dil * 2 - 1) // stride + 1
    layers += [nn.Flatten(), nn.Linear(c_in * side * side, 12), nn.ReLU()]
    net = CertifiedNet(nn.Sequential(*layers), nn.Linear(12, 5), (2, size, size), {"name": "test"})
    net = net.to(dtype)
    with torch.no_grad():
        net.train()(torch.rand(32, 2, size, size, dtype=dtype))
    return net.eval()


def _points(n: int, seed: int = 1, size: int = 10, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, size, size, generator=g).to(dtype), torch.randint(0, 5, (n,), generator=g)


def _assert_rel_close(ours: torch.Tensor, theirs: torch.Tensor, rel: float = 1e-6) -> None:
    scale = theirs.abs().clamp(min=1e-6)
    worst = float(((ours - theirs).abs() / scale).max().detach())
    assert worst <= rel, worst


@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("eps", [0.01, 0.04])
def test_patches_preact_bounds_equal_the_dense_engines(name, eps):
    net = _cnn(CONVS[name])
    x, _ = _points(3)
    dense = crown_relaxation(net, x, eps, "crown", conv_mode="dense")
    nodes, shapes = dense.nodes, dense.shapes
    compared = 0
    for n, node in enumerate(nodes):
        src = node.inputs[0] if node.layer is not None else None
        if not isinstance(node.layer, nn.ReLU) or not patches_supported(nodes, src, shapes):
            continue
        below = {k: v for k, v in dense.preact.items() if k < n}
        # a random subset of the neurons (the dense reference costs a full back-substitution each)
        g = torch.Generator().manual_seed(n)
        neurons = torch.randperm(shapes[src].numel(), generator=g)[:24].sort().values
        ours_l, ours_u = patch_preact_bounds(
            nodes, src, shapes, below, dense.affine, dense.lo, dense.hi, neurons, budget=4096
        )
        # the dense engine's own back-substitution of every neuron (not only the unstable ones)
        from ccdist_plugin.bounds.crown import CrownRelaxation, _dense_bounds

        relaxation_below = CrownRelaxation(nodes, shapes, below, dense.affine, dense.lo, dense.hi)
        ref_l, ref_u = _dense_bounds(relaxation_below, src, (dense.lo, dense.hi), neurons, 24)
        _assert_rel_close(ours_l, ref_l)
        _assert_rel_close(ours_u, ref_u)
        compared += 1
    assert compared == 3  # every convolutional map


@pytest.mark.parametrize("name", list(CONVS))
def test_patches_crown_margins_equal_the_dense_engines(name):
    net = _cnn(CONVS[name], bn=name != "s2p0")
    x, y = _points(4)
    for eps in (0.01, 0.05):
        patches = crown_margin_lower_bound(net, x, y, eps, intermediate="crown", backend="native")
        dense = crown_margin_lower_bound(
            net, x, y, eps, intermediate="crown", backend="native", conv_mode="dense"
        )
        _assert_rel_close(patches, dense)


def test_a_small_budget_chunks_points_and_neurons_without_changing_the_bounds():
    net = _cnn(CONVS["s2p1"])
    x, y = _points(5)
    big = crown_margin_lower_bound(net, x, y, 0.03, intermediate="crown", backend="native")
    # the largest window below the last map is 3 × 9 × 9 (243 coefficients): 2 rows are 486
    small = crown_margin_lower_bound(
        net, x, y, 0.03, intermediate="crown", backend="native", patch_budget=500
    )
    _assert_rel_close(small, big, 1e-12)


def test_a_budget_below_one_neuron_is_one_clear_error_naming_it():
    net = _cnn(CONVS["s1p1"])
    x, y = _points(2)
    with pytest.raises(PatchBudgetError, match="budget of 10 elements") as info:
        crown_margin_lower_bound(net, x, y, 0.03, intermediate="crown", backend="native", patch_budget=10)
    assert isinstance(info.value, ValueError) and not isinstance(info.value, MemoryError)
    assert "conv_mode='dense'" in str(info.value)


def test_an_unknown_conv_mode_is_refused():
    net = _cnn(CONVS["s1p1"])
    x, y = _points(1)
    with pytest.raises(ValueError, match="conv_mode"):
        crown_margin_lower_bound(net, x, y, 0.03, backend="native", conv_mode="sparse")


def test_a_layer_native_crown_cannot_take_is_refused_naming_it_and_the_alternative():
    net = _cnn(CONVS["s1p1"])
    net.features[3] = nn.MaxPool2d(1)  # the first BatchNorm replaced by a layer no native engine bounds
    x, y = _points(1)
    with pytest.raises(UnsupportedLayerError, match="MaxPool2d") as info:
        crown_margin_lower_bound(net, x, y, 0.03, intermediate="crown", backend="native")
    assert "auto_lirpa" in str(info.value).lower() or "ibp" in str(info.value).lower()


def test_residual_and_reflect_padded_maps_fall_back_to_the_dense_path_with_the_same_bounds():
    torch.manual_seed(3)
    block = Residual(
        nn.Sequential(
            nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1)
        ),
        nn.Identity(),
    )
    features = nn.Sequential(
        Normalize([0.5, 0.5], [0.25, 0.25]),
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        block,
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 10),
        nn.ReLU(),
    )
    net = CertifiedNet(features, nn.Linear(10, 5), (2, 10, 10), {"name": "test"}).double()
    with torch.no_grad():
        net.train()(torch.rand(32, 2, 10, 10, dtype=torch.float64))
    net.eval()
    x, y = _points(3)
    patches = crown_margin_lower_bound(net, x, y, 0.02, intermediate="crown", backend="native")
    dense = crown_margin_lower_bound(
        net, x, y, 0.02, intermediate="crown", backend="native", conv_mode="dense"
    )
    _assert_rel_close(patches, dense)
    r = crown_relaxation(net, x, 0.02, "crown")
    supported = [
        patches_supported(r.nodes, node.inputs[0], r.shapes)
        for node in r.nodes
        if isinstance(node.layer, nn.ReLU)
    ]
    assert supported and not any(supported)  # reflect padding at the bottom: every map goes the dense way


@pytest.mark.parametrize("name", ["s1p1", "s2p1"])
def test_patches_crown_is_sound_by_sampling_and_pgd(name):
    net = _cnn(CONVS[name], seed=2).float()
    x, y = _points(3, seed=5, dtype=torch.float32)
    eps = 0.03
    lb = crown_margin_lower_bound(net, x, y, eps, intermediate="crown", backend="native")
    assert torch.isfinite(lb).all()
    sampled = sampled_extremes(net, x, y, eps, samples=32, generator=torch.Generator().manual_seed(0)).z_min
    observed = torch.minimum(sampled, attacked_margins(net, x, y, eps, steps=5))
    assert (lb <= observed + 1e-5).all(), float((lb - observed).max())
    # not vacuous: tighter than IBP's bound somewhere
    from ccdist_plugin.bounds import margin_lower_bound

    assert (lb > margin_lower_bound(net, x, y, eps) + 1e-6).any()


def _auto_lirpa_crown(net: CertifiedNet, x: torch.Tensor, y: torch.Tensor, eps: float, with_ibp: bool):
    """auto_LiRPA's full CROWN; ``with_ibp``: its intermediate bounds intersected with interval
    bounds (``compare_crown_with_ibp``), as the native engine intersects them."""
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

    from ccdist_plugin.bounds.lirpa import margin_spec

    ptb = PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
    default = torch.get_default_dtype()
    torch.set_default_dtype(x.dtype)
    try:
        for mode in ("patches", "matrix"):  # auto_LiRPA's patches mode fails on some strided nets
            # minimum_sparsity 1: neurons stable under the reference keep it, as in the native engine
            opts = {"conv_mode": mode, "compare_crown_with_ibp": with_ibp, "minimum_sparsity": 1.0}
            bounded = BoundedModule(net, x, device="cpu", verbose=False, bound_opts=opts)
            try:
                lb, _ = bounded.compute_bounds(
                    x=(BoundedTensor(x, ptb),),
                    C=margin_spec(y, net.num_classes, x),
                    method="CROWN",
                    bound_upper=False,
                )
                return lb.detach()
            except RuntimeError:
                if mode == "matrix":
                    raise
    finally:
        torch.set_default_dtype(default)


@requires_auto_lirpa
@pytest.mark.autolirpa
@pytest.mark.parametrize("cheap_pass", [False, True])
@pytest.mark.parametrize("name", ["s1p1", "s2p1", "s2p0"])
def test_patches_crown_equals_auto_lirpa_full_crown(name, cheap_pass):
    net = _cnn(CONVS[name], seed=4)
    x, y = _points(3, seed=6)
    for eps in (0.01, 0.04):
        ours = crown_margin_lower_bound(
            net, x, y, eps, intermediate="crown", backend="native", cheap_pass=cheap_pass
        )
        # one point at a time: auto_LiRPA bounds the union of a batch's unstable neurons for every
        # point of it (so a point's bounds depend on its batch); the native engine's do not
        for i in range(x.shape[0]):
            one = slice(i, i + 1)
            # without the cheap pass, equal to auto_LiRPA's CROWN with interval-intersected
            # intermediate bounds (the cheap pass's bounds on the neurons it settles may move
            # later reference intervals: crown_margin_lower_bound's docstring) ...
            if not cheap_pass:
                _assert_rel_close(ours[one], _auto_lirpa_crown(net, x[one], y[one], eps, with_ibp=True))
            # ... and never looser than its default (which does not intersect)
            assert (ours[one] >= _auto_lirpa_crown(net, x[one], y[one], eps, with_ibp=False) - 1e-9).all()

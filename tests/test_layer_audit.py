"""Every layer attribute the bound engines read: supported settings are bounded soundly (against
sampling and PGD, and exactly at ε = 0), unsupported ones raise UnsupportedLayerError naming the layer."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import has_auto_lirpa, requires_auto_lirpa
from torch import nn

from ccdist_plugin.bounds import (
    UnsupportedLayerError,
    certify,
    crown_margin_lower_bound,
    input_box,
    margin_lower_bound,
    propagate_intervals,
    with_batch_statistics,
)
from ccdist_plugin.models import CertifiedNet, Normalize
from ccdist_plugin.soundness import attacked_margins, sampled_extremes

C, SIZE, K = 2, 8, 5


def _net(*layers: nn.Module, width: int, seed: int = 0, train: bool = False) -> CertifiedNet:
    """Normalize + ``layers`` + Flatten/ReLU tail + head, with BatchNorm statistics moved off
    their defaults so that they matter."""
    torch.manual_seed(seed)
    feats = nn.Sequential(Normalize([0.4] * C, [0.3] * C), *layers)
    net = CertifiedNet(feats, nn.Linear(width, K), (C, SIZE, SIZE), {"name": "audit"})
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            with torch.no_grad():
                m.weight.uniform_(-1.5, 1.5)  # negative scales too
    return net.train(train)


def _conv_net(conv: nn.Conv2d, extra: tuple[nn.Module, ...] = ()) -> CertifiedNet:
    with torch.no_grad():
        probe = conv(torch.zeros(1, C, SIZE, SIZE))
        for layer in extra:
            probe = layer.eval()(probe)
    width = probe.numel()
    return _net(conv, *extra, nn.ReLU(), nn.Flatten(), nn.Linear(width, 16), nn.ReLU(), width=16)


CONVS = {
    "replicate padding": lambda: nn.Conv2d(C, 4, 3, padding=1, padding_mode="replicate"),
    "reflect padding": lambda: nn.Conv2d(C, 4, 3, padding=2, padding_mode="reflect"),
    "circular padding": lambda: nn.Conv2d(C, 4, 3, stride=2, padding=1, padding_mode="circular"),
    "same padding, even kernel": lambda: nn.Conv2d(C, 4, 4, padding="same"),
    "same padding, replicate, dilated": lambda: nn.Conv2d(
        C, 4, 2, padding="same", dilation=2, padding_mode="replicate"
    ),
    "valid padding": lambda: nn.Conv2d(C, 4, 3, padding="valid"),
    "dilation 2, stride 2, odd remainder": lambda: nn.Conv2d(C, 4, 3, stride=2, padding=1, dilation=2),
    "groups 2": lambda: nn.Conv2d(C, 4, 3, stride=1, padding=1, groups=2),
    "depthwise, stride 3": lambda: nn.Conv2d(C, C, 3, stride=3, padding=1, groups=C),
    "no bias": lambda: nn.Conv2d(C, 4, 3, padding=1, bias=False),
}


def _points(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, C, SIZE, SIZE, generator=g), torch.randint(0, K, (n,), generator=g)


def _true_margins(net: nn.Module, x, y):
    with torch.no_grad():
        out = net(x)
    return out.gather(1, y.view(-1, 1)) - out


def _assert_sound(net: CertifiedNet, eps: float = 0.03, crown: bool = True):
    """IBP (and CROWN, CROWN-IBP) exact at ε = 0 and below every sampled and attacked margin."""
    x, y = _points()
    net64 = copy.deepcopy(net).double()
    x64 = x.double()
    bounds = {"ibp": lambda e: margin_lower_bound(net64, x64, y, e)}
    if crown:
        for kind in ("crown", "ibp"):
            bounds[f"crown/{kind}"] = lambda e, kind=kind: crown_margin_lower_bound(
                net64, x64, y, e, intermediate=kind
            )
    exact = _true_margins(net64, x64, y)
    for name, bound in bounds.items():
        torch.testing.assert_close(bound(0.0), exact, rtol=0, atol=1e-9, msg=f"{name} at eps 0")
    z = sampled_extremes(net, x, y, eps, 300, torch.Generator().manual_seed(0)).z_min
    z = torch.minimum(z, attacked_margins(net, x, y, eps, steps=20)).double()
    for name, bound in bounds.items():
        lb = bound(eps)
        assert bool((lb <= z + 1e-5).all()), f"{name}: bound above an observed margin by {(lb - z).max():.3g}"


@pytest.mark.parametrize("case", list(CONVS))
def test_conv_attributes_are_bounded_soundly(case):
    _assert_sound(_conv_net(CONVS[case]()).eval())


def test_replicate_padding_is_not_bounded_as_zero_padding():
    """The fault of issue 15: replicate padding bounded as zeros gave a lower bound above the true
    margin at ε = 0. Here the inputs are far from 0 so that the two paddings differ a lot."""
    net = _conv_net(nn.Conv2d(C, 4, 3, padding=1, padding_mode="replicate")).eval()
    x, y = _points()
    x = 0.5 + 0.5 * x
    zero_padded = copy.deepcopy(net)
    zero_padded.features[1].padding_mode = "zeros"
    assert not torch.allclose(_true_margins(net, x, y), _true_margins(zero_padded, x, y), atol=1e-3)
    torch.testing.assert_close(
        margin_lower_bound(net, x, y, 0.0), _true_margins(net, x, y), rtol=0, atol=1e-4
    )


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("bn", ["affine=False", "momentum=None", "no bias"])
def test_batchnorm_attributes_are_bounded_soundly(bn, train):
    def make(ch, dim):
        cls = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
        if bn == "affine=False":
            return cls(ch, affine=False)
        if bn == "momentum=None":
            return cls(ch, momentum=None)
        layer = cls(ch)
        layer.bias = None  # a hand-built layer without shift
        return layer

    net = _net(
        nn.Conv2d(C, 4, 3, stride=2, padding=1, bias=False),
        make(4, 2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 16, bias=False),
        make(16, 1),
        nn.ReLU(),
        width=16,
        train=train,
    )
    x, _ = _points()
    target = with_batch_statistics(net, x) if train else net
    state = copy.deepcopy(net.state_dict())
    _assert_sound_against(net, target)
    for key, value in net.state_dict().items():  # the bounds left the model as it was
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def _assert_sound_against(net: CertifiedNet, target: CertifiedNet, eps: float = 0.03):
    """Bounds of ``net`` (train mode: with the clean batch's statistics) below the margins of
    ``target``, the fixed function they describe."""
    x, y = _points()
    z = sampled_extremes(target, x, y, eps, 300, torch.Generator().manual_seed(0)).z_min
    z = torch.minimum(z, attacked_margins(target, x, y, eps, steps=20))
    for kind in ("crown", "ibp"):
        lb = crown_margin_lower_bound(net, x, y, eps, intermediate=kind)
        assert bool((lb <= z + 1e-5).all()), kind
    assert bool((margin_lower_bound(net, x, y, eps) <= z + 1e-5).all())
    torch.testing.assert_close(
        margin_lower_bound(net, x, y, 0.0), _true_margins(target, x, y), atol=1e-5, rtol=0
    )


def test_batchnorm_without_running_stats_is_bounded_in_train_mode_and_refused_in_eval_mode():
    net = _net(
        nn.Conv2d(C, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 16),
        nn.ReLU(),
        width=16,
        train=True,
    )
    x, y = _points()
    _assert_sound_against(net, with_batch_statistics(net, x))
    net.eval()
    for call in (
        lambda: margin_lower_bound(net, x, y, 0.01),
        lambda: crown_margin_lower_bound(net, x, y, 0.01),
        lambda: certify(net, x, y, 0.01),
    ):
        with pytest.raises(UnsupportedLayerError, match="track_running_stats=False"):
            call()


@pytest.mark.parametrize(
    "pool",
    [
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        nn.AvgPool2d(2, divisor_override=3),
    ],
    ids=["ceil_mode", "ceil_mode, count_include_pad=False", "divisor_override"],
)
def test_avgpool_attributes_are_bounded_soundly_by_ibp_and_native_crown(pool):
    # native CROWN pulls coefficients back through average pooling by autograd (the adjoint of
    # the layer's own linear map), so every pooling attribute is handled; exact at ε = 0
    conv = nn.Conv2d(C, 4, 3, padding=1)
    with torch.no_grad():
        width = pool(conv(torch.zeros(1, C, SIZE, SIZE))).numel()
    net = _net(conv, nn.ReLU(), pool, nn.Flatten(), nn.Linear(width, 16), nn.ReLU(), width=16).eval()
    _assert_sound(net)


def test_inplace_relu_does_not_overwrite_the_stored_preactivation_bounds():
    plain = _conv_net(nn.Conv2d(C, 4, 3, padding=1)).eval()
    inplace = copy.deepcopy(plain)
    for i, layer in enumerate(inplace.features):
        if isinstance(layer, nn.ReLU):
            inplace.features[i] = nn.ReLU(inplace=True)
    x, y = _points()
    lo, hi = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    ref = propagate_intervals(plain.features, lo, hi, reference=x)
    got = propagate_intervals(inplace.features, lo, hi, reference=x)
    assert bool((got.preact_bounds[0][0] < 0).any())  # stored before the activation, not clamped
    for (a, b), (c, d) in zip(ref.preact_bounds, got.preact_bounds, strict=True):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, d)
    _assert_sound(inplace)


class _ScaledConv(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    "layer,match",
    [
        (nn.MaxPool2d(2, ceil_mode=True), "MaxPool2d"),
        (nn.LeakyReLU(), "LeakyReLU"),
        (nn.InstanceNorm2d(4), "InstanceNorm2d"),
        (nn.Dropout2d(), "Dropout2d"),
    ],
)
def test_unknown_layers_are_refused_by_name(layer, match):
    """The native engine refuses them by name; the default backend hands them to auto_LiRPA, whose
    bound must then be sound (or it too refuses, naming the layer)."""
    net = _conv_net(nn.Conv2d(C, 4, 3, padding=1), extra=(layer,)).eval()
    x, y = _points()
    lo, hi = input_box(x, 0.01)
    with pytest.raises(UnsupportedLayerError, match=match):
        propagate_intervals(net.features, lo, hi, backend="native")
    with pytest.raises(UnsupportedLayerError, match=match):
        crown_margin_lower_bound(net, x, y, 0.01, backend="native")
    try:
        lb = margin_lower_bound(net, x, y, 0.01)
    except UnsupportedLayerError as err:
        assert re.search(match, str(err)), err
        return
    z = sampled_extremes(net, x, y, 0.01, 200, torch.Generator().manual_seed(0)).z_min
    assert bool((lb <= z + 1e-5).all())


def test_a_subclass_that_overrides_forward_is_refused_natively():
    """The native engine would read it as a Conv2d; the default backend traces its real forward
    through auto_LiRPA instead, and that bound must be sound."""
    net = _conv_net(_ScaledConv(C, 4, 3, padding=1)).eval()
    x, y = _points()
    lo, hi = input_box(x, 0.01)
    with pytest.raises(UnsupportedLayerError, match="_ScaledConv overrides Conv2d.forward"):
        propagate_intervals(net.features, lo, hi, backend="native")
    if not has_auto_lirpa():  # then no engine bounds it: the error names the layer and the install
        with pytest.raises(UnsupportedLayerError, match="_ScaledConv.*ccdist install-verifier"):
            margin_lower_bound(net, x, y, 0.01)
        return
    lb = margin_lower_bound(net, x, y, 0.01)
    z = sampled_extremes(net, x, y, 0.01, 200, torch.Generator().manual_seed(0)).z_min
    assert bool((lb <= z + 1e-5).all())


def test_a_forward_pre_hook_is_refused():
    """The old torch.nn.utils.weight_norm recomputes the weight in a pre-hook: between a training
    step and the next forward, ``layer.weight`` is stale, so the bounds would describe another net."""
    net = _conv_net(nn.Conv2d(C, 4, 3, padding=1)).eval()
    net.features[1].register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    x, y = _points()
    with pytest.raises(UnsupportedLayerError, match="pre-hook"):
        margin_lower_bound(net, x, y, 0.01)


def test_flatten_over_the_batch_is_refused():
    net = _conv_net(nn.Conv2d(C, 4, 3, padding=1)).eval()
    net.features[3] = nn.Flatten(start_dim=0)
    x, y = _points()
    with pytest.raises(UnsupportedLayerError, match="batch dimension"):
        margin_lower_bound(net, x, y, 0.01)


def test_dropout_in_train_mode_is_refused():
    net = _conv_net(nn.Conv2d(C, 4, 3, padding=1), extra=(nn.Dropout(0.5),)).train()
    x, y = _points()
    with pytest.raises(UnsupportedLayerError, match="Dropout"):
        margin_lower_bound(net, x, y, 0.01)


@requires_auto_lirpa
@pytest.mark.autolirpa
@pytest.mark.parametrize("case", ["groups 2", "no bias"])
def test_conv_attributes_match_auto_lirpa_crown_ibp(case):
    """Both backends run the same algorithm with IBP intermediate bounds: equal to rounding."""
    net = _conv_net(CONVS[case]()).eval()
    x, y = _points()
    ours = crown_margin_lower_bound(net, x, y, 0.02, intermediate="ibp")
    theirs = crown_margin_lower_bound(net, x, y, 0.02, intermediate="ibp", backend="auto_lirpa")
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@requires_auto_lirpa
@pytest.mark.autolirpa
def test_auto_lirpa_crown_through_a_dilated_convolution_is_refused():
    """auto_LiRPA's full CROWN gave bounds 0.01-0.09 above sampled margins on these networks
    (dilation 2, stride 1 and 2); the native backend is sound on them (test above)."""
    net = _conv_net(CONVS["dilation 2, stride 2, odd remainder"]()).eval()
    x, y = _points()
    with pytest.raises(UnsupportedLayerError, match="dilated"):
        crown_margin_lower_bound(net, x, y, 0.02, intermediate="crown", backend="auto_lirpa")

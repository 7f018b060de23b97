"""Full CROWN (CROWN intermediate bounds) on PreActResNet18: equal to auto_LiRPA's CROWN where auto_LiRPA
finishes, sound against sampling and PGD, and a memory budget too small for one neuron refused by name."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import briefly_trained, requires_auto_lirpa
from torch import nn

from ccdist_plugin.bounds import certify, crown_margin_lower_bound
from ccdist_plugin.bounds.crown import CrownBudgetError, _node_shapes, crown_relaxation
from ccdist_plugin.models import CertifiedNet, cnn7, preact_resnet18
from ccdist_plugin.soundness import attacked_margins, sampled_extremes

EPS = 0.03


def small_prn(seed: int, channels: int = 1, size: int = 8, width: int = 2) -> CertifiedNet:
    """A PreActResNet18 small enough for auto_LiRPA's full CROWN in seconds, with BatchNorm statistics
    other than (0, 1) and every other BatchNorm scale negated (radii must use |scale|)."""
    torch.manual_seed(seed)
    model = preact_resnet18(channels, size, 10, mean=[0.3] * channels, std=[0.4] * channels, width=width)
    with torch.no_grad():
        model.train()(torch.rand(64, channels, size, size))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight[::2].neg_()
    return model.eval()


@pytest.fixture(scope="module")
def trained_prn(digits):
    x, y = digits
    return briefly_trained(small_prn(1), x, y, EPS, steps=15).eval()


@pytest.fixture(scope="module")
def trained_cnn(digits):
    """A CNN-7 chain (five convolutions, BatchNorm) on the digits: patches form and the cheap pass."""
    torch.manual_seed(5)
    model = cnn7(1, 8, 10, width=32, channels=(4, 4, 8, 8, 8), mean=[0.3], std=[0.4])
    return briefly_trained(model, *digits, EPS, steps=15).eval()


def _unstable_below_reference(model: CertifiedNet, x: torch.Tensor, eps: float) -> int:
    """How many pre-activations full CROWN back-substituted (unstable under their reference)."""
    r = crown_relaxation(model, x, eps, "crown")
    return sum(int(((l < 0) & (u > 0)).sum()) for l, u in r.preact.values())


@requires_auto_lirpa
@pytest.mark.autolirpa
@pytest.mark.parametrize(
    "case", ["random-8x8", "trained-8x8", pytest.param("random-3x16x16-width4", marks=pytest.mark.slow)]
)
def test_full_crown_equals_auto_lirpa_on_preact_resnet18(case, digits, trained_prn):
    if case == "trained-8x8":
        model, x, y = copy.deepcopy(trained_prn), digits[0][300:303], digits[1][300:303]
    elif case == "random-8x8":
        model, x, y = small_prn(2), digits[0][100:103], digits[1][100:103]
    else:
        torch.manual_seed(3)
        model, x, y = small_prn(3, channels=3, size=16, width=4), torch.rand(1, 3, 16, 16), torch.tensor([7])
    model, x, eps = model.double(), x.double(), EPS if case != "random-3x16x16-width4" else 0.008
    # the comparison means something only where full CROWN had unstable neurons to bound
    assert _unstable_below_reference(model, x, eps) > 0
    ours = crown_margin_lower_bound(model, x, y, eps, intermediate="crown", backend="native")
    # one point at a time: auto_LiRPA's bounds of a point depend on the other points of its batch
    # (it bounds the union of their unstable neurons for all of them); ours do not. Its options
    # (crown.py, _auto_lirpa_margin) are those under which it computes the native engine's bounds.
    for i in range(x.shape[0]):
        theirs = crown_margin_lower_bound(
            model, x[i : i + 1], y[i : i + 1], eps, intermediate="crown", backend="auto_lirpa"
        )
        torch.testing.assert_close(ours[i : i + 1], theirs, rtol=1e-6, atol=1e-9)
    # and full CROWN is not CROWN-IBP: the intermediate bounds changed the result
    crown_ibp = crown_margin_lower_bound(model, x, y, eps, intermediate="ibp", backend="native")
    assert float((ours - crown_ibp).abs().max()) > 1e-6


@pytest.mark.parametrize("conv_mode", ["patches", "dense"])
@pytest.mark.parametrize("net", ["prn18", "cnn"])
def test_a_points_full_crown_bounds_do_not_depend_on_its_batch(
    net, conv_mode, trained_prn, trained_cnn, digits
):
    """Every choice (which neurons get a CROWN bound, the cheap pass's verdict) is made per example:
    a point's bounds, intermediate and final, are those it gets alone, whatever its batch."""
    if net == "prn18":
        model, x, y = copy.deepcopy(trained_prn).double(), digits[0][300:306].double(), digits[1][300:306]
    else:  # a chain of convolutions: the patches engine and the cheap first pass
        model, x, y = copy.deepcopy(trained_cnn).double(), digits[0][300:306].double(), digits[1][300:306]
    r = crown_relaxation(model, x, EPS, "crown", conv_mode=conv_mode)
    batch = crown_margin_lower_bound(model, x, y, EPS, intermediate="crown", conv_mode=conv_mode)
    for i in range(x.shape[0]):
        one = slice(i, i + 1)
        alone = crown_margin_lower_bound(
            model, x[one], y[one], EPS, intermediate="crown", conv_mode=conv_mode
        )
        torch.testing.assert_close(batch[one], alone, rtol=0, atol=1e-12)
        r_alone = crown_relaxation(model, x[one], EPS, "crown", conv_mode=conv_mode)
        for n, (l, u) in r.preact.items():
            torch.testing.assert_close(l[one], r_alone.preact[n][0], rtol=0, atol=1e-12)
            torch.testing.assert_close(u[one], r_alone.preact[n][1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("state", ["random", "trained"])
def test_full_crown_on_preact_resnet18_contains_sampled_and_pgd_points(state, digits, trained_prn):
    model = trained_prn if state == "trained" else small_prn(4)
    x, y = digits[0][200:204], digits[1][200:204]
    z = crown_margin_lower_bound(model, x, y, EPS, intermediate="crown", backend="native")
    ext = sampled_extremes(model, x, y, EPS, 100, torch.Generator().manual_seed(0))
    z_pgd = attacked_margins(model, x, y, EPS, steps=5)
    tol = 1e-5
    assert bool((z <= ext.z_min + tol).all()), "full CROWN margin bound above a sampled margin"
    assert bool((z <= z_pgd + tol).all()), "full CROWN margin bound above a PGD margin"
    # the float64 certificate of the same bounds: no point it certifies is broken by PGD
    cert = certify(model, x, y, EPS, method="crown", intermediate="crown")
    broken = (z_pgd.scatter(1, y.view(-1, 1), float("inf")) <= 0).any(1)
    assert not bool((cert.certified & broken).any())


def test_full_crown_one_neuron_per_pass_gives_the_same_bounds(trained_prn, digits):
    model = copy.deepcopy(trained_prn).double()
    x, y = digits[0][:1].double(), digits[1][:1]
    largest = max(math.prod(s) for s in _node_shapes(model.features, x))
    default = crown_margin_lower_bound(model, x, y, EPS, intermediate="crown")
    # the smallest budget that holds the margins (10 rows) of one example: one neuron per pass
    tight = crown_margin_lower_bound(model, x, y, EPS, intermediate="crown", budget=10 * largest)
    torch.testing.assert_close(tight, default, rtol=0, atol=1e-12)


@pytest.mark.parametrize("intermediate", ["crown", "ibp"])
def test_a_budget_too_small_for_one_neuron_is_one_error_naming_it(intermediate, digits):
    model = small_prn(5)
    x, y = digits[0][:2], digits[1][:2]
    with pytest.raises(
        CrownBudgetError, match="CROWN memory budget of 100 coefficient elements is too small"
    ):
        crown_margin_lower_bound(model, x, y, EPS, intermediate=intermediate, backend="native", budget=100)
    with pytest.raises(CrownBudgetError, match="budget of 100 "):
        crown_relaxation(model, x, EPS, "crown", budget=100)
    # the same through the float64 certificate (what ccdist eval calls)
    with pytest.raises(CrownBudgetError, match="budget of 100 "):
        certify(model, x, y, EPS, method="crown", intermediate=intermediate, budget=100)


@pytest.mark.slow
def test_full_crown_on_a_width_8_preact_resnet18_at_32x32_is_sound():
    """The network of benchmarks/resnet_cpu.py (untrained): one point, minutes on a CPU."""
    torch.manual_seed(0)
    model = preact_resnet18(3, 32, 10, width=8)
    with torch.no_grad():
        model.train()(torch.rand(64, 3, 32, 32))
    model.eval()
    x, y = torch.rand(1, 3, 32, 32), torch.tensor([3])
    eps = 2 / 255
    z = crown_margin_lower_bound(model, x, y, eps, intermediate="crown", backend="native")
    ext = sampled_extremes(model, x, y, eps, 200, torch.Generator().manual_seed(0))
    z_pgd = attacked_margins(model, x, y, eps, steps=10)
    assert bool((z <= ext.z_min + 1e-5).all()) and bool((z <= z_pgd + 1e-5).all())


def test_benchmark_full_crown_evaluation_counts_what_certify_proves(digits, trained_prn):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from reproduction.measure import evaluate_full_crown

    x, y = digits[0][400:412], digits[1][400:412]
    out = evaluate_full_crown(trained_prn, x, y, EPS, points=8, soundness_samples=50)
    assert out["points"] == 8 and out["unsound_points"] == 0
    # every bounded point's bounds checked against 50 samples and PGD, none above an observed margin
    assert out["soundness_checked_points"] == out["crown_bounded_points"] > 0
    assert out["bound_violations"] == 0 and out["bound_slack_min"] >= 0
    # the check itself: bounds raised above the observed margins are counted, one per logit difference
    from reproduction.measure import _BoundCheck

    check = _BoundCheck(trained_prn, EPS, samples=5)
    lb = certify(trained_prn, x[:1], y[:1], EPS, method="ibp").margin_lb
    check.add(x[:1], y[:1], lb.clone())
    assert check.summary()["bound_violations"] == 0
    check.add(x[:1], y[:1], lb + 100.0)
    assert check.summary()["bound_violations"] == trained_prn.num_classes - 1
    ibp = certify(trained_prn, x[:8], y[:8], EPS, method="ibp").certified
    full = certify(trained_prn, x[:8], y[:8], EPS, method="crown", intermediate="crown").certified
    assert out["ibp_cert_acc"] == pytest.approx(float(ibp.float().mean()))
    assert out["crown_cert_acc"] == pytest.approx(float((ibp | full).float().mean()))
    assert out["crown_bounded_points"] <= 8 and out["crown_cpu_s_per_point"] >= 0
    # full CROWN bounded exactly the correct points IBP left, one CPU time each
    correct = trained_prn(x[:8]).argmax(1) == y[:8]
    assert out["crown_bounded"] == torch.nonzero(correct & ~ibp).flatten().tolist()
    assert len(out["crown_cpu_s_points"]) == out["crown_bounded_points"] == len(out["crown_bounded"])


@pytest.mark.parametrize("conv_mode", ["patches", "dense"])
@pytest.mark.parametrize("net", ["prn18", "cnn"])
def test_inplace_relus_give_the_same_full_crown_bounds(net, conv_mode, trained_prn, trained_cnn, digits):
    """The cheap pass and the reference walk apply activations to stored bounds: an
    ``inplace=True`` ReLU must not overwrite them (it would clamp lower bounds to 0 and make
    unstable neurons look stable)."""
    plain = copy.deepcopy(trained_prn if net == "prn18" else trained_cnn).double()
    inplace = copy.deepcopy(plain)
    relus = [m for m in inplace.modules() if isinstance(m, nn.ReLU)]
    assert relus
    for m in relus:
        m.inplace = True
    x, y = digits[0][300:303].double(), digits[1][300:303]
    ref = crown_relaxation(plain, x, EPS, "crown", conv_mode=conv_mode)
    got = crown_relaxation(inplace, x, EPS, "crown", conv_mode=conv_mode)
    assert any(bool((l < 0).any()) for l, _ in got.preact.values())
    for n, (l, u) in ref.preact.items():
        torch.testing.assert_close(got.preact[n][0], l, rtol=0, atol=0)
        torch.testing.assert_close(got.preact[n][1], u, rtol=0, atol=0)
    z_plain = crown_margin_lower_bound(plain, x, y, EPS, intermediate="crown", conv_mode=conv_mode)
    z_inplace = crown_margin_lower_bound(inplace, x, y, EPS, intermediate="crown", conv_mode=conv_mode)
    torch.testing.assert_close(z_inplace, z_plain, rtol=0, atol=0)

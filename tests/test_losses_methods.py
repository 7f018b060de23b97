"""Issue 16's remaining methods: CROWN-IBP, IBP-R / IBP-R-Dist, distillation on the earlier feature
space (appendix E.9), clean-teacher presets. Properties, special cases, soundness, short training runs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import AUTO_LIRPA_MISSING
from torch import nn

from ccdist_plugin.attacks import PGD, pgd_attack
from ccdist_plugin.bounds import (
    crown_margin_lower_bound,
    flat_layers,
    input_box,
    propagate_intervals,
    with_batch_statistics,
)
from ccdist_plugin.bounds.crown_ibp import crown_ibp_margin_bounds
from ccdist_plugin.bounds.penultimate import penultimate_index, propagate_split
from ccdist_plugin.config import LossConfig, TrainConfig, load_preset
from ccdist_plugin.losses import (
    CCDistLoss,
    CrownIBPLoss,
    IBPRDistLoss,
    IBPRLoss,
    cc_combination,
    distillation_term,
    loss_inputs,
    make_loss,
    margin_ce,
    ramp_progress,
)
from ccdist_plugin.models import CertifiedNet, Normalize, Residual, cnn3, mlp, preact_resnet18

EPS = 0.05


def net(seed=0, width=24, batch_norm=True):
    torch.manual_seed(seed)
    return mlp(1, 8, 10, width=width, depth=2, batch_norm=batch_norm)


def conv(seed=0, channels=(4, 8), width=16):
    torch.manual_seed(seed)
    return cnn3(1, 8, 10, width=width, channels=channels)


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def settle(model, x):
    """Non-trivial running statistics (and negative BatchNorm scales) so that eval mode is tested."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.mul_(torch.where(torch.rand_like(m.weight) < 0.3, -1.0, 1.0))
    return model


def running_stats(model):
    return [b.clone() for name, b in model.named_buffers() if "running" in name]


def margins(model, x, y):
    logits = model(x)
    return logits.gather(1, y.view(-1, 1)) - logits


def assert_never_violated(model, x, y, eps, lb, samples=200):
    """Sampled and PGD points of the ball never have a logit difference below ``lb``."""
    lo, hi = input_box(x, eps)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(samples // 20):
            pts = lo + (hi - lo) * torch.rand((20,) + x.shape, generator=g)
            for p in pts:
                assert bool((margins(model, p, y) >= lb - 1e-5).all())
    for target in range(10):  # a margin attack towards each class
        x_adv = pgd_attack(model, x, y, eps, steps=20, objective="margin", restarts=1)
        with torch.no_grad():
            assert bool((margins(model, x_adv, y) >= lb - 1e-5).all()), target
        assert model.training is False


# ------------------------------------------------------------------------------ earlier features


@pytest.mark.parametrize("make", [net, conv])
@pytest.mark.parametrize("train", [False, True])
def test_split_pass_equals_the_whole_pass(make, train):
    model = make()
    x, _ = batch()
    settle(model, x)
    model.train(train)
    lo, hi = input_box(x, EPS)
    whole = propagate_intervals(model.features, lo, hi, reference=x, keep_all=True)
    part, split = propagate_split(model, lo, hi, reference=x, keep_all=True)
    k = penultimate_index(model)
    assert isinstance(flat_layers(model.features)[k], (nn.Linear, nn.Conv2d))
    assert not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in flat_layers(model.features)[k + 1 :])
    # the earlier space is the input of layer k: the whole pass's bounds after layer k - 1
    torch.testing.assert_close(part.lower, whole.layer_bounds[k - 1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(part.upper, whole.layer_bounds[k - 1][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split.lower, whole.lower, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.upper, whole.upper, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.value, whole.value)
    assert len(split.preact_bounds) == len(whole.preact_bounds)
    assert sorted(split.channel_affine) == sorted(whole.channel_affine)
    # sound: the earlier activations of sampled points lie in the box (eval: running statistics;
    # train: the function the bounds describe, the reference batch's statistics)
    fixed = with_batch_statistics(model, x) if train else model
    layers = flat_layers(fixed.features)[:k]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _ in range(30):
            v = lo + (hi - lo) * torch.rand(x.shape, generator=g)
            for layer in layers:
                v = layer(v)
            assert bool((v >= part.lower - 1e-5).all() and (v <= part.upper + 1e-5).all())


def test_penultimate_distillation_is_r_on_the_earlier_space_with_beta_2_over_w():
    student, teacher = conv(0), conv(1)
    x, y = batch()
    alpha = 0.3
    torch.manual_seed(5)
    out = CCDistLoss(teacher, alpha=alpha, distill_layer="penultimate")(copy.deepcopy(student), x, y, EPS)
    torch.manual_seed(5)
    inp = loss_inputs(student, x, y, EPS, PGD(steps=1, step_size=10.0), True, teacher.eval(), latent=True)
    width = inp.latent_adv.shape[1]
    assert width == 8 * 4 * 4 and width != student.feature_dim  # flattened conv output of cnn3
    r = distillation_term(
        cc_combination(inp.latent_adv, inp.latent_lb, alpha),
        cc_combination(inp.latent_adv, inp.latent_ub, alpha),
        inp.latent_t,
    )
    expected = margin_ce(cc_combination(inp.z_adv, inp.z_lb, alpha), y) + 2.0 / width * r
    torch.testing.assert_close(out.terms["distill"], r.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    # the teacher's earlier activations are its own layers' on the clean input
    with torch.no_grad():
        v = x
        for layer in flat_layers(teacher.features)[: penultimate_index(teacher)]:
            v = layer(v)
    torch.testing.assert_close(inp.latent_t, v.flatten(1))


def test_penultimate_moves_running_statistics_once_and_gradients_skip_the_teacher():
    student, teacher = conv(0), conv(1)
    x, y = batch()
    a, b = copy.deepcopy(student), copy.deepcopy(student).train()
    no_attack = PGD(steps=0, random_start=False)
    loss = CCDistLoss(teacher, alpha=0.5, distill_layer="penultimate", attack=no_attack)
    out = loss(a, x, y, EPS)  # x_adv = x
    with torch.no_grad():
        b(x)  # the split pass moves the statistics exactly as one train-mode forward pass does
    for sa, sb in zip(running_stats(a), running_stats(b), strict=True):
        torch.testing.assert_close(sa, sb)
    bns = [m for m in a.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    counts = [m.num_batches_tracked.item() for m in bns]
    assert counts and all(c == 1 for c in counts)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in a.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_penultimate_width_mismatch_is_one_clear_error():
    student, teacher = conv(0, channels=(4, 8)), conv(1, channels=(4, 6))
    assert student.feature_dim == teacher.feature_dim
    x, y = batch()
    with pytest.raises(ValueError, match="penultimate affine layer has width 96 in the teacher and 128"):
        CCDistLoss(teacher, alpha=0.5, distill_layer="penultimate")(student, x, y, EPS)
    # the default feature space is fine for these two
    CCDistLoss(teacher, alpha=0.5)(student, x, y, EPS)


def test_penultimate_needs_a_plain_affine_layer():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, 16)

        def forward(self, x):
            return self.linear(x)

    features = nn.Sequential(Normalize([0.5], [0.5]), nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), Block())
    model = CertifiedNet(features, nn.Linear(16, 10), (1, 8, 8), {"name": "custom"})
    with pytest.raises(ValueError, match="inside a Block"):
        penultimate_index(model)
    with pytest.raises(ValueError, match="distill_layer must be one of"):
        CCDistLoss(net(1), alpha=0.5, distill_layer="logits")


def test_distill_layer_config_and_build_loss():
    from ccdist_plugin.trainer import build_loss

    with pytest.raises(ValueError, match="loss.distill_layer"):
        LossConfig(distill_layer="head")
    cfg = TrainConfig(eps=0.1).override(["loss.method=cc_dist", "loss.distill_layer=penultimate"])
    loss = build_loss(cfg, teacher=net(1))
    assert loss.distill_layer == "penultimate"
    bad = cfg.override(["loss.method=logit_dist"])
    with pytest.raises(ValueError, match="loss.distill_layer=penultimate is not used by loss .logit_dist."):
        build_loss(bad, teacher=net(1))
    crown = build_loss(TrainConfig(eps=0.1).override(["loss.method=crown_ibp"]))
    assert isinstance(crown, CrownIBPLoss) and crown.eps_target == pytest.approx(0.1)
    ibpr = build_loss(TrainConfig(eps=0.1).override(["loss.method=ibp_r", "loss.attack.eps_factor=2.1"]))
    assert isinstance(ibpr, IBPRLoss) and ibpr.eps_target == pytest.approx(0.1)
    assert ibpr.attack.eps_factor == 2.1


# ------------------------------------------------------------------------------ CROWN-IBP


@pytest.mark.parametrize("make", [net, conv])
def test_crown_ibp_bound_equals_the_evaluation_crown_ibp(make):
    model = make()
    x, y = batch()
    settle(model, x).eval()
    _, lb = crown_ibp_margin_bounds(model, x, y, EPS)
    ref = crown_margin_lower_bound(model, x, y, EPS, intermediate="ibp")
    torch.testing.assert_close(lb, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [net, conv])
@pytest.mark.parametrize("train", [False, True])
def test_crown_ibp_bound_is_never_violated(make, train):
    model = make()
    x, y = batch(n=8)
    settle(model, x)
    model.train(train)
    ibp, lb = crown_ibp_margin_bounds(model, x, y, EPS)
    # train mode: the bound describes the network normalizing with x's batch statistics
    fixed = with_batch_statistics(model, x) if train else model.eval()
    assert_never_violated(fixed, x, y, EPS, lb.detach())
    assert_never_violated(fixed, x, y, EPS, ibp.detach(), samples=40)
    assert torch.isfinite(lb).all()
    with pytest.raises(AssertionError):  # the check does catch a bound above the truth
        assert_never_violated(fixed, x, y, EPS, lb.detach() + 0.5, samples=20)


@pytest.mark.parametrize("train", [False, True])
def test_crown_ibp_bound_matches_auto_lirpa(train):
    pytest.importorskip("auto_LiRPA", reason=AUTO_LIRPA_MISSING)
    from ccdist_plugin.bounds.crown import _auto_lirpa_margin

    model = conv()
    x, y = batch(n=8)
    settle(model, x)
    model.train(train)
    before = running_stats(model)
    _, lb = crown_ibp_margin_bounds(model, x, y, EPS)
    ref = _auto_lirpa_margin(model, x, y, EPS, "CROWN-IBP")
    torch.testing.assert_close(lb.detach(), ref.detach(), rtol=1e-4, atol=1e-4)
    for a, b in zip(before, running_stats(model), strict=True):
        assert torch.equal(a, b)  # neither bound moved the model's statistics


def test_crown_ibp_schedule_and_special_cases():
    model = settle(net(), batch()[0])
    x, y = batch()
    loss = CrownIBPLoss(eps_target=2 * EPS)
    assert loss.weights(0.0) == (1.0, 0.0) and loss.weights(2 * EPS) == (0.0, 0.0)
    assert loss.weights(EPS) == pytest.approx((0.5, 0.0))
    assert ramp_progress(torch.full((4,), EPS), 2 * EPS) == pytest.approx(0.5)
    # at the target ε it is IBP training (CE on the elided IBP margin bound), no back-substitution
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    out = loss(a, x, y, 2 * EPS)
    ibp = make_loss("ibp")(b, x, y, 2 * EPS)
    torch.testing.assert_close(out.loss, ibp.loss)
    assert "crown_ibp" not in out.terms
    # during the ramp: CE on b·CROWN-IBP + (1 − b)·IBP, b = 1 − ε/ε_target
    a = copy.deepcopy(model)
    ramp = CrownIBPLoss(eps_target=4 * EPS)
    start = ramp(a, x, y, EPS)
    weight, _ = ramp.weights(EPS)
    assert weight == pytest.approx(0.75) and "crown_ibp" in start.terms
    ibp_lb, crown = crown_ibp_margin_bounds(copy.deepcopy(model).train(), x, y, EPS)
    mixed = weight * crown + (1 - weight) * ibp_lb
    torch.testing.assert_close(start.loss, margin_ce(mixed, y), rtol=1e-5, atol=1e-5)
    # κ = 1: the clean cross-entropy of the (train-mode) network
    a = copy.deepcopy(model)
    clean = CrownIBPLoss(eps_target=2 * EPS, kappa_start=1.0, kappa_end=1.0)(a, x, y, EPS)
    torch.testing.assert_close(clean.loss, F.cross_entropy(copy.deepcopy(model).train()(x), y))
    for bad in ({"crown_start": 1.5}, {"kappa_end": -0.1}):
        with pytest.raises(ValueError, match="must lie in"):
            CrownIBPLoss(eps_target=EPS, **bad)
    with pytest.raises(ValueError, match="eps_target must be > 0"):
        CrownIBPLoss(eps_target=0.0)


def test_crown_ibp_gradients_batchnorm_and_teacher():
    student, teacher = settle(conv(0), batch()[0]), conv(1)
    x, y = batch()
    ref = copy.deepcopy(student).train()
    loss = CrownIBPLoss(eps_target=2 * EPS, teacher=teacher)
    out = loss(student, x, y, EPS)
    with torch.no_grad():
        ref(x)  # no attack: the clean batch moves the statistics, once
    for a, b in zip(running_stats(student), running_stats(ref), strict=True):
        torch.testing.assert_close(a, b)
    assert "distill" in out.terms and torch.isfinite(out.loss)
    # β R(1): the default β is 5/w
    plain = CrownIBPLoss(eps_target=2 * EPS)(copy.deepcopy(ref), x, y, EPS)
    assert float(out.loss.detach()) > float(plain.loss.detach())
    # the split pass (earlier feature space) gives CROWN-IBP the same record as the whole pass
    early = CrownIBPLoss(eps_target=2 * EPS, teacher=teacher, distill_layer="penultimate")
    out_early = early(copy.deepcopy(ref), x, y, EPS)
    torch.testing.assert_close(out_early.terms["crown_ibp"], plain.terms["crown_ibp"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_early.terms["robust"], plain.terms["robust"], rtol=1e-5, atol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training


class Block(nn.Module):
    """A user's block with its own forward: the native engines do not read it, auto_LiRPA does."""

    def __init__(self, batch_norm: bool = False):
        super().__init__()
        self.linear = nn.Linear(64, 16)
        self.bn = nn.BatchNorm1d(16) if batch_norm else nn.Identity()

    def forward(self, v):
        return torch.relu(self.bn(self.linear(v)))


def test_crown_ibp_without_auto_lirpa_refuses_layers_it_cannot_bound(monkeypatch):
    """Where auto_LiRPA is missing (simulated), a network the native back-substitution cannot take
    gets one error naming the layer, before any work."""
    import ccdist_plugin.bounds.lirpa
    from ccdist_plugin.bounds import UnsupportedLayerError

    def missing():
        raise ImportError("no auto_LiRPA")

    monkeypatch.setattr(ccdist_plugin.bounds.lirpa, "import_auto_lirpa", missing)
    torch.manual_seed(0)
    model = mlp(1, 8, 10, width=16, depth=2, activation="tanh")
    x, y = batch()
    with pytest.raises(UnsupportedLayerError, match="CROWN-IBP"):
        CrownIBPLoss(eps_target=2 * EPS)(model, x, y, EPS)

    features = nn.Sequential(Normalize([0.5], [0.5]), nn.Flatten(), Block())
    custom = CertifiedNet(features, nn.Linear(16, 10), (1, 8, 8), {"name": "custom"})
    before = copy.deepcopy(custom.state_dict())
    with pytest.raises(UnsupportedLayerError, match="Block.*auto_LiRPA"):
        CrownIBPLoss(eps_target=2 * EPS)(custom, x, y, EPS)
    for key, value in custom.state_dict().items():
        assert torch.equal(value, before[key])  # nothing ran


@pytest.mark.parametrize("kind", ["tanh", "wrapped"])
def test_crown_ibp_trains_other_networks_through_auto_lirpa(kind):
    """tanh and a user's block: the loss's bound is auto_LiRPA's CROWN-IBP (train-mode BatchNorm with
    the clean batch's statistics), sound, differentiable, and the statistics move once."""
    pytest.importorskip("auto_LiRPA", reason=AUTO_LIRPA_MISSING)
    from ccdist_plugin.bounds.crown import _auto_lirpa_margin

    torch.manual_seed(0)
    if kind == "tanh":
        model = mlp(1, 8, 10, width=16, depth=2, activation="tanh", batch_norm=True)
    else:
        features = nn.Sequential(Normalize([0.5], [0.5]), nn.Flatten(), Block(batch_norm=True))
        model = CertifiedNet(features, nn.Linear(16, 10), (1, 8, 8), {"name": "custom"})
    x, y = batch()
    settle(model, x)
    ref_model = copy.deepcopy(model).train()
    ref = _auto_lirpa_margin(ref_model, x, y, EPS, "CROWN-IBP").detach()
    loss = CrownIBPLoss(eps_target=4 * EPS)  # b = 0.75 at EPS
    out = loss(model, x, y, EPS)
    torch.testing.assert_close(out.terms["crown_ibp"], margin_ce(ref, y), rtol=1e-5, atol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        ref_model(x)  # one forward pass of the clean batch: what the step should have moved
    for a, b in zip(running_stats(model), running_stats(ref_model), strict=True):
        torch.testing.assert_close(a, b)
    fixed = with_batch_statistics(ref_model, x)
    assert_never_violated(fixed, x, y, EPS, ref, samples=60)


def prn(seed=0):
    """A PreActResNet18 on 1×8×8 inputs (residual joins, strided 1×1 shortcuts, pooling, BatchNorm1d)."""
    torch.manual_seed(seed)
    return preact_resnet18(1, 8, 10, mean=[0.3], std=[0.4], width=2)


def pooled_residual(seed=0):
    """A residual block whose shortcut pools and whose convolution reflects at the border: the two
    adjoints that go through autograd inside the back-substitution."""
    torch.manual_seed(seed)
    features = nn.Sequential(
        Normalize([0.5], [0.25]),
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        Residual(
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU()),
            nn.AvgPool2d(3, stride=1, padding=1),
        ),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 16),
        nn.ReLU(),
    )
    return CertifiedNet(features, nn.Linear(16, 10), (1, 8, 8), {"name": "pooled_residual"})


@pytest.mark.parametrize("make", [prn, pooled_residual])
@pytest.mark.parametrize("train", [False, True])
def test_crown_ibp_on_residual_nets_is_the_evaluation_bound_and_sound(make, train):
    model = settle(make(), batch()[0])
    x, y = batch(n=8)
    model.train(train)
    ibp, lb = crown_ibp_margin_bounds(model, x, y, EPS)
    fixed = with_batch_statistics(model, x) if train else model.eval()
    if not train:  # the training bound is the evaluation's CROWN-IBP (one back-substitution for both)
        ref = crown_margin_lower_bound(model, x, y, EPS, intermediate="ibp", backend="native")
        torch.testing.assert_close(lb.detach(), ref, rtol=1e-5, atol=1e-5)
    assert_never_violated(fixed, x, y, EPS, lb.detach())
    assert bool((lb > ibp + 1e-4).any())  # tighter than IBP somewhere, so it is not IBP by another name
    with pytest.raises(AssertionError):
        assert_never_violated(fixed, x, y, EPS, lb.detach() + 0.5, samples=20)


@pytest.mark.parametrize("train", [False, True])
def test_crown_ibp_on_a_residual_net_matches_auto_lirpa(train):
    pytest.importorskip("auto_LiRPA", reason=AUTO_LIRPA_MISSING)
    from ccdist_plugin.bounds.crown import _auto_lirpa_margin

    model = settle(prn(), batch()[0])
    x, y = batch(n=8)
    model.train(train)
    _, lb = crown_ibp_margin_bounds(model, x, y, EPS)
    ref = _auto_lirpa_margin(model, x, y, EPS, "CROWN-IBP")
    torch.testing.assert_close(lb.detach(), ref.detach(), rtol=1e-4, atol=1e-4)


def test_crown_ibp_gradient_through_residual_pooling_and_reflect_padding():
    """The bound's gradient equals a finite difference (float64): the adjoints computed by autograd
    inside the back-substitution stay differentiable in their coefficients."""
    model = pooled_residual().double().eval()
    x, y = batch(n=4)
    x = x.double()
    weight = model.features[7].weight  # the Linear after the block: its gradient flows through both
    direction = torch.randn_like(weight)

    def bound(step: float) -> float:
        with torch.no_grad():
            weight.add_(step * direction)
            value = crown_ibp_margin_bounds(model, x, y, EPS)[1].sum().item()
            weight.sub_(step * direction)
        return value

    (grad,) = torch.autograd.grad(crown_ibp_margin_bounds(model, x, y, EPS)[1].sum(), weight)
    h = 1e-6
    numeric = (bound(h) - bound(-h)) / (2 * h)
    assert (grad * direction).sum().item() == pytest.approx(numeric, rel=1e-4, abs=1e-6)
    conv_weight = model.features[4].branch[0].weight
    (conv_grad,) = torch.autograd.grad(crown_ibp_margin_bounds(model, x, y, EPS)[1].sum(), conv_weight)
    assert conv_grad.abs().sum() > 0


def test_crown_ibp_trains_a_preact_resnet18_with_a_teacher():
    student, teacher = prn(0), prn(1)
    x, y = batch(n=32)
    loss = CrownIBPLoss(eps_target=2 * EPS, teacher=teacher)
    opt = torch.optim.Adam(student.parameters(), lr=5e-3)
    first = None
    for _ in range(25):
        out = loss(student, x, y, EPS)  # b = 0.5: half CROWN-IBP, half IBP
        assert "crown_ibp" in out.terms and "distill" in out.terms and torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
        opt.step()
        first = float(out.loss) if first is None else first
    assert float(out.loss) < 0.7 * first
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training


# ------------------------------------------------------------------------------ IBP-R


def test_ibp_r_terms_match_their_definition():
    model = settle(net(), batch()[0])
    x, y = batch()
    loss = IBPRLoss(eps_target=None, reg_weight=1e-2)
    torch.manual_seed(3)
    out = loss(copy.deepcopy(model), x, y, EPS)
    assert out.stats.input_lb is not None
    # bounds over the attack's enlarged ball (2.1 ε)
    lo, hi = input_box(x, 2.1 * EPS)
    torch.testing.assert_close(out.stats.input_lb, lo)
    torch.testing.assert_close(out.stats.input_ub, hi)
    ref = copy.deepcopy(model).train()
    torch.manual_seed(3)
    x_adv = PGD(steps=8, step_size=0.25, eps_factor=2.1)(ref, x, y, EPS)
    assert float((x_adv - x).abs().max()) > EPS  # the attack left the ε-ball
    prop = propagate_intervals(ref.features, lo, hi, reference=x_adv)
    c, r = (prop.upper + prop.lower) / 2, (prop.upper - prop.lower) / 2
    lc, lr = ref.head(c), r @ ref.head.weight.abs().T
    bounded = prop.preact_bounds + [(lc - lr, lc + lr)]
    area = torch.stack([(F.relu(-a) * F.relu(b)).flatten(1).sum(1) for a, b in bounded]).mean(0).mean()
    adv = F.cross_entropy(ref.head(prop.value), y)
    torch.testing.assert_close(out.terms["relu_area"], area.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.detach(), (adv + 1e-2 * area).detach(), rtol=1e-5, atol=1e-5)
    # a per-example ε: the same box, example by example
    per_example = IBPRLoss()(copy.deepcopy(model), x, y, torch.full((x.shape[0],), EPS))
    torch.testing.assert_close(per_example.stats.input_lb, lo)
    # ρ = 0 and no ramp: plain adversarial training on the enlarged ball
    torch.manual_seed(3)
    plain = IBPRLoss(reg_weight=0.0)(copy.deepcopy(model), x, y, EPS)
    torch.testing.assert_close(plain.loss.detach(), adv.detach(), rtol=1e-5, atol=1e-6)


def test_ibp_r_ramp_mixes_the_clean_loss_without_moving_statistics_twice():
    model = settle(net(), batch()[0])
    x, y = batch()
    a = copy.deepcopy(model)
    loss = IBPRLoss(eps_target=2 * EPS, attack=PGD(steps=0, random_start=False), reg_weight=0.0)
    out = loss(a, x, y, EPS)  # κ = 1/2; x_adv = x
    ref = copy.deepcopy(model).train()
    logits = ref(x)  # one train-mode pass: the statistics move once, the clean term sees x's statistics
    torch.testing.assert_close(out.terms["clean"], F.cross_entropy(logits, y).detach())
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, y), rtol=1e-5, atol=1e-6)
    for s_a, s_b in zip(running_stats(a), running_stats(ref), strict=True):
        torch.testing.assert_close(s_a, s_b)


def test_ibp_r_mask_skips_misclassified_points():
    model = settle(net(), batch()[0])
    x, y = batch()
    with torch.no_grad():
        y_wrong = (copy.deepcopy(model).train()(x).argmax(1) + 1) % 10  # every clean prediction wrong
    out = IBPRLoss(mask_incorrect=True)(copy.deepcopy(model), x, y_wrong, EPS)
    assert float(out.terms["relu_area"]) == 0.0  # every point misclassified: nothing regularized
    out = IBPRLoss(mask_incorrect=False)(copy.deepcopy(model), x, y_wrong, EPS)
    assert float(out.terms["relu_area"]) > 0.0


def test_ibp_r_dist_is_ibp_r_plus_beta_r0():
    student, teacher = settle(net(0), batch()[0]), net(1)
    x, y = batch()
    torch.manual_seed(4)
    dist = IBPRDistLoss(teacher, eps_target=None)(copy.deepcopy(student), x, y, EPS)
    torch.manual_seed(4)
    base = IBPRLoss(eps_target=None)(copy.deepcopy(student), x, y, EPS)
    ref = copy.deepcopy(student).train()
    torch.manual_seed(4)
    x_adv = PGD(steps=8, step_size=0.25, eps_factor=2.1)(ref, x, y, EPS)
    with torch.no_grad():
        h_adv = propagate_intervals(ref.features, *input_box(x, 2.1 * EPS), reference=x_adv).value
        r0 = ((h_adv - teacher.eval().features(x)) ** 2).sum(1).mean()
    torch.testing.assert_close(dist.terms["distill"], r0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dist.loss.detach(), base.loss.detach() + 5 / 24 * r0, rtol=1e-5, atol=1e-5)
    dist.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="needs a teacher"):
        IBPRDistLoss(None)


# ------------------------------------------------------------------------------ short training runs


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("crown_ibp", {"eps_target": 2 * EPS}),
        ("ibp_r", {"eps_target": EPS, "reg_weight": 1e-2}),
        ("ibp_r_dist", {"eps_target": EPS}),
        ("cc_dist", {"alpha": 0.5, "distill_layer": "penultimate"}),
    ],
)
def test_a_short_training_run_lowers_the_loss(name, kwargs):
    model = conv(0)
    teacher = conv(1)
    x, y = batch(n=32, seed=3)
    if name in ("ibp_r_dist", "cc_dist"):
        kwargs = {**kwargs, "teacher": teacher}
    loss = make_loss(name, **kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    values = []
    for step in range(30):
        torch.manual_seed(step)
        out = loss(model, x, y, EPS)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        values.append(float(out.loss.detach()))
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert last < 0.7 * first, values


# ------------------------------------------------------------------------------ clean-teacher presets


def test_clean_teacher_presets():
    teacher = load_preset("cifar10-2-clean-teacher")
    student = load_preset("cifar10-2-clean-teacher-student")
    paper = load_preset("cifar10-2")
    pgd_teacher = load_preset("cifar10-2-teacher")
    assert teacher.role == "teacher" and teacher.loss.method == "ce"
    assert teacher.eps == pytest.approx(2 / 255) and teacher.optim.l1 == 5e-6
    assert teacher.model == student.model == paper.model
    # everything else as the PGD teacher: SGD, cyclic lr, epochs
    assert (teacher.optim.optimizer, teacher.optim.lr_schedule) == ("sgd", "cyclic")
    assert teacher.schedule == pgd_teacher.schedule
    assert student.teacher.preset == "cifar10-2-clean-teacher"
    assert student.loss.method == "cc_dist" and student.loss.beta == pytest.approx(2 / 512)
    # the student is the paper's cifar10-2 student apart from β and the teacher
    from ccdist_plugin.config import config_diff

    diff = config_diff(student, paper, ignore=("name", "log", "teacher"))
    assert diff == [f"loss.beta: {student.loss.beta!r} != None"], diff


def test_crown_ibp_through_average_pooling():
    torch.manual_seed(0)
    features = nn.Sequential(
        Normalize([0.5], [0.25]),
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 16),
        nn.ReLU(),
    )
    model = CertifiedNet(features, nn.Linear(16, 10), (1, 8, 8), {"name": "pooled"}).eval()
    x, y = batch(n=8)
    ibp, lb = crown_ibp_margin_bounds(model, x, y, EPS)
    assert_never_violated(model, x, y, EPS, lb.detach(), samples=60)
    assert bool((lb >= ibp - 1e-5).any())
    lb.sum().backward()  # the pooling transpose is differentiable
    assert model.features[1].weight.grad is not None
    try:
        from ccdist_plugin.bounds.crown import _auto_lirpa_margin

        ref = _auto_lirpa_margin(model, x, y, EPS, "CROWN-IBP")
    except ImportError:
        return
    torch.testing.assert_close(lb.detach(), ref.detach(), rtol=1e-4, atol=1e-4)

"""The paper's properties of the losses (Proposition 3.2, Lemma 3.3, special cases) and their plumbing."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ccdist_plugin.attacks import PGD
from ccdist_plugin.bounds import elided_margin_lower_bound, feature_bounds, input_box, interval_bounds
from ccdist_plugin.losses import (
    TEACHER_USES,
    AdversarialLoss,
    CCDist0Loss,
    CCDist1Loss,
    CCDistLoss,
    CCIBPLoss,
    IBPLoss,
    LogitDistLoss,
    LossStats,
    cc_combination,
    distillation_term,
    list_losses,
    loss_class,
    loss_inputs,
    make_loss,
    margin_ce,
    register_loss,
)
from ccdist_plugin.models import cnn3, mlp

EPS = 0.05


def pair(width=24, seed=0, batch_norm=False):
    torch.manual_seed(seed)
    student = mlp(1, 8, 10, width=width, depth=2, batch_norm=batch_norm)
    teacher = mlp(1, 8, 10, width=width, depth=2, batch_norm=batch_norm)
    return student, teacher


def batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def inputs_for(student, teacher, x, y):
    return loss_inputs(student, x, y, EPS, PGD(steps=1, step_size=10.0), True, teacher)


def test_r0_is_adversarial_feature_distance_and_r1_the_ibp_worst_case():
    s, t = pair()
    x, y = batch()
    inp = inputs_for(s, t, x, y)
    r0 = distillation_term(
        cc_combination(inp.h_adv, inp.h_lb, 0.0), cc_combination(inp.h_adv, inp.h_ub, 0.0), inp.h_t
    )
    torch.testing.assert_close(r0, ((inp.h_adv - inp.h_t) ** 2).sum(1).mean())
    r1 = distillation_term(inp.h_lb, inp.h_ub, inp.h_t)
    # R(1) upper-bounds the feature distance at every point of the ball (Proposition 3.1) ...
    lo, hi = input_box(x, EPS)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        h_t = t.features(x)
        for _ in range(200):
            h = s.features(lo + (hi - lo) * torch.rand(x.shape, generator=g))
            per_example = ((h - h_t) ** 2).sum(1)
            worst = torch.maximum((inp.h_lb - h_t) ** 2, (inp.h_ub - h_t) ** 2).sum(1)
            assert bool((per_example <= worst + 1e-5).all())
    assert float(r1.detach()) >= float(r0.detach()) - 1e-6


@settings(max_examples=25, deadline=None)
@given(
    a=st.floats(0.0, 1.0),
    b=st.floats(0.0, 1.0),
    width=st.integers(4, 40),
    n=st.integers(2, 9),
    seed=st.integers(0, 1000),
)
def test_r_is_monotone_and_bracketed_in_alpha(a, b, width, n, seed):
    s, t = pair(width=width, seed=seed)
    x, y = batch(n=n, seed=seed)
    inp = inputs_for(s, t, x, y)

    def r(alpha):
        lo = cc_combination(inp.h_adv, inp.h_lb, alpha)
        hi = cc_combination(inp.h_adv, inp.h_ub, alpha)
        return float(distillation_term(lo, hi, inp.h_t))

    lo_a, hi_a = min(a, b), max(a, b)
    assert r(lo_a) <= r(hi_a) + 1e-5 * (1 + abs(r(hi_a)))
    assert r(0.0) - 1e-5 <= r(lo_a) <= r(1.0) + 1e-5 * (1 + abs(r(1.0)))
    # continuity: a small step in alpha moves R by a small amount
    assert abs(r(lo_a) - r(min(1.0, lo_a + 1e-4))) <= 1e-2 * (1 + abs(r(1.0)))


@settings(max_examples=25, deadline=None)
@given(alpha=st.floats(0.0, 1.0), seed=st.integers(0, 1000), k=st.integers(2, 12))
def test_lemma_3_3_cc_logits_are_affine_in_the_cc_features(alpha, seed, k):
    torch.manual_seed(seed)
    s = mlp(1, 8, k, width=16, depth=2).double()
    x, _ = batch(n=6, seed=seed)
    x = x.double()
    y = torch.randint(0, k, (6,))
    inp = loss_inputs(s, x, y, EPS, PGD(steps=1, step_size=10.0), True)
    z_cc = cc_combination(inp.z_adv, inp.z_lb, alpha)
    lo, hi = cc_combination(inp.h_adv, inp.h_lb, alpha), cc_combination(inp.h_adv, inp.h_ub, alpha)
    torch.testing.assert_close(z_cc, elided_margin_lower_bound(s.head, lo, hi, y), rtol=1e-10, atol=1e-10)


def test_cc_ibp_special_cases():
    s, _ = pair()
    x, y = batch()
    x_adv = PGD(steps=1, step_size=10.0)(s, x, y, EPS)
    inp = loss_inputs(s, x, y, EPS, None, True, x_adv=x_adv)
    ibp = IBPLoss()(s, x, y, EPS).loss
    h_lb, h_ub = feature_bounds(s, x, EPS)
    torch.testing.assert_close(ibp, margin_ce(elided_margin_lower_bound(s.head, h_lb, h_ub, y), y))
    cc1 = CCIBPLoss(alpha=1.0)(s, x, y, EPS).loss
    torch.testing.assert_close(cc1, ibp)
    torch.testing.assert_close(
        CCIBPLoss(alpha=0.0).objective(inp)[0], torch.nn.functional.cross_entropy(s(x_adv), y)
    )


def test_adversarial_loss_is_pgd_cross_entropy():
    s, _ = pair()
    x, y = batch()
    torch.manual_seed(5)
    out = AdversarialLoss(PGD(steps=3, step_size=0.25))(s, x, y, EPS)
    torch.manual_seed(5)
    x_adv = PGD(steps=3, step_size=0.25)(s, x, y, EPS)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(s(x_adv), y))
    assert out.stats.preact_bounds == []  # no bounds were computed


@pytest.mark.parametrize("cls", [CCDistLoss, CCDist0Loss, CCDist1Loss, LogitDistLoss])
def test_gradients_reach_the_student_and_never_the_teacher(cls):
    torch.manual_seed(0)
    s, t = cnn3(1, 8, 10, width=16, channels=(4, 8)), cnn3(1, 8, 10, width=16, channels=(4, 8))
    x, y = batch(n=16)
    t.train()
    loss = cls(t, alpha=0.3)
    assert not t.training and all(not p.requires_grad for p in t.parameters())
    running = t.features[2].running_mean.clone()
    out = loss(s, x, y, EPS)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in s.parameters())
    assert all(p.grad is None for p in t.parameters())
    torch.testing.assert_close(t.features[2].running_mean, running)  # teacher BN untouched
    assert "distill" in out.terms and "cc_ibp" in out.terms


def test_cc_dist_is_cc_ibp_plus_beta_r_with_default_beta_5_over_w():
    s, t = pair(width=20)
    x, y = batch()
    loss = CCDistLoss(t, alpha=0.2)
    assert loss.resolved_beta(s) == pytest.approx(5 / 20)
    torch.manual_seed(1)
    out = loss(s, x, y, EPS)
    torch.manual_seed(1)
    x_adv = loss.attack(s, x, y, EPS)
    inp = loss_inputs(s, x, y, EPS, None, True, t, x_adv=x_adv)
    cc = margin_ce(cc_combination(inp.z_adv, inp.z_lb, 0.2), y)
    r = distillation_term(
        cc_combination(inp.h_adv, inp.h_lb, 0.2), cc_combination(inp.h_adv, inp.h_ub, 0.2), inp.h_t
    )
    torch.testing.assert_close(out.loss, cc + 0.25 * r)
    assert LogitDistLoss(t, alpha=0.2).resolved_beta(s) == pytest.approx(1e4 / 20)


def test_batchnorm_protocol_adv_stats_one_forward_each():
    """Attack in eval mode; the adversarial forward and the IBP bounds use the adversarial
    batch's statistics, and BatchNorm running statistics move exactly once, as one train-mode
    forward pass on the adversarial batch moves them."""
    torch.manual_seed(0)
    s = cnn3(1, 8, 10, width=16, channels=(4, 8))
    t = cnn3(1, 8, 10, width=16, channels=(4, 8))
    x, y = batch(n=32)
    s.train()
    bn = s.features[2]
    calls = []
    bn.register_forward_hook(lambda m, i, o: calls.append(m.training))
    loss = CCDistLoss(t, alpha=0.5)
    reference = copy.deepcopy(s)
    tracked = int(bn.num_batches_tracked)
    torch.manual_seed(2)
    out = loss(s, x, y, EPS)
    assert calls and not any(calls)  # only the attack calls the modules, in eval mode
    assert s.training and int(bn.num_batches_tracked) == tracked + 1
    torch.manual_seed(2)
    x_adv = loss.attack(reference, x, y, EPS)
    with torch.no_grad():
        adv_logits = reference(x_adv)  # one train-mode forward on the adversarial batch
    torch.testing.assert_close(bn.running_mean, reference.features[2].running_mean)
    torch.testing.assert_close(bn.running_var, reference.features[2].running_var)
    torch.testing.assert_close(out.stats.logits_adv, adv_logits, rtol=1e-4, atol=1e-5)
    lo, hi = input_box(x, EPS)
    h_lb, _ = interval_bounds(reference.features, lo, hi, reference=x_adv)
    inp = loss_inputs(reference, x, y, EPS, None, True, t, x_adv=x_adv)
    torch.testing.assert_close(inp.h_lb, h_lb)
    assert torch.isfinite(out.loss)


def test_make_loss_registry_and_errors():
    s, t = pair()
    assert {"cc_dist", "cc_ibp", "ibp", "pgd_at", "mtl_ibp", "exp_ibp", "sabr", "logit_dist"} <= set(
        list_losses()
    )
    x, y = batch()
    for name in list_losses():
        kw = {}
        if name in ("cc_ibp", "mtl_ibp", "exp_ibp"):
            kw = {"alpha": 0.5}
        if name in ("cc_dist", "cc_dist0", "cc_dist1", "logit_dist"):
            kw = {"alpha": 0.5, "teacher": t}
        if name == "sabr":
            kw = {"lam": 0.4}
        if name == "crown_ibp":
            kw = {"eps_target": 2 * EPS}
        if name == "ibp_r_dist":
            kw = {"teacher": t}
        out = make_loss(name, **kw)(s, x, y, EPS)
        assert torch.isfinite(out.loss) and out.terms["loss"] == out.loss.detach()
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("ccdist")
    with pytest.raises(ValueError, match="takes"):
        make_loss("ibp", alpha=0.3)
    with pytest.raises(ValueError, match="alpha must lie"):
        CCIBPLoss(alpha=1.5)
    with pytest.raises(ValueError, match="needs a teacher"):
        CCDistLoss(None, alpha=0.5)


def test_mismatched_teacher_is_one_clear_error():
    s = mlp(1, 8, 10, width=24)
    t = mlp(1, 8, 10, width=32)
    x, y = batch()
    with pytest.raises(ValueError, match="feature width: teacher 32 vs student 24"):
        CCDistLoss(t, alpha=0.5)(s, x, y, EPS)
    t2 = mlp(1, 8, 10, width=24, mean=[0.5], std=[0.2])
    with pytest.raises(ValueError, match="normalization"):
        CCDistLoss(t2, alpha=0.5)(s, x, y, EPS)


def test_sabr_box_is_inside_the_ball_and_distills_small_box_bounds():
    s, t = pair()
    x, y = batch()
    sabr = make_loss("sabr", lam=0.3, teacher=t)
    x_adv = sabr.attack(s, x, y, EPS)
    lo, hi = sabr.box(x, x_adv, EPS)
    big_lo, big_hi = input_box(x, EPS)
    assert bool((lo >= big_lo - 1e-7).all()) and bool((hi <= big_hi + 1e-7).all())
    assert bool(((hi - lo) <= 2 * 0.3 * EPS + 1e-6).all())
    out = sabr(s, x, y, EPS)
    assert "distill" in out.terms


# --------------------------------------------------------------------------------------------
# Self-description, the teacher path, typed stats
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_losses())
def test_every_loss_describes_itself_and_its_constructor_matches(name):
    """The description is what the trainer builds from: the constructor takes exactly
    ``arguments()`` (config_keys, option_keys, teacher unless teacher_use is "none")."""
    import inspect

    cls = loss_class(name)
    assert cls.name == name and cls.label and cls.teacher_use in TEACHER_USES
    params = {p for p in inspect.signature(cls.__init__).parameters if p != "self"}
    assert params == set(cls.arguments()), (name, params, cls.arguments())
    labels = [loss_class(n).label for n in list_losses()]
    assert len(set(labels)) == len(labels)  # a report row names one loss


def test_register_loss_refuses_a_malformed_description():
    class Nameless(CCIBPLoss):
        name = ""

    class BadTeacherUse(CCIBPLoss):
        name, label, teacher_use = "bad_teacher_use", "Bad", "sometimes"

    class BadKey(CCIBPLoss):
        name, label, config_keys = "bad_key", "Bad", ("alpha", "lam")

    for cls, message in ((Nameless, "name and a label"), (BadTeacherUse, "teacher_use"), (BadKey, "lam")):
        with pytest.raises(ValueError, match=message):
            register_loss(cls)
    with pytest.raises(ValueError, match="already registered"):

        class Clash(CCIBPLoss):
            name, label = "cc_ibp", "Clash"

        register_loss(Clash)
    assert loss_class("cc_ibp") is CCIBPLoss


def test_teacher_is_frozen_once_and_checked_once_per_student(monkeypatch):
    """check_compatible ran on every batch before; now once per student (a new student is checked)."""
    import ccdist_plugin.losses.base as losses_module

    s, t = pair()
    calls = []
    real = losses_module.check_compatible
    monkeypatch.setattr(losses_module, "check_compatible", lambda a, b: calls.append(b) or real(a, b))
    loss = CCDistLoss(t, alpha=0.5)
    assert not t.training and all(not p.requires_grad for p in t.parameters())
    x, y = batch()
    for _ in range(3):
        loss(s, x, y, EPS)
    assert calls == [s]
    wide = mlp(1, 8, 10, width=32, depth=2)
    with pytest.raises(ValueError, match="feature width"):
        loss(wide, x, y, EPS)
    assert calls == [s, wide]


def test_loss_stats_are_typed():
    s, t = pair()
    x, y = batch()
    out = make_loss("cc_dist", teacher=t, alpha=0.5)(s, x, y, EPS)
    assert isinstance(out.stats, LossStats)
    assert len(out.stats.preact_bounds) == 2 and out.stats.logits_adv.shape == (x.shape[0], 10)
    lo, hi = input_box(x, EPS)
    assert torch.equal(out.stats.input_lb, lo) and torch.equal(out.stats.input_ub, hi)
    assert not out.stats.logits_adv.requires_grad


def test_the_training_step_does_not_recheck_its_own_box(monkeypatch):
    """The loss builds its boxes valid by construction: propagate_intervals' lower <= upper check (a
    device sync) is skipped there, and kept for boxes a user passes in."""
    import ccdist_plugin.bounds.ibp as bounds_module

    calls = []
    monkeypatch.setattr(bounds_module, "check_box", lambda lo, hi: calls.append(1))
    s, _ = pair()
    x, y = batch()
    make_loss("cc_ibp", alpha=0.5)(s, x, y, EPS)
    assert calls == []
    interval_bounds(s.features, *input_box(x, EPS))
    assert calls == [1]

"""Residual networks and networks of your own: preact_resnet18, Residual bounds (native engine and
auto_LiRPA), CertifiedNet.wrap, their soundness, ONNX export and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import briefly_trained, require_abcrown_dir, requires_auto_lirpa
from torch import nn

from ccdist_plugin.bounds import (
    UnsupportedLayerError,
    check_boundable,
    crown_margin_lower_bound,
    feature_bounds,
    input_box,
    margin_lower_bound,
    native_unsupported_layer,
    propagate_intervals,
    with_batch_statistics,
)
from ccdist_plugin.bounds import ibp as bounds
from ccdist_plugin.losses import CCDistLoss
from ccdist_plugin.models import (
    CertifiedNet,
    Normalize,
    Residual,
    check_compatible,
    create_model,
    model_from_arch,
    preact_resnet18,
)
from ccdist_plugin.soundness import attacked_margins, sampled_extremes

EPS = 0.03
SAMPLES = 300


def small_prn(seed: int, width: int = 2) -> CertifiedNet:
    """A PreActResNet18 on 1×8×8 digits, narrow enough for full CROWN in seconds."""
    torch.manual_seed(seed)
    return preact_resnet18(1, 8, 10, mean=[0.3], std=[0.4], width=width)


def negate_some_bn_scales(model: nn.Module) -> nn.Module:
    """Flip the sign of every other BatchNorm scale: |scale| must be used for radii."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight[::2].neg_()
    return model


class PlainResNet(nn.Module):
    """A small ResNet written in plain PyTorch (its own forward, a reused ReLU, a max-pool): not a
    network the native engine reads, so it goes through auto_LiRPA."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(channels * 16, 16)
        self.bn3 = nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(x)
        out = out + self.conv2(self.relu(self.bn2(self.conv1(self.relu(self.bn1(out))))))
        out = self.pool(self.relu(out))
        return self.relu(self.bn3(self.fc(out.flatten(1))))


def plain_resnet(seed: int) -> CertifiedNet:
    torch.manual_seed(seed)
    return CertifiedNet.wrap(PlainResNet(), nn.Linear(16, 10), (1, 8, 8), mean=[0.3], std=[0.4])


# --------------------------------------------------------------------------------------------
# The architecture
# --------------------------------------------------------------------------------------------


def test_preact_resnet18_layout():
    m = preact_resnet18()
    assert isinstance(m, CertifiedNet) and isinstance(m.features[0], Normalize)
    assert m.feature_dim == 512 and m.num_classes == 10 and m.input_shape == (3, 32, 32)
    # the pooling sits before the last BatchNorm + ReLU, so the features are a ReLU output
    tail = list(m.features)[-4:]
    assert [type(t) for t in tail] == [nn.AvgPool2d, nn.Flatten, nn.BatchNorm1d, nn.ReLU]
    assert sum(isinstance(b, Residual) for b in m.modules()) == 8
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)]
    assert [c.out_channels for c in convs] == [64] + [64] * 4 + [128] * 4 + [256] * 4 + [512] * 4
    shortcuts = [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1)]
    assert [(c.out_channels, c.stride[0]) for c in shortcuts] == [(128, 2), (256, 2), (512, 2)]
    x = torch.rand(2, 3, 32, 32)
    m.eval()
    torch.testing.assert_close(m(x), m.head(m.features(x)))
    assert bool((m.features(x) >= 0).all())
    # Shi et al. initialization, as for cnn7
    fan_in = convs[3].weight[0].numel()
    assert float(convs[3].weight.std()) == pytest.approx(math.sqrt(2 * math.pi) / fan_in, rel=0.1)


def test_preact_resnet18_options_and_rebuild():
    m = create_model("preact_resnet18", in_channels=1, input_size=16, num_classes=5, width=4).eval()
    assert m.feature_dim == 32 and m.num_classes == 5
    m2 = model_from_arch(m.arch)
    m2.load_state_dict(m.state_dict())
    x = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(m(x), m2.eval()(x))
    std = preact_resnet18(1, 16, 5, width=4, pool_before_last_bn=False)
    tail = list(std.features)[-4:]
    assert [type(t) for t in tail] == [nn.BatchNorm2d, nn.ReLU, nn.AvgPool2d, nn.Flatten]
    with pytest.raises(ValueError, match="takes no option"):
        create_model("preact_resnet18", channels=[4, 4])
    with pytest.raises(ValueError, match="width"):
        preact_resnet18(width=0)


# --------------------------------------------------------------------------------------------
# Soundness
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_prn(digits):
    x, y = digits
    return briefly_trained(negate_some_bn_scales(small_prn(1)), x, y, EPS, steps=15)


@pytest.mark.parametrize("state", ["random", "trained"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_residual_ibp_and_crown_contain_sampled_and_pgd_points(state, mode, digits, trained_prn):
    x_all, _ = digits
    if state == "trained":
        model = copy.deepcopy(trained_prn)
    else:
        model = negate_some_bn_scales(small_prn(2)).train()
        with torch.no_grad():
            model(x_all[:64])  # running statistics other than (0, 1)
    x, y = x_all[200:208], digits[1][200:208]
    model.train(mode == "train")
    reference = with_batch_statistics(model, x) if mode == "train" else copy.deepcopy(model).eval()
    h_lb, h_ub = feature_bounds(model, x, EPS)
    z_ibp = margin_lower_bound(model, x, y, EPS)
    ext = sampled_extremes(reference, x, y, EPS, SAMPLES, torch.Generator().manual_seed(0))
    z_pgd = attacked_margins(reference, x, y, EPS, steps=10)
    tol = 1e-5
    assert bool((h_lb <= ext.h_min + tol).all()) and bool((ext.h_max <= h_ub + tol).all())
    assert bool((z_ibp <= ext.z_min + tol).all()), "IBP margin bound above a sampled margin"
    assert bool((z_ibp <= z_pgd + tol).all()), "IBP margin bound above a PGD margin"
    # train-mode bounds are those of the network holding the reference batch's statistics
    torch.testing.assert_close(z_ibp, margin_lower_bound(reference, x, y, EPS), rtol=1e-4, atol=1e-4)
    z_crown = crown_margin_lower_bound(reference, x, y, EPS)
    assert bool((z_crown <= ext.z_min + tol).all()), "CROWN margin bound above a sampled margin"
    assert bool((z_crown <= z_pgd + tol).all()), "CROWN margin bound above a PGD margin"


def test_a_join_that_drops_the_shortcut_radius_is_caught(digits, monkeypatch):
    """Fault injection: the sampling check above has teeth on residual nets."""
    model = small_prn(3).eval()
    x, y = digits[0][:8], digits[1][:8]
    lo, hi = input_box(x, 0.1)
    real = bounds._join
    monkeypatch.setattr(bounds, "_join", lambda a, b: (real(a, b)[0], a[1], real(a, b)[2]))
    broken = propagate_intervals(model.features, lo, hi, backend="native")
    monkeypatch.undo()
    ext = sampled_extremes(model, x, y, 0.1, 50, torch.Generator().manual_seed(0))
    assert bool((broken.lower > ext.h_min + 1e-5).any() or (broken.upper < ext.h_max - 1e-5).any())


def test_residual_join_adds_the_branch_intervals():
    torch.manual_seed(0)
    branch, shortcut = nn.Linear(5, 3), nn.Linear(5, 3)
    block = Residual(branch, shortcut)
    lo = torch.rand(4, 5)
    hi = lo + torch.rand(4, 5)
    out = propagate_intervals(block, lo, hi)
    parts = [propagate_intervals(m, lo, hi) for m in (branch, shortcut)]
    centre = sum((p.upper + p.lower) / 2 for p in parts)
    radius = sum((p.upper - p.lower) / 2 for p in parts)
    torch.testing.assert_close(out.lower, centre - radius)
    torch.testing.assert_close(out.upper, centre + radius)
    identity = Residual(nn.Sequential(nn.ReLU()))  # shortcut None: the identity
    got = propagate_intervals(identity, lo - 0.5, hi - 0.5)
    torch.testing.assert_close(got.upper, torch.relu(hi - 0.5) + hi - 0.5)


@requires_auto_lirpa
@pytest.mark.autolirpa
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_native_and_auto_lirpa_ibp_agree_on_preact_resnet18(mode):
    """Equal bounds (1e-5 relative), values, gradients and running-statistics updates on the
    full-width PreActResNet18 (small input to keep it fast), train-mode BatchNorm included."""
    torch.manual_seed(0)
    base = negate_some_bn_scales(preact_resnet18(3, 16, 10, mean=[0.5] * 3, std=[0.25] * 3))
    base.train()
    with torch.no_grad():
        base(torch.rand(16, 3, 16, 16))
    x = torch.rand(4, 3, 16, 16)
    lo, hi = input_box(x, 2 / 255)
    x_adv = (x + 0.005 * torch.randn_like(x)).clamp(lo, hi)
    results = {}
    for backend in ("native", "auto_lirpa"):
        net = copy.deepcopy(base).train(mode == "train")
        prop = propagate_intervals(
            net.features, lo, hi, reference=x_adv, update_running_stats=True, backend=backend
        )
        loss = prop.upper.sum() - prop.lower.sum() + prop.value.pow(2).sum()
        grads = torch.autograd.grad(loss, list(net.features.parameters()))
        results[backend] = (prop, grads, net)
    (ours, our_grads, our_net), (theirs, their_grads, their_net) = results["native"], results["auto_lirpa"]
    for a, b in ((ours.lower, theirs.lower), (ours.upper, theirs.upper), (ours.value, theirs.value)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.detach().abs().max()))
    assert len(ours.preact_bounds) == len(theirs.preact_bounds) == 17
    for g, h in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-3, atol=1e-4 * float(h.abs().max()) + 1e-8)
    for (name, b1), (_, b2) in zip(our_net.named_buffers(), their_net.named_buffers(), strict=True):
        torch.testing.assert_close(b1, b2, rtol=1e-5, atol=1e-6, msg=name)
    # auto_LiRPA shares the parameters: an eval-mode bound must not switch off their gradients
    assert all(p.requires_grad for p in their_net.parameters())


@requires_auto_lirpa
@pytest.mark.autolirpa
def test_native_crown_on_residual_nets_matches_auto_lirpa(trained_prn, digits):
    model = trained_prn.eval()
    x, y = digits[0][300:306], digits[1][300:306]
    ours = crown_margin_lower_bound(model, x, y, EPS, intermediate="ibp", backend="native")
    theirs = crown_margin_lower_bound(model, x, y, EPS, intermediate="ibp", backend="auto_lirpa")
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    full = crown_margin_lower_bound(model, x, y, EPS, backend="native")
    ext = sampled_extremes(model, x, y, EPS, 100, torch.Generator().manual_seed(1))
    assert bool((full <= ext.z_min + 1e-5).all())


# --------------------------------------------------------------------------------------------
# Bring your own model
# --------------------------------------------------------------------------------------------


def test_wrap_picks_the_engine():
    torch.manual_seed(0)
    seq = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        Residual(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
    )
    net = CertifiedNet.wrap(seq, nn.Linear(256, 10), (1, 8, 8))
    assert check_boundable(net) == "native" and native_unsupported_layer(net.features) is None
    assert net.arch["name"] == "wrapped"
    with pytest.raises(ValueError, match="cannot be rebuilt by name"):
        model_from_arch(net.arch)


@requires_auto_lirpa
@pytest.mark.autolirpa
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_same_network_both_engines_equal_bounds(mode):
    """A net both engines accept: forcing either backend gives the same bounds (1e-5 relative)."""
    model = negate_some_bn_scales(small_prn(4, width=4)).train()
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        model(x)
    model.train(mode == "train")
    lo, hi = input_box(x, 0.05)
    a = propagate_intervals(model.features, lo, hi, reference=x, backend="native")
    b = propagate_intervals(model.features, lo, hi, reference=x, backend="auto_lirpa")
    for p, q in ((a.lower, b.lower), (a.upper, b.upper)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5 * float(q.detach().abs().max()))
    for (l1, u1), (l2, u2) in zip(a.preact_bounds, b.preact_bounds, strict=True):
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5 * float(l2.detach().abs().max()))
        torch.testing.assert_close(u1, u2, rtol=1e-5, atol=1e-5 * float(u2.detach().abs().max()))


@requires_auto_lirpa
@pytest.mark.autolirpa
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_plain_pytorch_resnet_bounds_are_sound(mode, digits):
    model = negate_some_bn_scales(plain_resnet(0)).train()
    assert check_boundable(model) == "auto_lirpa"
    x, y = digits[0][:8], digits[1][:8]
    with torch.no_grad():
        model(digits[0][:64])
    model.train(mode == "train")
    reference = with_batch_statistics(model, x) if mode == "train" else copy.deepcopy(model).eval()
    h_lb, h_ub = feature_bounds(model, x, EPS)
    ext = sampled_extremes(reference, x, y, EPS, 200, torch.Generator().manual_seed(0))
    assert bool((h_lb <= ext.h_min + 1e-5).all()) and bool((ext.h_max <= h_ub + 1e-5).all())
    z = margin_lower_bound(model, x, y, EPS)
    assert bool((z <= ext.z_min + 1e-5).all())
    z_pgd = attacked_margins(reference, x, y, EPS, steps=10)
    assert bool((z <= z_pgd + 1e-5).all())
    z_crown = crown_margin_lower_bound(reference, x, y, EPS)  # backend "auto": auto_LiRPA here
    assert bool((z_crown <= ext.z_min + 1e-5).all()) and bool((z_crown <= z_pgd + 1e-5).all())


@requires_auto_lirpa
@pytest.mark.autolirpa
def test_cc_dist_trains_a_wrapped_model_through_auto_lirpa(digits):
    x, y = digits[0][:64], digits[1][:64]
    student, teacher = plain_resnet(0).train(), plain_resnet(1).eval()
    loss_fn = CCDistLoss(teacher=teacher, alpha=0.5)
    bn = student.features[1].bn1
    expected = copy.deepcopy(bn)
    out = loss_fn(student, x, y, EPS)
    out.loss.backward()
    assert math.isfinite(float(out.loss)) and float(out.terms["distill"]) > 0
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert all(p.grad is None for p in teacher.parameters())
    assert int(bn.num_batches_tracked) == int(expected.num_batches_tracked) + 1
    assert not torch.equal(bn.running_mean, expected.running_mean)  # moved by the training pass
    assert len(out.stats.preact_bounds) >= 3  # auto_LiRPA's ReLU inputs, for the Shi regularizer


class SortFeatures(nn.Module):
    """Sorting (ONNX TopK): neither the native engine nor auto_LiRPA bounds it. (Not cumsum:
    auto_LiRPA bounds it once torch.onnx exports it as CumSum, which depends on the opset a
    previous export left set.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sort(dim=1).values


@requires_auto_lirpa
@pytest.mark.autolirpa
def test_bad_models_get_one_clear_error_each():
    features = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), SortFeatures(), nn.ReLU())
    with pytest.raises(UnsupportedLayerError, match=r"no engine can bound.*SortFeatures\(\)") as info:
        CertifiedNet.wrap(features, nn.Linear(8, 3), (1, 8, 8))
    assert isinstance(info.value, ValueError)
    net = CertifiedNet.wrap(features, nn.Linear(8, 3), (1, 8, 8), check_bounds=False)
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(UnsupportedLayerError, match=r"SortFeatures\(\)"):
        margin_lower_bound(net, x, torch.zeros(2, dtype=torch.long), 0.1)
    with pytest.raises(UnsupportedLayerError, match=r"SortFeatures\(\)"):
        propagate_intervals(net.features, x, x, backend="native")
    good = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU())
    with pytest.raises(ValueError, match="head must be an nn.Linear"):
        CertifiedNet.wrap(good, nn.Sequential(nn.Linear(8, 3)), (1, 8, 8))
    with pytest.raises(ValueError, match="the head takes"):
        CertifiedNet.wrap(good, nn.Linear(9, 3), (1, 8, 8))
    with pytest.raises(ValueError, match=r"input_shape must be \(C, H, W\)"):
        CertifiedNet.wrap(good, nn.Linear(8, 3), (64,))
    student = CertifiedNet.wrap(good, nn.Linear(8, 3), (1, 8, 8))
    wide = CertifiedNet.wrap(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU()), nn.Linear(16, 3), (1, 8, 8)
    )
    with pytest.raises(ValueError, match="feature width: teacher 16 vs student 8"):
        check_compatible(wide, student)
    with pytest.raises(ValueError, match="feature width"):
        CCDistLoss(teacher=wide, alpha=0.5)(student, x, torch.zeros(2, dtype=torch.long), 0.1)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def test_residual_net_onnx_matches_pytorch(tmp_path, trained_prn, digits):
    from ccdist_plugin.verification import export_onnx

    model = trained_prn.eval()
    x = model.normalize(digits[0][:32])
    diff = export_onnx(model.without_normalization(), tmp_path / "prn.onnx", model.input_shape, test_inputs=x)
    assert diff <= 1e-5
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "prn.onnx"))
    name = sess.get_inputs()[0].name
    for i in range(4):
        got = sess.run(None, {name: x[i : i + 1].numpy()})[0]
        want = model.without_normalization()(x[i : i + 1]).detach().numpy()
        assert float(abs(got - want).max()) <= 1e-5 * max(1.0, float(abs(want).max()))


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def test_prn18_presets_carry_the_papers_settings():
    from ccdist_plugin.config import load_preset

    teacher, student, ccibp = (load_preset(f"cifar10-2-prn18{s}") for s in ("-teacher", "", "-ccibp"))
    base = load_preset("cifar10-2")
    for cfg in (teacher, student, ccibp):
        assert cfg.model.name == "preact_resnet18" and cfg.model.init == "shi" and cfg.data.name == "cifar10"
        assert cfg.eps == base.eps
    # E.8: teacher 30 epochs with l1 5e-6; student β = 5/w, the cifar10-2 schedule and α
    assert teacher.role == "teacher" and teacher.loss.method == "pgd_at"
    assert teacher.schedule.epochs == 30 and teacher.optim.l1 == 5e-6
    assert (student.loss.method, student.loss.beta, student.teacher.preset) == (
        "cc_dist",
        None,
        "cifar10-2-prn18-teacher",
    )
    assert (ccibp.loss.method, ccibp.teacher.preset) == ("cc_ibp", None)
    for cfg in (student, ccibp):
        assert cfg.schedule == base.schedule and cfg.optim == base.optim
        assert cfg.loss.alpha == base.loss.alpha and cfg.loss.attack == base.loss.attack
    # E.5: a PreActResNet18 teacher (30 epochs, l1 5e-5) for a CNN-7 student with α = 3e-3, l1 5e-5
    t_tiny, s_tiny = load_preset("tinyimagenet-1-prn18-teacher"), load_preset("tinyimagenet-1-prn18")
    assert t_tiny.model.name == "preact_resnet18" and s_tiny.model.name == "cnn7"
    assert (t_tiny.schedule.epochs, t_tiny.optim.l1) == (30, 5e-5)
    assert (s_tiny.loss.method, s_tiny.loss.alpha, s_tiny.optim.l1) == ("cc_dist", 3e-3, 5e-5)
    assert s_tiny.teacher.preset == "tinyimagenet-1-prn18-teacher"


@pytest.mark.parametrize(
    "pair",
    [
        ("cifar10-2-prn18-teacher", "cifar10-2-prn18"),
        ("tinyimagenet-1-prn18-teacher", "tinyimagenet-1-prn18"),
    ],
)
def test_prn18_preset_teachers_fit_their_students(pair):
    from ccdist_plugin.config import load_preset
    from ccdist_plugin.data import dataset_spec
    from ccdist_plugin.trainer import build_model

    teacher_cfg, student_cfg = (load_preset(name) for name in pair)
    spec = dataset_spec(student_cfg.data.name)
    teacher, student = build_model(teacher_cfg, spec), build_model(student_cfg, spec)
    assert teacher.feature_dim == student.feature_dim == 512
    check_compatible(teacher, student)  # feature width, input shape, classes, normalization


@pytest.mark.abcrown
def test_real_abcrown_verifies_a_residual_net(tmp_path, digits):
    """A small residual net on digits, trained briefly, 5 test points exported (ONNX with the residual
    additions + VNN-LIB) and all sent to α,β-CROWN: no error, no soundness alarm, every point our
    CROWN certifies comes back safe, every point PGD broke does not."""
    abcrown = require_abcrown_dir()
    from ccdist_plugin.bounds import certify
    from ccdist_plugin.verification import VerificationResult, export_instances, run_verification

    x, y = digits
    torch.manual_seed(0)
    block = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    features = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        Residual(block),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 16),
        nn.ReLU(),
    )
    model = CertifiedNet.wrap(features, nn.Linear(16, 10), (1, 8, 8), mean=[0.3], std=[0.4])
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(4):
        for b in torch.randperm(1500).split(100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    model.eval()
    xs, ys, eps = x[1500:1505], y[1500:1505], 0.02
    export = export_instances(
        model, (xs, ys), tmp_path / "export", eps, timeout_s=20, methods=("ibp",), verify_all=True
    )
    res = run_verification(
        export.out_dir,
        abcrown_dir=abcrown,
        grace_s=60,
        extra_args=["--pgd_restarts", "2", "--pgd_steps", "20"],
    )
    assert isinstance(res, VerificationResult) and res.abcrown_ran
    assert not res.soundness_alarms, res.soundness_alarms
    verdicts = {r["index"]: r["verdict"] for r in res.instances}
    assert len(verdicts) == 5 and "error" not in verdicts.values(), res.instances
    crown = certify(model, xs, ys, eps, method="crown").certified
    for pos, p in enumerate(export.points):
        v = verdicts[p["index"]]
        if p["ibp_certified"] or bool(crown[pos]):
            assert v == "safe", p
        if p["pgd_broken"] or not p["correct"]:
            assert v != "safe", p
    assert sum(v == "safe" for v in verdicts.values()) >= 1


@requires_auto_lirpa
@pytest.mark.autolirpa
def test_evaluate_certifies_a_wrapped_model_through_auto_lirpa(digits):
    """The default CROWN backend ("auto") sends a network only auto_LiRPA bounds to auto_LiRPA."""
    from ccdist_plugin.evaluation import EvalSettings, evaluate

    model = plain_resnet(0).eval()
    x, y = digits[0][:6], digits[1][:6]
    result = evaluate(model, x, y, EvalSettings(eps=0.01, pgd_steps=2), progress=False)
    crown = [
        k for k, v in result.metrics.items() if "crown" in k and k.endswith("cert_acc") and v is not None
    ]
    assert crown and all(0.0 <= result.metrics[k] <= 1.0 for k in crown), result.metrics


@requires_auto_lirpa
@pytest.mark.autolirpa
def test_auto_lirpa_failing_in_both_conv_modes_is_one_clear_error(monkeypatch):
    """auto_LiRPA 9d100ec fails on a 32×32 PreActResNet18 in patches mode (a shape error) and its
    matrix mode runs out of memory there: injected here, the user gets one error naming both."""
    from auto_LiRPA import BoundedModule

    calls = []

    def failing(self, *args, **kwargs):
        calls.append(self.bound_opts["conv_mode"])
        raise RuntimeError(f"injected failure in {self.bound_opts['conv_mode']} mode")

    monkeypatch.setattr(BoundedModule, "compute_bounds", failing)
    model = small_prn(0).eval()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([1, 2])
    with pytest.raises(UnsupportedLayerError, match="patches mode: injected.*matrix mode: injected.*native"):
        crown_margin_lower_bound(model, x, y, EPS, intermediate="crown", backend="auto_lirpa")
    assert calls == ["patches", "matrix"]

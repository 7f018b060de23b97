"""Evaluation metrics: closed-form answers on a linear model, orderings on a trained digits model,
AutoAttack only when it ran, BaB only when α,β-CROWN ran, and the ``ccdist eval`` command."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from ccdist_plugin import evaluation
from ccdist_plugin.attacks import EVAL_PGD
from ccdist_plugin.bounds import certify
from ccdist_plugin.evaluation import EvalSettings, evaluate, find_autoattack
from ccdist_plugin.models import CertifiedNet, Normalize

EPS = 0.05


def linear_net(seed: int = 0, side: int = 4, classes: int = 5) -> CertifiedNet:
    """f(x) = W x + b in disguise: Normalize(0, 1) → Flatten → Linear(identity) → ReLU → head.

    On inputs in [0.25, 0.75] every feature is positive, so the ReLU is the identity on the whole
    ε-ball (ε ≤ 0.25) and the worst case of z_j = f_y − f_j is z_j(x) − ε‖W_y − W_j‖₁ exactly.
    """
    torch.manual_seed(seed)
    d = side * side
    ident = nn.Linear(d, d)
    with torch.no_grad():
        ident.weight.copy_(torch.eye(d))
        ident.bias.zero_()
    head = nn.Linear(d, classes)
    with torch.no_grad():
        head.weight.normal_(0, 1.0)
        head.bias.normal_(0, 0.5)
    features = nn.Sequential(Normalize([0.0], [1.0]), nn.Flatten(), ident, nn.ReLU())
    return CertifiedNet(features, head, (1, side, side), {"name": "linear-test"}).eval()


def exact_margins(net: CertifiedNet, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, k) exact minima over the ball of f_y − f_j (entry y is 0), float64."""
    w = net.head.weight.double()
    b = net.head.bias.double()
    logits = x.flatten(1).double() @ w.T + b
    z = logits.gather(1, y.view(-1, 1)) - logits
    l1 = (w[y].unsqueeze(1) - w.unsqueeze(0)).abs().sum(-1)  # (B, k): ‖W_y − W_j‖₁
    return z - eps * l1


@pytest.fixture(scope="module")
def linear_case():
    net = linear_net()
    g = torch.Generator().manual_seed(1)
    x = 0.3 + 0.4 * torch.rand(400, 1, 4, 4, generator=g)  # the ball stays inside [0.25, 0.75]
    with torch.no_grad():
        pred = net(x).argmax(1)
    # labels: mostly the prediction, some wrong, so that every category occurs
    y = torch.where(torch.arange(400) % 7 == 0, (pred + 1) % 5, pred)
    m = exact_margins(net, x, y, EPS)
    robust = (m.scatter(1, y.view(-1, 1), float("inf")) > 0).all(1)
    # "far from the boundary": every exact margin at least 1e-3 away from zero
    far = (m.scatter(1, y.view(-1, 1), 1.0).abs() > 1e-3).all(1)
    return net, x[far], y[far], robust[far], m[far]


def test_linear_certified_accuracy_equals_closed_form(linear_case):
    net, x, y, robust, m = linear_case
    assert 0.1 < robust.float().mean() < 0.9, "the case should contain robust and non-robust points"
    for method in ("ibp", "crown"):
        res = certify(net, x, y, EPS, method=method)
        bound = res.margin_lb.scatter(1, y.view(-1, 1), 0.0)
        # the bound is exact here (up to float64 rounding) and never above the true minimum
        assert torch.allclose(bound, m, atol=1e-9), method
        assert torch.equal(res.certified, robust), method
    result = evaluate(net, x, y, EvalSettings(eps=EPS, batch_size=512), progress=False)
    exact = robust.float().mean().item()
    assert result.metrics["ibp_cert_acc"] == pytest.approx(exact)
    assert result.metrics["crown_cert_acc"] == pytest.approx(exact)
    # no attack can beat the exact robust accuracy, and PGD never does better than clean accuracy
    assert exact <= result.metrics["pgd_acc"] <= result.metrics["standard_acc"]
    assert result.soundness_alarms == []
    # IBP loss: the mean CE of −z̲ with the exact z̲
    expected_loss = F.cross_entropy(-m, y).item()
    assert result.metrics["ibp_loss"] == pytest.approx(expected_loss, rel=1e-9)


def test_linear_certified_never_exceeds_exact_near_boundary():
    """Points scattered around the decision boundary (and with box clipping): certification never
    claims a point whose exact worst case is not robust."""
    net = linear_net(seed=3)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(300, 1, 4, 4, generator=g)  # anywhere in [0, 1]: the ball is clipped to the box
    with torch.no_grad():
        y = net(x).argmax(1)
    eps = 0.02
    lo = (x - eps).clamp(0, 1).flatten(1).double()
    hi = (x + eps).clamp(0, 1).flatten(1).double()
    w, b = net.head.weight.double(), net.head.bias.double()
    diff = w[y].unsqueeze(1) - w.unsqueeze(0)  # (B, k, d) rows of f_y − f_j
    # exact minimum over the clipped box of a linear function: each coordinate at its worse end
    worst = torch.where(diff > 0, lo.unsqueeze(1), hi.unsqueeze(1))
    exact = (diff * worst).sum(-1) + (b[y].unsqueeze(1) - b.unsqueeze(0))
    robust = (exact.scatter(1, y.view(-1, 1), float("inf")) > 0).all(1)
    for method in ("ibp", "crown"):
        cert = certify(net, x, y, eps, method=method).certified
        assert not bool((cert & ~robust).any()), f"{method} certified a non-robust point"


def test_pgd_settings_are_recorded_and_validated():
    s = EvalSettings(eps=0.1)
    d = s.to_dict()
    assert (d["pgd_steps"], d["pgd_step_rel"], d["pgd_restarts"]) == (
        EVAL_PGD.steps,
        EVAL_PGD.step_size,
        EVAL_PGD.restarts,
    )
    assert d["pgd_step_size"] == pytest.approx(0.1 * EVAL_PGD.step_size)
    assert s.pgd == EVAL_PGD
    with pytest.raises(ValueError, match="attack"):
        EvalSettings(eps=0.1, attack="fgsm")
    with pytest.raises(ValueError, match="restarts"):
        EvalSettings(eps=0.1, pgd_restarts=0)
    with pytest.raises(ValueError, match="certification methods"):
        EvalSettings(eps=0.1, methods=("ibp", "lp"))
    with pytest.raises(ValueError, match="eps"):
        EvalSettings(eps=float("nan"))


def test_evaluate_rejects_bad_inputs(linear_case):
    net, x, y, _, _ = linear_case
    with pytest.raises(ValueError, match="input"):
        evaluate(net, x[:, :, :2], y, EvalSettings(eps=EPS), progress=False)
    with pytest.raises(ValueError, match="labels"):
        evaluate(net, x, y[:-1], EvalSettings(eps=EPS), progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate(net, x * 3, y, EvalSettings(eps=EPS), progress=False)


def test_autoattack_not_reported_when_unavailable(linear_case, monkeypatch):
    net, x, y, _, _ = linear_case
    monkeypatch.setattr(evaluation, "AUTOATTACK_MODULES", ("no_such_autoattack_module",))
    monkeypatch.setattr(evaluation, "find_autoattack", lambda: None)
    result = evaluate(net, x[:20], y[:20], EvalSettings(eps=EPS, attack="autoattack"), progress=False)
    assert result.metrics["autoattack_acc"] is None
    assert result.autoattack["run"] is False and "no AutoAttack" in result.autoattack["reason"]
    assert "aa_robust" not in result.per_example
    assert result.metrics["pgd_acc"] is not None  # PGD still ran


def test_find_autoattack_skips_missing_modules():
    assert find_autoattack(("no_such_module_a", "no_such_module_b")) is None


@pytest.mark.slow
@pytest.mark.skipif(find_autoattack() is None, reason="no AutoAttack implementation importable")
def test_autoattack_is_sound_on_linear_model(linear_case):
    net, x, y, robust, _ = linear_case
    n = 24
    result = evaluate(net, x[:n], y[:n], EvalSettings(eps=EPS, attack="autoattack"), progress=False)
    aa = result.metrics["autoattack_acc"]
    assert result.autoattack["run"] is True
    # an attack never beats the exact robust accuracy, and on a linear model AutoAttack reaches it
    assert aa == pytest.approx(robust[:n].float().mean().item())
    assert aa <= result.metrics["pgd_acc"] + 1e-12


def test_bab_not_counted_without_abcrown(linear_case, tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    net, x, y, robust, _ = linear_case
    monkeypatch.delenv("ABCROWN_DIR", raising=False)
    settings = EvalSettings(eps=EPS, bab=True, bab_count=12, bab_timeout_s=5.0, pgd_steps=5)
    result = evaluate(net, x[:12], y[:12], settings, progress=False, bab_dir=tmp_path / "bab")
    bab = result.bab
    assert bab is not None and bab["count"] == 12
    if bab["abcrown_ran"] is False and bab["counts"].get("missing", 0) > 0:
        assert result.metrics["bab_cert_acc"] is None and "not run" in bab["reason"]
    else:  # every point was decided by the pre-checks: the exact answer
        assert result.metrics["bab_cert_acc"] == pytest.approx(robust[:12].float().mean().item())


# --------------------------------------------------------------------------------------------
# A trained digits model (the trainer with the digits preset, a short run)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    from ccdist_plugin.config import load_preset
    from ccdist_plugin.trainer import Trainer, build_model, load_data

    out = tmp_path_factory.mktemp("digits_run")
    cfg = load_preset("digits").override(
        [
            "loss.method=cc_ibp",
            "teacher.preset=null",
            "schedule.epochs=6",
            "schedule.warmup_epochs=1",
            "schedule.ramp_up_epochs=3",
            "optim.lr_decay_epochs=[5]",
            "model.width=128",
            "log.progress=false",
            "log.val_size=100",
            f"log.output_dir={out}",
        ]
    )
    torch.manual_seed(0)
    data = load_data(cfg)
    fit = Trainer(build_model(cfg, data.spec), cfg).fit(data.train, data.test)
    return fit.checkpoint, data.test.tensors(), cfg.eps


def test_orderings_on_trained_digits_model(digits_checkpoint):
    from ccdist_plugin.checkpoint import load_model

    path, (x, y), eps = digits_checkpoint
    model = load_model(path)
    n = 160
    settings = EvalSettings(eps=eps, pgd_restarts=2, batch_size=n)
    result = evaluate(model, x[:n], y[:n], settings, progress=False)
    m = result.metrics
    assert m["standard_acc"] > 0.6  # the model learned something
    assert m["pgd_acc"] <= m["standard_acc"]
    assert m["ibp_cert_acc"] <= m["pgd_acc"]
    assert m["crown_cert_acc"] <= m["pgd_acc"]
    assert m["ibp_cert_acc"] > 0  # certified training certifies some points at its ε
    pe = {k: torch.tensor(v) for k, v in result.per_example.items()}
    # per point: certified ⇒ PGD-robust ⇒ correct
    assert not bool((pe["ibp_certified"] & ~pe["pgd_robust"]).any())
    assert not bool((pe["crown_certified"] & ~pe["pgd_robust"]).any())
    assert not bool((pe["pgd_robust"] & ~pe["correct"]).any())
    assert result.soundness_alarms == []
    assert m["ibp_loss"] > 0


def test_eval_command_writes_record_table_and_plot(digits_checkpoint, tmp_path):
    from ccdist_plugin.cli import main
    from ccdist_plugin.reports import load_record

    path, _, _ = digits_checkpoint
    out = tmp_path / "eval"
    args = ["eval", "--checkpoint", str(path), "--count", "80", "--curve-eps", "0,1", "--out", str(out)]
    res = CliRunner().invoke(main, args + ["--quiet", "--pgd-restarts", "2"])
    assert res.exit_code == 0, res.output
    assert "| Method |" in res.output and "not run" in res.output  # AA and BaB not run
    record = load_record(out)
    assert record["count"] == 80 and record["settings"]["pgd_restarts"] == 2
    assert record["checkpoint"]["sha256"] and len(record["checkpoint"]["sha256"]) == 64
    assert [p["eps"] for p in record["eps_curve"]] == pytest.approx([0.0, record["eps"]])
    assert record["eps_curve"][0]["ibp_cert_acc"] == pytest.approx(record["metrics"]["standard_acc"])
    assert (out / "eval.md").read_text().startswith("| Method |")
    assert (out / "accuracy_vs_eps.png").stat().st_size > 5000
    assert json.loads((out / "eval.json").read_text())["schema"] == "ccdist-eval-v1"


def test_eval_command_teacher_comparison(digits_checkpoint, tmp_path):
    from ccdist_plugin.cli import main

    path, _, _ = digits_checkpoint
    out = tmp_path / "eval"
    args = ["eval", "--checkpoint", str(path), "--compare-teacher", str(path), "--count", "40"]
    res = CliRunner().invoke(
        main, args + ["--curve-eps", "", "--out", str(out), "--quiet", "--methods", "ibp"]
    )
    assert res.exit_code == 0, res.output
    table = (out / "teacher_comparison.md").read_text()
    assert "(teacher)" in table and "(student)" in table and "PGD-40" in table
    record = json.loads((out / "eval.json").read_text())
    assert record["teacher"]["metrics"]["standard_acc"] == record["metrics"]["standard_acc"]


def test_eval_command_bad_input(tmp_path):
    from ccdist_plugin.cli import main

    bogus = tmp_path / "x.pt"
    bogus.write_bytes(b"not a checkpoint")
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(bogus), "--quiet"])
    assert res.exit_code != 0 and "not" in res.output


def test_sweep_command_trains_evaluates_and_plots(tmp_path):
    """Two values of α, one seed, one tiny epoch each: trained, evaluated, compared and plotted."""
    from ccdist_plugin.cli import main

    out = tmp_path / "sweep"
    sets = [
        "loss.method=cc_ibp",
        "teacher.preset=null",
        "model.width=32",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        "schedule.ramp_up_epochs=1",
        "optim.lr_decay_epochs=[]",
        "log.val_size=50",
        "optim.batch_size=500",
    ]
    args = ["sweep", "--param", "alpha", "--values", "0.3,0.7", "--config", "digits", "--seeds", "0"]
    args += [a for s in sets for a in ("--set", s)] + [
        "--output-dir",
        str(out),
        "--count",
        "30",
        "--attack",
        "none",
        "--quiet",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "alpha=0.3" in res.output and "alpha=0.7" in res.output
    for value in ("0.3", "0.7"):
        record = json.loads((out / f"alpha={value}" / "seed0" / "eval" / "eval.json").read_text())
        assert record["checkpoint"]["params"]["alpha"] == float(value) and record["count"] == 30
    assert (out / "compare.md").is_file() and (out / "sweep_alpha.png").stat().st_size > 5000


@pytest.mark.slow
@pytest.mark.abcrown
def test_bab_with_abcrown_on_trained_digits_model(digits_checkpoint, tmp_path):
    from conftest import abcrown_dir

    from ccdist_plugin.checkpoint import load_model

    if abcrown_dir() is None:
        pytest.skip("ABCROWN_DIR unset or without abcrown.py")
    path, (x, y), eps = digits_checkpoint
    model = load_model(path)
    n = 12
    settings = EvalSettings(eps=eps, bab=True, bab_count=n, bab_timeout_s=30.0, batch_size=n)
    result = evaluate(model, x[:n], y[:n], settings, progress=False, bab_dir=tmp_path / "bab")
    assert result.bab["abcrown_ran"] and result.soundness_alarms == []
    same = result.bab["same_points"]
    bab = result.metrics["bab_cert_acc"]
    # branch and bound only adds certificates to our bounds, and never beats the attack
    assert max(same["ibp_certified"], same["crown_certified"]) <= bab <= same["pgd_robust"]

"""The one IBP → CROWN → PGD pre-filter, the metric names, the one evaluation attack."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import requires_auto_lirpa

from ccdist_plugin.attacks import EVAL_PGD, EVAL_PGD_SOURCE, PGD
from ccdist_plugin.bounds import CERT_TOL, CertifyResult, resolve_crown_intermediate
from ccdist_plugin.evaluation import STATUSES, EvalSettings, evaluate, prefilter
from ccdist_plugin.models import cnn3, cnn7, mlp
from ccdist_plugin.verification import cascade
from ccdist_plugin.verification import export as export_mod


def _digits_like(n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return mlp(1, 8, 10, width=32, depth=2).eval()


def test_statuses_partition_the_points_and_agree_with_evaluate():
    model = _model()
    x, y = _digits_like()
    eps = 0.002  # small enough that some points are certified
    pre = prefilter(model, x, y, eps, generator=torch.Generator().manual_seed(0))
    assert set(pre.status) <= set(STATUSES) and len(pre.status) == len(y)
    res = evaluate(model, x, y, EvalSettings(eps=eps, batch_size=16), progress=False)
    counts = pre.counts()
    assert res.metrics["standard_acc"] == pytest.approx(1 - counts["misclassified"] / len(y))
    certified_any = counts["certified_ibp"] + counts["certified_crown"]
    assert certified_any > 0 and counts["alarm"] == 0
    assert res.metrics["ibp_cert_acc"] == pytest.approx(counts["certified_ibp"] / len(y))
    # CROWN alone may prove fewer points than IBP ∪ CROWN, never more
    assert res.metrics["crown_cert_acc"] <= certified_any / len(y) + 1e-12
    assert res.metrics["pgd_acc"] == pytest.approx(float((pre.correct & ~pre.broken).double().mean()))


def test_an_unsound_certificate_broken_by_the_attack_is_an_alarm_never_certified(monkeypatch):
    """Inject a bound that claims every difference is proved: the points PGD breaks become alarms,
    in the pre-filter (export) and in evaluate (alarms recorded)."""

    def lying_certify(model, x, y, eps, method="ibp", tol=CERT_TOL, batch_size=256, **kw):
        k = model.num_classes
        margin = torch.full((x.shape[0], k), 1.0, dtype=torch.float64).scatter(1, y.view(-1, 1), float("inf"))
        correct = model(x).argmax(1) == y
        return CertifyResult(margin_lb=margin, certified=correct, correct=correct)

    monkeypatch.setattr(cascade, "certify", lying_certify)
    torch.manual_seed(0)
    model = mlp(1, 8, 10, width=32, depth=2, init="default").eval()
    x, _ = _digits_like()
    with torch.no_grad():
        y = model(x).argmax(1)  # every point correct, so every broken point is a refuted certificate
    pre = prefilter(model, x, y, 0.3, generator=torch.Generator().manual_seed(0))
    assert pre.broken.any() and pre.correct.all()
    for i, status in enumerate(pre.status):
        if bool(pre.correct[i]) and bool(pre.broken[i]):
            assert status == "alarm"
        assert status not in ("certified_ibp", "certified_crown") or not bool(pre.broken[i])
    res = evaluate(model, x, y, EvalSettings(eps=0.3), progress=False)
    assert any("IBP certified" in a for a in res.soundness_alarms)


def test_export_uses_the_prefilter(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from ccdist_plugin.verification import export_instances

    calls = []
    real = export_mod.prefilter

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(export_mod, "prefilter", spy)
    model = _model()
    x, y = _digits_like(8)
    res = export_instances(model, (x, y), tmp_path, 0.01, attack_steps=3, attack_restarts=1)
    assert len(calls) == 1 and calls[0]["attack"] == PGD(steps=3, restarts=1, objective="margin")
    manifest = json.loads(res.manifest_path.read_text())
    assert manifest["crown_intermediate"] == "crown"
    assert all(p["prefilter_status"] in STATUSES for p in manifest["points"])


def test_crown_metrics_are_named_by_their_intermediate_bounds():
    model = _model()
    x, y = _digits_like(8)
    full = evaluate(model, x, y, EvalSettings(eps=0.01, crown_intermediate="crown"), progress=False)
    ibp = evaluate(model, x, y, EvalSettings(eps=0.01, crown_intermediate="ibp"), progress=False)
    assert full.metrics["crown_cert_acc"] is not None and full.metrics["crown_ibp_cert_acc"] is None
    assert ibp.metrics["crown_ibp_cert_acc"] is not None and ibp.metrics["crown_cert_acc"] is None
    assert "crown_ibp_certified" in ibp.per_example and "crown_certified" not in ibp.per_example
    assert full.to_dict()["settings"]["crown_intermediate_used"] == "crown"
    assert ibp.to_dict()["settings"]["crown_intermediate_used"] == "ibp"


def test_auto_is_full_crown_on_small_networks_and_crown_ibp_on_cifar_cnn7():
    assert resolve_crown_intermediate(_model()) == "crown"
    assert resolve_crown_intermediate(cnn3(1, 8, 10, width=16, channels=(4, 8))) == "crown"
    big = cnn7(3, 32, 10, width=16, channels=(4, 4, 8, 8, 8))
    assert resolve_crown_intermediate(big) == "ibp"
    x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 10, (2,))
    res = evaluate(big.eval(), x, y, EvalSettings(eps=0.001, methods=("crown",)), progress=False)
    assert res.metrics["crown_cert_acc"] is None and res.metrics["crown_ibp_cert_acc"] is not None
    assert res.to_dict()["settings"]["crown_intermediate_used"] == "ibp"


def test_the_evaluation_attack_is_stated_in_the_record():
    model = _model()
    x, y = _digits_like(8)
    d = evaluate(model, x, y, EvalSettings(eps=0.01), progress=False).to_dict()["settings"]
    assert d["attack_description"].startswith(f"PGD-{EVAL_PGD.steps} (step {EVAL_PGD.step_size:g}·ε")
    assert d["attack_source"] == EVAL_PGD_SOURCE
    other = evaluate(model, x, y, EvalSettings(eps=0.01, pgd_steps=5), progress=False).to_dict()["settings"]
    assert other["attack_source"].startswith("custom")


@requires_auto_lirpa
@pytest.mark.autolirpa
def test_the_auto_lirpa_crown_backend_gives_the_same_certificates():
    model = _model()
    x, y = _digits_like(16)
    for kind in ("crown", "ibp"):
        ours = evaluate(model, x, y, EvalSettings(eps=0.003, crown_intermediate=kind), progress=False)
        theirs = evaluate(
            model,
            x,
            y,
            EvalSettings(eps=0.003, crown_intermediate=kind, crown_backend="auto_lirpa"),
            progress=False,
        )
        name = "crown_certified" if kind == "crown" else "crown_ibp_certified"
        assert ours.per_example[name] == theirs.per_example[name]

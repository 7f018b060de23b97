"""eval.json records (schema, round trip, validation), the Table 1/2 and compare tables, the plots,
and the ``ccdist compare`` command; records are built from synthetic evaluation results."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ccdist_plugin import reports
from ccdist_plugin.evaluation import EvalResult, EvalSettings


def fake_record(
    label="CC-Dist", seed=0, beta=0.02, std=0.9, pgd=0.7, ibp=0.4, crown=0.5, eps=0.1, curve=True, aa=None
) -> dict:
    settings = EvalSettings(eps=eps, attack="autoattack" if aa is not None else "pgd40")
    result = EvalResult(count=300, eps=eps, settings=settings)
    result.metrics = {
        "standard_acc": std,
        "pgd_acc": pgd,
        "autoattack_acc": aa,
        "ibp_cert_acc": ibp,
        "crown_cert_acc": crown,
        "bab_cert_acc": None,
        "ibp_loss": 1.3 + seed,
    }
    result.timings_s = {"standard": 0.1, "total": 2.0}
    result.autoattack = (
        {"run": aa is not None, "module": "x"} if aa is not None else {"run": False, "reason": "r"}
    )
    info = {
        "path": "runs/x/checkpoint.pt",
        "sha256": "0" * 64,
        "role": "student",
        "name": "digits",
        "method": "cc_dist",
        "epoch": 12,
        "seed": seed,
        "train_time_s": 5.0 + seed,
        "params": {"alpha": 0.5, "beta": beta, "eps": eps},
        "config": {"loss": {"alpha": 0.5, "beta": beta, "attack": {"steps": 1}}, "seed": seed},
    }
    points = []
    if curve:
        points = [
            {
                "eps": f * eps,
                "standard_acc": std,
                "pgd_acc": pgd * (1.2 - 0.4 * f),
                "ibp_cert_acc": ibp * (1 - f / 2),
            }
            for f in (0.0, 0.5, 1.0, 2.0)
        ]
        for p in points:
            p["crown_cert_acc"] = min(p["pgd_acc"], p["ibp_cert_acc"] + 0.1)
            p["pgd_acc"] = min(p["pgd_acc"], std)
    return reports.make_record(
        result, info, {"name": "digits", "split": "test", "start": 0, "count": 300}, label, points
    )


def test_record_schema_round_trip(tmp_path):
    rec = fake_record()
    assert rec["schema"] == reports.SCHEMA
    for key in ("eps", "count", "settings", "metrics", "timings_s", "code", "checkpoint", "autoattack"):
        assert key in rec
    s = rec["settings"]
    assert s["pgd_steps"] == 40 and s["pgd_restarts"] == 1 and s["methods"] == ["ibp", "crown"]
    assert rec["code"]["package_version"] and rec["code"]["torch"]
    path = reports.write_json(rec, tmp_path / "run" / "eval.json")
    loaded = reports.load_record(tmp_path / "run")  # a folder holding eval.json
    assert loaded["metrics"] == rec["metrics"]
    assert json.loads(path.read_text())["checkpoint"]["sha256"] == "0" * 64


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.pop("eps"), "missing key 'eps'"),
        (lambda r: r["metrics"].pop("crown_cert_acc"), "metrics.crown_cert_acc missing"),
        (lambda r: r["metrics"].update(pgd_acc=1.5), "not a fraction"),
        (lambda r: r["metrics"].update(autoattack_acc=0.5), "autoattack.run is not true"),
        (lambda r: r["settings"].pop("pgd_restarts"), "settings.pgd_restarts missing"),
        (lambda r: r["checkpoint"].pop("sha256"), "checkpoint.sha256 missing"),
        (lambda r: r.update(schema="other"), "schema"),
    ],
)
def test_validate_record_names_the_problem(mutate, message):
    rec = fake_record()
    mutate(rec)
    with pytest.raises(ValueError, match=message):
        reports.validate_record(rec)


def test_load_record_errors(tmp_path):
    with pytest.raises(ValueError, match="no eval.json"):
        reports.load_record(tmp_path)
    (tmp_path / "eval.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        reports.load_record(tmp_path / "eval.json")


def test_eval_table_layout_and_not_run():
    table = reports.eval_table([fake_record(), fake_record(label="CC-IBP", aa=0.65)])
    header = table.splitlines()[0]
    for col in ("Method", "Std.", "PGD-40", "AA", "IBP", "CROWN", "BaB", "time"):
        assert col in header
    rows = [line for line in table.splitlines() if line.startswith("| CC-")]
    assert len(rows) == 2
    assert "| 90.00 | 70.00 | not run | 40.00 | 50.00 | not run |" in rows[0]
    assert "| 65.00 |" in rows[1]  # AutoAttack shown only where it ran


def test_compare_table_mean_std():
    recs = [
        fake_record(seed=0, std=0.90),
        fake_record(seed=1, std=0.92),
        fake_record(label="CC-IBP", std=0.8),
    ]
    table = reports.compare_table(recs)
    dist = next(line for line in table.splitlines() if line.startswith("| CC-Dist"))
    assert "| 2 |" in dist and "91.00 ± 1.41" in dist
    ibp = next(line for line in table.splitlines() if line.startswith("| CC-IBP"))
    assert "| 1 |" in ibp and "80.00 |" in ibp and "±" not in ibp.split("|")[4]
    by_beta = reports.compare_table(recs, group_by="beta")
    assert "beta=0.02" in by_beta


def test_teacher_table():
    teacher = fake_record(label="PGD teacher", std=0.95, pgd=0.75, ibp=0.0, crown=0.41)
    student = fake_record(std=0.93, pgd=0.72, ibp=0.38, crown=0.6)
    table = reports.teacher_table(teacher, student)
    assert "PGD-40" in table  # AutoAttack did not run for both
    assert "| PGD teacher (teacher) | 95.00 | 75.00 | 41.00 | CROWN |" in table
    assert "| CC-Dist (student) | 93.00 | 72.00 | 60.00 | CROWN |" in table
    with pytest.raises(ValueError, match="different settings"):
        reports.teacher_table(fake_record(eps=0.2), student)


def _check_png(path):
    import matplotlib.image as mpimg

    assert path.is_file() and path.stat().st_size > 5000
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 10  # not a blank canvas


def test_plots_render(tmp_path):
    recs = [
        fake_record(beta=b, seed=s, pgd=0.6 + b, crown=0.4 + b) for b in (0.01, 0.05, 0.2) for s in (0, 1)
    ]
    _check_png(reports.plot_accuracy_vs_eps([recs[0]], tmp_path / "one.png"))
    _check_png(reports.plot_accuracy_vs_eps(recs[:2], tmp_path / "two.png"))
    _check_png(reports.plot_sweep(recs, tmp_path / "sweep.png", param="beta"))
    with pytest.raises(ValueError, match="eps_curve"):
        reports.plot_accuracy_vs_eps([fake_record(curve=False)], tmp_path / "none.png")
    with pytest.raises(ValueError, match="no parameter"):
        reports.plot_sweep(recs, tmp_path / "bad.png", param="loss.no_such_key")


def test_record_param_resolution():
    rec = fake_record(beta=0.05)
    assert reports.record_param(rec, "beta") == 0.05
    assert reports.record_param(rec, "loss.attack.steps") == 1
    assert reports.record_param(rec, "nope") is None


def test_checkpoint_info_resolves_default_beta(tmp_path):
    path = tmp_path / "c.pt"
    path.write_bytes(b"abc")
    payload = {
        "role": "student",
        "config": {"loss": {"method": "cc_dist", "beta": None}},
        "history": [{"time_s": 1.5}],
    }
    info = reports.checkpoint_info(path, payload, feature_dim=250)
    assert info["params"]["beta"] == pytest.approx(5 / 250)
    assert info["train_time_s"] == 1.5 and len(info["sha256"]) == 64
    assert reports.default_label(info) == "CC-Dist"
    assert reports.default_label({"role": "teacher", "method": "pgd_at"}) == "PGD teacher"


def test_labels_and_default_beta_come_from_the_loss_class(tmp_path):
    """No parallel label table: every registered loss's row label is its class's ``label``, and the
    default β recorded is the class's (10⁴/w for Logit-Dist, not 5/w)."""
    from ccdist_plugin.losses import list_losses, loss_class

    for name in list_losses():
        assert reports.default_label({"role": "student", "method": name}) == loss_class(name).label
    assert reports.default_label({"role": "student", "method": "my_loss"}) == "my_loss"
    path = tmp_path / "c.pt"
    path.write_bytes(b"abc")
    payload = {"role": "student", "config": {"loss": {"method": "logit_dist", "beta": None}}}
    assert reports.checkpoint_info(path, payload, feature_dim=100)["params"]["beta"] == pytest.approx(100.0)
    no_teacher = {"role": "student", "config": {"loss": {"method": "cc_ibp", "beta": None}}}
    assert reports.checkpoint_info(path, no_teacher, feature_dim=100)["params"]["beta"] is None


def test_compare_command(tmp_path):
    from ccdist_plugin.cli import main

    runs = []
    for beta in (0.01, 0.1):
        for seed in (0, 1):
            d = tmp_path / f"b{beta}" / f"s{seed}" / "eval"
            reports.write_json(fake_record(beta=beta, seed=seed, crown=0.4 + beta), d / "eval.json")
            runs.append(str(d.parent))  # a run folder holding eval/eval.json
    out = tmp_path / "cmp"
    res = CliRunner().invoke(main, ["compare", *runs, "--out", str(out), "--group-by", "beta"])
    assert res.exit_code == 0, res.output
    assert "±" in res.output and "beta=0.01" in res.output
    assert (out / "compare.md").is_file()
    _check_png(out / "accuracy_vs_eps.png")
    _check_png(out / "sweep_beta.png")  # the runs differ in β: the Figure 1 plot is drawn
    bad = CliRunner().invoke(main, ["compare", str(tmp_path / "missing")])
    assert bad.exit_code != 0 and "does not exist" in bad.output

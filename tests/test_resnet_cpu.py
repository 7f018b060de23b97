"""``benchmarks/resnet_cpu.py`` (issue 16's CPU-scale comparison): its runs are the prn18 presets with the
stated overrides, and its report pairs CC-Dist with CC-IBP seed by seed."""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import resnet_cpu as rn  # noqa: E402

from ccdist_plugin.config import load_config


def test_runs_are_the_prn18_presets_with_the_stated_overrides(tmp_path):
    teacher = rn.Run("teacher", "teacher", 0, 8, 8, teacher_steps=5)
    cfg = load_config("cifar10-2-prn18-teacher", rn.overrides(teacher, tmp_path))
    assert cfg.loss.method == "pgd_at" and cfg.model.name == "preact_resnet18" and cfg.model.width == 8
    assert (cfg.loss.attack.steps, cfg.loss.attack.step_size) == (5, 0.5)
    assert cfg.optim.l1 == pytest.approx(5e-6) and cfg.schedule.epochs == 8  # E.8's teacher ℓ1
    for kind in ("cc_ibp", "cc_dist"):
        run = rn.Run(f"{kind}-s3", kind, 3, 8, 12, teacher="t.pt" if kind == "cc_dist" else None)
        cfg = load_config("cifar10-2-prn18", rn.overrides(run, tmp_path))
        assert cfg.loss.method == kind and cfg.loss.alpha == rn.ALPHA and cfg.seed == 3
        assert cfg.loss.beta is None  # CC-Dist: the default 5/w
        assert (cfg.loss.attack.steps, cfg.loss.attack.step_size, cfg.loss.attack.eps_factor) == (
            1,
            10.0,
            1.0,
        )
        assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.ramp_up_epochs) == (12, 1, 5)
        assert list(cfg.optim.lr_decay_epochs) == [10, 11]
        assert cfg.data.name == "cifar10-jpeg" and cfg.model.width == 8


def _result(kind: str, seed: int, std: float, cert: float, beta_w: float | None = None) -> dict:
    test = {"std": std, "pgd40": std - 0.1, "ibp_cert": cert / 2, "crown_cert": cert, "unsound_points": 0}
    test["attack"] = "PGD-40"
    run = {"kind": kind, "seed": seed} | ({} if beta_w is None else {"beta_w": beta_w})
    return {"run": run, "train_s": 10.0, "width": 64, "test": test}


def test_report_pairs_seeds_per_beta_and_counts_wins():
    results = {"teacher": _result("teacher", 0, 0.6, 0.0)}
    # seed 1's CC-Dist run is missing: only seeds with both methods are paired
    for seed, ibp, dist in ((0, 0.30, 0.32), (2, 0.31, 0.30), (3, 0.29, 0.33)):
        results[f"cc_ibp-s{seed}"] = _result("cc_ibp", seed, 0.5, ibp)
        results[f"cc_dist-s{seed}"] = _result("cc_dist", seed, 0.5, dist)  # no beta_w recorded: 5/w
        results[f"cc_dist-b1-s{seed}"] = _result("cc_dist", seed, 0.5, ibp - 0.01, beta_w=1.0)
    results["cc_ibp-s1"] = _result("cc_ibp", 1, 0.5, 0.9)
    args = Namespace(width=8, seeds=4, epochs=12, teacher_epochs=8, teacher_steps=5, workers=2, out="x")
    summary = rn.report(results, args)
    assert list(summary["rows"]) == ["teacher", "cc_ibp", "cc_dist@5", "cc_dist@1"]
    assert summary["rows"]["cc_ibp"]["seeds"] == [0, 1, 2, 3]
    paired = summary["paired"]["cc_dist@5"]
    assert paired["seeds"] == [0, 2, 3]
    cert = paired["crown_cert"]
    assert cert["differences"] == pytest.approx([0.02, -0.01, 0.04])
    assert cert["mean"] == pytest.approx(0.05 / 3) and cert["dist_higher_in"] == 2
    low, high = cert["ci95"]
    assert low < cert["mean"] < high
    assert summary["paired"]["cc_dist@1"]["crown_cert"]["differences"] == pytest.approx([-0.01] * 3)
    text = rn.markdown(summary)
    assert "| CROWN-IBP-cert | +2.00, -1.00, +4.00 | +1.67 |" in text and "2/3" in text
    assert "CC-Dist (β = 1/w) − CC-IBP" in text and "--betas 5,1" in text


def test_beta_override_only_where_it_differs_from_the_presets_default(tmp_path):
    run = rn.Run("d", "cc_dist", 0, 8, 12, teacher="t.pt", beta_w=1.0)
    cfg = load_config("cifar10-2-prn18", rn.overrides(run, tmp_path))
    assert cfg.loss.beta == pytest.approx(1.0 / 64)


def test_full_crown_table_names_crown_and_crown_ibp_apart():
    results = {"teacher": _result("teacher", 0, 0.6, 0.0)}
    for seed in (0, 1):
        results[f"cc_ibp-s{seed}"] = _result("cc_ibp", seed, 0.5, 0.3)
        results[f"cc_dist-s{seed}"] = _result("cc_dist", seed, 0.5, 0.3)
    full = {"points": 20, "ibp_cert_acc": 0.1, "crown_ibp_cert_acc": 0.25, "crown_cert_acc": 0.35}
    full |= {"crown_bounded_points": 12, "crown_cpu_s_per_point": 4.0, "unsound_points": 0}
    results["cc_ibp-s1"]["full_crown"] = full  # only seed 1 of CC-IBP has it
    args = Namespace(width=8, seeds=2, epochs=12, teacher_epochs=8, teacher_steps=5, workers=2, out="x")
    summary = rn.report(results, args)
    assert list(summary["full_crown"]) == ["cc_ibp"] and summary["full_crown"]["cc_ibp"]["seeds"] == [1]
    text = rn.markdown(summary)
    assert "| IBP-cert | CROWN-IBP-cert | CROWN-cert |" in text
    assert "| CC-IBP | 1 | 20 | 10.00 | 25.00 | 35.00 | 12 | 4.0 | 0 |" in text
    # without --crown-points the report has no such table
    del results["cc_ibp-s1"]["full_crown"]
    assert "Full CROWN" not in rn.markdown(rn.report(results, args))


@pytest.mark.parametrize(
    "only, trained",
    [("cc_ibp-s0", ["cc_ibp-s0"]), ("cc_ibp-s0,cc_dist-s0", ["teacher", "cc_ibp-s0", "cc_dist-s0"])],
)
def test_only_cc_ibp_runs_train_no_teacher(tmp_path, monkeypatch, only, trained):
    """``--only`` naming CC-IBP runs alone trains no PGD teacher (at the paper's width it costs hours and
    nothing uses it); a CC-Dist run among them still gets one."""
    from concurrent.futures import Future

    submitted: list[str] = []

    class InlinePool:  # runs each job where it is submitted, recording its run
        def __init__(self, workers):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, run, *args):
            submitted.append(run.name)
            future: Future = Future()
            future.set_result({"test": {k: 0.0 for k, _ in rn.METRICS}})
            return future

    monkeypatch.setattr(rn, "ProcessPoolExecutor", InlinePool)
    rn.main(["--out", str(tmp_path), "--seeds", "1", "--only", only, "--docs", ""])
    assert sorted(submitted) == sorted(trained)

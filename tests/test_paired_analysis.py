"""The pre-registered paired analysis (benchmarks/paired_analysis.py): hand-computed statistics, and
pairing that refuses verdicts about different points, ε, seeds or models."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from paired_analysis import (  # noqa: E402
    PAPER_EFFECT_POINTS,
    PointVerdict,
    TInterval,
    decide,
    mcnemar_exact,
    pair_verdicts,
    paired_t_interval,
    per_seed_differences,
    pool_pairs,
    t_quantile,
    verdicts_from_export,
)


def test_t_quantile_matches_tables():
    # two-sided 95 % critical values from any t table
    assert t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
    assert t_quantile(0.975, 1) == pytest.approx(12.706205, abs=1e-6)
    with pytest.raises(ValueError):
        t_quantile(0.975, 0)


def test_paired_t_interval_by_hand():
    # d = 1..5: mean 3, sample sd √2.5, se √2.5/√5 = √0.5, half-width 2.776445·0.7071068 = 1.963243
    ti = paired_t_interval([1, 2, 3, 4, 5])
    assert ti.n == 5 and ti.mean == pytest.approx(3.0) and ti.sd == pytest.approx(math.sqrt(2.5))
    assert ti.low == pytest.approx(3 - 1.963243, abs=1e-5) and ti.high == pytest.approx(
        3 + 1.963243, abs=1e-5
    )
    # two differences −1 and 3: mean 1, sd 2√2, se 2, half-width 12.706205·2
    ti = paired_t_interval([-1.0, 3.0])
    assert (ti.low, ti.high) == (pytest.approx(1 - 25.41241, abs=1e-4), pytest.approx(1 + 25.41241, abs=1e-4))
    # identical differences: a zero-width interval at the mean
    assert paired_t_interval([0.5, 0.5, 0.5]).low == pytest.approx(0.5)
    for bad in ([1.0], [], [1.0, float("nan")]):
        with pytest.raises(ValueError):
            paired_t_interval(bad)


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2·(1/2)^5
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)  # 2·(C(10,0)+C(10,1))/2^10
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)  # two-sided: symmetric
    assert mcnemar_exact(3, 3) == 1.0  # 2·42/64 > 1 is capped
    assert mcnemar_exact(0, 0) == 1.0  # no discordant pair: no evidence
    # many pairs: no float underflow; 500 vs 560 of 1060 is not significant, 400 vs 600 is
    assert 0.05 < mcnemar_exact(500, 560) < 1.0 and mcnemar_exact(400, 600) < 1e-9
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def _verdicts(method, model, seed=0, eps=2 / 255, certified=(True, False, True, False), labels=None, start=0):
    labels = labels or [i % 10 for i in range(len(certified))]
    return [
        PointVerdict(model, method, seed, "cifar10-jpeg", start + i, labels[i], eps, c)
        for i, c in enumerate(certified)
    ]


def test_pairing_and_pooling_counts():
    p0 = pair_verdicts(
        _verdicts("cc_dist", "m1", certified=(True, True, False, False)),
        _verdicts("cc_ibp", "m2", certified=(True, False, True, False)),
    )
    assert p0.counts() == {"both": 1, "only_a": 1, "only_b": 1, "neither": 1}
    p1 = pair_verdicts(
        _verdicts("cc_dist", "m3", seed=1, certified=(True, True, True, False)),
        _verdicts("cc_ibp", "m4", seed=1, certified=(False, False, True, False)),
    )
    pooled = pool_pairs([p0, p1])
    assert pooled == {"both": 2, "only_a": 3, "only_b": 1, "neither": 2, "pairs": 8}
    with pytest.raises(ValueError, match="pooled twice"):
        pool_pairs([p0, p0])
    swapped = pair_verdicts(
        _verdicts("cc_ibp", "m5", seed=2), _verdicts("cc_dist", "m6", seed=2)
    )  # the methods in the other order: pooling would mix "only A" meanings
    with pytest.raises(ValueError, match="different methods"):
        pool_pairs([p0, swapped])


def test_pairing_order_of_records_does_not_matter():
    a = _verdicts("cc_dist", "m1", certified=(True, False, False, False))
    b = _verdicts("cc_ibp", "m2", certified=(False, False, False, True))
    p = pair_verdicts(list(reversed(a)), b)
    assert p.indices == (0, 1, 2, 3) and p.a == (True, False, False, False) and p.b[3] is True


@pytest.mark.parametrize(
    "fault, change, message",
    [
        ("another ε", {"eps": 8 / 255}, "differ in eps"),
        ("another seed", {"seed": 1}, "differ in seed"),
        ("another dataset", {"dataset": "cifar10"}, "differ in dataset"),
        ("the same model", {"model_sha256": "m1"}, "same model"),
        ("the same method", {"method": "cc_dist"}, "same model|both sides are method"),
    ],
)
def test_pairing_refuses_unlike_sides(fault, change, message):
    a = _verdicts("cc_dist", "m1")
    b = [dataclasses.replace(v, **change) for v in _verdicts("cc_ibp", "m2")]
    with pytest.raises(ValueError, match=message):
        pair_verdicts(a, b)


def test_pairing_refuses_other_points_duplicates_mixed_sides_and_labels():
    a = _verdicts("cc_dist", "m1")
    with pytest.raises(ValueError, match="different test points"):
        pair_verdicts(a, _verdicts("cc_ibp", "m2", start=1))  # points 1-4 vs 0-3
    with pytest.raises(ValueError, match="different test points"):
        pair_verdicts(a, _verdicts("cc_ibp", "m2")[:3])
    with pytest.raises(ValueError, match="several verdicts"):
        pair_verdicts(a + a[:1], _verdicts("cc_ibp", "m2"))
    mixed = _verdicts("cc_ibp", "m2")
    mixed[2] = dataclasses.replace(mixed[2], model_sha256="m9")  # one verdict about another network
    with pytest.raises(ValueError, match="different models"):
        pair_verdicts(a, mixed)
    mixed_eps = _verdicts("cc_ibp", "m2")
    mixed_eps[0] = dataclasses.replace(mixed_eps[0], eps=8 / 255)
    with pytest.raises(ValueError, match="ε values"):
        pair_verdicts(a, mixed_eps)
    with pytest.raises(ValueError, match="different labels"):
        pair_verdicts(a, _verdicts("cc_ibp", "m2", labels=[9, 9, 9, 9]))
    with pytest.raises(ValueError, match="at least one"):
        pair_verdicts([], a)


def test_per_seed_differences_refuses_unpaired_seeds():
    seeds, d = per_seed_differences({0: 0.50, 1: 0.40}, {0: 0.45, 1: 0.42})
    assert seeds == [0, 1] and d == [pytest.approx(5.0), pytest.approx(-2.0)]
    with pytest.raises(ValueError, match="seeds differ"):
        per_seed_differences({0: 0.5, 1: 0.4}, {0: 0.5, 2: 0.4})


def _ti(low, high):
    return TInterval(5, (low + high) / 2, 1.0, low, high, 0.95)


def test_decision_rule():
    assert decide(_ti(0.2, 3.0), only_dist=40, only_ibp=15, p_value=0.001) == "gain appears"
    # the interval says gain but McNemar does not reject (or points the other way): not a gain
    assert decide(_ti(0.2, 3.0), only_dist=20, only_ibp=15, p_value=0.5) == "inconclusive"
    assert decide(_ti(0.2, 3.0), only_dist=10, only_ibp=30, p_value=0.001) == "inconclusive"
    assert decide(_ti(-3.0, -0.5), only_dist=5, only_ibp=30, p_value=0.001) == "worse"
    assert decide(_ti(-2.0, 0.8), only_dist=10, only_ibp=12, p_value=0.8) == "no gain of the paper's size"
    assert (
        decide(_ti(-2.0, PAPER_EFFECT_POINTS + 1), only_dist=10, only_ibp=12, p_value=0.8) == "inconclusive"
    )


def _records(export, specs):
    """Verdict records as the verifier writes them (with the identity fields where this version has them)."""
    import test_verify

    make = getattr(test_verify, "record_for", None)
    out = []
    for inst, index, verdict in specs:
        rec = {"instance": inst, "index": index, "verdict": verdict, "time_s": 1.0, "returncode": 0}
        out.append(make(export, inst, verdict, index=index) if make else rec)
    (export / "verify").mkdir(exist_ok=True)
    (export / "verify" / "results_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))


def test_verdicts_from_export_reads_certified_points_and_checks_identity(tmp_path):
    from test_verify import make_export

    export = make_export(tmp_path, ["misclassified", "pre-certified", "attacked", "bab", "bab", "bab"])
    manifest = json.loads((export / "manifest.json").read_text())
    manifest.update(model_sha256="abc", dataset="cifar10-jpeg")
    (export / "manifest.json").write_text(json.dumps(manifest))
    # α,β-CROWN records: instance 0 (point 103) safe, instance 1 (point 104) timeout, instance 2 none
    _records(export, [(0, 103, "safe"), (1, 104, "timeout")])
    v = verdicts_from_export(export, "cc_dist", 3)
    assert [x.index for x in v] == [100, 101, 102, 103, 104, 105]
    assert [x.certified for x in v] == [False, True, False, True, False, False]
    assert [x.category for x in v] == [
        "misclassified",
        "pre-certified",
        "attacked",
        "safe",
        "timeout",
        "missing",
    ]
    assert {(x.model_sha256, x.method, x.seed, x.eps, x.dataset) for x in v} == {
        ("abc", "cc_dist", 3, 0.1, "cifar10-jpeg")
    }
    # a "safe" record that names another test point than its instance's is never counted: refused here,
    # or already dropped by the verifier's own bookkeeping (then the point has no verdict)
    _records(export, [(0, 999, "safe"), (1, 104, "timeout")])
    try:
        v = verdicts_from_export(export, "cc_dist", 3)
    except ValueError as err:
        assert "about point 999" in str(err)
    else:
        assert not v[3].certified and v[3].category == "missing"


def test_verdicts_from_export_refuses_another_checkpoint(tmp_path):
    from test_verify import make_export

    from ccdist_plugin.fileio import file_sha256

    export = make_export(tmp_path, ["pre-certified"])
    ckpt, other = tmp_path / "a.pt", tmp_path / "b.pt"
    ckpt.write_bytes(b"weights a")
    other.write_bytes(b"weights b")
    manifest = json.loads((export / "manifest.json").read_text())
    manifest.update(model_sha256="abc", dataset="digits", checkpoint_sha256=file_sha256(ckpt))
    (export / "manifest.json").write_text(json.dumps(manifest))
    assert verdicts_from_export(export, "cc_ibp", 0, checkpoint=ckpt)[0].certified
    with pytest.raises(ValueError, match="another checkpoint"):
        verdicts_from_export(export, "cc_ibp", 0, checkpoint=other)

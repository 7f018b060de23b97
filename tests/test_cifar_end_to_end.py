"""``benchmarks/cifar_end_to_end.py`` (issue 23): the project's route (pre-filter, then α,β-CROWN on the
rest) against α,β-CROWN alone, per point. The summary logic on made-up verdicts; the whole
machinery (both routes, interleaved shards, CPU time of the children) on a tiny digits case when
α,β-CROWN is installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import require_abcrown_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cifar_end_to_end as e2e  # noqa: E402


def test_a_safe_point_refuted_by_the_other_route_is_an_alarm_and_timeouts_are_apart():
    ours = ["safe", "unsafe", "safe", "timeout", "unsafe", "error"]
    theirs = ["safe", "unsafe", "unsafe", "safe", "timeout", "timeout"]
    g = e2e.compare_points(ours, theirs)
    assert g["alarms"] == [2]  # certified by one, refuted by the other
    assert g["same"] == 2 and g["timeout_vs_verdict"] == 2 and g["both_undecided"] == 1
    assert e2e.route_counts(ours) == {"certified": 2, "refuted": 2, "budget_hits": 1, "errors": 1}
    assert e2e.compare_points(["alarm"], ["timeout"])["alarms"] == [0]  # a route's own alarm too


def test_a_verdict_after_the_budget_is_a_budget_hit_that_must_still_agree(tmp_path):
    import pickle

    statuses = ["safe-incomplete (timed out)", "unsafe-pgd", "unknown", "safe", "unsafe-bab (timed out)"]
    with open(tmp_path / "csv_run_results.pkl", "wb") as f:
        pickle.dump({"results": [(st, 11.0) for st in statuses]}, f)
    seconds, late = e2e.abcrown_alone_details(tmp_path)
    assert seconds == [11.0] * 5 and late == ["safe", "", "", "", "unsafe"]
    g = e2e.compare_points(
        ["safe", "unsafe", "timeout"], ["timeout", "unsafe", "timeout"], None, ["safe", "", ""]
    )
    assert g["timeout_vs_verdict"] == 1 and g["late_same"] == 1 and g["alarms"] == []
    # refuted after the budget what the other route certified: a soundness alarm all the same
    assert e2e.compare_points(["safe"], ["timeout"], None, ["unsafe"])["alarms"] == [0]


def _shard(start, ours_verdicts, stages, abcrown_verdicts, seconds, walls, cpus):
    return {
        "start": start,
        "count": len(stages),
        "ours": {
            "wall_s": walls[0],
            "cpu_s": cpus[0],
            "verdicts": ours_verdicts,
            "stages": stages,
            "export_s": 1.0,
            "verify_s": walls[0] - 1.0,
            "load_before": 1.0,
        },
        "abcrown": {
            "wall_s": walls[1],
            "cpu_s": cpus[1],
            "verdicts": abcrown_verdicts,
            "seconds": seconds,
            "load_before": 1.0,
        },
    }


def test_shards_add_up_to_totals_ratios_and_where_the_time_went():
    measured = [
        _shard(
            0,
            ["safe", "unsafe"],
            ["pre-certified", "misclassified"],
            ["safe", "unsafe"],
            [2.0, 1.0],
            (2.0, 8.0),
            (3.0, 8.0),
        ),
        _shard(
            2,
            ["timeout", "unsafe"],
            ["bab", "attacked"],
            ["timeout", "unsafe"],
            [10.0, 1.5],
            (12.0, 16.0),
            (12.0, 12.0),
        ),
    ]
    s = e2e.summarize(measured, timeout=10.0, alpha_crown=False, threads=1)
    assert s["points"] == 4 and s["ours"]["wall_s"] == 14.0 and s["abcrown"]["cpu_s"] == 20.0
    assert s["wall_ratio"] == 0.583 and s["cpu_ratio"] == 0.75
    assert s["wall_ratio_per_shard"] == [0.25, 0.75] and s["cpu_ratio_per_shard"] == [0.375, 1.0]
    assert s["ours"]["prefilter"] == {"misclassified": 1, "pre-certified": 1, "attacked": 1, "bab": 1}
    assert s["ours"]["budget_hits"] == 1 and s["abcrown"]["budget_hits"] == 1
    time = s["abcrown"]["time"]
    assert time["by_prefilter_outcome"]["bab"] == {"points": 1, "seconds": 10.0}
    assert time["budget_hit_seconds"] == 10.0
    text = e2e.markdown(s, "cifar_end_to_end.py --points 4")
    assert "**0.58**" in text and "**0.75**" in text and "0 safe/unsafe disagreements" in text
    assert "`cifar_end_to_end.py --points 4`" in text
    assert "ours: `ccdist export` + `ccdist verify`" in text and "checkpoint sha256" not in text
    # the α-CROWN mode and the network's hash are in the table; True is an older record (every layer)
    for recorded, shown in (("final", "final"), (True, "all")):
        s2 = {**e2e.summarize(measured, 10.0, recorded, 1), "checkpoint_sha256": "ab" * 32}
        text = e2e.markdown(s2, "c")
        assert f"`ccdist export --alpha-crown --alpha-crown-layers {shown}` + `ccdist verify`" in text
        assert "checkpoint sha256 abababababab." in text


def test_the_recorded_command_leaves_out_the_scratch_folder():
    argv = ["--checkpoint", "c.pt", "--work", "/tmp/x", "--points", "4", "--work=/tmp/y", "--alpha-crown"]
    assert e2e.recorded_command(argv) == (
        "python benchmarks/cifar_end_to_end.py --checkpoint c.pt --points 4 --alpha-crown"
    )


@pytest.mark.slow
def test_both_routes_run_interleaved_on_a_tiny_digits_case(tmp_path):
    abcrown = require_abcrown_dir()
    pytest.importorskip("sklearn")
    import verifier_overhead as vo

    from ccdist_plugin.checkpoint import save_checkpoint
    from ccdist_plugin.data import load_dataset

    model = vo.train_small_cnn3(load_dataset("digits"), steps=60, seed=0)
    ckpt = save_checkpoint(
        tmp_path / "ckpt.pt",
        {"arch": model.arch, "model_state": model.state_dict(), "config": {"eps": "0.05"}},
    )
    s = e2e.measure(
        ckpt,
        tmp_path / "work",
        points=6,
        shards=2,
        timeout=10.0,
        abcrown=Path(abcrown),
        extra=[],
        data={"name": "digits"},
    )
    assert [m["order"] for m in s["measured"]] == [["ours", "abcrown"], ["abcrown", "ours"]]
    assert s["points"] == 6 and len(s["verdicts"]["abcrown"]) == 6
    assert s["agreement"]["alarms"] == []
    for route in e2e.ROUTES:
        assert s[route]["errors"] == 0
        assert s[route]["cpu_s"] > 0  # the children's CPU time is counted (they were waited for)
    assert sum(s["ours"]["prefilter"].values()) == 6
    # the abcrown route's csv held every point with its full property; ours only the undecided ones
    shard = tmp_path / "work" / "shard_0"
    alone = json.loads((shard / "abcrown" / "manifest.json").read_text())
    ours = json.loads((shard / "ours" / "manifest.json").read_text())
    assert alone["verify_all"] and not alone["drop_proven"] and not ours["verify_all"]

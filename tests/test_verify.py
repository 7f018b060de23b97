"""ccdist verify: verdicts read back, hard wall-clock kill, resume, shards + merge, soundness alarms,
the no-verifier path; and (marker ``abcrown``) the real α,β-CROWN on a small digits model.

Most tests use a fake ``abcrown.py`` (a script in tmp_path) whose behaviour per VNN-LIB file is
set in ``behaviour.json``: ``unsat`` / ``sat`` / ``timeout`` / ``garbage`` (written to the
results file), ``crash`` (exit 1), ``hang`` (sleeps, with a child process, until killed).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import require_abcrown_dir
from torch import nn

from ccdist_plugin.fileio import file_sha256
from ccdist_plugin.verification import (
    VerificationResult,
    export_id_of,
    find_abcrown,
    merge_shards,
    parse_shard,
    run_verification,
    summarize,
)

FAKE_ABCROWN = r"""
import argparse, json, os, signal, subprocess, sys, time
HERE = os.path.dirname(os.path.abspath(__file__))


def _parse(argv):
    p = argparse.ArgumentParser()
    for k in ("--config", "--onnx_path", "--vnnlib_path", "--results_file", "--timeout"):
        p.add_argument(k)
    return p.parse_known_args(argv)


class ABCROWN:
    def __init__(self, args=None):
        self.args, self.rest = _parse(args)

    def main(self):
        args = self.args
        name = os.path.basename(args.vnnlib_path)
        with open(os.path.join(HERE, "calls.txt"), "a") as f:
            words = [name, "timeout=" + str(args.timeout), *self.rest, "pid=%d" % os.getpid()]
            f.write(" ".join(words) + "\n")
        b = json.load(open(os.path.join(HERE, "behaviour.json"))).get(name, "unsat")
        if b.startswith("slow_"):  # slow_<seconds>_<result>
            _, seconds, b = b.split("_")
            time.sleep(float(seconds))
        if b == "die_once":  # the verifier process dies the first time only
            marker = os.path.join(HERE, name + ".died")
            if not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(9)
            b = "unsat"
        if b == "swap_model":  # another network written over the one being verified
            with open(args.onnx_path, "ab") as f:
                f.write(b"tampered")
            b = "unsat"
        if b == "die":
            os._exit(9)
        if b == "crash":
            sys.exit(1)
        if b == "raise":
            raise RuntimeError("fake verifier bug")
        if b == "hang":
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            open(os.path.join(HERE, "child.pid"), "w").write(str(child.pid))
            open(os.path.join(HERE, "verifier.pid"), "w").write(str(os.getpid()))
            time.sleep(120)
        with open(args.results_file, "w") as f:
            f.write({"garbage": "I am not a verdict"}.get(b, b) + "\n")


if __name__ == "__main__":
    ABCROWN(sys.argv[1:]).main()
"""


def make_fake_abcrown(root: Path, behaviour: dict[str, str]) -> Path:
    d = root / "fake_abcrown"
    d.mkdir(exist_ok=True)
    (d / "abcrown.py").write_text(FAKE_ABCROWN)
    (d / "behaviour.json").write_text(json.dumps(behaviour))
    return d


def calls(fake: Path) -> list[str]:
    p = fake / "calls.txt"
    return p.read_text().splitlines() if p.exists() else []


def make_export(
    root: Path,
    outcomes: list[str],
    sent: list[bool] | None = None,
    flags: dict[int, dict] | None = None,
    eps: float = 0.1,
) -> Path:
    """A synthetic export directory at radius ``eps``: one point per outcome; ``sent[i]``: point i
    has an instance (default: only ``bab`` points). ``flags`` maps point positions to extra manifest
    fields. (The export id is a hash of the content: edit a manifest only through these arguments.)"""
    flags = flags or {}
    out = root / "export"
    (out / "vnnlib").mkdir(parents=True)
    sent = sent or [o == "bab" for o in outcomes]
    (out / "model.onnx").write_bytes(b"a stand-in for an ONNX model")
    points, rows = [], []
    for i, outcome in enumerate(outcomes):
        p = {
            "index": 100 + i,
            "label": i % 10,
            "prediction": i % 10 if outcome != "misclassified" else (i + 1) % 10,
            "correct": outcome != "misclassified",
            "ibp_certified": outcome == "pre-certified",
            "crown_certified": outcome == "pre-certified",
            "pgd_broken": outcome == "attacked",
            "outcome": outcome,
            "instance": None,
            "vnnlib": None,
            "dropped": [],
        }
        p.update(flags.get(i, {}))
        if sent[i]:
            p["instance"], p["vnnlib"] = len(rows), f"vnnlib/point_{100 + i:06d}.vnnlib"
            (out / p["vnnlib"]).write_text(f"; placeholder property of test point {100 + i}\n")
            p["vnnlib_sha256"] = file_sha256(out / p["vnnlib"])
            rows.append(f"model.onnx,{p['vnnlib']},5")
        points.append(p)
    (out / "instances.csv").write_text("".join(r + "\n" for r in rows))
    (out / "abcrown.yaml").write_text("general:\n  device: cpu\n")
    manifest = {
        "onnx": "model.onnx",
        "onnx_sha256": file_sha256(out / "model.onnx"),
        "eps": eps,
        "timeout_s": 5.0,
        "methods": ["ibp", "crown"],
        "points": points,
    }
    manifest["export_id"] = export_id_of(manifest["onnx_sha256"], eps, 5.0, points)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def record_for(export: Path, instance: int, verdict: str, **changes) -> dict:
    """A verdict record about instance ``instance`` of ``export`` (as run_verification writes it)."""
    manifest = json.loads((export / "manifest.json").read_text())
    point = next(p for p in manifest["points"] if p["instance"] == instance)
    rec = {
        "instance": instance,
        "index": point["index"],
        "verdict": verdict,
        "time_s": 1.0,
        "returncode": 0,
        "shard": "all",
        "worker": "all/w0",
        "export_id": manifest["export_id"],
        "onnx_sha256": manifest["onnx_sha256"],
        "vnnlib_sha256": point["vnnlib_sha256"],
        "eps": manifest["eps"],
        "budget_s": manifest["timeout_s"],
    }
    return {**rec, **changes}


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --------------------------------------------------------------------------------------------
# Verdicts, hard limit, errors
# --------------------------------------------------------------------------------------------


def test_verdicts_errors_and_hard_kill(tmp_path):
    outcomes = ["bab"] * 6 + ["pre-certified", "misclassified", "attacked"]
    export = make_export(tmp_path, outcomes)
    behaviour = ["unsat", "sat", "timeout", "garbage", "crash", "hang"]
    fake = make_fake_abcrown(tmp_path, {f"point_{100 + i:06d}.vnnlib": b for i, b in enumerate(behaviour)})
    start = time.monotonic()
    res = run_verification(export, abcrown_dir=fake, timeout_s=3, grace_s=2.0, python=sys.executable)
    assert time.monotonic() - start < 100  # the hang was cut short (its sleep is 120 s)
    by_index = {r["index"]: r for r in res.instances}
    assert [by_index[100 + i]["verdict"] for i in range(6)] == [
        "safe",
        "unsafe",
        "timeout",
        "error",
        "error",
        "timeout",
    ]
    assert by_index[105]["killed"] and by_index[105]["returncode"] is None
    assert "unreadable" in by_index[103]["detail"] and "status 1" in by_index[104]["detail"]
    assert res.counts == {
        "misclassified": 1, "pre-certified": 1, "attacked": 1,
        "safe": 1, "unsafe": 1, "timeout": 2, "error": 2, "missing": 0,
        "late": 0, "excluded": 0, "alarm": 0,
    }  # fmt: skip
    assert res.certified == 2 and res.certified_accuracy == pytest.approx(2 / 9)
    assert res.pgd_accuracy == pytest.approx((9 - 3) / 9)
    assert not res.soundness_alarms
    child = int((fake / "child.pid").read_text())
    for _ in range(50):
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child), "the hard limit must kill the whole process group"
    assert all("timeout=3" in c for c in calls(fake))
    saved = json.loads((export / "verification.json").read_text())
    assert saved["certified"] == 2 and saved["counts"]["error"] == 2
    table = (export / "verification.md").read_text()
    assert "**certified accuracy** | **2** | **22.22**" in table and "IBP-certified" in table


def test_resume_skips_done_and_retries_errors(tmp_path):
    export = make_export(tmp_path, ["bab"] * 4)
    fake = make_fake_abcrown(tmp_path, {"point_000101.vnnlib": "crash"})
    run_verification(export, abcrown_dir=fake, python=sys.executable)
    assert len(calls(fake)) == 4
    res = run_verification(export, abcrown_dir=fake, python=sys.executable)
    assert len(calls(fake)) == 4 and res.counts["safe"] == 3 and res.counts["error"] == 1
    (fake / "behaviour.json").write_text("{}")
    res = run_verification(export, abcrown_dir=fake, retry_errors=True, python=sys.executable)
    assert len(calls(fake)) == 5 and calls(fake)[-1].startswith("point_000101")
    assert res.counts["safe"] == 4 and res.counts["error"] == 0


def test_cut_short_results_line_is_rerun(tmp_path):
    export = make_export(tmp_path, ["bab"] * 2)
    fake = make_fake_abcrown(tmp_path, {})
    run_verification(export, abcrown_dir=fake, python=sys.executable)
    results = export / "verify" / "results_all.jsonl"
    lines = results.read_text().splitlines()
    results.write_text(lines[0] + "\n" + lines[1][:20])  # a kill in the middle of a write
    res = run_verification(export, abcrown_dir=fake, python=sys.executable)
    assert len(calls(fake)) == 3 and res.counts["safe"] == 2


def test_shards_and_merge_report_missing(tmp_path):
    export = make_export(tmp_path, ["bab"] * 5 + ["pre-certified"])
    fake = make_fake_abcrown(tmp_path, {})
    r0 = run_verification(export, abcrown_dir=fake, shard="0/2", python=sys.executable)
    assert (export / "verify" / "results_shard_0_of_2.jsonl").is_file()
    assert (export / "verify" / "summary_shard_0_of_2.json").is_file()
    assert not (export / "verification.json").exists()  # a shard does not claim the whole export
    assert sorted(c.split()[0] for c in calls(fake)) == [f"point_{100 + i:06d}.vnnlib" for i in (0, 2, 4)]
    assert r0.missing == [1, 3]
    merged = merge_shards(export)  # shard 1 died: its instances are missing, not certified
    assert merged.missing == [1, 3] and merged.counts["missing"] == 2 and merged.certified == 4
    assert json.loads((export / "verification.json").read_text())["missing"] == [1, 3]
    run_verification(export, abcrown_dir=fake, shard=(1, 2), python=sys.executable)
    merged = merge_shards(export)
    assert merged.missing == [] and merged.certified == 6 and merged.certified_accuracy == 1.0
    assert len(merged.results_files) == 2


def test_soundness_alarms(tmp_path, caplog):
    outcomes = ["pre-certified", "attacked", "misclassified", "bab", "pre-certified"]
    export = make_export(tmp_path, outcomes, sent=[True] * 5)
    fake = make_fake_abcrown(
        tmp_path,
        {
            "point_000100.vnnlib": "sat",  # our bounds certified it
            "point_000101.vnnlib": "unsat",  # PGD broke it
            "point_000102.vnnlib": "unsat",  # misclassified
            "point_000103.vnnlib": "unsat",
            "point_000104.vnnlib": "unsat",
        },
    )
    with caplog.at_level(logging.ERROR, logger="ccdist_plugin.verification"):
        res = run_verification(export, abcrown_dir=fake, python=sys.executable)
    assert len(res.soundness_alarms) == 3
    assert sum("SOUNDNESS ALARM" in r.getMessage() for r in caplog.records) == 3
    assert res.certified == 2  # the alarmed pre-certified point is not counted
    assert res.cross_checks == {"pre-certified->unsafe": 1, "pre-certified->safe": 1,
                                "attacked->safe": 1, "misclassified->safe": 1}  # fmt: skip
    saved = json.loads((export / "verification.json").read_text())
    assert len(saved["soundness_alarms"]) == 3
    assert "SOUNDNESS ALARMS (3)" in (export / "verification.md").read_text()
    from ccdist_plugin.cli import main

    cli = CliRunner().invoke(main, ["verify", "--export", str(export), "--abcrown", str(fake)])
    assert cli.exit_code == 3 and "SOUNDNESS ALARM" in cli.output


@pytest.mark.parametrize("safe_file", ["results_all.jsonl", "results_shard_0_of_2.jsonl"])
def test_conflicting_results_are_never_certified_whatever_the_file_order(tmp_path, safe_file):
    export = make_export(tmp_path, ["bab"])
    (export / "verify").mkdir()
    unsafe_file = ({"results_all.jsonl", "results_shard_0_of_2.jsonl"} - {safe_file}).pop()
    (export / "verify" / safe_file).write_text(json.dumps(record_for(export, 0, "safe")) + "\n")
    (export / "verify" / unsafe_file).write_text(json.dumps(record_for(export, 0, "unsafe")) + "\n")
    res = summarize(export)
    assert len(res.soundness_alarms) == 1 and "in another" in res.soundness_alarms[0]
    assert res.certified == 0 and res.counts["alarm"] == 1 and res.counts["safe"] == 0


def test_without_abcrown_reports_our_bounds(tmp_path, monkeypatch):
    monkeypatch.delenv("ABCROWN_DIR", raising=False)
    export = make_export(tmp_path, ["bab", "pre-certified", "attacked", "bab"])
    res = run_verification(export)
    assert not res.abcrown_ran and res.counts["missing"] == 2 and res.certified == 1
    assert res.ibp_certified_accuracy == pytest.approx(
        0.25
    ) and res.crown_certified_accuracy == pytest.approx(0.25)
    assert "ccdist install-verifier" in res.message and "None" not in res.message
    assert json.loads((export / "verification.json").read_text())["abcrown_ran"] is False
    from ccdist_plugin.cli import main

    cli = CliRunner().invoke(main, ["verify", "--export", str(export)])
    assert cli.exit_code == 2
    assert "CROWN-certified" in cli.output and "ABCROWN_DIR is unset" in cli.output
    assert cli.output.count("ccdist install-verifier") == 1, cli.output  # the hint once, not twice


def test_find_abcrown_and_parse_shard(tmp_path, monkeypatch):
    (tmp_path / "complete_verifier").mkdir()
    (tmp_path / "complete_verifier" / "abcrown.py").write_text("")
    assert find_abcrown(tmp_path) == (tmp_path / "complete_verifier").resolve()
    monkeypatch.setenv("ABCROWN_DIR", str(tmp_path / "complete_verifier"))
    assert find_abcrown() == (tmp_path / "complete_verifier").resolve()
    with pytest.raises(FileNotFoundError, match="nowhere.*ccdist install-verifier"):
        find_abcrown(tmp_path / "nowhere")
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


def test_not_an_export_dir(tmp_path):
    with pytest.raises(ValueError, match="manifest.json"):
        run_verification(tmp_path)


# --------------------------------------------------------------------------------------------
# The real α,β-CROWN
# --------------------------------------------------------------------------------------------


@pytest.mark.abcrown
def test_real_abcrown_agrees_with_our_bounds_and_attacks(tmp_path):
    """A small digits MLP trained for a second, 10 test points, all sent to α,β-CROWN on CPU
    (``verify_all``; IBP as the only pre-check, so the CROWN-certifiable points go to BaB):
    no soundness alarm, no error, every point our CROWN certifies comes back safe, every point
    PGD broke does not, and BaB certifies at least what IBP does."""
    abcrown = require_abcrown_dir()
    sk = pytest.importorskip("sklearn.datasets")
    from ccdist_plugin.bounds import certify
    from ccdist_plugin.models import mlp
    from ccdist_plugin.verification import export_instances

    d = sk.load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    torch.manual_seed(0)
    model = mlp(1, 8, 10, width=32, depth=2)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(6):
            for b in torch.randperm(1500).split(100):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[b]), y[b]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    xs, ys, eps = x[1500:1510], y[1500:1510], 0.02
    export = export_instances(
        model, (xs, ys), tmp_path / "export", eps, timeout_s=20, methods=("ibp",), verify_all=True
    )
    outcomes = {o for o in export.counts if export.counts[o]}
    assert {"pre-certified", "bab"} <= outcomes, export.counts  # the paths exercised
    assert outcomes & {"attacked", "misclassified"}, export.counts
    # α,β-CROWN's own attack dominates its CPU time here; ours already ran (50 steps x 3 restarts)
    cheap_attack = ["--pgd_restarts", "2", "--pgd_steps", "20"]
    res = run_verification(export.out_dir, abcrown_dir=abcrown, grace_s=60, extra_args=cheap_attack)
    assert isinstance(res, VerificationResult) and res.abcrown_ran
    assert not res.soundness_alarms, res.soundness_alarms
    verdicts = {r["index"]: r["verdict"] for r in res.instances}
    assert len(verdicts) == 10 and "error" not in verdicts.values(), res.instances
    crown = certify(model, xs, ys, eps, method="crown").certified
    for pos, p in enumerate(export.points):
        v = verdicts[p["index"]]
        if p["ibp_certified"] or bool(crown[pos]):
            assert v == "safe", p  # our bound proved it: α,β-CROWN must agree
        if p["pgd_broken"] or not p["correct"]:
            assert v != "safe", p
    n_ibp = sum(bool(p["ibp_certified"]) for p in export.points)
    assert sum(v == "safe" for v in verdicts.values()) >= n_ibp
    assert res.certified >= n_ibp and res.counts["missing"] == 0

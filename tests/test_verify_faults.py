"""Faults injected into verification (issue 15): stale verdicts after a re-export, tampered
exports, conflicting or late verdicts, a verifier that crashes, hangs or is killed, shards
writing at once, a full disk. In every case: nothing is counted that was not proved for the
current export, nothing proved is lost, and the report says what happened.

Most tests use the stand-in verifier of ``test_verify.py`` (``abcrown.py`` in tmp_path, with a
behaviour per VNN-LIB file); it also works as an importable module, so the persistent worker
runs it like the real α,β-CROWN.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_verify import _alive, calls, make_export, make_fake_abcrown, record_for

import ccdist_plugin.verification.records as records_mod
from ccdist_plugin.verification import (
    VerdictWriteError,
    check_export,
    hard_limit_s,
    merge_shards,
    run_verification,
    summarize,
)

REPO = Path(__file__).resolve().parent.parent


def _wait_dead(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return not _alive(pid)


def _write_records(export: Path, name: str, records: list[dict]) -> None:
    (export / "verify").mkdir(exist_ok=True)
    with open(export / "verify" / name, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


# --------------------------------------------------------------------------------------------
# Verdicts that cannot lie
# --------------------------------------------------------------------------------------------


def _tiny_model(seed: int):
    from ccdist_plugin.models import mlp

    torch.manual_seed(seed)
    return mlp(1, 4, 10, width=16, depth=2).eval()


def test_reexport_over_verdicts_starts_a_fresh_verification(tmp_path):
    """Re-exporting another model at a larger ε into a verified folder: the old "safe" verdicts
    (one per csv row) must not be credited to the new export."""
    from ccdist_plugin.verification import export_instances

    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 4, 4, generator=g)
    model_a = _tiny_model(0)
    with torch.no_grad():
        y = model_a(x).argmax(1)  # every point correct for model A
    fake = make_fake_abcrown(tmp_path, {})  # the stand-in proves everything it is given
    out = tmp_path / "export"
    first = export_instances(model_a, (x, y), out, 0.05, methods=("ibp",), attack_steps=0, timeout_s=5)
    assert first.num_instances > 0
    integrity = check_export(out)  # a genuine export passes its own integrity check
    assert (
        integrity.excluded == {}
        and integrity.problems == []
        and len(integrity.instances) == first.num_instances
    )
    res_a = run_verification(out, abcrown_dir=fake, python=sys.executable)
    assert res_a.counts["safe"] == first.num_instances

    # the very same export again (e.g. an interrupted `ccdist eval --bab` rerun): verdicts kept
    again = export_instances(model_a, (x, y), out, 0.05, methods=("ibp",), attack_steps=0, timeout_s=5)
    assert again.stale_dir is None
    n_calls = len(calls(fake))
    assert run_verification(out, abcrown_dir=fake, python=sys.executable).certified == res_a.certified
    assert len(calls(fake)) == n_calls

    model_b = _tiny_model(1)
    second = export_instances(model_b, (x, y), out, 0.3, methods=("ibp",), attack_steps=0, timeout_s=5)
    assert second.stale_dir is not None and (second.stale_dir / "verify").is_dir()
    assert not (out / "verification.json").exists()
    before = summarize(out)  # nothing run yet for the new export: nothing from the old one counts
    assert before.counts["safe"] == 0 and before.certified == before.counts["pre-certified"] == 0
    assert before.counts["missing"] == second.num_instances
    n_calls = len(calls(fake))
    res_b = run_verification(out, abcrown_dir=fake, python=sys.executable)
    assert len(calls(fake)) == n_calls + second.num_instances  # every new instance verified again
    assert res_b.counts["safe"] == second.num_instances and not res_b.ignored_records


def test_eval_bab_does_not_reuse_verdicts_of_another_model(tmp_path):
    """``ccdist eval --bab`` always exports into <out>/bab: the same rule applies."""
    pytest.importorskip("onnxruntime")
    from ccdist_plugin.evaluation import EvalSettings, evaluate

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 4, 4, generator=g)
    model_a, model_b = _tiny_model(0), _tiny_model(1)
    with torch.no_grad():
        y = model_a(x).argmax(1)
    fake = make_fake_abcrown(tmp_path, {})
    settings = EvalSettings(eps=0.3, bab=True, bab_count=6, bab_timeout_s=5.0, pgd_steps=0, methods=("ibp",))
    bab = tmp_path / "bab"
    evaluate(model_a, x, y, settings, progress=False, bab_dir=bab, abcrown_dir=fake)
    n_calls = len(calls(fake))
    (fake / "behaviour.json").write_text(json.dumps({f"point_{i:06d}.vnnlib": "sat" for i in range(6)}))
    res_b = evaluate(model_b, x, y, settings, progress=False, bab_dir=bab, abcrown_dir=fake)
    assert len(calls(fake)) > n_calls  # model B was verified, not read back from model A's run
    assert res_b.bab["counts"]["safe"] == 0 and res_b.bab["certified"] == 0
    assert list(bab.glob("verify.stale-*"))


def test_records_about_something_else_are_ignored_and_reported(tmp_path):
    export = make_export(tmp_path, ["bab"] * 3)
    wrong = [
        record_for(export, 0, "safe", export_id="an-older-export"),
        record_for(export, 0, "safe", onnx_sha256="0" * 64),
        record_for(export, 1, "safe", vnnlib_sha256="1" * 64),
        record_for(export, 1, "safe", eps=0.2),
        record_for(export, 2, "safe", index=7),
        {"instance": 2, "verdict": "safe", "time_s": 1.0},  # a record from before verdicts carried ids
    ]
    _write_records(export, "results_all.jsonl", [*wrong, record_for(export, 2, "safe")])
    res = summarize(export)
    assert res.certified == 1 and res.counts["safe"] == 1 and res.missing == [0, 1]
    reasons = " | ".join(r["reason"] for r in res.ignored_records)
    assert len(res.ignored_records) == 6
    for what in ("another export", "another model", "another property", "ε 0.2", "test point 7"):
        assert what in reasons
    assert "Ignored 6 record(s)" in res.table()


def test_an_export_without_ids_is_refused(tmp_path):
    export = make_export(tmp_path, ["bab"])
    manifest = json.loads((export / "manifest.json").read_text())
    del manifest["export_id"]
    (export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="older ccdist export"):
        summarize(export)


def test_an_edited_manifest_is_refused(tmp_path):
    """The export id is a hash of the manifest's content: e.g. an attacked point relabelled
    pre-certified would be counted without any proof."""
    export = make_export(tmp_path, ["bab", "attacked"])
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["points"][1]["outcome"] = "pre-certified"
    (export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="edited after the export"):
        summarize(export)


@pytest.mark.parametrize("tamper", ["vnnlib", "csv_row", "model"])
def test_tampered_exports_are_excluded_with_the_reason(tmp_path, tamper):
    export = make_export(tmp_path, ["bab"] * 4 + ["pre-certified"])
    if tamper == "vnnlib":  # e.g. a box shrunk to a point
        (export / "vnnlib" / "point_000101.vnnlib").write_text("(assert (<= X_0 0.5))\n")
    elif tamper == "csv_row":  # row 1 pointed at another point's property
        rows = (export / "instances.csv").read_text().splitlines()
        rows[1] = rows[2]
        (export / "instances.csv").write_text("\n".join(rows) + "\n")
    else:  # another network swapped in
        (export / "model.onnx").write_bytes(b"another network")
    fake = make_fake_abcrown(tmp_path, {})
    res = run_verification(export, abcrown_dir=fake, python=sys.executable)
    run = sorted(c.split()[0] for c in calls(fake))
    if tamper == "model":
        assert run == [] and res.counts["excluded"] == 4 and res.certified == 1
        assert "not the exported model" in res.integrity_problems[0]
    else:
        assert "point_000101.vnnlib" not in run and len(run) == 3
        assert res.counts["excluded"] == 1 and list(res.excluded) == [1] and res.certified == 4
        assert "sha256 mismatch" in res.excluded[1] or "row 1" in res.excluded[1]
    assert "Integrity check" in res.table() and res.soundness_alarms == []
    assert check_export(export).excluded == res.excluded


def test_pre_certified_point_broken_by_our_pgd_is_an_alarm(tmp_path):
    """The export/verify path raises the same alarm as evaluate: bounds and attack disagree."""
    from ccdist_plugin.verification import PrefilterResult
    from ccdist_plugin.verification.export import _point_record

    margins = torch.full((1, 3), 1.0, dtype=torch.float64)
    pre = PrefilterResult(  # what prefilter returns when bounds and attack disagree
        status=["alarm"],
        prediction=torch.tensor([0]),
        correct=torch.tensor([True]),
        margin_lb={"ibp": margins},
        proved=torch.tensor([[False, True, True]]),
        certified={"ibp": torch.tensor([True])},
        broken=torch.tensor([True]),
        adv_margin=torch.tensor([-0.5], dtype=torch.float64),
        crown_intermediate=None,
        timings_s={},
    )
    record = _point_record(0, 42, 0, pre, ("ibp",))
    assert record["outcome"] == "pre-certified" and "PGD found a counterexample" in record["soundness_alarm"]

    export = make_export(tmp_path, ["pre-certified", "pre-certified"], flags={0: {"pgd_broken": True}})
    res = summarize(export)
    assert res.certified == 1 and res.counts["alarm"] == 1 and len(res.soundness_alarms) == 1


# --------------------------------------------------------------------------------------------
# One time budget
# --------------------------------------------------------------------------------------------


def test_verdict_after_the_budget_is_late_and_not_counted(tmp_path):
    export = make_export(tmp_path, ["bab"] * 3)
    late_ones = [record_for(export, 0, "safe", time_s=700.0), record_for(export, 1, "unsafe", time_s=900.0)]
    _write_records(export, "results_all.jsonl", [*late_ones, record_for(export, 2, "safe", time_s=599.0)])
    res = summarize(export, budget_s=600)
    assert res.certified == 1 and res.counts["late"] == 2 and res.counts["safe"] == 1
    assert [r["instance"] for r in res.late] == [0, 1]
    table = res.table()
    assert "budget 600 s" in table and "safe after 700.0 s" in table
    assert hard_limit_s(600) < 900  # the old limit (timeout + max(60, timeout/2)) let 700 s count


def test_slow_verifier_run_is_late(tmp_path):
    export = make_export(tmp_path, ["bab"] * 2)
    fake = make_fake_abcrown(tmp_path, {"point_000100.vnnlib": "slow_2.5_unsat"})
    res = run_verification(export, abcrown_dir=fake, timeout_s=1.0, grace_s=10, python=sys.executable)
    assert res.budget_s == 1.0 and res.counts["late"] == 1 and res.certified == 1
    assert res.late[0]["verdict"] == "safe" and res.late[0]["time_s"] > 1.0
    assert all("timeout=1" in c for c in calls(fake))


# --------------------------------------------------------------------------------------------
# The persistent verifier and its faults
# --------------------------------------------------------------------------------------------


def _pids(fake: Path) -> list[str]:
    return [c.split("pid=")[1] for c in calls(fake)]


def test_worker_loads_the_verifier_once_and_process_mode_per_instance(tmp_path):
    export = make_export(tmp_path, ["bab"] * 4)
    fake = make_fake_abcrown(tmp_path, {})
    res = run_verification(export, abcrown_dir=fake, python=sys.executable)
    assert res.counts["safe"] == 4 and len(set(_pids(fake))) == 1
    assert {r["mode"] for r in res.instances} == {"worker"}
    (export / "verify").rename(tmp_path / "first-run")
    (fake / "calls.txt").unlink()
    res = run_verification(export, abcrown_dir=fake, python=sys.executable, mode="process")
    assert res.counts["safe"] == 4 and len(set(_pids(fake))) == 4


def test_worker_crash_costs_only_its_instance(tmp_path):
    """The worker dies on instance 1 (every time) and on instance 3 (once): each is retried once
    in a fresh process; the queued instances still run; the report counts the retries."""
    export = make_export(tmp_path, ["bab"] * 5)
    fake = make_fake_abcrown(tmp_path, {"point_000101.vnnlib": "die", "point_000103.vnnlib": "die_once"})
    res = run_verification(export, abcrown_dir=fake, python=sys.executable)
    by = {r["instance"]: r for r in res.instances}
    assert by[1]["verdict"] == "error" and by[1]["attempts"] == 2
    assert by[3]["verdict"] == "safe" and by[3]["attempts"] == 2 and by[3]["mode"] == "worker+retry"
    assert res.counts["safe"] == 4 and res.certified == 4 and res.missing == []
    assert res.workers == {"all/w0": {"done": 5, "retried": 2}}
    assert "retried after a crash" in res.table()


@pytest.mark.parametrize("mode", ["worker", "process"])
def test_hung_verifier_is_killed_with_its_process_group(tmp_path, mode):
    export = make_export(tmp_path, ["bab"] * 3)
    fake = make_fake_abcrown(tmp_path, {"point_000100.vnnlib": "hang"})
    res = run_verification(export, abcrown_dir=fake, timeout_s=1, grace_s=1, python=sys.executable, mode=mode)
    by = {r["instance"]: r for r in res.instances}
    assert by[0]["verdict"] == "timeout" and by[0]["killed"]
    assert by[1]["verdict"] == by[2]["verdict"] == "safe"  # the next instances ran after the hang
    assert _wait_dead(int((fake / "child.pid").read_text())), "the verifier's child outlived the kill"


def test_killed_verification_leaves_no_verifier_running(tmp_path):
    """``ccdist verify`` itself killed (SIGKILL) mid-instance: the verifier and its children go too,
    the instance has no verdict (not counted), and a resumed run verifies it."""
    export = make_export(tmp_path, ["bab"] * 2)
    fake = make_fake_abcrown(tmp_path, {"point_000100.vnnlib": "hang"})
    code = (
        "import sys; from ccdist_plugin.verification import run_verification; "
        f"run_verification({str(export)!r}, abcrown_dir={str(fake)!r}, timeout_s=100, python=sys.executable)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runner = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 60
    while not (fake / "child.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (fake / "child.pid").exists(), "the stand-in verifier never started"
    time.sleep(0.3)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    assert _wait_dead(int((fake / "verifier.pid").read_text())), "the verifier outlived ccdist verify"
    assert _wait_dead(int((fake / "child.pid").read_text())), "the verifier's child was orphaned"
    res = summarize(export)
    assert res.certified == 0 and res.missing == [0, 1]
    (fake / "behaviour.json").write_text("{}")
    res = run_verification(export, abcrown_dir=fake, python=sys.executable)
    assert res.certified == 2 and res.missing == []


def test_truncated_result_line_is_not_counted_and_rerun(tmp_path):
    export = make_export(tmp_path, ["bab"] * 2)
    line = json.dumps(record_for(export, 0, "safe"))
    _write_records(export, "results_all.jsonl", [record_for(export, 1, "safe")])
    with open(export / "verify" / "results_all.jsonl", "a") as f:
        f.write(line[: len(line) // 2])  # killed in the middle of the write
    res = summarize(export)
    assert res.certified == 1 and res.missing == [0]
    assert any("cut-short" in r["reason"] for r in res.ignored_records)
    fake = make_fake_abcrown(tmp_path, {})
    res = run_verification(export, abcrown_dir=fake, python=sys.executable)
    assert [c.split()[0] for c in calls(fake)] == ["point_000100.vnnlib"] and res.certified == 2


def test_disk_full_while_writing_a_verdict(tmp_path, monkeypatch):
    export = make_export(tmp_path, ["bab"] * 3)
    fake = make_fake_abcrown(tmp_path, {})
    real_write, written = records_mod._write_verdict_bytes, []

    def full_after_one(fd: int, data: bytes) -> int:
        if written:
            real_write(fd, data[:10])  # part of the line reaches the disk, then it is full
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(data)
        return real_write(fd, data)

    monkeypatch.setattr(records_mod, "_write_verdict_bytes", full_after_one)
    with pytest.raises(VerdictWriteError, match="No space left") as info:
        run_verification(export, abcrown_dir=fake, python=sys.executable)
    assert len(calls(fake)) == 2  # the run stopped at the verdict it could not write
    assert info.value.result is not None and info.value.result.certified == 1
    assert "not counted" in info.value.result.message
    monkeypatch.undo()
    res = run_verification(export, abcrown_dir=fake, python=sys.executable)  # resumed: nothing lost
    assert res.certified == 3 and len(calls(fake)) == 4 and res.missing == []


# --------------------------------------------------------------------------------------------
# Several workers, several shards
# --------------------------------------------------------------------------------------------


def test_two_workers_share_the_queue_and_the_report_says_who_did_what(tmp_path):
    export = make_export(tmp_path, ["bab"] * 6)
    fake = make_fake_abcrown(tmp_path, {"point_000102.vnnlib": "die_once"})
    res = run_verification(export, abcrown_dir=fake, python=sys.executable, workers=2)
    assert res.certified == 6 and res.missing == []
    assert sum(w["done"] for w in res.workers.values()) == 6
    assert sum(w["retried"] for w in res.workers.values()) == 1
    assert set(res.workers) <= {"all/w0", "all/w1"}


def test_shards_writing_at_once(tmp_path):
    """Two shards and a duplicate of one of them, running at the same time (threads here; processes
    or machines write the same way: one O_APPEND write per line): every line is whole, nothing is
    missing, duplicates agree and are counted once."""
    export = make_export(tmp_path, ["bab"] * 8)
    fake = make_fake_abcrown(tmp_path, {"point_000103.vnnlib": "sat"})
    errors: list[BaseException] = []

    def shard(s: str) -> None:
        try:
            run_verification(export, abcrown_dir=fake, shard=s, python=sys.executable, mode="process")
        except BaseException as err:  # noqa: BLE001  (reported by the assertion below)
            errors.append(err)

    threads = [threading.Thread(target=shard, args=(s,)) for s in ("0/2", "1/2", "0/2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors
    merged = merge_shards(export)
    assert merged.missing == [] and merged.ignored_records == []
    assert merged.counts["safe"] == 7 and merged.counts["unsafe"] == 1 and merged.certified == 7
    assert merged.missing_by_shard == {"shard_0_of_2": [], "shard_1_of_2": []}
    assert not merged.soundness_alarms


def test_dead_shard_is_reported_missing_per_shard(tmp_path):
    export = make_export(tmp_path, ["bab"] * 4)
    fake = make_fake_abcrown(tmp_path, {})
    run_verification(export, abcrown_dir=fake, shard="1/2", python=sys.executable)
    _write_records(export, "results_shard_0_of_2.jsonl", [])  # shard 0 started, then died
    merged = merge_shards(export)
    assert merged.missing == [0, 2] and merged.missing_by_shard["shard_0_of_2"] == [0, 2]
    assert merged.missing_by_shard["shard_1_of_2"] == [] and merged.certified == 2
    assert "Missing per shard" in merged.table()


def test_worker_that_cannot_import_the_verifier_falls_back_to_processes(tmp_path):
    export = make_export(tmp_path, ["bab"] * 2)
    fake = tmp_path / "script_only"
    fake.mkdir()
    (fake / "abcrown.py").write_text(
        "import sys\n"
        "if __name__ != '__main__':\n"
        "    raise ImportError('this verifier only runs as a script')\n"
        "args = sys.argv[1:]\n"
        "open(args[args.index('--results_file') + 1], 'w').write('unsat\\n')\n"
    )
    res = run_verification(export, abcrown_dir=fake, python=sys.executable)
    assert res.certified == 2 and {r["mode"] for r in res.instances} == {"process"}


def test_model_swapped_during_the_run_is_never_counted(tmp_path):
    export = make_export(tmp_path, ["bab"] * 3)
    fake = make_fake_abcrown(tmp_path, {"point_000100.vnnlib": "swap_model"})
    res = run_verification(export, abcrown_dir=fake, python=sys.executable)
    assert res.certified == 0 and res.counts["error"] == 1 and res.counts["excluded"] == 2
    assert "changed while it was verified" in res.instances[0]["detail"]
    assert sum("another model" in r["reason"] for r in res.ignored_records) == 2
    assert "not the exported model" in res.integrity_problems[0]

"""``reproduce_cpu.py --protocol paper-cpu`` (issue 17): the scaled schedule and configs, paired seeds
(same initialization, data order and attack noise for CC-IBP and CC-Dist), and a digits-sized smoke run of
the whole pipeline except α,β-CROWN, then the analysis with stand-in BaB verdicts."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import reproduce_cpu as rc  # noqa: E402
from reproduction.jobs import build_unseeded  # noqa: E402
from reproduction.runfolders import lock_is_stale, wait_or_lock  # noqa: E402


def test_schedule_is_the_papers_scaled():
    assert rc.paper_cpu_schedule(160) == {
        "warmup_epochs": 1,
        "ramp_up_epochs": 80,
        "lr_decay_epochs": [120, 140],
    }
    assert rc.paper_cpu_schedule(24) == {
        "warmup_epochs": 1,
        "ramp_up_epochs": 12,
        "lr_decay_epochs": [18, 21],
    }
    assert rc.paper_cpu_schedule(2)["lr_decay_epochs"] == []  # no decay at or after the last epoch
    with pytest.raises(ValueError):
        rc.paper_cpu_schedule(1)


def test_configs_are_the_protocols(tmp_path):
    student = rc.Job("s", "cifar10-jpeg", "cc_dist", 2, 0.01, 5.0, "t.pt", epochs=24, protocol="paper-cpu")
    cfg = rc.paper_cpu_config(student, tmp_path)
    assert (
        cfg.model.name == "cnn7"
        and list(cfg.model.channels) == [16, 16, 32, 32, 32]
        and cfg.model.width == 128
    )
    att = cfg.loss.attack
    assert (att.steps, att.step_size, att.eps_factor) == (8, 0.25, 2.1)
    assert cfg.loss.method == "cc_dist" and cfg.loss.alpha == 0.01 and cfg.loss.beta == pytest.approx(5 / 128)
    assert (cfg.schedule.epochs, cfg.schedule.ramp_up_epochs, list(cfg.optim.lr_decay_epochs)) == (
        24,
        12,
        [18, 21],
    )
    assert cfg.seed == 2 and cfg.data.val_split == rc.VAL_SIZE and cfg.eps == pytest.approx(2 / 255)
    ibp = rc.paper_cpu_config(rc.Job("i", "cifar10-jpeg", "cc_ibp", 2, 0.01, protocol="paper-cpu"), tmp_path)
    assert ibp.loss.method == "cc_ibp" and ibp.loss.beta is None and ibp.loss.attack == cfg.loss.attack
    teacher = rc.paper_cpu_config(
        rc.Job("t", "cifar10-jpeg", "teacher", 0, teacher_epochs=30, teacher_steps=10, protocol="paper-cpu"),
        tmp_path,
    )
    assert teacher.loss.method == "pgd_at" and teacher.schedule.epochs == 30
    assert (teacher.loss.attack.steps, teacher.loss.attack.step_size) == (10, 0.25)
    assert teacher.model == cfg.model  # the same architecture as the students


def test_attack_cost_plan_is_the_protocols():
    import attack_cost

    assert attack_cost.NARROW["channels"] == (16, 16, 32, 32, 32) and attack_cost.NARROW["width"] == 128
    assert attack_cost.TRAIN_IMAGES == 10_000 - rc.VAL_SIZE


def _teacher(root: Path) -> str:
    job = rc.Job("teacher-s0", "digits", "teacher", 0, teacher_epochs=1, protocol="paper-cpu")
    rc.run_job(job, str(root))
    return str(root / "teacher-s0" / "checkpoint.pt")


def test_same_seed_gives_both_methods_the_same_start_and_batches(tmp_path):
    """CC-Dist with β = 0 is CC-IBP: trained from the same seed it must end bitwise equal, which holds only
    if initialization, data order and attack noise are all the same for the two methods."""
    from ccdist_plugin.checkpoint import load_model
    from ccdist_plugin.data import load_dataset
    from ccdist_plugin.trainer import Trainer

    teacher = _teacher(tmp_path)
    data = load_dataset("digits", val_split=rc.DIGITS_VAL)
    states = {}
    for kind, bw in (("cc_ibp", None), ("cc_dist", 0.0)):
        job = rc.Job(kind, "digits", kind, 3, 0.5, bw, teacher, epochs=2, protocol="paper-cpu")
        cfg = rc.paper_cpu_config(job, tmp_path / kind)
        if kind == "cc_dist":
            load_model(teacher)  # as run_job's process may have done: consumes the global random state
        model = rc.build_student(cfg, data.spec)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        fit = Trainer(model, cfg, teacher=teacher if kind == "cc_dist" else None).fit(data.train, data.val)
        states[kind] = (init, fit.model.state_dict())
    for i in (0, 1):  # initial and trained weights
        a, b = states["cc_ibp"][i], states["cc_dist"][i]
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the fault the seeding prevents: a network built after loading a teacher, without reseeding, differs
    cfg = rc.paper_cpu_config(rc.Job("x", "digits", "cc_ibp", 3, 0.5, protocol="paper-cpu"), tmp_path / "x")
    torch.manual_seed(cfg.seed)
    load_model(teacher)
    unseeded = build_unseeded(cfg, data.spec).state_dict()
    assert not all(torch.equal(unseeded[k], states["cc_ibp"][0][k]) for k in unseeded)
    other_seed = rc.build_student(cfg.replace(seed=4), data.spec).state_dict()
    assert not all(torch.equal(other_seed[k], states["cc_ibp"][0][k]) for k in other_seed)


def _fake_bab(run: Path, outcomes: list[str], eps: float) -> None:
    """A verified export of ``run``'s checkpoint with the given outcomes (stand-in for α,β-CROWN)."""
    from test_verify import make_export

    from ccdist_plugin.fileio import file_sha256

    shutil.rmtree(run / "bab", ignore_errors=True)
    export = make_export(run / "tmp", outcomes, eps=eps)  # ε is part of the export id
    manifest = json.loads((export / "manifest.json").read_text())
    manifest.update(
        model_sha256="model-" + run.name,
        dataset="digits",
        checkpoint_sha256=file_sha256(run / "checkpoint.pt"),
    )
    (export / "manifest.json").write_text(json.dumps(manifest))
    export.rename(run / "bab")
    shutil.rmtree(run / "tmp")
    (run / "bab.json").write_text("{}")


def test_smoke_whole_pipeline_then_analysis(tmp_path, monkeypatch):
    monkeypatch.delenv("ABCROWN_DIR", raising=False)
    root, docs = tmp_path / "runs", tmp_path / "docs"
    argv = [
        "--protocol", "paper-cpu", "--dataset", "digits", "--epochs", "2", "--teacher-epochs", "1",
        "--seeds", "2", "--alphas", "0.5", "--beta-sweep", "1,5", "--workers", "1",
        "--out", str(root), "--docs", str(docs),
    ]  # fmt: skip
    rc.main(argv)
    res = json.loads((docs / "results" / "paper_cpu.json").read_text())
    assert res["status"] == "ok"
    alpha, beta = res["selection"]["alpha"]["chosen"], res["selection"]["beta_w"]["chosen"]
    assert alpha == 0.5 and beta in (1.0, 5.0)
    groups = {"cc_ibp", *(f"cc_dist-b{b:g}" for b in {5.0, beta})}
    assert set(res["groups"]) == groups and all(set(v) == {"0", "1"} for v in res["groups"].values())
    row = res["groups"]["cc_ibp"]["0"]
    assert {"std", "pgd40", "ibp_cert", "crown_cert", "ibp_loss", "feature_distance"} <= set(row)
    comp = res["comparisons"]["cc_dist-b5"]
    assert comp["crown_pairs"]["pairs"] == 2 * 300 and comp["decision"].startswith("not available")
    assert len(comp["crown_cert"]["differences"]) == 2
    assert "paired seeds" in (docs / "results" / "paper_cpu.md").read_text()
    # resumable: a second invocation trains nothing (every run is reused)
    mtimes = {p: p.stat().st_mtime for p in root.glob("*/checkpoint.pt")}
    rc.main(argv)
    assert {p: p.stat().st_mtime for p in root.glob("*/checkpoint.pt")} == mtimes

    # the analysis of BaB verdicts, with stand-in verified exports (12 points per run)
    plan = res["plan"]
    names = rc.paper_cpu_names(plan, alpha, 5.0)
    for s in (0, 1):
        _fake_bab(root / names["cc_ibp"][s], ["pre-certified"] * 3 + ["attacked"] * 9, 0.1)
        _fake_bab(root / names["cc_dist"][s], ["pre-certified"] * 8 + ["attacked"] * 3 + ["bab"], 0.1)
    out = rc.report_paper_cpu(str(root), plan, docs)
    comp = out["comparisons"]["cc_dist-b5"]
    assert comp["bab_pairs"]["only_a"] == 10 and comp["bab_pairs"]["only_b"] == 0  # 5 per seed
    assert comp["bab_cert"]["differences"] == [pytest.approx(100 * 5 / 12)] * 2
    assert comp["decision"] in ("gain appears", "inconclusive")  # sd 0: the interval is one point
    # a verdict about another ε is refused, never paired
    _fake_bab(root / names["cc_ibp"][1], ["pre-certified"] * 3 + ["attacked"] * 9, 0.2)
    with pytest.raises(ValueError, match="eps"):
        rc.report_paper_cpu(str(root), plan, docs)
    # a BaB export of another checkpoint (a retrained run) is refused too
    _fake_bab(root / names["cc_ibp"][1], ["pre-certified"] * 3 + ["attacked"] * 9, 0.1)
    (root / names["cc_ibp"][1] / "checkpoint.pt").write_bytes(b"retrained")
    with pytest.raises(ValueError, match="another checkpoint"):
        rc.report_paper_cpu(str(root), plan, docs)


def test_lock_of_a_killed_run_is_taken_over_at_once(tmp_path):
    """A run killed mid-training leaves its lock: the next invocation must resume it, not wait hours."""
    import socket
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock, done = tmp_path / "running.lock", tmp_path / "result.json"
    lock.write_text(f"{dead.pid} {socket.gethostname()}")
    assert lock_is_stale(lock)
    wait_or_lock(lock, done, poll_s=60.0)  # returns at once, holding the lock
    assert lock.read_text().split()[0] == str(os.getpid()) and not lock_is_stale(lock)
    lock.write_text(f"{os.getpid()} another-host")  # another host's fresh lock: live until 3 hours old
    assert not lock_is_stale(lock)
    os.utime(lock, (0, 0))
    assert lock_is_stale(lock)


@pytest.mark.slow  # trains 4 epochs in a subprocess, kills it, resumes
def test_a_run_killed_mid_training_resumes_from_its_last_epoch(tmp_path):
    import signal
    import subprocess
    import time

    root = tmp_path / "runs"
    job = "rc.Job('cc_ibp-a0.5-s0', 'digits', 'cc_ibp', 0, 0.5, epochs=4, protocol='paper-cpu')"
    code = f"import sys; sys.path.insert(0, {str(Path(rc.__file__).parent)!r}); import reproduce_cpu as rc; "
    code += f"rc.run_job({job}, {str(root)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code])
    run = root / "cc_ibp-a0.5-s0"
    deadline = time.time() + 300
    while not (run / "checkpoint.pt").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (run / "train_time.json").is_file():
        pytest.skip("the run finished before it could be killed (machine too fast for this test)")
    # the next invocation takes over the dead process's lock and continues from the saved epoch
    res = rc.run_job(
        rc.Job("cc_ibp-a0.5-s0", "digits", "cc_ibp", 0, 0.5, epochs=4, protocol="paper-cpu"), str(root)
    )
    assert json.loads((run / "train_time.json").read_text())["resumed"] is True
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 5)) and "test" in res


def _stage(argv: list[str], capsys) -> tuple[int, str]:
    """Run the script's ``main``; (exit status, stderr)."""
    capsys.readouterr()
    try:
        rc.main(argv)
    except SystemExit as stop:
        return int(stop.code), capsys.readouterr().err
    return 0, capsys.readouterr().err


def test_a_stage_reuses_an_earlier_stage_only_with_the_same_settings(tmp_path, monkeypatch, capsys):
    """Issue 21: `--until teacher --teacher-epochs 1`, then `--teacher-epochs 3 --until select-alpha`, used
    to reuse the 1-epoch teacher and report 3 epochs. Now it stops (exit 2, one line, nothing changed);
    the same settings are reused."""
    _teacher_stage_then_other_settings(tmp_path, monkeypatch, capsys)


def _teacher_stage_then_other_settings(tmp_path, monkeypatch, capsys) -> tuple[list[str], Path]:
    monkeypatch.delenv("ABCROWN_DIR", raising=False)
    root, docs = tmp_path / "runs", tmp_path / "docs"
    base = [
        "--protocol", "paper-cpu", "--dataset", "digits", "--epochs", "2", "--seeds", "2", "--alphas", "0.5",
        "--beta-sweep", "1,5", "--workers", "1", "--out", str(root), "--docs", str(docs),
    ]  # fmt: skip
    assert _stage([*base, "--teacher-epochs", "1", "--until", "teacher"], capsys)[0] == 0
    teacher = root / "teacher-s0"
    before = (teacher / "checkpoint.pt").read_bytes()
    code, err = _stage([*base, "--teacher-epochs", "3", "--until", "select-alpha"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(teacher) in err and "teacher_epochs: 1 there, 3 now" in err and "--overwrite" in err
    assert (teacher / "checkpoint.pt").read_bytes() == before and not (root / "cc_ibp-a0.5-s0").exists()
    # the report of runs with other settings is refused too (it would misstate them)
    code, err = _stage([*base, "--teacher-epochs", "3", "--report-only"], capsys)
    assert code == 2 and "teacher_epochs: 1 there, 3 now" in err
    # the same settings again: reused (another stage continues)
    assert _stage([*base, "--teacher-epochs", "1", "--until", "teacher"], capsys)[0] == 0
    assert (teacher / "checkpoint.pt").read_bytes() == before
    return base, teacher


@pytest.mark.slow  # retrains the teacher and runs the α stage (about a minute on 2 busy cores)
def test_overwrite_retrains_only_the_stage_whose_settings_differ(tmp_path, monkeypatch, capsys):
    base, teacher = _teacher_stage_then_other_settings(tmp_path, monkeypatch, capsys)
    root = teacher.parent
    # --overwrite: the teacher is retrained with 3 epochs
    assert _stage([*base, "--teacher-epochs", "3", "--until", "select-alpha", "--overwrite"], capsys)[0] == 0
    epochs = [json.loads(line)["epoch"] for line in (teacher / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert json.loads((teacher / "result.json").read_text())["job"]["teacher_epochs"] == 3
    assert json.loads((teacher / "settings.json").read_text())["teacher_epochs"] == 3
    assert (root / "cc_ibp-a0.5-s0" / "result.json").is_file()


def test_a_cc_dist_run_is_reused_only_with_the_same_teacher_weights(tmp_path):
    """A CC-Dist run records its teacher's weights: after the teacher was retrained (same settings, other
    weights) the run is refused, and with overwrite retrained."""
    from ccdist_plugin.checkpoint import save_checkpoint, state_sha256
    from ccdist_plugin.config import load_preset
    from ccdist_plugin.data import load_dataset
    from ccdist_plugin.trainer import build_model

    net = build_model(load_preset("digits-teacher"), load_dataset("digits").spec)
    teacher = tmp_path / "teacher-s0" / "checkpoint.pt"
    save_checkpoint(teacher, {"arch": dict(net.arch), "model_state": net.state_dict()})
    (teacher.parent / "train_time.json").write_text("{}")
    job = rc.Job("cc_dist-x", "digits", "cc_dist", 0, 0.5, 5.0, str(teacher), epochs=2, protocol="paper-cpu")
    settings = rc.job_settings(job, rc.teacher_weights_sha256(job))
    assert settings["teacher_sha256"] == state_sha256(net)
    run = tmp_path / "cc_dist-x"
    rc.check_run_folder(run, settings, overwrite=False)
    (run / "result.json").write_text(json.dumps({"job": {}}))
    (run / "checkpoint.pt").write_bytes(b"trained towards the first teacher")
    rc.check_run_folder(run, settings, overwrite=False)  # the same teacher: reusable
    other = {**settings, "teacher_sha256": state_sha256(torch.nn.Linear(1, 1))}
    with pytest.raises(rc.RunSettingsError, match="teacher_sha256"):
        rc.check_run_folder(run, other, overwrite=False)
    assert (run / "checkpoint.pt").is_file()
    (run / "notes.txt").write_text("mine")
    rc.check_run_folder(run, other, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt", rc.SETTINGS_NAME]

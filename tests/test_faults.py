"""Faults injected through the ``ccdist`` command line (issue: nothing lost, nothing silently wrong).

Every test injects one fault in a temporary folder and asserts the exit status, the one-line message
and that nothing was lost or miscounted. Runs are tiny (digits, a width-16 MLP, one or two epochs).
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ccdist_plugin.checkpoint import load_checkpoint, save_checkpoint
from ccdist_plugin.cli import main
from ccdist_plugin.fileio import file_sha256

pytest.importorskip("sklearn")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--quiet",
    "--set", "device=cpu", "--set", "model.width=16", "--set", "log.val_size=32",
    "--set", "log.plot=false", "--set", "log.tensorboard=false", "--set", "data.options.test_size=100",
]  # fmt: skip
TEACHER = ["train-teacher", "--config", "digits-teacher", *TINY, "--set", "schedule.epochs=1"]
TEACHER += ["--set", "loss.attack.steps=1"]
STUDENT = ["train", "--config", "digits", *TINY, "--set", "schedule.epochs=2"]
STUDENT += ["--set", "schedule.warmup_epochs=1", "--set", "schedule.ramp_up_epochs=1"]
STUDENT += ["--set", "optim.lr_decay_epochs=[]"]


def ccdist(*args: str | Path) -> object:
    """Run ``ccdist ARGS`` in this process; stderr is part of ``.output``."""
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result) -> str:
    """The one ``error: ...`` line of a failed command (asserting there is exactly one)."""
    lines = [ln for ln in result.output.splitlines() if ln.startswith(("error:", "Error:"))]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "run"
    result = ccdist(*TEACHER, "--output-dir", out)
    assert result.exit_code == 0, result.output
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def student(tmp_path_factory, teacher) -> Path:
    out = tmp_path_factory.mktemp("student") / "run"
    result = ccdist(*STUDENT, "--teacher", teacher, "--output-dir", out)
    assert result.exit_code == 0, result.output
    return out / "checkpoint.pt"


def _perturbed_copy(src: Path, dst: Path, *, nan: bool = False, drop_key: bool = False) -> Path:
    payload = load_checkpoint(src)
    state = dict(payload["model_state"])
    name = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 2)
    weight = state[name].clone()
    if nan:
        weight.view(-1)[0] = float("nan")
    else:
        weight += 0.01
    state[name] = weight
    if drop_key:
        del state[name]
    payload["model_state"] = state
    payload.pop("format", None)
    return save_checkpoint(dst, payload)


# ---------------------------------------------------------------------------------- data loss


def test_second_run_into_a_held_folder_is_refused(tmp_path, teacher):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from ccdist_plugin.runlock import run_folder_lock
            with run_folder_lock({str(run)!r}, command="ccdist train --config first"):
                print("held", flush=True)
                sys.stdin.read()
            """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        (run / "checkpoint.pt").write_bytes(b"the first run's model")
        result = ccdist(*TEACHER, "--output-dir", run)
        assert result.exit_code == 2
        line = error_line(result)
        assert f"pid {holder.pid}" in line and "ccdist train --config first" in line
        assert (run / "checkpoint.pt").read_bytes() == b"the first run's model"  # nothing overwritten
    finally:
        holder.communicate("", timeout=60)
    # the holder has ended: its folder is free again, and its checkpoint is replaced only when asked to
    result = ccdist(*TEACHER, "--output-dir", run)
    assert result.exit_code == 2 and "--overwrite" in error_line(result)
    assert (run / "checkpoint.pt").read_bytes() == b"the first run's model"
    result = ccdist(*TEACHER, "--output-dir", run, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (run / ".ccdist.lock").exists()


def test_stale_lock_and_temporaries_of_a_killed_run_are_cleaned(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = {"pid": int(dead.stdout), "hostname": "here", "command": "ccdist train (killed -9)"}
    (run / ".ccdist.lock").write_text(json.dumps(stale))
    for i in range(3):  # what kill -9 during a checkpoint write leaves behind
        (run / f".checkpoint.pt.abc{i}.tmp").write_bytes(b"half a checkpoint")
    (run / "notes.txt").write_text("mine")
    result = ccdist(*TEACHER, "--output-dir", run)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run.glob(".*.tmp")) == []
    assert (run / "notes.txt").read_text() == "mine" and load_checkpoint(run / "checkpoint.pt")["epoch"] == 1


def test_lock_without_flock_checks_the_recorded_pid(tmp_path, monkeypatch):
    import socket

    from ccdist_plugin import runlock

    monkeypatch.setattr(runlock, "fcntl", None)  # a file system without flock
    (tmp_path / ".ccdist.lock").write_text(
        json.dumps({"pid": os.getppid(), "hostname": socket.gethostname(), "command": "ccdist train X"})
    )
    with pytest.raises(runlock.RunFolderLockedError, match=f"pid {os.getppid()} .*ccdist train X"):
        with runlock.run_folder_lock(tmp_path):
            pass
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    (tmp_path / ".ccdist.lock").write_text(
        json.dumps({"pid": int(ended.stdout), "hostname": socket.gethostname()})
    )
    with runlock.run_folder_lock(tmp_path, command="mine"):
        assert json.loads((tmp_path / ".ccdist.lock").read_text())["command"] == "mine"
    assert not (tmp_path / ".ccdist.lock").exists()


def test_replaced_teacher_is_refused_on_resume_and_moved_teacher_accepted(tmp_path, teacher, student):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(student.read_bytes())
    before = file_sha256(run / "checkpoint.pt")
    replaced = _perturbed_copy(teacher, tmp_path / "teacher.pt")  # another network at the given path
    args = [*STUDENT, "--teacher", replaced, "--output-dir", run, "--resume"]
    result = ccdist(*args)
    assert result.exit_code == 2
    assert "--allow-teacher-change" in error_line(result)
    assert file_sha256(run / "checkpoint.pt") == before
    # the same bytes at a new path: accepted (the run is finished, so resuming is a no-op)
    moved = tmp_path / "moved" / "teacher copy.pt"
    moved.parent.mkdir()
    moved.write_bytes(teacher.read_bytes())
    result = ccdist(*STUDENT, "--teacher", moved, "--output-dir", run, "--resume")
    assert result.exit_code == 0, result.output
    result = ccdist(*args, "--allow-teacher-change")
    assert result.exit_code == 0, result.output
    assert (
        load_checkpoint(run / "checkpoint.pt")["teacher_sha256"] == load_checkpoint(student)["teacher_sha256"]
    )


# ------------------------------------------------------------------- nothing overwritten (issue 21 §4)


def _finished_run_copy(src: Path, run: Path, epoch: int | None = None) -> Path:
    """``run/checkpoint.pt``: a copy of a finished run's checkpoint (``epoch``: as if stopped after it)."""
    run.mkdir(parents=True)
    if epoch is None:
        (run / "checkpoint.pt").write_bytes(src.read_bytes())
    else:
        payload = load_checkpoint(src)
        payload["epoch"] = epoch
        payload.pop("format", None)
        save_checkpoint(run / "checkpoint.pt", payload)
    (run / "notes.txt").write_text("mine")  # not the run's: never removed
    return run / "checkpoint.pt"


def test_second_train_into_a_finished_run_is_refused_unless_overwrite(tmp_path, teacher, student):
    run = tmp_path / "run"
    ckpt = _finished_run_copy(student, run)
    before = file_sha256(ckpt)
    result = ccdist(*STUDENT, "--teacher", teacher, "--output-dir", run)  # the same command again
    assert result.exit_code == 2
    line = error_line(result)
    assert "checkpoint.pt (a finished run, 2/2 epochs)" in line and str(run) in line
    assert "--resume" in line and "another --output-dir" in line and "--overwrite" in line
    assert file_sha256(ckpt) == before and sorted(p.name for p in run.iterdir()) == [
        "checkpoint.pt",
        "notes.txt",
    ]
    result = ccdist(*STUDENT, "--teacher", teacher, "--output-dir", run, "--resume", "--overwrite")
    assert result.exit_code == 2 and "pass one" in result.output and file_sha256(ckpt) == before
    # --overwrite: the earlier run's outputs are replaced, other files kept
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.old").write_text("the earlier run's")
    result = ccdist(*STUDENT, "--teacher", teacher, "--output-dir", run, "--overwrite")
    assert result.exit_code == 0, result.output
    assert file_sha256(ckpt) != before and load_checkpoint(ckpt)["epoch"] == 2
    assert (run / "notes.txt").read_text() == "mine" and not (run / "tensorboard").exists()


def test_train_teacher_into_an_unfinished_run_is_refused_naming_resume(tmp_path, teacher):
    run = tmp_path / "run"
    args = [*TEACHER, "--set", "schedule.epochs=2", "--output-dir", run]
    ckpt = _finished_run_copy(teacher, run, epoch=1)
    payload = load_checkpoint(ckpt)
    payload["config"]["schedule"]["epochs"] = 2  # a killed 2-epoch run
    payload.pop("format")
    save_checkpoint(ckpt, payload)
    before = file_sha256(ckpt)
    result = ccdist(*args)
    assert result.exit_code == 2
    line = error_line(result)
    assert "an unfinished run, stopped after 1 of 2 epochs" in line and "--resume to continue it" in line
    assert file_sha256(ckpt) == before


def test_eval_into_a_folder_with_results_is_refused_unless_overwrite(tmp_path, student):
    out = tmp_path / "eval"
    args = ["eval", "--checkpoint", student, "--count", "8", "--curve-eps", "", "--quiet", "--out", out]
    assert ccdist(*args).exit_code == 0
    (out / "eval.json").write_text('{"mine": 1}')  # stands for a record this run must not replace
    (out / "notes.txt").write_text("mine")
    result = ccdist(*args)
    assert result.exit_code == 2
    line = error_line(result)
    assert "earlier evaluation: eval.json" in line and "another --out" in line and "--overwrite" in line
    assert "--resume" not in line and json.loads((out / "eval.json").read_text()) == {"mine": 1}
    result = ccdist(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "eval.json").read_text())["count"] == 8 and (out / "notes.txt").is_file()


def test_sweep_refuses_an_earlier_sweep_resumes_only_equal_runs_and_overwrites(tmp_path):
    out = tmp_path / "sweep"
    sets = ["loss.method=cc_ibp", "teacher.preset=null", "model.width=16", "schedule.epochs=1"]
    sets += ["schedule.warmup_epochs=0", "schedule.ramp_up_epochs=1", "optim.lr_decay_epochs=[]"]
    sets += ["log.val_size=32", "log.plot=false", "log.tensorboard=false", "optim.batch_size=500"]
    args = ["sweep", "--param", "alpha", "--values", "0.5", "--config", "digits", "--no-eval", "--quiet"]
    args += [a for s in sets for a in ("--set", s)] + ["--output-dir", out]
    assert ccdist(*args).exit_code == 0
    ckpt = out / "alpha=0.5" / "seed0" / "checkpoint.pt"
    before = file_sha256(ckpt)
    result = ccdist(*args)
    assert result.exit_code == 2
    line = error_line(result)
    assert "earlier sweep" in line and "alpha=0.5/seed0/checkpoint.pt (a finished run, 1/1 epochs)" in line
    assert "--resume" in line and "--overwrite" in line and file_sha256(ckpt) == before
    result = ccdist(*args, "--resume")  # the same settings: kept, not retrained
    assert result.exit_code == 0 and "kept" in result.output and file_sha256(ckpt) == before
    result = ccdist(*args, "--resume", "--set", "optim.lr=0.0001")  # other settings: not taken for these
    assert result.exit_code == 2 and "optim.lr" in error_line(result) and file_sha256(ckpt) == before
    result = ccdist(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert file_sha256(ckpt) != before


def test_demo_into_an_earlier_demo_is_refused_and_overwrite_removes_only_its_outputs(
    tmp_path, student, monkeypatch
):
    from ccdist_plugin import demo

    out = tmp_path / "demo"
    _finished_run_copy(student, out / "cc_dist")
    (out / "export").mkdir()
    (out / "mine.txt").write_text("mine")
    result = ccdist("demo", "--output-dir", out, "--quiet")
    assert result.exit_code == 2
    line = error_line(result)
    assert "earlier demo: cc_dist/checkpoint.pt (a finished run, 2/2 epochs)" in line
    assert "another --output-dir" in line and "--overwrite" in line and "--resume" not in line
    assert (out / "cc_dist" / "checkpoint.pt").is_file()
    seen = []
    monkeypatch.setattr(
        demo, "_run_demo", lambda out, *rest: seen.append(sorted(p.name for p in out.rglob("*")))
    )
    demo.run_demo(out, overwrite=True)
    assert seen == [["cc_dist", "mine.txt", "notes.txt"]]  # the run's checkpoint and export/ are gone


# ---------------------------------------------------------------------------------- NaN models


@pytest.mark.parametrize("command", ["eval", "export", "teacher"])
def test_model_with_a_nan_weight_is_refused_at_load(tmp_path, teacher, student, command):
    bad = _perturbed_copy(student if command != "teacher" else teacher, tmp_path / "nan.pt", nan=True)
    if command == "eval":
        result = ccdist("eval", "--checkpoint", bad, "--count", "8", "--curve-eps", "", "--quiet")
    elif command == "export":
        result = ccdist("export", "--checkpoint", bad, "--out", tmp_path / "x", "--count", "4")
    else:
        result = ccdist(*STUDENT, "--teacher", bad, "--output-dir", tmp_path / "run")
    assert result.exit_code == 2
    line = error_line(result)
    assert "non-finite" in line and "tensor '" in line
    assert not (tmp_path / "eval").exists() and not (tmp_path / "x").exists()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_nan_outputs_are_never_correct_and_eval_json_is_strict(tmp_path, student):
    from ccdist_plugin.checkpoint import load_model
    from ccdist_plugin.evaluation import EvalSettings, evaluate
    from ccdist_plugin.reports import write_json

    model = load_model(student)
    x, y = torch.rand(40, 1, 8, 8), torch.zeros(40, dtype=torch.long)  # class 0: NaN's argmax
    with torch.no_grad():
        next(p for p in model.parameters() if p.ndim == 2).fill_(float("nan"))
    result = evaluate(model, x, y, EvalSettings(eps=0.05, methods=("ibp",), pgd_steps=2), progress=False)
    assert result.metrics["standard_acc"] == 0.0 and result.metrics["pgd_acc"] == 0.0
    assert result.metrics["ibp_cert_acc"] == 0.0
    path = write_json({"metrics": {"ibp_loss": float("nan"), "standard_acc": 0.0}}, tmp_path / "eval.json")

    def refuse(token):
        raise AssertionError(f"not strict JSON: {token}")

    record = json.loads(path.read_text(), parse_constant=refuse)
    assert record["metrics"]["ibp_loss"] is None and record["non_finite"]["keys"] == ["metrics.ibp_loss"]


# ---------------------------------------------------------------------------------- templates


def test_template_names_are_not_resolved_against_the_working_directory(tmp_path, monkeypatch):
    from ccdist_plugin.verification import template_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()
    (tmp_path / "teacher").mkdir()
    assert template_path("digits").name == "digits.yaml" and template_path("digits").is_file()
    assert template_path("teacher").parent == template_path("digits").parent
    with pytest.raises(ValueError, match="does not exist"):
        template_path("./digits")


def test_export_prints_its_summary_once_and_quotes_next_command(tmp_path, student, monkeypatch):
    pytest.importorskip("onnx")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()  # a folder named like the template
    out = tmp_path / "my export"
    result = ccdist("export", "--checkpoint", student, "--out", out, "--count", "4", "--attack-steps", "0")
    assert result.exit_code == 0, result.output
    assert result.output.count("4 test points") == 1
    assert f"next: ccdist verify --export {shlex.quote(str(out))}" in result.output
    assert shlex.split(result.output.splitlines()[-1])[-1] == str(out)


# ---------------------------------------------------------------------------------- one-line errors


def _garbage_npz(root: Path, labels: int | None) -> Path:
    root.mkdir(parents=True)
    for split, n in (("train10k", 20), ("test2k", 10)):
        path = root / f"cifar10-jpeg-{split}.npz"
        if labels is None:
            path.write_bytes(b"not a zip file at all")
        else:
            x = np.zeros((n, 32, 32, 3), dtype=np.uint8)
            np.savez(path, x=x, y=np.full(n, labels, dtype=np.int64))
    return root


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing dataset", "--set data.root="),
        ("corrupt data file", "malformed file"),
        ("labels out of range", "labels must lie in 0..9"),
        ("unknown model", "unknown model 'resnet_nope'"),
        ("unknown dataset", "unknown dataset 'nope'"),
        ("output is a file", "is a file"),
        ("lr 1e39", "optim.lr must be finite and <= 3.4e38"),
        ("empty yaml", "is empty"),
    ],
)
def test_training_faults_give_one_line(case, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CCDIST_DATA", str(tmp_path / "no data here"))
    args = [*TEACHER, "--output-dir", tmp_path / "run"]
    if case == "missing dataset":
        args += ["--set", "data.name=cifar10", "--set", "data.options={}"]
    elif case in ("corrupt data file", "labels out of range"):
        root = _garbage_npz(tmp_path / "data", None if case == "corrupt data file" else 10)
        args += ["--set", "data.name=cifar10-jpeg", "--set", f"data.root={root}", "--set", "data.options={}"]
    elif case == "unknown model":
        args += ["--set", "model.name=resnet_nope"]
    elif case == "unknown dataset":
        args += ["--set", "data.name=nope"]
    elif case == "output is a file":
        (tmp_path / "file").write_text("x")
        args += ["--output-dir", tmp_path / "file" / "run"]
    elif case == "lr 1e39":
        args += ["--set", "optim.lr=1e39"]
    else:
        (tmp_path / "empty.yaml").write_text("")
        args = ["train", "--config", "empty.yaml"]
    result = ccdist(*args)
    assert result.exit_code == 2, result.output
    assert fragment in error_line(result)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    if case == "missing dataset":
        assert "CCDIST_DATA" in error_line(result) and "pass root=" not in result.output
    debug = ccdist("--debug", *args)
    assert debug.exit_code != 0 and debug.exception is not None  # --debug: the exception itself
    if case == "unknown model":
        after = ccdist(*args, "--debug")
        assert type(after.exception) is type(debug.exception)


def test_output_folder_not_writable(tmp_path, monkeypatch):
    import ccdist_plugin.runlock as runlock

    monkeypatch.setattr(runlock.os, "access", lambda *a, **k: False)  # as root, chmod would not stop us
    result = ccdist(*TEACHER, "--output-dir", tmp_path / "run")
    assert result.exit_code == 2 and "is not writable" in error_line(result)


@pytest.mark.parametrize("when", ["first epoch", "after a checkpoint"])
def test_read_only_mid_run_and_non_finite_loss_say_what_is_kept(when, tmp_path, monkeypatch):
    from ccdist_plugin import trainer as trainer_module

    run = tmp_path / "run"
    real_save = trainer_module.save_checkpoint
    saves = []

    def save(path, payload):
        saves.append(payload["epoch"])
        if len(saves) > 1:
            raise PermissionError(13, "Permission denied", str(path))
        return real_save(path, payload)

    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    args = [*TEACHER, "--set", "schedule.epochs=2", "--output-dir", run]
    result = ccdist(*args)
    assert result.exit_code == 2
    line = error_line(result)
    assert "Permission denied" in line and f"last checkpoint is kept at {run / 'checkpoint.pt'}" in line
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1  # the good checkpoint is intact

    monkeypatch.setattr(trainer_module, "save_checkpoint", real_save)
    real_ce = torch.nn.functional.cross_entropy

    def nan_loss(*args, **kwargs):  # every loss of this run is a cross-entropy: it diverges at once
        return real_ce(*args, **kwargs) * float("nan")

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_loss)
    fresh = tmp_path / "fresh"
    target = fresh if when == "first epoch" else run
    extra = ["--resume"] if when != "first epoch" else []
    result = ccdist(*TEACHER, "--set", "schedule.epochs=2", "--output-dir", target, *extra)
    assert result.exit_code == 2
    line = error_line(result)
    if when == "first epoch":
        assert "No checkpoint was written yet" in line and not (fresh / "checkpoint.pt").exists()
    else:
        assert f"last good checkpoint is kept at {run / 'checkpoint.pt'}" in line
        assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1


def test_checkpoint_and_export_faults(tmp_path, student):
    broken = _perturbed_copy(student, tmp_path / "broken.pt", drop_key=True)
    result = ccdist("eval", "--checkpoint", broken, "--count", "4", "--quiet")
    assert result.exit_code == 2 and "do not match its architecture (missing" in error_line(result)

    result = ccdist("eval", "--checkpoint", student, "--eps", "300/255", "--count", "4", "--quiet")
    assert result.exit_code == 2 and "larger than 1" in error_line(result)
    assert not (student.parent / "eval" / "eval.json").exists()

    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text('{"points": [1, 2,')  # a truncated write
    (export / "instances.csv").write_text("")
    for extra in ([], ["--merge"]):
        result = ccdist("verify", "--export", export, *extra)
        assert result.exit_code == 2 and "manifest.json is not valid JSON" in error_line(result)


def test_labels_out_of_range_and_nan_pixels_from_the_python_api(tmp_path):
    from ccdist_plugin.config import load_preset
    from ccdist_plugin.trainer import Trainer, build_model, load_data

    cfg = load_preset("digits-teacher").override(
        ["model.width=16", "schedule.epochs=1", "log.progress=false", f"log.output_dir={tmp_path / 'run'}"]
    )
    model = build_model(cfg, load_data(cfg).spec)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    bad_y = y.clone()
    bad_y[5] = 10
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        Trainer(model, cfg).fit((x, bad_y))
    bad_x = x.clone()
    bad_x[3, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Trainer(model, cfg).fit((bad_x, y))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, bad_y), batch_size=32)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        Trainer(model, cfg).fit(loader)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ------------------------------------------------------------------- loss options, labels, full disk


@pytest.mark.parametrize(
    "method, option, value, expects",
    [
        ("crown_ibp", "crown_start", "abc", "expects a number"),
        ("ibp_r", "reg_weight", "abc", "expects a number"),
        ("sabr", "lam", "abc", "expects a number"),
        ("ibp_r", "mask_incorrect", "abc", "expects true/false"),  # was taken as True
        ("ibp_r", "reg_weight", ".inf", "must be finite"),
    ],
)
def test_loss_option_of_the_wrong_type_gives_one_line(method, option, value, expects, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--config", "digits", *TINY, "--set", f"loss.method={method}"]
    result = ccdist(*args, "--set", f"loss.options.{option}={value}", "--output-dir", run)
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert f"loss.options.{option}'" in line and expects in line
    assert not (run / "checkpoint.pt").exists()


def _valid_option(tp) -> object:
    return True if tp is bool else 0.5


def test_every_option_of_every_loss_is_type_checked_when_the_loss_is_built():
    """One mechanism for all losses: each option is read as its constructor annotation says, so a
    value of the wrong type is a ValueError naming it (from a config and from make_loss), and a
    value the config reader accepts (``"2/255"``, an int for a float) builds the loss."""
    import typing

    from ccdist_plugin.config import LossConfig
    from ccdist_plugin.losses import list_losses, loss_class, make_loss
    from ccdist_plugin.models import mlp

    teacher = mlp(1, 8, 10, width=16, depth=2)
    checked = 0
    for name in list_losses():
        cls = loss_class(name)
        hints = typing.get_type_hints(cls.__init__)
        extra = {"eps_target": 0.1} if cls.ramp_target else {}
        extra |= {"teacher": teacher} if cls.teacher_use == "required" else {}
        config = {"alpha": 0.5} if "alpha" in cls.config_keys else {}
        for option in cls.option_keys:
            assert option in hints, f"{name}: option {option!r} has no type annotation to check it by"
            valid = {k: _valid_option(hints[k]) for k in cls.required_options}
            for wrong in ("abc", [1, 2], None):
                options = {**valid, option: wrong}
                if wrong is None and type(None) in typing.get_args(hints[option]):
                    continue
                with pytest.raises(ValueError, match=f"loss.options.{option}'? (expects|must)"):
                    cls.from_config(LossConfig(method=name, options=options, **config), **extra)
                with pytest.raises(ValueError, match=f"loss.options.{option}'? (expects|must)"):
                    make_loss(name, **{**extra, **config, **options})
            if hints[option] is float:
                for text, value in (("1/4", 0.25), (1, 1.0)):
                    loss = cls.from_config(
                        LossConfig(method=name, options={**valid, option: text}, **config), **extra
                    )
                    assert getattr(loss, option) == value and isinstance(getattr(loss, option), float)
                with pytest.raises(ValueError, match="must be finite"):
                    make_loss(name, **{**extra, **config, **valid, option: float("nan")})
            checked += 1
    assert checked >= 8  # lam, temperature, four CROWN-IBP schedule ends, reg_weight, mask_incorrect


@pytest.mark.parametrize("label", [10, -1])
def test_labels_out_of_range_given_to_a_loss_from_python(label):
    from ccdist_plugin.bounds import certify
    from ccdist_plugin.losses import CCDistLoss, make_loss
    from ccdist_plugin.models import mlp

    torch.manual_seed(0)
    teacher, student = mlp(1, 8, 10, width=16, depth=2), mlp(1, 8, 10, width=16, depth=2)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, label])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)") as from_certify:
        certify(student, x, y, 0.01, method="ibp")
    for loss in (CCDistLoss(teacher, alpha=0.5), make_loss("sabr", lam=0.5), make_loss("ibp")):
        with pytest.raises(ValueError) as info:
            loss(student, x, y, 0.01)
        assert str(info.value) == str(from_certify.value)  # the same words as certify
    good = CCDistLoss(teacher, alpha=0.5)(student, x, torch.tensor([0, 1, 2, 9]), 0.01)
    assert torch.isfinite(good.loss)


class _DiskFullAfter:
    """A file object that takes ``room`` bytes and then fails as a full disk does."""

    def __init__(self, fh, room: int) -> None:
        self._fh, self._room = fh, room

    def write(self, data) -> int:
        if len(data) > self._room:
            self._fh.write(bytes(data[: self._room]))
            self._room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._fh.write(data)

    def flush(self) -> None:
        self._fh.flush()

    def fileno(self) -> int:
        return self._fh.fileno()


@pytest.mark.parametrize("room", [2000, 0])
def test_disk_full_while_a_checkpoint_is_saved(room, tmp_path, monkeypatch):
    """A full disk in the middle of torch.save (torch reports it as its own ``inline_container``
    RuntimeError) or at its first byte: one line naming the file and the error, the previous
    checkpoint intact, no temporary left, and ``--resume`` continues once there is room again."""
    from ccdist_plugin import checkpoint as checkpoint_module

    run = tmp_path / "run"
    real_write, saves = checkpoint_module.atomic_write, []

    def full_at_second_save(path, write):
        saves.append(path)
        if len(saves) < 2:
            return real_write(path, write)
        return real_write(path, lambda fh: write(_DiskFullAfter(fh, room)))

    monkeypatch.setattr(checkpoint_module, "atomic_write", full_at_second_save)
    args = [*TEACHER, "--set", "schedule.epochs=2", "--output-dir", run]
    result = ccdist(*args)
    assert result.exit_code == 2, result.output
    line = error_line(result)
    checkpoint = run / "checkpoint.pt"
    assert f"{checkpoint}: No space left on device" in line
    assert f"last checkpoint is kept at {checkpoint}, intact" in line and "--resume" in line
    assert load_checkpoint(checkpoint)["epoch"] == 1 and len(saves) == 2
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == []
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # the epoch-2 row was written

    monkeypatch.undo()  # room again: the run continues from epoch 1
    result = ccdist(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert load_checkpoint(checkpoint)["epoch"] == 2


def test_save_checkpoint_reports_a_full_disk_as_an_os_error_naming_the_file(tmp_path, monkeypatch):
    from ccdist_plugin import checkpoint as checkpoint_module

    path = save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 1, "w": torch.zeros(1000)})
    before = file_sha256(path)
    real_write = checkpoint_module.atomic_write
    monkeypatch.setattr(
        checkpoint_module,
        "atomic_write",
        lambda p, write: real_write(p, lambda fh: write(_DiskFullAfter(fh, 700))),
    )
    with pytest.raises(OSError) as info:
        save_checkpoint(path, {"epoch": 2, "w": torch.ones(1000)})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert "inline_container" in repr(info.value.__cause__)  # what torch raised, kept as the cause
    assert file_sha256(path) == before and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def _export_and_fake_verifier(root: Path, count: int) -> tuple[Path, Path]:
    from test_verify import make_export, make_fake_abcrown

    return make_export(root, ["bab"] * count), make_fake_abcrown(root, {})


@pytest.mark.parametrize("mode", ["worker", "process"])
def test_disk_full_during_verify_is_one_line_without_a_thread_traceback(mode, tmp_path, monkeypatch):
    """The first file an instance writes (its command line) meets a full disk inside a worker
    thread: the thread hands the error to the command (no 'Exception in thread' traceback), the
    command prints one line, and a later run verifies every instance."""
    import threading

    from test_verify import calls

    export, fake = _export_and_fake_verifier(tmp_path, 3)
    real_write_text, thread_errors = Path.write_text, []

    def full_disk(self, *args, **kwargs):
        if self.name == "command.txt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    monkeypatch.setattr(threading, "excepthook", lambda info: thread_errors.append(info.exc_value))
    result = ccdist("verify", "--export", export, "--abcrown", fake, "--mode", mode)
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "verification stopped at instance 0 (test point 100)" in line and "No space left on device" in line
    assert "a resumed run verifies them" in line
    assert "Exception in thread" not in result.output and thread_errors == []
    assert calls(fake) == []  # the run stopped before any verifier ran

    monkeypatch.undo()
    result = ccdist("verify", "--export", export, "--abcrown", fake, "--mode", mode)
    assert result.exit_code == 0, result.output
    summary = json.loads((export / "verification.json").read_text())
    assert summary["certified"] == 3 and summary["missing"] == []


def test_an_unexpected_error_in_a_verify_worker_is_raised_by_the_run(tmp_path, monkeypatch):
    """A bug in a worker thread is not printed by the thread and forgotten: run_verification
    raises it (so the command shows it as the bug it is)."""
    import threading

    import ccdist_plugin.verification.runner as runner_mod

    export, fake = _export_and_fake_verifier(tmp_path, 2)
    thread_errors: list[BaseException] = []

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(runner_mod, "_run_one", broken)
    monkeypatch.setattr(threading, "excepthook", lambda info: thread_errors.append(info.exc_value))
    with pytest.raises(KeyError, match="a bug"):
        runner_mod.run_verification(export, abcrown_dir=fake, python=sys.executable)
    assert thread_errors == []


# ---------------------------------------------------------------------------------- housekeeping


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(tmp_path, monkeypatch):
    from ccdist_plugin import trainer as trainer_module

    run = tmp_path / "my runs" / "teacher"
    real = trainer_module.Trainer._validate
    calls = []

    def interrupt_in_epoch_two(self, val):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, val)

    monkeypatch.setattr(trainer_module.Trainer, "_validate", interrupt_in_epoch_two)
    result = ccdist(*TEACHER, "--set", "schedule.epochs=2", "--output-dir", run)
    assert result.exit_code == 130
    assert f"last checkpoint is kept at {run / 'checkpoint.pt'}" in result.output
    resume = result.output.strip().splitlines()[-1].strip()
    assert shlex.quote(str(run)) in resume and resume.endswith("--resume")
    assert not (run / ".ccdist.lock").exists()  # the lock went with the interrupted run
    monkeypatch.setattr(trainer_module.Trainer, "_validate", real)
    words = shlex.split(resume)
    assert words[0] == "ccdist"
    result = ccdist(*words[1:])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 2


def test_version():
    from ccdist_plugin import __version__

    result = ccdist("--version")
    assert result.exit_code == 0 and result.output.strip() == f"ccdist {__version__}"


@pytest.mark.slow
def test_real_sigint_in_a_training_process(tmp_path):
    """A real SIGINT (not a simulated KeyboardInterrupt): exit 130, the resume hint, the lock released."""
    import signal
    import time

    run = tmp_path / "a run"
    cmd = [
        sys.executable,
        "-m",
        "ccdist_plugin.cli",
        *TEACHER,
        "--set",
        "schedule.epochs=200",
        "--output-dir",
        run,
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.monotonic() + 300
    while not (run / "checkpoint.pt").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"last checkpoint is kept at {run / 'checkpoint.pt'}" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].strip().endswith("--resume")
    assert shlex.quote(str(run)) in err and not (run / ".ccdist.lock").exists()
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] >= 1


# ------------------------------------------------------------- benchmarks/reproduce_cpu.py (issue 21 §5)


def _reproduce_cpu(argv: list[str], capsys) -> tuple[int, str]:
    """``benchmarks/reproduce_cpu.py ARGV`` in this process: (exit status, stderr)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import reproduce_cpu

    capsys.readouterr()
    try:
        reproduce_cpu.main([str(a) for a in argv])
    except SystemExit as stop:
        return int(stop.code), capsys.readouterr().err
    return 0, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


PAPER_CPU_SMOKE = ["--protocol", "paper-cpu", "--dataset", "digits", "--epochs", "2", "--teacher-epochs", "1"]
PAPER_CPU_SMOKE += ["--seeds", "2", "--alphas", "0.5", "--workers", "1"]


@pytest.fixture(scope="module")
def paper_cpu_alpha_stage(tmp_path_factory) -> Path:
    """A paper-cpu run folder (digits, smoke size) after ``--until select-alpha``."""
    root = tmp_path_factory.mktemp("paper-cpu") / "runs"
    sys.path.insert(0, str(REPO / "benchmarks"))
    import reproduce_cpu

    reproduce_cpu.main(
        [*PAPER_CPU_SMOKE, "--out", str(root), "--docs", str(root.parent / "docs"), "--until", "select-alpha"]
    )
    return root


@pytest.mark.parametrize("deleted", ["teacher-s0", "cc_ibp-a0.5-s0"])
def test_reproduce_cpu_next_stage_after_a_deleted_checkpoint(
    deleted, paper_cpu_alpha_stage, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("ABCROWN_DIR", raising=False)
    root = tmp_path / "runs"
    import shutil

    shutil.copytree(paper_cpu_alpha_stage, root)
    (root / deleted / "checkpoint.pt").unlink()
    kept = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != "running.lock"}
    argv = [*PAPER_CPU_SMOKE, "--beta-sweep", "1,5", "--out", root, "--docs", tmp_path / "docs"]
    code, err = _reproduce_cpu([*argv, "--until", "select-beta"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert str(root / deleted) in line and "checkpoint.pt" in line and "--overwrite" in line
    now = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != "running.lock"}
    assert now == kept  # nothing trained, nothing removed


def test_reproduce_cpu_beta_sweep_without_the_papers_beta(tmp_path, capsys):
    root = tmp_path / "runs"
    argv = [*PAPER_CPU_SMOKE, "--beta-sweep", "1,20", "--out", root, "--docs", tmp_path / "docs"]
    code, err = _reproduce_cpu(argv, capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "--beta-sweep 1,20 must contain 5" in line and "1,5,20" in line
    assert not root.exists()
    code, err = _reproduce_cpu([*PAPER_CPU_SMOKE, "--beta-sweep", "1,x", "--out", root], capsys)
    assert code == 2 and "--beta-sweep takes comma-separated numbers" in _one_error_line(err)


def test_resnet_cpu_refuses_a_run_with_other_settings(tmp_path, capsys):
    """resnet_cpu reuses a run only with its recorded settings: a teacher of 2 epochs is not taken for 3."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import resnet_cpu

    root = tmp_path / "runs"
    old = resnet_cpu.Run("teacher", "teacher", 0, 8, 2, 5)
    (root / "teacher").mkdir(parents=True)
    (root / "teacher" / "settings.json").write_text(json.dumps(resnet_cpu.run_settings(old)))
    (root / "teacher" / "result.json").write_text("{}")
    (root / "teacher" / "checkpoint.pt").write_bytes(b"the 2-epoch teacher")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        resnet_cpu.main(["--out", str(root), "--teacher-epochs", "3", "--seeds", "1", "--docs", ""])
    assert stop.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "epochs: 2 there, 3 now" in line and str(root / "teacher") in line
    assert (root / "teacher" / "checkpoint.pt").read_bytes() == b"the 2-epoch teacher"

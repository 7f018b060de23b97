"""The ``ccdist`` command line: presets, config errors, train-teacher / train / resume on digits."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from ccdist_plugin.checkpoint import load_checkpoint
from ccdist_plugin.cli import main
from ccdist_plugin.config import list_presets

torch.set_num_threads(1)

TINY = [
    "--set", "device=cpu", "--set", "model.width=16",
    "--set", "log.val_size=32", "--set", "log.plot=false", "--set", "log.tensorboard=false",
    "--set", "data.options={test_size: 100}",
]  # fmt: skip


def _losses_available() -> bool:
    try:
        import ccdist_plugin.losses  # noqa: F401
    except ImportError:
        return False
    return True


def test_presets_lists_every_preset():
    result = CliRunner().invoke(main, ["presets"])
    assert result.exit_code == 0, result.output
    listed = [line.split()[0] for line in result.output.splitlines() if not line.startswith(" ")]
    assert listed == list_presets()


def test_help_names_the_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("train-teacher", "train", "demo", "presets"):
        assert command in result.output


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train", "--config", "cifar10_2"], "did you mean 'cifar10-2'"),
        (["train", "--config", "digits", "--set", "optim.lrr=1"], "did you mean 'optim.lr'"),
        (["train", "--config", "digits", "--set", "loss.alpha"], "key=value"),
        (["train", "--config", "missing.yaml"], "does not exist"),
        (["train-teacher", "--config", "digits"], "student config"),
        (["train", "--config", "digits-teacher"], "ccdist train-teacher"),
        (["train", "--config", "digits", "--teacher", "nowhere.pt"], "does not exist"),
    ],
)
def test_config_errors_are_reported(args, fragment):
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert fragment in result.output


@pytest.mark.skipif(not _losses_available(), reason="ccdist_plugin.losses not available yet")
def test_train_teacher_then_student_then_resume(tmp_path):
    pytest.importorskip("sklearn")
    runner = CliRunner()
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    t_args = ["--set", "schedule.epochs=1", "--set", "loss.attack.steps=2", "--output-dir", str(teacher_dir)]
    result = runner.invoke(
        main, ["train-teacher", "--config", "digits-teacher", "--quiet", "--threads", "1", *TINY, *t_args]
    )
    assert result.exit_code == 0, result.output
    teacher_ckpt = teacher_dir / "checkpoint.pt"
    assert load_checkpoint(teacher_ckpt)["role"] == "teacher"

    s_args = [
        "--set",
        "schedule.epochs=2",
        "--set",
        "schedule.ramp_up_epochs=1",
        "--set",
        "optim.lr_decay_epochs=[]",
    ]
    base = ["train", "--config", "digits", "--teacher", str(teacher_ckpt), "--quiet", *TINY, *s_args]
    result = runner.invoke(main, [*base, "--output-dir", str(student_dir)])
    assert result.exit_code == 0, result.output
    assert "done:" in result.output and (student_dir / "config.yaml").is_file()
    assert load_checkpoint(student_dir / "checkpoint.pt")["epoch"] == 2
    # resuming a finished run is a no-op that succeeds; resuming with another config is refused
    result = runner.invoke(main, [*base, "--output-dir", str(student_dir), "--resume"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        main, [*base, "--set", "loss.alpha=0.9", "--output-dir", str(student_dir), "--resume"]
    )
    assert result.exit_code != 0 and "loss.alpha" in result.output


@pytest.mark.skipif(not _losses_available(), reason="ccdist_plugin.losses not available yet")
def test_demo_trains_three_models_and_certifies(tmp_path):
    pytest.importorskip("sklearn")
    from ccdist_plugin.demo import run_demo

    result = run_demo(tmp_path / "demo", export=False, verify=False)
    assert [r["model"] for r in result.rows] == ["PGD teacher", "CC-IBP", "CC-Dist"]
    teacher, cc_ibp, cc_dist = result.rows
    assert teacher["standard"] > 0.8 and teacher["pgd"] > 0.5
    for row in (cc_ibp, cc_dist):
        assert row["n"] == 300
        assert row["ibp"] > 0.2 and row["crown"] > 0.2  # certified accuracy clearly above zero
        assert row["crown"] <= row["pgd"] <= row["standard"]  # sound: certified <= empirical robust <= clean
    table = result.table()
    assert "CC-Dist" in table and "CROWN-cert" in table
    assert (tmp_path / "demo" / "cc_dist" / "checkpoint.pt").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _losses_available(), reason="ccdist_plugin.losses not available yet")
@pytest.mark.parametrize("script", ["quickstart.py", "custom_loop.py"])
def test_examples_run(script, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("sklearn")
    path = Path(__file__).resolve().parents[1] / "examples" / script
    done = subprocess.run(
        [sys.executable, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "certified accuracy" in done.stdout.lower()

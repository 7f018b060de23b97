"""``ccdist tune`` (Optuna): search spaces, bad input, pruning, divergence, report, resume after a kill.

Everything runs on digits with tiny trials (a width-16 MLP, 2-3 epochs, 64 validation points).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ccdist_plugin.cli import main
from ccdist_plugin.config import load_config, load_preset
from ccdist_plugin.tune import (
    SearchSpace,
    check_space,
    check_spaces,
    parse_space,
    trial_config,
    trial_rows,
)

torch.set_num_threads(1)

TINY = [
    "--set", "device=cpu", "--set", "model.width=16", "--set", "log.val_size=64",
    "--set", "log.plot=false", "--set", "log.tensorboard=false", "--set", "data.options.test_size=100",
    "--set", "data.val_split=0.2", "--set", "schedule.epochs=3", "--set", "schedule.warmup_epochs=1",
    "--set", "schedule.ramp_up_epochs=1", "--set", "optim.lr_decay_epochs=[]",
    "--set", "loss.method=cc_ibp",  # no teacher needed: the tune machinery is the same
]  # fmt: skip
PARAMS = ["--param", "loss.alpha=log:1e-3:1", "--param", "optim.lr=log:5e-4:5e-3"]


def ccdist(*args: str | Path):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.startswith(("error:", "Error:"))]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output and "Usage:" not in result.output, result.output
    return lines[0]


def finished(out: Path) -> list[dict[str, str]]:
    with open(out / "trials.csv") as fh:
        return [r for r in csv.DictReader(fh) if r["status"] in ("complete", "pruned", "diverged")]


# ------------------------------------------------------------------------------------- spaces


def test_parse_space_forms():
    assert parse_space("loss.alpha=float:0:1") == SearchSpace("loss.alpha", "float", 0.0, 1.0)
    assert parse_space("optim.lr=log:1e-4:2e-3") == SearchSpace("optim.lr", "log", 1e-4, 2e-3)
    assert parse_space("eps=float:1/255:2/255").high == pytest.approx(2 / 255)
    assert parse_space("schedule.epochs=int:2:5") == SearchSpace("schedule.epochs", "int", 2, 5)
    space = parse_space("optim.optimizer=choice:adam, sgd")
    assert space.choices == ("adam", "sgd")
    assert parse_space("model.width=choice:16,32").choices == (16, 32)
    for text in ("loss.alpha=log:0.001:0.5", "optim.optimizer=choice:adam,sgd", "model.width=int:8:64"):
        assert parse_space(parse_space(text).text()) == parse_space(text)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("loss.alpha", "KEY=SPACE"),
        ("=float:0:1", "empty key"),
        ("loss.alpha=uniform:0:1", "is not one of"),
        ("loss.alpha=0.5", "is not one of"),
        ("loss.alpha=float:0", "two ends"),
        ("loss.alpha=float:0:1:2", "two ends"),
        ("loss.alpha=float:a:1", "must be a number"),
        ("loss.alpha=float:0.5:0.5", "is empty"),
        ("loss.alpha=float:0.9:0.1", "inverted"),
        ("optim.lr=log:0:1e-3", "LO > 0"),
        ("schedule.epochs=int:1.5:4", "must be an integer"),
        ("optim.optimizer=choice:", "empty choice"),
        ("optim.optimizer=choice:adam,,sgd", "empty choice"),
        ("optim.optimizer=choice:adam,adam", "repeats"),
        ("loss.alpha=float:0:inf", "finite"),
    ],
)
def test_parse_space_refuses(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_space(text)


def test_check_space_uses_the_config_checks():
    base = load_preset("digits")
    check_space(base, parse_space("loss.alpha=float:0:1"))
    with pytest.raises(ValueError, match="did you mean 'loss.alpha'"):
        check_space(base, parse_space("loss.alpah=float:0:1"))
    with pytest.raises(ValueError, match=r"loss.alpha must lie in \[0, 1\]"):
        check_space(base, parse_space("loss.alpha=float:0:2"))  # the upper end is checked too
    with pytest.raises(ValueError, match="optim.optimizer"):
        check_space(base, parse_space("optim.optimizer=choice:adam,lbfgs"))
    with pytest.raises(ValueError, match="two --param"):
        check_spaces(base, [parse_space("loss.alpha=float:0:1"), parse_space("loss.alpha=log:0.1:1")])


def test_trial_config_sets_values_and_folder(tmp_path):
    base = load_preset("digits")
    cfg = trial_config(base, {"loss.alpha": 0.125, "schedule.epochs": 14}, tmp_path / "trial_0007")
    assert (cfg.loss.alpha, cfg.schedule.epochs) == (0.125, 14)
    assert cfg.log.output_dir == str(tmp_path / "trial_0007")
    assert cfg.optim == base.optim  # the rest is the base config's


# -------------------------------------------------------------------------------- command errors


def test_missing_optuna_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    out = tmp_path / "t"
    result = ccdist("tune", "--config", "digits", *PARAMS, "--trials", "2", "--out", out)
    assert result.exit_code == 2
    assert 'pip install "ccdist-plugin[tune]"' in error_line(result)
    assert not out.exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--param", "loss.alpah=float:0:1"], "did you mean 'loss.alpha'"),
        (["--param", "loss.alpha=float:0.5:0.5"], "is empty"),
        (["--param", "loss.alpha=float:0.9:0.1"], "inverted"),
        (["--param", "loss.alpha=between:0:1"], "is not one of"),
        (["--param", "loss.alpha=float:0:1", "--trials", "0"], "--trials must be at least 1"),
        (["--param", "loss.alpha=float:0:1", "--metric", "val_bab"], "--metric 'val_bab'"),
        (["--param", "loss.alpha=float:0:1", "--set", "optim.lrr=1"], "did you mean 'optim.lr'"),
        (["--param", "loss.alpha=float:0:1", "--set", "log.val_size=0"], "val_size is 0"),
        ([], "at least one --param"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, fragment):
    pytest.importorskip("optuna", reason="ccdist tune needs Optuna (pip install optuna)")
    out = tmp_path / "t"
    trials = [] if "--trials" in args else ["--trials", "2"]
    result = ccdist("tune", "--config", "digits", *TINY, *args, *trials, "--out", out)
    assert result.exit_code == 2, result.output
    assert fragment in error_line(result)
    assert not out.exists()  # nothing written


def test_a_distillation_loss_needs_a_teacher(tmp_path):
    pytest.importorskip("optuna", reason="ccdist tune needs Optuna (pip install optuna)")
    result = ccdist("tune", "--config", "digits", *PARAMS, "--trials", "2", "--out", tmp_path / "t")
    assert result.exit_code == 2 and "pass --teacher" in error_line(result)


# ------------------------------------------------------------------------------------ a tune


def test_tune_report_best_yaml_and_continue(tmp_path):
    pytest.importorskip("optuna", reason="ccdist tune needs Optuna (pip install optuna)")
    out = tmp_path / "tune"
    base = ["tune", "--config", "digits", *TINY, *PARAMS, "--out", out, "--threads", "1"]
    result = ccdist(*base, "--trials", "3")
    assert result.exit_code == 0, result.output
    rows = finished(out)
    assert [r["trial"] for r in rows] == ["0", "1", "2"]
    for r in rows:  # each trial is a normal run folder with the trial's values
        cfg = load_config(out / f"trial_{int(r['trial']):04d}" / "config.yaml")
        assert cfg.loss.alpha == pytest.approx(float(r["loss.alpha"]))
        assert 1e-3 <= cfg.loss.alpha <= 1 and 5e-4 <= cfg.optim.lr <= 5e-3
    report = (out / "report.md").read_text()
    metric = "val_crown_ibp_cert_acc"  # the default objective
    assert metric in report and (out / "report.png").stat().st_size > 0
    values = {r["trial"]: float(r[metric]) for r in rows if r["status"] == "complete"}
    for number, value in values.items():  # a complete trial's value: its last epoch's metric
        with open(out / f"trial_{int(number):04d}" / "metrics.csv") as fh:
            assert float(list(csv.DictReader(fh))[-1][metric]) == pytest.approx(value)
    best = max(values, key=lambda k: (values[k], -int(k)))
    assert f"best: trial {best}," in result.output

    # best.yaml is the best trial's config, trained as it is by `ccdist train --config`
    best_cfg = load_config(out / "best.yaml")
    trial_cfg = load_config(out / f"trial_{int(best):04d}" / "config.yaml")
    assert (best_cfg.loss.alpha, best_cfg.optim.lr) == (trial_cfg.loss.alpha, trial_cfg.optim.lr)
    assert best_cfg.log.output_dir == str(out / "best")
    trained = ccdist("train", "--config", out / "best.yaml", "--quiet", "--threads", "1")
    assert trained.exit_code == 0, trained.output
    assert (out / "best" / "checkpoint.pt").is_file()

    again = ccdist(*base, "--trials", "3")  # the total is reached: nothing new
    assert again.exit_code == 0 and len(finished(out)) == 3, again.output
    more = ccdist(*base, "--trials", "4")  # one more trial, numbered on
    assert more.exit_code == 0 and [r["trial"] for r in finished(out)] == ["0", "1", "2", "3"], more.output

    other = ccdist(*other_args(base), "--trials", "5")
    assert other.exit_code == 2 and "holds a study with other settings" in error_line(other)


def other_args(base: list) -> list:
    """The same tune with another search space for optim.lr."""
    return [("optim.lr=log:1e-4:1e-3" if a == "optim.lr=log:5e-4:5e-3" else a) for a in base]


def _tiny_base():
    return load_config("digits", [TINY[i + 1] for i in range(0, len(TINY), 2)])


def _prune_from(optuna, epoch: int):
    """An Optuna pruner that prunes every trial from ``epoch`` on (to test the wiring)."""

    class PruneFrom(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return trial.last_step is not None and trial.last_step >= epoch

    return PruneFrom()


def test_pruning_stops_a_trial_at_the_reported_epoch(tmp_path):
    optuna = pytest.importorskip("optuna", reason="ccdist tune needs Optuna (pip install optuna)")
    from ccdist_plugin.checkpoint import load_checkpoint
    from ccdist_plugin.cli.tune import _Objective

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base, spaces = _tiny_base(), [parse_space("loss.alpha=float:0.1:0.9")]
    study = optuna.create_study(direction="maximize", pruner=_prune_from(optuna, 2))
    study.optimize(_Objective(optuna, base, spaces, "val_ibp_cert_acc", tmp_path, pruning_from=2), n_trials=1)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert sorted(trial.intermediate_values) == [1, 2]  # reported per epoch, stopped after epoch 2 of 3
    run = tmp_path / "trial_0000"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 2  # the stopped epoch is saved
    (row,) = trial_rows(study.trials)
    assert (row.status, row.note) == ("pruned", "pruned after epoch 2")
    assert row.value == trial.intermediate_values[2]


def test_pruning_waits_for_the_warm_up(tmp_path):
    optuna = pytest.importorskip("optuna", reason="ccdist tune needs Optuna (pip install optuna)")
    from ccdist_plugin.cli.tune import _Objective

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=_prune_from(optuna, 1))
    objective = _Objective(
        optuna, _tiny_base(), [parse_space("loss.alpha=float:0.1:0.9")], "val_crown_ibp_cert_acc", tmp_path, 2
    )
    study.optimize(objective, n_trials=1)
    (trial,) = study.trials
    assert sorted(trial.intermediate_values) == [1, 2]  # epoch 1 is the warm-up: not pruned there
    rows = (tmp_path / "trial_0000" / "metrics.csv").read_text()
    assert "val_crown_ibp_cert_acc" in rows  # the tune's own metric is recorded with the epoch's


def test_a_diverging_trial_is_pruned_and_reported(tmp_path):
    pytest.importorskip("optuna", reason="ccdist tune needs Optuna (pip install optuna)")
    out = tmp_path / "tune"
    args = ["tune", "--config", "digits", *TINY, "--param", "loss.alpha=float:0:1", "--out", out]
    result = ccdist(*args, "--set", "optim.lr=1e30", "--trials", "2", "--threads", "1")  # Adam steps of 1e30
    assert result.exit_code == 0, result.output
    rows = finished(out)
    assert [r["status"] for r in rows] == ["diverged", "diverged"]
    assert all(r["note"].startswith("non-finite loss in epoch") for r in rows)
    assert "diverged" in (out / "report.md").read_text()
    assert "no trial completed" in result.output and not (out / "best.yaml").exists()


def _tune_process(out: Path, trials: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "ccdist_plugin.cli", "tune", "--config", "digits", *TINY, *PARAMS]
    args += ["--trials", str(trials), "--out", str(out), "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_resume_after_a_kill(tmp_path):
    pytest.importorskip("optuna", reason="ccdist tune needs Optuna (pip install optuna)")
    out = tmp_path / "tune"
    proc = _tune_process(out, 3)
    deadline = time.monotonic() + 300
    while not (out / "trial_0001").exists():  # trial 0 is finished, trial 1 is training
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = _tune_process(out, 3)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    assert "trial 1: its process" in output and "marked failed" in output
    rows = finished(out)
    assert len(rows) == 3 and "1" not in [r["trial"] for r in rows]  # the total is reached without it
    with open(out / "trials.csv") as fh:
        killed = [r for r in csv.DictReader(fh) if r["trial"] == "1"]
    assert killed[0]["status"] == "failed" and "killed" in killed[0]["note"]
    assert (out / "best.yaml").is_file()


@pytest.mark.slow  # two fresh interpreters training side by side (about 25 s on 2 shared cores)
def test_two_processes_share_a_study(tmp_path):
    pytest.importorskip("optuna", reason="ccdist tune needs Optuna (pip install optuna)")
    out = tmp_path / "tune"
    procs = [_tune_process(out, 4) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    numbers = [int(r["trial"]) for r in finished(out)]
    # each trial ran once; a process starts no trial once the total is finished or running elsewhere,
    # so the total is exceeded only when both counted at the same moment (one extra at most)
    assert len(set(numbers)) == len(numbers) and 4 <= len(numbers) <= 5
    assert all(any(f"trial {n} " in o for o in outputs) for n in numbers)

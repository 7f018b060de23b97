"""``ccdist tune``: hyper-parameter search with Optuna over ``ccdist train`` runs (docs/tuning.md).

::

    ccdist tune --config digits --teacher T.pt --param loss.alpha=log:1e-3:1 \\
        --param optim.lr=log:5e-4:5e-3 --trials 8 --out runs/tune-digits

Each trial is a normal run folder ``DIR/trial_NNNN``; the study lives in ``DIR/study.db`` (SQLite)
or any Optuna database URL (``--storage``), so a killed or finished tune continues when run again
(``--trials`` is the total of finished trials) and several processes (or machines, with a shared
database) can work on one study. Trials are pruned on the per-epoch validation metric (Optuna's
median pruner); a trial whose loss becomes non-finite is pruned and reported. At the end:
``DIR/report.md`` (the table of trials), ``DIR/report.png`` (the metric against each parameter),
``DIR/trials.csv`` and ``DIR/best.yaml`` (the best trial's config, for ``ccdist train --config``).

Optuna is an optional dependency: ``pip install "ccdist-plugin[tune]"``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import click

from ccdist_plugin.cli.common import CliError, data_not_found, needs_teacher, setup_logging
from ccdist_plugin.config import TrainConfig, config_diff, load_config

__all__ = ["tune_command", "INSTALL_HINT"]

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "ccdist-plugin[tune]"'
#: a trial on another machine counts as killed when its heartbeat is this old (seconds)
HEARTBEAT_S, GRACE_S = 60, 180
#: what, besides the searched keys, must match when a tune continues a study (machine-specific
#: keys such as paths and the device may differ between the processes of one study)
_MAY_DIFFER = ("log", "device", "data.root", "teacher.checkpoint")


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise CliError(f"ccdist tune needs Optuna, which is not installed: {INSTALL_HINT}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the command prints its own lines
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _base_config(config: str, overrides: tuple[str, ...], teacher: str | None) -> TrainConfig:
    try:
        cfg = load_config(config, list(overrides))
    except ValueError as err:
        raise CliError(f"--config/--set: {err}") from err
    if teacher is not None:
        if cfg.role != "student":
            raise CliError(f"config {config!r} trains a teacher; --teacher is for student configs")
        if not Path(teacher).is_file():
            raise CliError(f"--teacher: checkpoint {teacher!r} does not exist")
        cfg = cfg.replace(teacher=dataclasses.replace(cfg.teacher, checkpoint=str(teacher)))
    elif cfg.teacher.checkpoint is None and needs_teacher(cfg):
        raise CliError(
            f"loss {cfg.loss.method!r} distils from a teacher: pass --teacher CK (from ccdist train-teacher)"
        )
    if cfg.log.val_size <= 0:
        raise CliError("log.val_size is 0: the tune needs the per-epoch validation metric")
    return cfg


def _spaces(params: tuple[str, ...], base: TrainConfig):
    from ccdist_plugin.tune import check_spaces, parse_space

    if not params:
        raise CliError("give at least one --param KEY=SPACE (e.g. --param loss.alpha=log:1e-3:0.5)")
    spaces = []
    for text in params:
        try:
            spaces.append(parse_space(text))
        except ValueError as err:
            raise CliError(f"--param {err}") from err
    try:
        check_spaces(base, spaces)
    except ValueError as err:
        raise CliError(f"--param: {err}") from err
    return spaces


def _storage(optuna, url: str):
    engine: dict[str, Any] = {}
    if url.startswith("sqlite"):  # several local processes: wait for the writer instead of failing
        engine["connect_args"] = {"timeout": 120}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
            )
        except Exception as err:  # a bad URL, a missing driver, an unreachable server: the user's
            # two processes creating the same new database's tables at once: the loser retries
            if type(err).__name__ in ("IntegrityError", "OperationalError") and attempt < 4:
                time.sleep(0.5 * (attempt + 1))
                continue
            raise CliError(f"--storage {url}: {type(err).__name__}: {err}".splitlines()[0]) from err
    raise AssertionError("unreachable")  # pragma: no cover


def _signature(base: TrainConfig, spaces, metric: str) -> dict[str, Any]:
    return {"config": base.to_dict(), "params": [s.text() for s in spaces], "metric": metric}


def _check_same_study(study, signature: dict[str, Any], where: str) -> None:
    """A continued study must search the same keys, metric and base config (paths aside)."""
    old = study.user_attrs.get("ccdist_tune")
    if old is None:
        study.set_user_attr("ccdist_tune", signature)
        return
    problems = []
    if old["params"] != signature["params"]:
        problems.append(f"--param {' '.join(old['params'])} (now {' '.join(signature['params'])})")
    if old["metric"] != signature["metric"]:
        problems.append(f"--metric {old['metric']} (now {signature['metric']})")
    diff = config_diff(old["config"], signature["config"], ignore=_MAY_DIFFER)
    problems += [f"config {d}" for d in diff[:3]]
    if problems:
        raise CliError(
            f"{where} holds a study with other settings: {'; '.join(problems)}. "
            "Continue it with the same --config/--set/--param/--metric, or use another --out/--study"
        )


def _crown_ibp_accuracy(trainer) -> float:
    """CROWN-IBP-certified accuracy of the trainer's network on its validation examples."""
    from ccdist_plugin.bounds import certify

    x, y = trainer.validation
    model = trainer.model.eval()
    result = certify(
        model, x.to(trainer.device), y.to(trainer.device), trainer.config.eps, "crown", intermediate="ibp"
    )
    return float(result.certified.float().mean())


class _Objective:
    """One trial: suggest, train with per-epoch reports (pruning), return the final metric."""

    def __init__(self, optuna, base: TrainConfig, spaces, metric: str, out: Path, pruning_from: int):
        self.optuna, self.base, self.spaces, self.metric, self.out = optuna, base, spaces, metric, out
        self.pruning_from = pruning_from
        self._data: dict[str, Any] = {}

    def data(self, cfg: TrainConfig):
        from ccdist_plugin.data import DatasetNotFoundError
        from ccdist_plugin.trainer import load_data

        key = repr(cfg.data)
        if key not in self._data:
            try:
                self._data = {key: load_data(cfg)}  # one dataset kept (data.* may be searched)
            except DatasetNotFoundError as err:
                raise data_not_found(err, "--set data.root=DIR (or export CCDIST_DATA=DIR)") from err
        return self._data[key]

    def __call__(self, trial) -> float:

        from ccdist_plugin.trainer import NonFiniteLossError, Trainer, build_model
        from ccdist_plugin.tune import suggest, trial_config, trial_dir

        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = {s.key: suggest(trial, s) for s in self.spaces}
        run_dir = trial_dir(self.out, trial.number)
        try:
            cfg = trial_config(self.base, params, run_dir)
        except ValueError as err:  # a combination the config refuses: a failed trial, said why
            trial.set_user_attr("failure", str(err))
            raise ValueError(f"trial {trial.number} ({_params_text(params)}): {err}") from err
        data = self.data(cfg)
        model = build_model(cfg, data.spec)  # initialized from cfg.seed
        epochs = cfg.schedule.epochs
        reported = [0]

        def on_epoch(trainer, row: dict[str, Any]) -> None:
            if self.metric == "val_crown_ibp_cert_acc":
                row[self.metric] = _crown_ibp_accuracy(trainer)
            value = float(row[self.metric])
            trial.report(value, row["epoch"])
            reported[0] = row["epoch"]
            if row["epoch"] < epochs and row["epoch"] >= self.pruning_from and trial.should_prune():
                raise self.optuna.TrialPruned(f"{self.metric}={value:.4f} after epoch {row['epoch']}")

        trainer = Trainer(model, cfg)
        val = data.val if data.val is not None else data.test
        try:
            result = trainer.fit(data.train, val, on_epoch=on_epoch)
        except NonFiniteLossError as err:
            trial.set_user_attr("diverged", f"non-finite loss in epoch {reported[0] + 1}")
            trial.set_user_attr("diverged_detail", str(err))
            raise self.optuna.TrialPruned(str(err)) from err
        return float(result.history[-1][self.metric])


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _echo_trial(study, frozen) -> None:
    from ccdist_plugin.tune import trial_rows

    (row,) = trial_rows([frozen])
    value = "" if row.value is None else f" {study.user_attrs['ccdist_tune']['metric']}={row.value:.4f}"
    note = f" ({row.note})" if row.note else ""
    click.echo(f"trial {row.number} {row.status}:{value} [{_params_text(row.params)}]{note}")


def _write_outputs(study, base: TrainConfig, spaces, metric: str, out: Path, where: str) -> None:
    from ccdist_plugin.tune import best_row, format_table, plot_trials, trial_config, trial_rows

    rows = trial_rows(study.get_trials(deepcopy=False))
    keys = [s.key for s in spaces]
    table = format_table(rows, keys, metric)
    with open(out / "trials.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trial", "status", metric, "epochs", *keys, "note"])
        for r in rows:
            writer.writerow([r.number, r.status, r.value, r.epochs, *(r.params.get(k) for k in keys), r.note])
    plot = plot_trials(rows, spaces, metric, out / "report.png")
    best = best_row(rows)
    lines = [
        f"# ccdist tune: {out.name}",
        "",
        f"Study {study.study_name!r} in {where}; objective: {metric} (maximized), trial folders trial_NNNN/.",
        "Searched: " + ", ".join(f"`{s.text()}`" for s in spaces) + ".",
        "",
        "```",
        table,
        "```",
        "",
    ]
    if best is not None:
        cfg = trial_config(base, best.params, out / "best")
        header = (
            f"# ccdist tune {out.name}: trial {best.number}, {metric} = {best.value:.4f} "
            f"({_params_text(best.params)})\n# train it: ccdist train --config {out / 'best.yaml'}\n"
        )
        (out / "best.yaml").write_text(header + cfg.to_yaml())
        lines.append(
            f"Best: trial {best.number} ({_params_text(best.params)}), {metric} = {best.value:.4f}; "
            "its config: best.yaml (`ccdist train --config best.yaml`)."
        )
    if plot is not None:
        lines += ["", f"![{metric} against each parameter](report.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    click.echo(table)
    if best is None:
        click.echo("no trial completed, so no best.yaml")
    else:
        click.echo(f"best: trial {best.number}, {metric}={best.value:.4f}; config: {out / 'best.yaml'}")
    click.echo(f"report: {out / 'report.md'}")


@click.command("tune")
@click.option(
    "--config", "config", required=True, help="preset name (see `ccdist presets`) or a YAML config file"
)
@click.option("--teacher", default=None, help="teacher checkpoint (from `ccdist train-teacher`)")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=SPACE",
    help="a config key and its search space: float:LO:HI, log:LO:HI, int:LO:HI or choice:A,B,C (repeatable)",
)
@click.option(
    "--trials", type=int, required=True, help="finished trials in total (a rerun continues the study)"
)
@click.option("--out", "out_dir", required=True, help="the tune's folder: trial runs, study.db, report")
@click.option("--storage", default=None, help="Optuna database URL (default: sqlite:///OUT/study.db)")
@click.option("--study", "study_name", default=None, help="study name in the storage (default: OUT's name)")
@click.option(
    "--metric",
    default="val_crown_ibp_cert_acc",
    show_default=True,
    help="the maximized validation metric: val_crown_ibp_cert_acc, val_ibp_cert_acc or val_clean_acc",
)
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config key (repeatable)"
)
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
@click.option(
    "--seed", "sampler_seed", type=int, default=None, help="seed of the sampler (default: the config's seed)"
)
def tune_command(
    config: str,
    teacher: str | None,
    params: tuple[str, ...],
    trials: int,
    out_dir: str,
    storage: str | None,
    study_name: str | None,
    metric: str,
    overrides: tuple[str, ...],
    threads: int | None,
    sampler_seed: int | None,
) -> None:
    """Search hyper-parameters with Optuna: one `ccdist train` run per trial, pruned per epoch."""
    from ccdist_plugin.tune import METRICS, stale_running_trials

    optuna = _import_optuna()
    setup_logging(True)  # trials train quietly; one line per trial
    if trials < 1:
        raise CliError(f"--trials must be at least 1, got {trials}")
    if threads is not None and threads < 1:
        raise CliError(f"--threads must be at least 1, got {threads}")
    if metric not in METRICS:
        raise CliError(f"--metric {metric!r} is not one of {', '.join(METRICS)}")
    base = _base_config(config, overrides, teacher)
    spaces = _spaces(params, base)
    trial_base = base.override_values({"log.progress": False})  # one line per trial instead
    if base.data.val_split == 0:
        click.echo(
            "note: data.val_split is 0, so the metric is measured on the test split; "
            "hold out validation data with --set data.val_split=0.1",
            err=True,
        )
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    where = str(out / "study.db") if storage is None else re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)
    name = study_name or out.resolve().name
    storage_obj = _storage(optuna, url)
    study = optuna.create_study(
        study_name=name, storage=storage_obj, direction="maximize", load_if_exists=True
    )
    # the sampler's seed moves on with the study, so that a rerun does not repeat the first suggestions
    seed = (base.seed if sampler_seed is None else sampler_seed) + len(study.get_trials(deepcopy=False))
    study = optuna.load_study(
        study_name=name,
        storage=storage_obj,
        sampler=optuna.samplers.TPESampler(n_startup_trials=min(10, max(2, trials // 2)), seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2),
    )
    _check_same_study(study, _signature(base, spaces, metric), where)
    host = socket.gethostname()
    for stale in stale_running_trials(study.get_trials(deepcopy=False), host):
        study._storage.set_trial_user_attr(stale._trial_id, "failure", "its process was killed")
        study._storage.set_trial_state_values(stale._trial_id, optuna.trial.TrialState.FAIL)
        click.echo(f"trial {stale.number}: its process ({stale.user_attrs['pid']}) is gone; marked failed")
    optuna.storages.fail_stale_trials(study)  # other machines' trials whose heartbeat stopped
    # no pruning before training reaches the full ε: in the warm-up nothing is certified yet, and
    # during the ramp the trials train at ε_t < ε, where the ranking at ε still changes
    sched = base.schedule
    pruning_from = sched.warmup_epochs + sched.ramp_up_epochs + 1
    click.echo(f"study {name!r} ({where}); pruning from epoch {pruning_from} of {sched.epochs}")
    objective = _Objective(optuna, trial_base, spaces, metric, out, pruning_from)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    while True:
        done = len(study.get_trials(deepcopy=False, states=finished))
        running = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
        if done >= trials:
            click.echo(f"{done} trials finished (--trials {trials})")
            break
        if done + running >= trials:
            click.echo(f"{done} trials finished, {running} running in other processes (--trials {trials})")
            break
        study.optimize(objective, n_trials=1, callbacks=[_echo_trial])
    _write_outputs(study, base, spaces, metric, out, where)

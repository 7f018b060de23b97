"""``ccdist presets``, ``ccdist train-teacher``, ``ccdist train`` and ``ccdist demo``.

``--config`` takes a preset name or a YAML file; ``--set key=value`` (repeatable) overrides any
config key (``--set loss.alpha=0.5 --set schedule.epochs=10``); ``--resume`` continues an
interrupted run from its checkpoint; ``--overwrite`` replaces an earlier run in the output folder
(without either, a folder holding a run's checkpoint is refused: nothing is overwritten by
accident); ``--quiet`` silences progress bars and per-epoch logs.

The teacher of ``ccdist train --teacher CKPT`` goes into the run's config (``teacher.checkpoint``),
which is how the trainer finds it: recorded in the run's config.yaml, compared by its weights on
``--resume``.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import click

from ccdist_plugin.cli.common import (
    EXIT_INTERRUPTED,
    data_not_found,
    invoked_command,
    quote_command,
    setup_logging,
)
from ccdist_plugin.config import TrainConfig, list_presets, load_config

__all__ = ["presets_command", "train_teacher_command", "train_command", "demo_command", "resolve_config"]

#: how the data folder is named on these commands' command line (in "dataset not found" errors)
DATA_ROOT_HINT = "--set data.root=DIR (or export CCDIST_DATA=DIR)"


def resolve_config(
    config: str, overrides: tuple[str, ...], quiet: bool, output_dir: str | None
) -> TrainConfig:
    """The run's config: ``--config`` with ``--set`` overrides, ``--quiet`` and ``--output-dir``."""
    extra = list(overrides)
    if quiet:
        extra.append("log.progress=false")
    if output_dir is not None:
        extra.append(f"log.output_dir={output_dir}")
    try:
        return load_config(config, extra)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--config/--set") from err


def _run(
    cfg: TrainConfig, resume: bool, allow_teacher_change: bool, threads: int | None, overwrite: bool = False
) -> None:
    import torch

    if resume and overwrite:
        raise click.BadParameter("--resume continues the earlier run, --overwrite replaces it: pass one")

    if threads is not None:  # small networks on a busy CPU: 1 thread can be many times faster
        torch.set_num_threads(threads)
    from ccdist_plugin import distributed
    from ccdist_plugin.data import DatasetNotFoundError
    from ccdist_plugin.trainer import Trainer, build_model, load_data

    try:
        data = load_data(cfg)
    except DatasetNotFoundError as err:
        raise data_not_found(err, DATA_ROOT_HINT) from err
    model = build_model(cfg, data.spec)  # initialized from cfg.seed, as through the Python API
    val = data.val if data.val is not None else data.test
    checkpoint = Path(cfg.log.output_dir) / "checkpoint.pt"
    try:
        trainer = Trainer(model, cfg)  # the teacher (if any) is cfg.teacher.checkpoint
        result = trainer.fit(
            data.train, val, resume=resume, allow_teacher_change=allow_teacher_change, overwrite=overwrite
        )
    except KeyboardInterrupt:
        _interrupted(checkpoint)
    except OSError as err:  # e.g. a full disk or a folder gone read-only: say what is kept
        kept = _kept(checkpoint)
        if checkpoint.is_file():
            kept += ", intact (continue with --resume once the cause is fixed)"
        raise OSError(err.errno, f"{err.strerror or err}; {kept}", err.filename) from err
    finally:
        distributed.cleanup()  # under torchrun (a no-op otherwise)
    if not distributed.is_main_process():
        return
    last = result.history[-1] if result.history else {}
    summary = ", ".join(
        f"{k}={last[k]:.4f}" for k in ("val_clean_acc", "val_ibp_cert_acc") if isinstance(last.get(k), float)
    )
    click.echo(f"done: {result.checkpoint} {summary}")


def _kept(checkpoint: Path) -> str:
    if not checkpoint.is_file():
        return f"no checkpoint was written yet ({checkpoint})"
    return f"the last checkpoint is kept at {checkpoint}"


def _interrupted(checkpoint: Path) -> None:
    """Ctrl-C: say where the last checkpoint is and how to continue; exit 130."""
    if checkpoint.is_file():
        argv = invoked_command()
        resume = argv if "--resume" in argv else [*argv, "--resume"]
        click.echo(f"interrupted: {_kept(checkpoint)}; continue with:", err=True)
        click.echo(f"  {quote_command(resume)}", err=True)
    else:
        click.echo(f"interrupted: {_kept(checkpoint)}; nothing to resume", err=True)
    raise click.exceptions.Exit(EXIT_INTERRUPTED)


_config_option = click.option(
    "--config", "config", required=True, help="preset name (see `ccdist presets`) or a YAML config file"
)
_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config key (repeatable)"
)
_quiet_option = click.option("--quiet", is_flag=True, help="no progress bars or per-epoch logs")
_resume_option = click.option("--resume", is_flag=True, help="continue from <output_dir>/checkpoint.pt")
_overwrite_option = click.option(
    "--overwrite",
    is_flag=True,
    help="replace an earlier run in the output folder (its checkpoint, config.yaml, metrics, curves.png, "
    "tensorboard/; other files are kept); without it, or --resume, such a folder is refused",
)
_output_option = click.option("--output-dir", default=None, help="run directory (default: the config's)")
_threads_option = click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's choice)"
)


@click.command("presets")
def presets_command() -> None:
    """List the packaged configurations (use them with --config NAME)."""
    from ccdist_plugin.config import preset_description

    names = list_presets()
    width = max(map(len, names)) + 2
    for name in names:  # the description wrapped under itself, never cut
        lines = textwrap.wrap(preset_description(name), max(100 - width, 40)) or [""]
        click.echo(f"{name:{width}s}{lines[0]}")
        for line in lines[1:]:
            click.echo(" " * width + line)


@click.command("train-teacher")
@_config_option
@_set_option
@_quiet_option
@_resume_option
@_overwrite_option
@_output_option
@_threads_option
def train_teacher_command(
    config: str,
    overrides,
    quiet: bool,
    resume: bool,
    overwrite: bool,
    output_dir: str | None,
    threads: int | None,
) -> None:
    """Train a PGD adversarially-trained teacher (docs/method.md "Teacher")."""
    setup_logging(quiet)
    cfg = resolve_config(config, overrides, quiet, output_dir)
    if cfg.role != "teacher":
        raise click.BadParameter(
            f"config {config!r} is a student config (role: {cfg.role}); use a '-teacher' preset "
            f"(e.g. {cfg.name}-teacher) or `ccdist train`",
            param_hint="--config",
        )
    _run(cfg, resume, False, threads, overwrite)


@click.command("train")
@_config_option
@click.option("--teacher", default=None, help="teacher checkpoint (from `ccdist train-teacher`)")
@_set_option
@_quiet_option
@_resume_option
@click.option(
    "--allow-teacher-change",
    is_flag=True,
    help="with --resume: continue towards a teacher whose weights differ from the checkpoint's",
)
@_overwrite_option
@_output_option
@_threads_option
def train_command(
    config: str,
    teacher: str | None,
    overrides,
    quiet: bool,
    resume: bool,
    allow_teacher_change: bool,
    overwrite: bool,
    output_dir: str | None,
    threads: int | None,
) -> None:
    """Train a certified student (CC-Dist, CC-IBP, ... per the config's loss.method)."""
    setup_logging(quiet)
    cfg = resolve_config(config, overrides, quiet, output_dir)
    if cfg.role != "student":
        raise click.BadParameter(
            f"config {config!r} trains a teacher; use `ccdist train-teacher`", param_hint="--config"
        )
    if teacher is not None:
        if not Path(teacher).is_file():
            raise click.BadParameter(f"teacher checkpoint {teacher!r} does not exist", param_hint="--teacher")
        cfg = cfg.replace(teacher=dataclasses.replace(cfg.teacher, checkpoint=str(teacher)))
    _run(cfg, resume, allow_teacher_change, threads, overwrite)


@click.command("demo")
@click.option("--output-dir", default="runs/demo", show_default=True, help="where the three runs are written")
@click.option("--quiet", is_flag=True, help="only print the final table")
@click.option("--seed", default=0, show_default=True, help="seed of every run")
@click.option("--no-verify", is_flag=True, help="skip alpha,beta-CROWN even when ABCROWN_DIR is set")
@click.option(
    "--overwrite",
    is_flag=True,
    help="replace an earlier demo in the output folder (its three runs and export/); without it such a "
    "folder is refused",
)
def demo_command(output_dir: str, quiet: bool, seed: int, no_verify: bool, overwrite: bool) -> None:
    """Quick start on sklearn's digits: PGD teacher, CC-IBP and CC-Dist students, one table (< 2 min)."""
    from ccdist_plugin.demo import run_demo

    setup_logging(True)
    result = run_demo(
        output_dir=output_dir,
        seed=seed,
        echo=None if quiet else click.echo,
        verify=not no_verify,
        overwrite=overwrite,
    )
    click.echo(result.table())

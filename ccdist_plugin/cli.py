"""The ``ccdist`` command line (click).

Commands::

    ccdist presets                                   # packaged configurations
    ccdist train-teacher --config cifar10-2-teacher  # PGD adversarial training of a teacher
    ccdist train --config cifar10-2 --teacher runs/cifar10-2-teacher/checkpoint.pt
    ccdist demo                                      # the quick start on sklearn's digits (< 2 min on CPU)

``--config`` takes a preset name or a YAML file; ``--set key=value`` (repeatable) overrides any
config key (``--set loss.alpha=0.5 --set schedule.epochs=10``); ``--resume`` continues an
interrupted run from its checkpoint; ``--quiet`` silences progress bars and per-epoch logs.

Other areas register their own commands at the bottom of this file, one
``main.add_command(...)`` line each (``ccdist eval``, ``ccdist export``, ``ccdist verify``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import click

from ccdist_plugin.config import TrainConfig, list_presets, load_config

__all__ = ["main"]


def _setup_logging(quiet: bool) -> None:
    from ccdist_plugin import distributed

    quiet = quiet or not distributed.is_main_process()  # under torchrun only rank 0 logs at INFO
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    logging.getLogger("ccdist_plugin").setLevel(logging.WARNING if quiet else logging.INFO)


def _resolve(config: str, overrides: tuple[str, ...], quiet: bool, output_dir: str | None) -> TrainConfig:
    extra = list(overrides)
    if quiet:
        extra.append("log.progress=false")
    if output_dir is not None:
        extra.append(f"log.output_dir={output_dir}")
    try:
        return load_config(config, extra)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--config/--set") from err


def _run(cfg: TrainConfig, teacher: str | None, resume: bool, threads: int | None = None) -> None:
    import torch

    if threads is not None:  # small networks on a busy CPU: 1 thread can be many times faster
        torch.set_num_threads(threads)
    from ccdist_plugin import distributed
    from ccdist_plugin.trainer import Trainer, build_model, load_data

    if teacher is not None:  # recorded in the run's config.yaml (and checked on --resume)
        cfg = cfg.replace(teacher=dataclasses.replace(cfg.teacher, checkpoint=str(teacher)))
    data = load_data(cfg)
    torch.manual_seed(cfg.seed)  # the initialization depends on the seed only
    model = build_model(cfg, data.spec)
    val = data.val if data.val is not None else data.test
    try:
        trainer = Trainer(model, cfg, teacher=teacher)
        result = trainer.fit(data.train, val, resume=resume)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    finally:
        distributed.cleanup()  # under torchrun (a no-op otherwise)
    if not distributed.is_main_process():
        return
    last = result.history[-1] if result.history else {}
    summary = ", ".join(
        f"{k}={last[k]:.4f}" for k in ("val_clean_acc", "val_ibp_cert_acc") if isinstance(last.get(k), float)
    )
    click.echo(f"done: {result.checkpoint} {summary}")


_config_option = click.option(
    "--config", "config", required=True, help="preset name (see `ccdist presets`) or a YAML config file"
)
_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config key (repeatable)"
)
_quiet_option = click.option("--quiet", is_flag=True, help="no progress bars or per-epoch logs")
_resume_option = click.option("--resume", is_flag=True, help="continue from <output_dir>/checkpoint.pt")
_output_option = click.option("--output-dir", default=None, help="run directory (default: the config's)")
_threads_option = click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's choice)"
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--malloc-tuning/--no-malloc-tuning",
    default=True,
    show_default=True,
    help="On Linux, keep freed memory for reuse (glibc mallopt): element-wise work on large CPU "
    "tensors and CC-IBP steps get faster (measured in docs/RESULTS.md); see ccdist_plugin.malloc.",
)
def main(malloc_tuning: bool) -> None:
    """CC-Dist: certified training with distillation from robust teachers."""
    if malloc_tuning:
        from ccdist_plugin.malloc import retain_freed_memory

        retain_freed_memory()


@main.command("presets")
def presets_command() -> None:
    """List the packaged configurations (use them with --config NAME)."""
    from ccdist_plugin.config import preset_description

    for name in list_presets():
        click.echo(f"{name:24s} {preset_description(name)}")


@main.command("train-teacher")
@_config_option
@_set_option
@_quiet_option
@_resume_option
@_output_option
@_threads_option
def train_teacher_command(
    config: str, overrides, quiet: bool, resume: bool, output_dir: str | None, threads: int | None
) -> None:
    """Train a PGD adversarially-trained teacher (docs/method.md "Teacher")."""
    _setup_logging(quiet)
    cfg = _resolve(config, overrides, quiet, output_dir)
    if cfg.role != "teacher":
        raise click.BadParameter(
            f"config {config!r} is a student config (role: {cfg.role}); use a '-teacher' preset "
            f"(e.g. {cfg.name}-teacher) or `ccdist train`",
            param_hint="--config",
        )
    _run(cfg, None, resume, threads)


@main.command("train")
@_config_option
@click.option("--teacher", default=None, help="teacher checkpoint (from `ccdist train-teacher`)")
@_set_option
@_quiet_option
@_resume_option
@_output_option
@_threads_option
def train_command(
    config: str,
    teacher: str | None,
    overrides,
    quiet: bool,
    resume: bool,
    output_dir: str | None,
    threads: int | None,
) -> None:
    """Train a certified student (CC-Dist, CC-IBP, ... per the config's loss.method)."""
    _setup_logging(quiet)
    cfg = _resolve(config, overrides, quiet, output_dir)
    if cfg.role != "student":
        raise click.BadParameter(
            f"config {config!r} trains a teacher; use `ccdist train-teacher`", param_hint="--config"
        )
    if teacher is not None and not Path(teacher).is_file():
        raise click.BadParameter(f"teacher checkpoint {teacher!r} does not exist", param_hint="--teacher")
    _run(cfg, teacher, resume, threads)


@main.command("demo")
@click.option("--output-dir", default="runs/demo", show_default=True, help="where the three runs are written")
@click.option("--quiet", is_flag=True, help="only print the final table")
@click.option("--seed", default=0, show_default=True, help="seed of every run")
@click.option("--no-verify", is_flag=True, help="skip alpha,beta-CROWN even when ABCROWN_DIR is set")
def demo_command(output_dir: str, quiet: bool, seed: int, no_verify: bool) -> None:
    """Quick start on sklearn's digits: PGD teacher, CC-IBP and CC-Dist students, one table (< 2 min)."""
    from ccdist_plugin.demo import run_demo

    _setup_logging(True)
    result = run_demo(
        output_dir=output_dir, seed=seed, echo=None if quiet else click.echo, verify=not no_verify
    )
    click.echo(result.table())


# Commands defined by other areas: one registration line each.
from ccdist_plugin.export import export_command  # noqa: E402
from ccdist_plugin.verify import verify_command  # noqa: E402

main.add_command(export_command)
main.add_command(verify_command)
from ccdist_plugin.cli_eval import compare_command, eval_command, sweep_command  # noqa: E402

main.add_command(eval_command)
main.add_command(compare_command)
main.add_command(sweep_command)

if __name__ == "__main__":  # python -m ccdist_plugin.cli (what torchrun -m runs)
    main()

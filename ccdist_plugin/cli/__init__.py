"""The ``ccdist`` command line (click): every command lives in this package.

::

    ccdist presets                                   # packaged configurations
    ccdist train-teacher --config cifar10-2-teacher  # PGD adversarial training of a teacher
    ccdist train --config cifar10-2 --teacher runs/cifar10-2-teacher/checkpoint.pt
    ccdist demo                                      # the quick start on sklearn's digits
    ccdist eval / compare / sweep                    # tables and figures (cli/evaluate.py)
    ccdist tune                                      # hyper-parameter search, Optuna (cli/tune.py)
    ccdist export / verify                           # alpha,beta-CROWN (cli/verification.py)
    ccdist install-verifier                          # auto_LiRPA + alpha,beta-CROWN (cli/install.py)
    ccdist configs [--path | --copy DIR]             # the packaged alpha,beta-CROWN templates

Modules: :mod:`.common` (ε parsing, KEY=VALUE overrides, logging, checkpoint loading, one-line
errors), :mod:`.train`, :mod:`.evaluate`, :mod:`.tune`, :mod:`.verification`, :mod:`.install`,
:mod:`.configs`. Expected failures print one ``error: ...`` line and exit with status 2; ``--debug``
(before or after the command) shows tracebacks.
"""

from __future__ import annotations

import click

from ccdist_plugin.cli.common import CcdistGroup
from ccdist_plugin.version import __version__

__all__ = ["main"]


@click.group(cls=CcdistGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="ccdist", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="show the traceback of an error instead of one line")
@click.option(
    "--malloc-tuning/--no-malloc-tuning",
    default=True,
    show_default=True,
    help="On Linux, keep freed memory for reuse (glibc mallopt): element-wise work on large CPU "
    "tensors and CC-IBP steps get faster (measured in docs/RESULTS.md); see ccdist_plugin.malloc.",
)
@click.pass_context
def main(ctx: click.Context, debug: bool, malloc_tuning: bool) -> None:
    """CC-Dist: certified training with distillation from robust teachers."""
    ctx.meta["ccdist.debug"] = debug or ctx.meta.get("ccdist.debug", False)
    if malloc_tuning:
        from ccdist_plugin.malloc import retain_freed_memory

        retain_freed_memory()


def _register() -> None:
    from ccdist_plugin.cli import configs, evaluate, install, train, tune, verification

    for command in (
        train.presets_command,
        train.train_teacher_command,
        train.train_command,
        train.demo_command,
        evaluate.eval_command,
        evaluate.compare_command,
        evaluate.sweep_command,
        tune.tune_command,
        verification.export_command,
        verification.verify_command,
        install.install_verifier_command,
        configs.configs_command,
    ):
        main.add_command(command)


_register()

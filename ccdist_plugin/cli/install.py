"""``ccdist install-verifier``: auto_LiRPA, onnx2pytorch and α,β-CROWN at the tested commits.

The library is :mod:`ccdist_plugin.install`; this module only reads the command line and prints.
"""

from __future__ import annotations

import click

from ccdist_plugin.cli.common import CliError

__all__ = ["install_verifier_command"]


@click.command("install-verifier")
@click.option(
    "--prefix",
    default=None,
    type=click.Path(file_okay=False),
    help="writable folder for the sources and α,β-CROWN's complete_verifier "
    "(default: verifier/ under $CCDIST_HOME, else $XDG_CACHE_HOME/ccdist, else ~/.cache/ccdist)",
)
@click.option(
    "--from",
    "source_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="a folder holding alpha-beta-CROWN/, auto_LiRPA/ and onnx2pytorch/ source trees, "
    "instead of their git repositories",
)
def install_verifier_command(prefix: str | None, source_dir: str | None) -> None:
    """Install auto_LiRPA, onnx2pytorch and α,β-CROWN into this Python environment.

    From their git repositories at the tested commits (alpha-beta-CROWN 8250d5fbd530, auto_LiRPA
    9d100ec07086, onnx2pytorch fork KaidiXu/onnx2pytorch 8447c42c3192), or from --from DIR. The
    installed torch is never changed: auto_LiRPA and onnx2pytorch go in with --no-deps and the PyPI
    requirements under a constraint pinning torch. Where no torchvision imports beside that torch,
    α,β-CROWN gets an import-only stand-in. Where the verifier went is recorded, so ccdist verify
    and ccdist eval --bab find it without ABCROWN_DIR (which still wins when set). Running it again
    redoes only what is not in place. Exit status 2 with one line when something fails.
    """
    from ccdist_plugin.install import InstallError, install_verifier

    try:
        install_verifier(prefix=prefix, source_dir=source_dir, say=click.echo)
    except InstallError as err:
        raise CliError(str(err)) from None

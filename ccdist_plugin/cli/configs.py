"""``ccdist configs``: where the packaged α,β-CROWN templates are, or a copy of them.

An installed wheel keeps the templates inside the package (``ccdist_plugin/abcrown_configs/``);
a clone of the repository also has them at its top level (``abcrown_configs/``). ``ccdist export``
finds them by name; this command is for running abcrown.py by hand or editing a template::

    ccdist configs                        # the templates and the folder that holds them
    ccdist configs --path                 # the folder only (for scripts)
    ccdist configs --copy my_configs      # copies to edit (an existing different file is never overwritten)
"""

from __future__ import annotations

import click

from ccdist_plugin.cli.common import CliError

__all__ = ["configs_command"]


@click.command("configs")
@click.option("--path", "print_path", is_flag=True, help="print only the folder holding the templates")
@click.option(
    "--copy",
    "copy_to",
    default=None,
    metavar="DIR",
    help="copy the templates into DIR (created if needed; never overwrites a different file)",
)
def configs_command(print_path: bool, copy_to: str | None) -> None:
    """The packaged alpha,beta-CROWN templates: list them, print their folder or copy them."""
    from ccdist_plugin.verification import TEMPLATE_DIR, copy_templates, list_templates

    if print_path and copy_to is not None:
        raise CliError("give --path or --copy DIR, not both")
    if print_path:
        click.echo(str(TEMPLATE_DIR))
        return
    if copy_to is not None:
        status = copy_templates(copy_to)
        for name, what in status.items():
            click.echo(f"{what:9s} {click.format_filename(copy_to)}/{name}")
        click.echo(
            f"next: python $ABCROWN_DIR/abcrown.py --config {click.format_filename(copy_to)}/<template>.yaml "
            "--root_path EXPORT_DIR --results_file EXPORT_DIR/abcrown_results.pkl"
        )
        return
    names = list_templates()
    if not names:
        raise CliError(f"no α,β-CROWN templates found in {TEMPLATE_DIR}")
    click.echo(f"α,β-CROWN templates in {TEMPLATE_DIR}:")
    for name in names:
        click.echo(f"  {name}.yaml")
    click.echo("use: ccdist export --template NAME, or --config <that folder>/NAME.yaml with abcrown.py")

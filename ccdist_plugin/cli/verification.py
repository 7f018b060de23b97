"""``ccdist export`` and ``ccdist verify``: complete verification with α,β-CROWN.

The library is :mod:`ccdist_plugin.verification` (``export``: ONNX + VNN-LIB + manifest;
``runner`` and ``reports``: running α,β-CROWN, merging verdicts); this module only reads the
command line and prints. See ``docs/verification.md``.
"""

from __future__ import annotations

import shlex
import sys

import click

from ccdist_plugin.cli.common import (
    alpha_crown_from_options,
    alpha_crown_options,
    checkpoint_dataset,
    checkpoint_eps,
    load_checkpoint_and_model,
    parse_eps,
    parse_names,
    parse_overrides,
    quote_command,
    setup_logging,
)

__all__ = ["export_command", "verify_command"]


@click.command("export")
@click.option(
    "--checkpoint",
    "checkpoint",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="a checkpoint written by ccdist train / train-teacher",
)
@click.option("--data", "data_name", default=None, help="dataset name (default: the checkpoint's config)")
@click.option(
    "--data-root", default=None, help="folder holding the data (default: the dataset's search path)"
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="export directory")
@click.option("--count", default=100, show_default=True, help="number of test points")
@click.option("--start", default=0, show_default=True, help="index of the first test point")
@click.option(
    "--eps", "eps_text", default=None, help="ℓ∞ radius in pixel units, e.g. 2/255 (default: the checkpoint's)"
)
@click.option(
    "--template",
    default=None,
    help="abcrown_configs name or YAML path (default: from the dataset; teacher checkpoints: teacher)",
)
@click.option(
    "--timeout", "timeout_s", default=600.0, show_default=True, help="α,β-CROWN seconds per instance"
)
@click.option(
    "--drop-proven/--no-drop-proven",
    default=True,
    show_default=True,
    help="leave logit differences proved by our IBP/CROWN out of the VNN-LIB disjunction",
)
@click.option(
    "--verify-all",
    is_flag=True,
    help="also send misclassified, pre-certified and PGD-broken points to α,β-CROWN (cross-check)",
)
@click.option("--methods", default="ibp,crown", show_default=True, help="our bounds used as pre-checks")
@alpha_crown_options
@click.option("--attack-steps", default=50, show_default=True, help="PGD steps of the pre-check (0: none)")
@click.option("--attack-restarts", default=3, show_default=True, help="PGD restarts of the pre-check")
@click.option(
    "--device",
    "abcrown_device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="general.device in the generated abcrown.yaml (default: the template's)",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="override an α,β-CROWN key in abcrown.yaml, e.g. --set solver.batch_size=64 (repeatable)",
)
def export_command(
    checkpoint,
    data_name,
    data_root,
    out_dir,
    count,
    start,
    eps_text,
    template,
    timeout_s,
    drop_proven,
    verify_all,
    methods,
    alpha_crown,
    alpha_crown_layers,
    alpha_crown_steps,
    alpha_crown_budget,
    attack_steps,
    attack_restarts,
    abcrown_device,
    overrides,
):
    """Export a checkpoint and test points as ONNX + VNN-LIB for α,β-CROWN."""
    from ccdist_plugin.verification import DATASET_TEMPLATES, export_instances

    setup_logging(False)
    alpha = alpha_crown_from_options(alpha_crown, alpha_crown_layers, alpha_crown_steps, alpha_crown_budget)
    try:
        eps_given = parse_eps(eps_text, "--eps") if eps_text is not None else None
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    cfg_overrides = parse_overrides(overrides, "--set", "solver.batch_size=64")
    if abcrown_device is not None:
        cfg_overrides["general.device"] = abcrown_device
    payload, model = load_checkpoint_and_model(checkpoint)
    cfg = payload.get("config") or {}
    eps = checkpoint_eps(cfg, eps_given)
    name, _, data = checkpoint_dataset(cfg, data_name, data_root)
    if template is None:
        template = "teacher" if cfg.get("role") == "teacher" else DATASET_TEMPLATES.get(name, "digits")
    result = export_instances(
        model,
        data.test,
        out_dir,
        eps,
        count=count,
        start=start,
        drop_proven=drop_proven,
        timeout_s=timeout_s,
        template=template,
        methods=list(parse_names(methods)),
        attack_steps=attack_steps,
        attack_restarts=attack_restarts,
        verify_all=verify_all,
        dataset_name=name,
        checkpoint_path=checkpoint,
        config_overrides=cfg_overrides,
        alpha_crown=alpha or False,
    )
    c = result.counts
    click.echo(
        f"{len(result.points)} test points, eps={eps:.6g}: {c['misclassified']} misclassified, "
        f"{c['pre-certified']} pre-certified ({'IBP/CROWN/α-CROWN' if alpha else 'IBP/CROWN'}), "
        f"{c['attacked']} broken by PGD, "
        f"{c['bab']} for branch-and-bound; {result.num_instances} α,β-CROWN instances in {result.out_dir}"
    )
    click.echo(f"next: {quote_command(['ccdist', 'verify', '--export', result.out_dir])}")


@click.command("verify")
@click.option(
    "--export",
    "export_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="an export directory written by ccdist export",
)
@click.option(
    "--abcrown",
    "abcrown_dir",
    default=None,
    help="α,β-CROWN's complete_verifier folder (default: $ABCROWN_DIR)",
)
@click.option("--shard", default=None, metavar="I/N", help="run only the instances r with r % N == I")
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=None,
    help="time budget per instance (default: the export's); a verdict after it is reported late, not counted",
)
@click.option(
    "--grace",
    "grace_s",
    type=float,
    default=None,
    help="kill the verifier this many seconds after the budget (default max(5, timeout/10))",
)
@click.option("--merge", is_flag=True, help="only join the shards' results into verification.json")
@click.option("--retry-errors", is_flag=True, help="run again instances whose result is error")
@click.option(
    "--abcrown-args", default="", help='extra α,β-CROWN options, e.g. "--device cpu --batch_size 64"'
)
@click.option("--workers", default=1, show_default=True, help="verifier processes side by side, one queue")
@click.option(
    "--mode",
    type=click.Choice(["worker", "process"]),
    default="worker",
    show_default=True,
    help="worker: α,β-CROWN loaded once per worker; process: one α,β-CROWN process per instance",
)
def verify_command(
    export_dir, abcrown_dir, shard, timeout_s, grace_s, merge, retry_errors, abcrown_args, workers, mode
):
    """Run α,β-CROWN on an export directory and report certified accuracy.

    Exit status: 0 done, 2 α,β-CROWN not found (our IBP/CROWN results still reported),
    3 soundness alarm.
    """
    from ccdist_plugin.verification import merge_shards, run_verification

    setup_logging(False)
    if merge:
        result = merge_shards(export_dir, budget_s=timeout_s)
    else:
        result = run_verification(
            export_dir,
            abcrown_dir=abcrown_dir,
            shard=shard,
            timeout_s=timeout_s,
            grace_s=grace_s,
            extra_args=shlex.split(abcrown_args),
            retry_errors=retry_errors,
            workers=workers,
            mode=mode,
        )
    click.echo(result.table())
    if result.soundness_alarms:
        click.echo(f"SOUNDNESS ALARM: {len(result.soundness_alarms)} disagreement(s), see above", err=True)
        sys.exit(3)
    if not result.abcrown_ran:
        sys.exit(2)

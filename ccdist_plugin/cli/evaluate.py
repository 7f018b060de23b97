"""``ccdist eval``, ``ccdist compare`` and ``ccdist sweep``: the paper's tables and figures.

::

    ccdist eval --checkpoint runs/digits/checkpoint.pt                  # Table 1 row, eval.json, plots
    ccdist eval --checkpoint S.pt --compare-teacher T.pt --count 100    # + Table 2 (teacher vs student)
    ccdist eval --checkpoint S.pt --attack autoattack --bab --bab-count 100
    ccdist compare runs/a/eval runs/b/eval ... --out compare            # mean ± std table and plots
    ccdist sweep --param beta --values 0.01,0.02,0.05 --config digits --teacher T.pt --seeds 0,1

An output folder that already holds results is refused (exit 2, one line): ``eval --out`` holding an
``eval.json``, a ``sweep`` folder holding its runs. ``--overwrite`` replaces them (the files the command
writes there, nothing else); ``sweep --resume`` continues an earlier sweep with the same settings.

See ``docs/evaluation.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import click

from ccdist_plugin import reports
from ccdist_plugin.attacks import EVAL_PGD
from ccdist_plugin.cli.common import (
    alpha_crown_from_options,
    alpha_crown_options,
    checkpoint_dataset,
    checkpoint_eps,
    load_checkpoint_and_model,
    needs_teacher,
    parse_eps,
    parse_float_list,
    parse_names,
    parse_overrides,
    setup_logging,
)
from ccdist_plugin.runlock import TRAINING_OUTPUTS, claim_output_folder

__all__ = [
    "eval_command",
    "compare_command",
    "sweep_command",
    "run_eval",
    "compare_records",
    "EVAL_OUTPUTS",
    "SWEEP_MARKERS",
    "SWEEP_OUTPUTS",
]

logger = logging.getLogger(__name__)

#: the figures of an accuracy-vs-ε curve point
_CURVE_KEYS = ("standard_acc", "pgd_acc", "ibp_cert_acc", "crown_cert_acc", "crown_ibp_cert_acc")
#: multiples of ε at which ``ccdist eval`` draws the accuracy-vs-ε curve by default
DEFAULT_CURVE = "0,0.5,1,1.5,2"
_PARAM_KEYS = {"beta": "loss.beta", "alpha": "loss.alpha"}
#: what ``ccdist eval`` writes into ``--out`` (``--overwrite`` removes these, nothing else)
EVAL_OUTPUTS = ("eval.json", "eval.md", "accuracy_vs_eps.png", "teacher_comparison.md", "teacher", "bab")
#: a sweep's runs are ``<out>/<param>=<value>/seed<seed>``; its teacher (when it trains one) ``<out>/teacher``
_SWEEP_RUNS = ("*=*/seed*", "teacher")
#: what marks an earlier sweep in its folder, and everything a sweep writes there
SWEEP_MARKERS = tuple(f"{run}/checkpoint.pt" for run in _SWEEP_RUNS) + ("compare.md",)
SWEEP_OUTPUTS = (
    *(f"{run}/{name}" for run in _SWEEP_RUNS for name in (*TRAINING_OUTPUTS, "eval")),
    "compare.md",
    "accuracy_vs_eps.png",
    "sweep_*.png",
)


def _test_points(
    cfg: dict[str, Any], data_name: str | None, data_root: str | None, start: int, count: int | None
):
    name, root, data = checkpoint_dataset(cfg, data_name, data_root)
    n = len(data.test)
    if start < 0 or start >= n:
        raise ValueError(f"--start {start} is outside the test set (0..{n - 1})")
    stop = n if count is None else min(n, start + count)
    x, y = data.test.subset(list(range(start, stop))).tensors()
    info = {"name": name, "split": "test", "start": start, "count": stop - start, "root": root}
    return x, y, info


def run_eval(
    checkpoint: str | Path,
    out_dir: str | Path,
    settings_kwargs: dict[str, Any],
    eps: float | None = None,
    data_name: str | None = None,
    data_root: str | None = None,
    start: int = 0,
    count: int | None = None,
    curve: list[float] | None = None,
    label: str | None = None,
    abcrown_dir: str | None = None,
    progress: bool = True,
    plots: bool = True,
    say=logger.info,
) -> dict[str, Any]:
    """Evaluate one checkpoint and write ``<out_dir>/eval.json``, ``eval.md`` and (with a curve)
    ``accuracy_vs_eps.png``; returns the record.

    Args:
        settings_kwargs: keyword arguments of :class:`~ccdist_plugin.evaluation.EvalSettings`
            (without ``eps``).
        eps: radius in pixel units (default: the checkpoint's).
        curve: multiples of ε for the accuracy-vs-ε curve (PGD and IBP/CROWN, no AutoAttack/BaB).
    """
    from ccdist_plugin.evaluation import EvalSettings, evaluate
    from ccdist_plugin.verification import DATASET_TEMPLATES

    payload, model = load_checkpoint_and_model(checkpoint)
    cfg = payload.get("config") or {}
    eps = checkpoint_eps(cfg, eps)
    x, y, data_info = _test_points(cfg, data_name, data_root, start, count)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = dict(settings_kwargs)
    if kwargs.get("bab") and kwargs.get("bab_template") is None:
        kwargs["bab_template"] = (
            "teacher" if cfg.get("role") == "teacher" else DATASET_TEMPLATES.get(data_info["name"], "digits")
        )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    settings = EvalSettings(eps=eps, **kwargs)
    info = reports.checkpoint_info(checkpoint, payload, feature_dim=model.feature_dim)
    name = label or reports.default_label(info)
    say(f"evaluating {name} ({checkpoint}) on {len(y)} {data_info['name']} test points at eps={eps:g} ...")
    result = evaluate(
        model,
        x,
        y,
        settings,
        progress=progress,
        bab_dir=out / "bab",
        checkpoint_path=checkpoint,
        dataset_name=data_info["name"],
        abcrown_dir=abcrown_dir,
        log=say,
    )
    points = []
    curve_start = time.perf_counter()
    for factor in curve or []:
        e = factor * eps
        if factor == 1.0:
            m = result.metrics
        else:
            curve_settings = EvalSettings(**_curve_kwargs(settings, e))
            m = evaluate(model, x, y, curve_settings, progress=progress).metrics
        points.append({"eps": e, **{k: m.get(k) for k in _CURVE_KEYS}})
    if points:  # the evaluation's time ("Eval time") includes the curve's passes
        result.timings_s["eps_curve"] = time.perf_counter() - curve_start
        result.timings_s["total"] = result.timings_s.get("total", 0.0) + result.timings_s["eps_curve"]
    record = reports.make_record(result, info, data_info, label=name, eps_curve=points)
    reports.write_json(record, out / "eval.json")
    (out / "eval.md").write_text(reports.eval_table([record]))
    if plots and points:
        reports.plot_accuracy_vs_eps([record], out / "accuracy_vs_eps.png")
    return record


def _curve_kwargs(settings: Any, eps: float) -> dict[str, Any]:
    kw = {k: v for k, v in settings.to_dict().items() if k != "pgd_step_size"}
    kw.update(eps=eps, bab=False, attack="pgd40" if settings.attack != "none" else "none")
    return kw


# --------------------------------------------------------------------------------------------
# ccdist eval
# --------------------------------------------------------------------------------------------


@click.command("eval")
@click.option(
    "--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False), help="checkpoint to evaluate"
)
@click.option("--data", "data_name", default=None, help="dataset name (default: the checkpoint's)")
@click.option(
    "--data-root", default=None, help="folder holding the data (default: the checkpoint's / search path)"
)
@click.option(
    "--eps", "eps_text", default=None, help="ℓ∞ radius in pixel units, e.g. 2/255 (default: the checkpoint's)"
)
@click.option("--count", type=int, default=None, help="number of test points (default: the whole test set)")
@click.option("--start", default=0, show_default=True, help="index of the first test point")
@click.option("--batch-size", default=256, show_default=True, help="test points per batch (every metric)")
@click.option(
    "--attack",
    type=click.Choice(["pgd40", "autoattack", "none"]),
    default="pgd40",
    show_default=True,
    help="autoattack: PGD-40 and AutoAttack (when an implementation is importable)",
)
@click.option(
    "--pgd-steps",
    default=EVAL_PGD.steps,
    show_default=True,
    help="default: the evaluation attack (docs/evaluation.md)",
)
@click.option(
    "--pgd-step",
    "pgd_step_text",
    default=f"{EVAL_PGD.step_size:g}",
    show_default=True,
    help="PGD step as a multiple of ε",
)
@click.option(
    "--pgd-restarts", default=EVAL_PGD.restarts, show_default=True, help="PGD random starts per test point"
)
@click.option("--methods", default="ibp,crown", show_default=True, help="certification by our bounds")
@click.option(
    "--crown-intermediate",
    type=click.Choice(["auto", "crown", "ibp"]),
    default="auto",
    show_default=True,
    help="CROWN's intermediate bounds: crown (full CROWN: crown_cert_acc), ibp (CROWN-IBP: "
    "crown_ibp_cert_acc), auto (full CROWN where affordable, else CROWN-IBP; the record says which)",
)
@click.option(
    "--crown-backend",
    type=click.Choice(["auto", "native", "auto_lirpa"]),
    default="auto",
    show_default=True,
    help="auto: native unless a layer needs auto_LiRPA; auto_lirpa: auto_LiRPA's CROWN (needs it installed)",
)
@alpha_crown_options
@click.option("--bab", is_flag=True, help="branch and bound with alpha,beta-CROWN (export + verify)")
@click.option("--bab-count", default=100, show_default=True, help="BaB on the first N evaluated points")
@click.option("--bab-timeout", default=600.0, show_default=True, help="alpha,beta-CROWN seconds per point")
@click.option(
    "--template", default=None, help="abcrown_configs template (default: by dataset; teachers: teacher)"
)
@click.option(
    "--bab-set", multiple=True, metavar="KEY=VALUE", help="alpha,beta-CROWN key override (repeatable)"
)
@click.option(
    "--abcrown", "abcrown_dir", default=None, help="alpha,beta-CROWN complete_verifier (default $ABCROWN_DIR)"
)
@click.option(
    "--curve-eps",
    default=DEFAULT_CURVE,
    show_default=True,
    help="multiples of ε for the accuracy-vs-ε plot ('' for none)",
)
@click.option("--compare-teacher", default=None, type=click.Path(exists=True, dir_okay=False), help="Table 2")
@click.option("--label", default=None, help="method name in the tables (default: from the loss)")
@click.option("--out", "out_dir", default=None, help="output folder (default: <checkpoint folder>/eval)")
@click.option(
    "--overwrite",
    is_flag=True,
    help="replace an earlier evaluation in --out (eval.json, eval.md, plots, teacher/, bab/; other files are "
    "kept); without it such a folder is refused",
)
@click.option("--seed", default=0, show_default=True, help="seed of the attacks' random starts")
@click.option("--quiet", is_flag=True, help="no progress bars or logs")
# over 80 lines only by its signature (one parameter per option); the body is the command's steps in order
def eval_command(
    checkpoint,
    data_name,
    data_root,
    eps_text,
    count,
    start,
    batch_size,
    attack,
    pgd_steps,
    pgd_step_text,
    pgd_restarts,
    methods,
    crown_intermediate,
    crown_backend,
    alpha_crown,
    alpha_crown_layers,
    alpha_crown_steps,
    alpha_crown_budget,
    bab,
    bab_count,
    bab_timeout,
    template,
    bab_set,
    abcrown_dir,
    curve_eps,
    compare_teacher,
    label,
    out_dir,
    overwrite,
    seed,
    quiet,
):
    """Standard, PGD-40/AutoAttack, IBP/CROWN/BaB-certified accuracy and the IBP loss of a checkpoint."""
    setup_logging(quiet)
    out = Path(out_dir) if out_dir else Path(checkpoint).parent / "eval"
    alpha = alpha_crown_from_options(alpha_crown, alpha_crown_layers, alpha_crown_steps, alpha_crown_budget)
    try:
        eps = parse_eps(eps_text, "--eps") if eps_text is not None else None
        pgd_step_rel = parse_eps(pgd_step_text, "--pgd-step", upper=None)
        curve = parse_float_list(curve_eps, "--curve-eps") if curve_eps else []
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    claim_output_folder(
        out,
        ("eval.json",),
        EVAL_OUTPUTS,
        overwrite=overwrite,
        resume_option=None,
        folder_option="--out",
        what="evaluation",
    )
    settings = dict(
        batch_size=batch_size,
        attack=attack,
        pgd_steps=pgd_steps,
        pgd_step_rel=pgd_step_rel,
        pgd_restarts=pgd_restarts,
        methods=parse_names(methods),
        crown_intermediate=crown_intermediate,
        crown_backend=crown_backend,
        alpha_crown=alpha or False,
        seed=seed,
        bab=bab,
        bab_count=bab_count,
        bab_timeout_s=bab_timeout,
        bab_template=template,
        bab_overrides=parse_overrides(bab_set, "--bab-set", "bab.timeout=60"),
    )
    common = dict(
        eps=eps,
        data_name=data_name,
        data_root=data_root,
        start=start,
        count=count,
        curve=curve,
        abcrown_dir=abcrown_dir,
        progress=not quiet,
        say=logger.info,
    )
    record = run_eval(checkpoint, out, settings, label=label, **common)
    records = [record]
    if compare_teacher is not None:
        records.append(_compare_teacher(compare_teacher, record, out, settings, common))
    click.echo(reports.eval_table(records))
    if compare_teacher is not None:
        click.echo(reports.teacher_table(records[1], records[0]))
    written = ["eval.json", "eval.md"] + (["accuracy_vs_eps.png"] if record["eps_curve"] else [])
    written += ["teacher_comparison.md"] if compare_teacher else []
    click.echo(f"wrote {', '.join(str(out / w) for w in written)}")


def _compare_teacher(
    teacher_checkpoint: str,
    record: dict[str, Any],
    out: Path,
    settings: dict[str, Any],
    common: dict[str, Any],
) -> dict[str, Any]:
    """``eval --compare-teacher``: evaluate the teacher at the student's ε (into ``out/teacher``), write
    Table 2, and add the teacher to the student's ``eval.json``, ``eval.md`` and ε plot. Returns the
    teacher's record."""
    teacher = run_eval(teacher_checkpoint, out / "teacher", settings, **{**common, "eps": record["eps"]})
    table2 = reports.teacher_table(teacher, record)
    (out / "teacher_comparison.md").write_text(table2)
    record["teacher"] = {k: v for k, v in teacher.items() if k != "per_example"}
    reports.write_json(record, out / "eval.json")
    (out / "eval.md").write_text(reports.eval_table([record, teacher]) + "\n" + table2)
    if record["eps_curve"] and teacher["eps_curve"]:
        reports.plot_accuracy_vs_eps([record, teacher], out / "accuracy_vs_eps.png")
    return teacher


# --------------------------------------------------------------------------------------------
# ccdist compare
# --------------------------------------------------------------------------------------------


def compare_records(
    records: list[dict[str, Any]], out: Path, group_by: str, sweep_param: str | None
) -> list[Path]:
    """Write ``compare.md`` and the plots for a set of records; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "compare.md"]
    text = reports.compare_table(records, group_by=group_by)
    (out / "compare.md").write_text(text)
    if any(r.get("eps_curve") for r in records):
        written.append(reports.plot_accuracy_vs_eps(records, out / "accuracy_vs_eps.png"))
    if sweep_param is None:
        betas = {reports.record_param(r, "beta") for r in records}
        sweep_param = "beta" if len(betas) > 1 and None not in betas else None
    if sweep_param is not None:
        written.append(reports.plot_sweep(records, out / f"sweep_{sweep_param}.png", param=sweep_param))
    return written


@click.command("compare")
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", "out_dir", default="compare", show_default=True, help="where compare.md and plots go")
@click.option(
    "--group-by",
    default="label",
    show_default=True,
    help="'label' (method and ε; seeds are averaged) or a run parameter (beta, loss.alpha, ...)",
)
@click.option(
    "--sweep-param", default=None, help="x axis of the sweep plot (default: beta when runs differ in β)"
)
def compare_command(runs, out_dir, group_by, sweep_param):
    """One table over several runs/seeds (mean ± std) and plots, from their eval.json files."""
    records = [reports.load_record(r) for r in runs]
    written = compare_records(records, Path(out_dir), group_by, sweep_param)
    click.echo((Path(out_dir) / "compare.md").read_text())
    click.echo("wrote " + ", ".join(str(p) for p in written))


# --------------------------------------------------------------------------------------------
# ccdist sweep
# --------------------------------------------------------------------------------------------


def _epochs_done(checkpoint: Path) -> int:
    """Epochs an earlier (possibly interrupted) run of a sweep finished: 0 when there is no checkpoint."""
    from ccdist_plugin.checkpoint import load_checkpoint

    return int(load_checkpoint(checkpoint).get("epoch", 0)) if checkpoint.is_file() else 0


def _check_kept_run(checkpoint: Path, cfg, teacher_sha256: str | None) -> None:
    """A finished run of an earlier sweep is kept only when it was trained with these settings (and
    towards a teacher with these weights); ``ValueError`` naming the differences otherwise."""
    from ccdist_plugin.checkpoint import check_resumable, load_checkpoint

    try:
        check_resumable(load_checkpoint(checkpoint), cfg, None, teacher_sha256)
    except ValueError as err:
        raise ValueError(
            f"{checkpoint}: the earlier sweep's run cannot be kept: {err}. Pass --overwrite to retrain the "
            "sweep, or another --output-dir"
        ) from None


def _sweep_runs(
    config: str, extra: list[str], param: str, key: str, values: list[str], seeds: list[int], out: Path
):
    """``(value, seed, config, run folder)`` of every run of a sweep."""
    from ccdist_plugin.config import load_config

    runs = []
    for value in values:
        for seed in seeds:
            run_dir = out / f"{param}={value}" / f"seed{seed}"
            cfg = load_config(config, extra + [f"{key}={value}", f"seed={seed}", f"log.output_dir={run_dir}"])
            runs.append((value, seed, cfg, run_dir))
    return runs


def _sweep_teacher(cfg, out: Path, quiet: bool) -> Path | None:
    """The teacher of a sweep whose loss needs one and that was given none: the preset the config names,
    trained (or resumed, or kept when finished with the same settings) in ``out/teacher``; None when the
    loss needs no teacher."""
    from ccdist_plugin.config import load_preset
    from ccdist_plugin.trainer import Trainer, build_model, load_data

    if not needs_teacher(cfg):
        return None
    t_preset = cfg.teacher.preset
    if not t_preset:
        raise ValueError(f"loss {cfg.loss.method!r} needs a teacher: pass --teacher")
    t_dir = out / "teacher"
    teacher_path = t_dir / "checkpoint.pt"
    t_cfg = load_preset(t_preset).override(
        [f"log.output_dir={t_dir}"] + (["log.progress=false"] if quiet else [])
    )
    done = _epochs_done(teacher_path)
    if done < t_cfg.schedule.epochs:
        click.echo(f"{'resuming' if done else 'training'} the teacher ({t_preset}) in {t_dir} ...")
        data = load_data(t_cfg)
        Trainer(build_model(t_cfg, data.spec), t_cfg).fit(
            data.train, data.val if data.val is not None else data.test, resume=done > 0, overwrite=False
        )
    else:
        _check_kept_run(teacher_path, t_cfg, None)
    return teacher_path


@click.command("sweep")
@click.option("--param", required=True, help="beta, alpha, or a dotted config key (loss.attack.steps)")
@click.option("--values", "values_text", required=True, help="comma-separated values, e.g. 0.005,0.02,0.1")
@click.option("--config", "config", required=True, help="preset name or YAML config of the runs")
@click.option(
    "--teacher", default=None, type=click.Path(exists=True, dir_okay=False), help="teacher checkpoint"
)
@click.option("--seeds", default="0", show_default=True, help="comma-separated seeds (mean ± std over them)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="config override (repeatable)")
@click.option("--output-dir", default=None, help="folder of the sweep (default runs/sweep-<config>-<param>)")
@click.option(
    "--resume",
    is_flag=True,
    help="continue an earlier sweep in the folder: finished runs with the same settings are kept, "
    "interrupted ones continued",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="replace an earlier sweep in the folder (its runs, teacher and plots; other files are kept)",
)
@click.option("--eval/--no-eval", "do_eval", default=True, show_default=True, help="evaluate every run")
@click.option("--count", type=int, default=None, help="test points per evaluation (default: all)")
@click.option(
    "--attack",
    type=click.Choice(["pgd40", "autoattack", "none"]),
    default="pgd40",
    show_default=True,
    help="the evaluation attack, as for ccdist eval (autoattack: PGD-40 and AutoAttack)",
)
@click.option("--bab", is_flag=True, help="branch-and-bound certified accuracy too (slow)")
@click.option("--bab-count", default=100, show_default=True, help="BaB on the first N evaluated points")
@click.option("--bab-timeout", default=600.0, show_default=True, help="alpha,beta-CROWN seconds per point")
@click.option("--quiet", is_flag=True, help="no progress bars or per-epoch logs")
def sweep_command(
    param,
    values_text,
    config,
    teacher,
    seeds,
    overrides,
    output_dir,
    resume,
    overwrite,
    do_eval,
    count,
    attack,
    bab,
    bab_count,
    bab_timeout,
    quiet,
):
    """Train (and evaluate) one run per value of a parameter and seed; the β sweep of Figure 1."""
    from ccdist_plugin.trainer import Trainer, build_model, load_data

    setup_logging(quiet)
    key = _PARAM_KEYS.get(param, param)
    values = [v.strip() for v in values_text.split(",") if v.strip()]
    seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    if not values or not seed_list:
        raise click.BadParameter("need at least one value and one seed")
    if resume and overwrite:
        raise click.BadParameter("--resume continues the earlier sweep, --overwrite replaces it: pass one")
    base_name = Path(config).stem
    out = Path(output_dir or f"runs/sweep-{base_name}-{param}")
    extra = list(overrides) + (["log.progress=false"] if quiet else [])
    try:
        runs = _sweep_runs(config, extra, param, key, values, seed_list, out)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--param/--values/--set") from err
    if not resume:  # an earlier sweep here is kept unless --overwrite
        claim_output_folder(out, SWEEP_MARKERS, SWEEP_OUTPUTS, overwrite=overwrite, what="sweep")
    teacher_path = teacher if teacher is not None else _sweep_teacher(runs[0][2], out, quiet)
    teacher_sha = None
    if teacher_path is not None:
        from ccdist_plugin.checkpoint import load_model, state_sha256

        teacher_sha = state_sha256(load_model(teacher_path))
    records = []
    for value, seed, cfg, run_dir in runs:
        ckpt = run_dir / "checkpoint.pt"
        done = _epochs_done(ckpt)
        if teacher_path is not None and needs_teacher(cfg):  # the trainer reads it from the config
            cfg = cfg.replace(teacher=dataclasses.replace(cfg.teacher, checkpoint=str(teacher_path)))
        if done >= cfg.schedule.epochs:
            _check_kept_run(ckpt, cfg, teacher_sha if needs_teacher(cfg) else None)
            click.echo(f"{param}={value} seed {seed}: {ckpt} has the same settings, kept (not retrained)")
        else:
            verb = f"resuming (after epoch {done})" if done else "training"
            click.echo(f"{verb} {param}={value} seed {seed} into {run_dir} ...")
            data = load_data(cfg)
            Trainer(build_model(cfg, data.spec), cfg).fit(
                data.train, data.val if data.val is not None else data.test, resume=done > 0, overwrite=False
            )
        if do_eval:
            settings = dict(attack=attack, bab=bab, bab_count=bab_count, bab_timeout_s=bab_timeout)
            records.append(
                run_eval(
                    ckpt,
                    run_dir / "eval",
                    settings,
                    count=count,
                    curve=[],
                    progress=not quiet,
                    label=f"{reports.default_label({'method': cfg.loss.method, 'role': cfg.role})}",
                )
            )
    if records:
        written = compare_records(records, out, group_by=param, sweep_param=param)
        click.echo((out / "compare.md").read_text())
        click.echo("wrote " + ", ".join(str(p) for p in written))

"""The report of the issue-9 protocol: ``docs/results/reproduce_cpu.{json,md}`` and the β-sweep plot
``docs/img/beta_sweep.png``, from the finished runs on disk."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

from .measure import eval_attack_text, machine_text
from .plan import DIGITS_EPS, parse_floats

log = logging.getLogger("reproduce_cpu")


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.2f}"
    return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}"


def _mean_time(rows: list[dict]) -> str:
    return f"{statistics.mean(r['train_s'] for r in rows):.0f}" if rows else "–"


def long_teacher_name(args: argparse.Namespace) -> str:
    """The run name of the teacher of ``--long-teacher-epochs``."""
    return f"teacher-e{args.long_teacher_epochs}-s0"


def select_alpha(results: dict[str, dict], alphas: list[float]) -> float:
    """The α whose CC-IBP seed-0 run has the best validation CROWN-IBP-certified accuracy (ties: the
    smaller α)."""
    return max(alphas, key=lambda al: (results[f"cc_ibp-a{al:g}-s0"]["val"]["crown_cert"], -al))


def report_from_disk(root: str, alphas, sweep, args, wall_s: float) -> None:
    """Report every finished run found under ``root`` (missing runs are left out and counted)."""
    results = {p.parent.name: json.loads(p.read_text()) for p in Path(root).glob("*/result.json")}
    bab = {p.parent.name: json.loads(p.read_text()) for p in Path(root).glob("*/bab.json")}
    for export in Path(root).glob("*/bab"):  # interrupted: what finished (missing points: not certified)
        name = export.parent.name
        if name not in bab and (export / "instances.csv").is_file():
            from ccdist_plugin.verification import merge_shards

            try:
                res = merge_shards(export)
            except ValueError as err:  # e.g. an export written before verdicts carried export ids
                log.warning("%s: BaB results not used: %s", name, err)
                continue
            bab[name] = {k: v for k, v in dataclasses.asdict(res).items() if not isinstance(v, list)}
            bab[name]["partial"] = True
            bab[name]["missing"] = len(res.missing)
    best_alpha = select_alpha(results, alphas) if len(alphas) > 1 else alphas[0]
    report(results, bab, best_alpha, alphas, sweep, args, wall_s)


def _seed_table(
    groups: dict[str, list[str]], results: dict, bab: dict, bab_count: int, skip_empty: bool = False
) -> str:
    """One row per method: mean ± std over the seeds found of the test metrics, BaB and train time."""
    lines = [
        "| method | seeds | standard | PGD-40 | IBP-cert | CROWN-IBP-cert | BaB-cert (first "
        f"{bab_count}) | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, names in groups.items():
        rows = [results[n] for n in names if "test" in results.get(n, {})]
        if not rows and skip_empty:
            continue
        tests = [r["test"] for r in rows]
        babs = [bab[n] for n in names if n in bab and "certified_accuracy" in bab[n]]
        bab_txt = _ms([b["certified_accuracy"] for b in babs]) + (f" (n={len(babs)})" if babs else "")
        missing = sum(int(b.get("missing", 0)) for b in babs if b.get("partial"))
        if missing:
            bab_txt += f", partial: {missing} BaB instance(s) not run"
        lines.append(
            f"| {label} | {len(rows)} | {_ms([t['std'] for t in tests])} | "
            f"{_ms([t['pgd40'] for t in tests])} | "
            f"{_ms([t['ibp_cert'] for t in tests])} | {_ms([t['crown_cert'] for t in tests])} | {bab_txt} | "
            f"{_mean_time(rows)} |"
        )
    return "\n".join(lines)


def report(results, bab, best_alpha, alphas, sweep, args, wall_s: float) -> None:
    """Write docs/results/reproduce_cpu.{json,md} and docs/img/beta_sweep.png."""
    docs = Path(args.docs)
    (docs / "results").mkdir(parents=True, exist_ok=True)
    (docs / "img").mkdir(parents=True, exist_ok=True)
    a = f"{best_alpha:g}"
    main_table = _seed_table(_main_groups(results, a, args), results, bab, args.bab_count)
    other_alphas = _other_alpha_tables(results, bab, best_alpha, alphas, args)
    sweep_rows = []
    for bw in sweep:
        name = f"cc_ibp-a{a}-s0" if bw == 0 else f"cc_dist-a{a}-b{bw:g}-s0"
        if name in results:
            sweep_rows.append((bw, results[name]["val"]))
    sweep_lines = [
        "| β·w | val standard | val PGD-10 | val IBP-cert | val CROWN-IBP-cert |",
        "|---|---|---|---|---|",
    ]
    for bw, v in sweep_rows:
        sweep_lines.append(
            f"| {bw:g} | {_ms([v['std']])} | {_ms([v['pgd10']])} | {_ms([v['ibp_cert']])} | "
            f"{_ms([v['crown_cert']])} |"
        )
    digits_lines = [] if args.skip_digits else _digits_table(results, args.seeds)
    plot = _plot_sweep(sweep_rows, docs / "img" / "beta_sweep.png", a)
    train_min = sum(r["train_s"] for r in results.values()) / 60
    eval_min = sum(r.get(k, {}).get("eval_s", 0) for r in results.values() for k in ("val", "test")) / 60
    md = [
        "<!-- generated by: python benchmarks/reproduce_cpu.py " + " ".join(sys.argv[1:]) + " -->",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine_text()}. "
        f"{len(results)} runs; training {train_min:.0f} min and evaluation {eval_min:.0f} min "
        "of process wall time in all (1 thread per process, up to 4 at once; on a shared machine, so times "
        "are only comparable between runs made together: see the run log of benchmarks/README.md).",
        "",
        "### CIFAR-10 JPEG subset, ε = 2/255, cnn3 (16, 32 channels, w = 128), test split (2000 images)",
        "",
        main_table,
        "",
        "Accuracies in %, mean ± sample std over seeds (one value: one seed). "
        f"PGD-40: {eval_attack_text()}; PGD-10 (validation): step ε/4, one random start. "
        "CROWN-IBP-cert = certified by IBP or by CROWN with IBP intermediate bounds (CROWN-IBP; float64, "
        "the package's `evaluation.prefilter`). BaB-cert = "
        f"the test points 0-{args.bab_count - 1} certified by our IBP pre-check or by α,β-CROWN "
        f"(bab.timeout {args.bab_timeout:g} s, hard limit {args.bab_timeout + 30:g} s per point, CPU, "
        "attack 20 steps × 2 restarts after our PGD-50 × 3); misclassified, PGD-broken, timed-out and "
        "not-run points count as not certified. Train time: wall seconds of the run's process.",
        "",
        *other_alphas,
        (
            "### α chosen on the validation split (1000 images carved from the 10k train set), CC-IBP seed 0"
            if len(alphas) > 1
            else f"### α = {a}: given (`--alphas {a}`), no selection run; CC-IBP seed 0, validation split"
        ),
        "",
        "\n".join(_alpha_table(results, best_alpha, alphas)),
        "",
        f"### β sweep at α = {a} (seed 0, validation split; β = 0 is CC-IBP)",
        "",
        "\n".join(sweep_lines),
        "",
        f"![β sweep](../img/{plot.name})" if plot else "",
    ]
    if digits_lines:
        md += [
            "",
            f"### sklearn digits (8×8), ε = {DIGITS_EPS}, mlp (test split)",
            "",
            "\n".join(digits_lines),
        ]
    (docs / "results" / "reproduce_cpu.md").write_text("\n".join(md) + "\n")
    text = json.dumps({"results": results, "bab": bab, "best_alpha": best_alpha}, indent=1)
    # no machine paths in committed files: make the run directories relative to the working directory
    (docs / "results" / "reproduce_cpu.json").write_text(text.replace(str(Path.cwd().resolve()) + os.sep, ""))
    print("\n".join(md))


def _main_groups(results: dict, a: str, args: argparse.Namespace) -> dict[str, list[str]]:
    """The main table's rows (label → run names): the teacher, CC-IBP and CC-Dist at the selected α, and the
    runs with the longer teacher."""
    groups = {
        "PGD teacher": ["teacher-s0"],
        f"CC-IBP (α={a})": [f"cc_ibp-a{a}-s{s}" for s in range(args.seeds)],
        **{
            f"CC-Dist (α={a}, β={bw:g}/w)": [f"cc_dist-a{a}-b{bw:g}-s{s}" for s in range(args.seeds)]
            for bw in parse_floats(args.main_betas)
        },
    }
    if getattr(args, "long_teacher_epochs", 0):
        t = args.long_teacher_epochs
        groups[f"PGD teacher, {t} epochs"] = [long_teacher_name(args)]
        for bw in parse_floats(args.main_betas):
            names = [f"cc_dist-a{a}-b{bw:g}-s{s}-t{t}" for s in range(args.seeds)]
            if any(n in results for n in names):  # a stage may have run one β only
                groups[f"CC-Dist (α={a}, β={bw:g}/w), {t}-epoch teacher"] = names
    return groups


def _other_alpha_tables(results: dict, bab: dict, best_alpha: float, alphas, args) -> list[str]:
    """Tables of the runs at the α that validation did not select, when several seeds of them exist."""
    other_alphas = []
    for al in alphas:
        o = f"{al:g}"
        other = {
            f"CC-IBP (α={o})": [f"cc_ibp-a{o}-s{s}" for s in range(args.seeds)],
            **{
                f"CC-Dist (α={o}, β={bw:g}/w)": [f"cc_dist-a{o}-b{bw:g}-s{s}" for s in range(args.seeds)]
                for bw in sorted({*parse_floats(args.main_betas), 5.0})
            },
        }
        if al != best_alpha and sum("test" in results.get(n, {}) for n in other[f"CC-IBP (α={o})"]) >= 2:
            other_alphas += [
                f"#### α = {o} (not selected)",
                "",
                _seed_table(other, results, bab, args.bab_count, skip_empty=True),
                "",
            ]
    return other_alphas


def _alpha_table(results: dict, best_alpha: float, alphas) -> list[str]:
    """The α candidates' validation metrics (CC-IBP seed 0)."""
    alpha_lines = [
        "| α | val standard | val PGD-10 | val IBP-cert | val CROWN-IBP-cert |",
        "|---|---|---|---|---|",
    ]
    for al in alphas:
        v = results[f"cc_ibp-a{al:g}-s0"]["val"]
        alpha_lines.append(
            f"| {al:g}{' (selected)' if al == best_alpha and len(alphas) > 1 else ''} | {_ms([v['std']])} | "
            f"{_ms([v['pgd10']])} | "
            f"{_ms([v['ibp_cert']])} | {_ms([v['crown_cert']])} |"
        )
    return alpha_lines


def _digits_table(results: dict, seeds: int) -> list[str]:
    """The sklearn digits runs' test metrics."""
    digits_lines = [
        "| method | seeds | standard | PGD-40 | IBP-cert | CROWN-IBP-cert | train time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, names in {
        "PGD teacher": ["digits-teacher-s0"],
        "CC-IBP (α=0.5)": [f"digits-cc_ibp-s{s}" for s in range(seeds)],
        "CC-Dist (α=0.5, β=5/w)": [f"digits-cc_dist-s{s}" for s in range(seeds)],
    }.items():
        rows = [results[n] for n in names if n in results]
        t = [r["test"] for r in rows]
        digits_lines.append(
            f"| {label} | {len(rows)} | {_ms([x['std'] for x in t])} | {_ms([x['pgd40'] for x in t])} | "
            f"{_ms([x['ibp_cert'] for x in t])} | {_ms([x['crown_cert'] for x in t])} | "
            f"{_mean_time(rows)} |"
        )
    return digits_lines


def _plot_sweep(rows, path: Path, alpha: str) -> Path | None:
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = [max(bw, 0.3) for bw, _ in rows]
    for key, label in (
        ("std", "standard"),
        ("pgd10", "PGD-10"),
        ("crown_cert", "CROWN-IBP-cert"),
        ("ibp_cert", "IBP-cert"),
    ):
        ax.plot(xs, [100 * v[key] for _, v in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{bw:g}" for bw, _ in rows])
    ax.set_xlabel("β·w (β = 0 is CC-IBP)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"CC-Dist β sweep, cnn3, ε = 2/255, α = {alpha}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path

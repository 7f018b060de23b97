"""Stage ``report`` of ``--protocol paper-cpu``: the pre-registered paired analysis of the finished runs
(``paired_analysis.py``) and ``docs/results/paper_cpu.{json,md}``."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .measure import machine_text
from .plan import paper_cpu_names, select_by_validation
from .runfolders import RunSettingsError, settings_differences


def _bab_verdicts(root: Path, name: str, method: str, seed: int) -> list | None:
    """Per-point BaB verdicts of one run, or None when its BaB has not run (or not finished)."""
    from paired_analysis import verdicts_from_export

    export = root / name / "bab"
    if not (root / name / "bab.json").is_file():
        return None
    return verdicts_from_export(export, method, seed, checkpoint=root / name / "checkpoint.pt")


def _crown_verdicts(result: dict, method: str, seed: int, dataset: str) -> list:
    """Per-point CROWN-certified verdicts on the whole test split, identified by the checkpoint's hash."""
    from paired_analysis import PointVerdict

    pts = result["test"]["points"]
    cert = set(pts["crown_certified"])
    return [
        PointVerdict(
            result["checkpoint_sha256"], method, seed, dataset, i, lab, float(result["eps"]), i in cert
        )
        for i, lab in enumerate(pts["labels"])
    ]


def paper_cpu_analysis(root: str | Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Everything the report says, from the finished runs under ``root`` (pure reading, no training)."""
    root = Path(root)
    results = {p.parent.name: json.loads(p.read_text()) for p in root.glob("*/result.json")}
    _check_results_follow_plan(root, results, plan)
    ds = plan["dataset"]
    out: dict[str, Any] = {"plan": plan, "selection": {}, "comparisons": {}, "groups": {}}
    alpha_choice = _validation_choice({a: results.get(f"cc_ibp-a{a:g}-s0") for a in plan["alphas"]})
    if alpha_choice is None:
        out["status"] = "α selection not finished"
        return out
    out["selection"]["alpha"] = alpha_choice
    alpha = alpha_choice["chosen"]
    beta_rows = {b: results.get(f"cc_dist-a{alpha:g}-b{b:g}-s0") for b in plan["beta_sweep"]}
    beta_choice = _validation_choice(beta_rows)
    if beta_choice is None:
        out["status"] = "β selection not finished"
        return out
    out["selection"]["beta_w"] = beta_choice
    beta = beta_choice["chosen"]
    teacher = results.get("teacher-s0", {}).get("test")
    out["teacher"] = teacher and {k: v for k, v in teacher.items() if k != "points"}
    names = paper_cpu_names(plan, alpha)
    groups = {"cc_ibp": names["cc_ibp"]}
    for bw in sorted({5.0, beta}):
        groups[f"cc_dist-b{bw:g}"] = paper_cpu_names(plan, alpha, bw)["cc_dist"]
    per_seed = {g: _seed_rows(root, results, g, run_names) for g, run_names in groups.items()}
    out["groups"] = per_seed
    if teacher:
        students = [row["std"] for g in per_seed.values() for row in g.values()]
        out["teacher_gap_points"] = 100 * (teacher["std"] - max(students)) if students else None
    for g in groups:
        if g != "cc_ibp":
            out["comparisons"][g] = _comparison(root, results, per_seed, groups[g], names["cc_ibp"], g, ds)
    out["status"] = "ok"
    return out


def _validation_choice(rows: dict[float, dict | None]) -> dict[str, Any] | None:
    """A swept setting's value chosen on validation (``chosen``) and each candidate's validation metrics
    (``val``), from its seed-0 runs' results; None while one of them has not been evaluated."""
    if not all(r and "val" in r for r in rows.values()):
        return None
    return {"chosen": select_by_validation(rows), "val": {f"{v:g}": r["val"] for v, r in rows.items()}}


def _seed_rows(root: Path, results: dict[str, dict], group: str, run_names: list[str]) -> dict[int, dict]:
    """Per seed of one method: the run's test metrics, train time and (when run) its BaB-certified share."""
    rows: dict[int, dict] = {}
    for s, n in enumerate(run_names):
        r = results.get(n)
        if not r or "test" not in r:
            continue
        row = {k: v for k, v in r["test"].items() if k != "points"}
        row["train_s"] = r["train_s"]
        bab = _bab_verdicts(root, n, "cc_ibp" if group == "cc_ibp" else "cc_dist", s)
        if bab is not None:
            row["bab_cert"] = sum(v.certified for v in bab) / len(bab)
            correct = sum(v.category != "misclassified" for v in bab)
            row["bab_cert_of_correct"] = sum(v.certified for v in bab) / correct if correct else None
            row["bab_points"] = len(bab)
        rows[s] = row
    return rows


def _comparison(
    root: Path,
    results: dict[str, dict],
    per_seed: dict[str, dict[int, dict]],
    dist_names: list[str],
    ibp_names: list[str],
    g: str,
    ds: str,
) -> dict[str, Any]:
    """One CC-Dist group against CC-IBP: per-seed differences of each metric with their t interval, the
    per-point verdict pairs pooled over seeds (BaB primary, CROWN secondary) and the decision."""
    from paired_analysis import (
        decide,
        mcnemar_exact,
        pair_verdicts,
        paired_t_interval,
        per_seed_differences,
        pool_pairs,
    )

    seeds = sorted(set(per_seed[g]) & set(per_seed["cc_ibp"]))
    comp: dict[str, Any] = {"seeds": seeds}
    for metric in ("bab_cert", "crown_cert", "std", "pgd40"):
        have = [s for s in seeds if metric in per_seed[g][s] and metric in per_seed["cc_ibp"][s]]
        if len(have) < 2:
            continue
        _, d = per_seed_differences(
            {s: per_seed[g][s][metric] for s in have}, {s: per_seed["cc_ibp"][s][metric] for s in have}
        )
        comp[metric] = {
            "seeds": have,
            "differences": d,
            "interval": dataclasses.asdict(paired_t_interval(d)),
        }
    for what in ("bab", "crown"):
        pairs = []
        for s in seeds:
            rd, ri = results[dist_names[s]], results[ibp_names[s]]
            if what == "bab":
                a = _bab_verdicts(root, dist_names[s], "cc_dist", s)
                b = _bab_verdicts(root, ibp_names[s], "cc_ibp", s)
                if a is None or b is None:
                    continue
            else:
                a, b = _crown_verdicts(rd, "cc_dist", s, ds), _crown_verdicts(ri, "cc_ibp", s, ds)
            pairs.append(pair_verdicts(a, b))
        if pairs:
            pooled = pool_pairs(pairs)
            comp[f"{what}_pairs"] = {
                **pooled,
                "seeds": [p.seed for p in pairs],
                "mcnemar_p": mcnemar_exact(pooled["only_a"], pooled["only_b"]),
            }
    if "bab_cert" in comp and "bab_pairs" in comp:
        bp = comp["bab_pairs"]
        ti = paired_t_interval(comp["bab_cert"]["differences"])
        comp["decision"] = decide(ti, bp["only_a"], bp["only_b"], bp["mcnemar_p"])
    else:
        comp["decision"] = "not available: branch and bound has not run on both methods"
    return comp


#: the plan's settings that every paper-cpu run records in its job (what the report states)
PLAN_KEYS_OF_RUNS = ("dataset", "epochs", "teacher_epochs", "teacher_steps")


def _check_results_follow_plan(root: Path, results: dict[str, dict], plan: dict[str, Any]) -> None:
    """The report states the plan's settings: refuse (``RunSettingsError``) runs trained with others."""
    for name, result in sorted(results.items()):
        job = result.get("job") or {}
        if job.get("protocol") != "paper-cpu":
            continue
        differ = settings_differences(job, plan, PLAN_KEYS_OF_RUNS)
        if differ:
            raise RunSettingsError(
                f"{root / name} was run with other settings ({'; '.join(differ)}), which this report "
                "would misstate; report with the settings the runs were trained with, or retrain them with "
                "--overwrite"
            )


def report_paper_cpu(root: str, plan: dict[str, Any], docs: Path) -> dict[str, Any]:
    """``docs/results/paper_cpu.{json,md}`` from the finished runs (missing ones are left out, said so)."""
    res = paper_cpu_analysis(root, plan)
    md = paper_cpu_markdown(res)
    (docs / "results").mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=1, default=str)
    (docs / "results" / "paper_cpu.json").write_text(text.replace(str(Path.cwd().resolve()) + os.sep, ""))
    (docs / "results" / "paper_cpu.md").write_text(md)
    print(md)
    return res


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def paper_cpu_markdown(res: dict[str, Any]) -> str:
    plan = res["plan"]
    lines = [
        "<!-- generated by: python benchmarks/reproduce_cpu.py " + " ".join(sys.argv[1:]) + " -->",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine_text()}. Protocol "
        f"`paper-cpu` on {plan['dataset']}: teacher {plan['teacher_epochs']} epochs "
        f"PGD-{plan['teacher_steps']}, "
        f"students {plan['epochs']} epochs (ramp and decays scaled from the paper's 160), 8-step attack of "
        f"0.25ε′ on ε′ = 2.1ε, {plan['seeds']} paired seeds, BaB on the first {plan['bab_count']} "
        "test points "
        f"({plan['bab_timeout']:g} s each).",
        "",
    ]
    if res.get("status") != "ok":
        return "\n".join(lines + [f"_Not finished: {res.get('status')}._", ""])
    sel = res["selection"]
    lines += [
        "| selection (seed 0, validation) | candidate | val standard | val CROWN-cert |",
        "|---|---|---|---|",
    ]
    for key, label in (("alpha", "α (CC-IBP)"), ("beta_w", "β·w (CC-Dist)")):
        for c, v in sel[key]["val"].items():
            chosen = " (chosen)" if float(c) == sel[key]["chosen"] else ""
            lines.append(f"| {label} | {c}{chosen} | {_pct(v['std'])} | {_pct(v['crown_cert'])} |")
    lines += [
        "",
        "| method | seed | standard | PGD-40 | IBP-cert | CROWN-cert | BaB-cert | BaB-cert / correct | "
        "IBP loss | feature distance to teacher |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g, rows in res["groups"].items():
        for s, r in sorted(rows.items()):
            lines.append(
                f"| {g} | {s} | {_pct(r['std'])} | {_pct(r['pgd40'])} | {_pct(r['ibp_cert'])} | "
                f"{_pct(r['crown_cert'])} | {_pct(r.get('bab_cert'))} | "
                f"{_pct(r.get('bab_cert_of_correct'))} | "
                f"{r.get('ibp_loss', float('nan')):.4g} | {r.get('feature_distance', float('nan')):.4g} |"
            )
    t = res.get("teacher")
    if t:
        lines += [
            "",
            f"Teacher: standard {_pct(t['std'])}, PGD-40 {_pct(t['pgd40'])}; gap to the best student seed "
            f"{res['teacher_gap_points']:.2f} points (the protocol asks ≥ 8).",
        ]
    for g, comp in res["comparisons"].items():
        lines += [
            "",
            f"**{g} − cc_ibp** (paired seeds {comp['seeds']}): decision: **{comp['decision']}**",
            "",
        ]
        for metric in ("bab_cert", "crown_cert", "std", "pgd40"):
            if metric in comp:
                ti = comp[metric]["interval"]
                d = ", ".join(f"{v:+.2f}" for v in comp[metric]["differences"])
                lines.append(
                    f"- {metric}: differences {d} points; mean {ti['mean']:+.2f}, 95 % t interval "
                    f"[{ti['low']:+.2f}, {ti['high']:+.2f}] (n = {ti['n']})"
                )
        for what in ("bab", "crown"):
            if f"{what}_pairs" in comp:
                p = comp[f"{what}_pairs"]
                lines.append(
                    f"- {what.upper()} verdicts pooled over seeds {p['seeds']} ({p['pairs']} pairs): both "
                    f"{p['both']}, CC-Dist only {p['only_a']}, CC-IBP only {p['only_b']}, neither "
                    f"{p['neither']}; exact McNemar p = {p['mcnemar_p']:.3g}"
                )
    return "\n".join(lines) + "\n"

"""Evaluation records (``eval.json``), the paper's tables, and plots.

An ``eval.json`` record (:data:`SCHEMA`) holds every figure of an evaluation with the settings that
produced it::

    {"schema": "ccdist-eval-v1", "created": ISO time, "label": "CC-Dist",
     "code": {"package_version", "git_commit", "git_dirty", "torch", "python"},
     "checkpoint": {"path", "sha256", "role", "name", "method", "epoch", "seed", "train_time_s",
                    "params": {"alpha", "beta", "eps", ...}, "config": {...}},
     "data": {"name", "split", "start", "count"},
     "eps", "count",
     "settings": {PGD steps/step/restarts, "attack_description", "attack_source", AutoAttack version,
                  methods, "crown_intermediate_used", tol, seed, BaB settings},
     "metrics": {"standard_acc", "pgd_acc", "autoattack_acc", "ibp_cert_acc", "crown_cert_acc" (CROWN),
                 "crown_ibp_cert_acc" (CROWN-IBP), "bab_cert_acc", "ibp_loss"},
                 # fractions in [0, 1]; null = not computed
     "timings_s": {...}, "autoattack": {"run", "module", ... | "reason"},
     "bab": {counts, α,β-CROWN config, ...} | null, "eps_curve": [{"eps", metrics...}],
     "soundness_alarms": [], "per_example": {...}, "teacher": <record> | absent}

Tables are Markdown in the paper's layout (Table 1: method, standard, PGD-40/AutoAttack, IBP,
CROWN, BaB-certified accuracy in %, time; Table 2: teacher vs student). ``compare`` groups
records (by label, or by a config parameter) and reports mean ± sample standard deviation over
the seeds. Plots are matplotlib PNGs (Agg backend): accuracy against ε, and the β sweep of
Figure 1.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ccdist_plugin.fileio import atomic_write_text, file_sha256

__all__ = [
    "SCHEMA",
    "METRIC_LABELS",
    "code_version",
    "file_sha256",
    "checkpoint_info",
    "make_record",
    "validate_record",
    "write_json",
    "load_record",
    "record_param",
    "eval_table",
    "compare_table",
    "teacher_table",
    "plot_accuracy_vs_eps",
    "plot_sweep",
]

SCHEMA = "ccdist-eval-v1"
#: metric keys of a record and their column titles
METRIC_LABELS = {
    "standard_acc": "Std.",
    "pgd_acc": "PGD-40",
    "autoattack_acc": "AA",
    "ibp_cert_acc": "IBP",
    "crown_cert_acc": "CROWN",
    "crown_ibp_cert_acc": "CROWN-IBP",
    "bab_cert_acc": "BaB",
}
_REQUIRED = {
    "schema": str,
    "created": str,
    "label": str,
    "code": dict,
    "checkpoint": dict,
    "data": dict,
    "eps": (int, float),
    "count": int,
    "settings": dict,
    "metrics": dict,
    "timings_s": dict,
    "autoattack": dict,
    "soundness_alarms": list,
}
# CROWN-IBP got its own name later: records written before it have only crown_cert_acc
_REQUIRED_METRICS = (*(k for k in METRIC_LABELS if k != "crown_ibp_cert_acc"), "ibp_loss")
_REQUIRED_SETTINGS = ("eps", "pgd_steps", "pgd_step_rel", "pgd_restarts", "methods", "tol", "bab")


# --------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """The CPU model, logical CPU count, load average, torch, Python and OS: what a benchmark or
    results page states next to its figures."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "system": platform.system(),
    }


def code_version() -> dict[str, Any]:
    """Package version, git commit (and whether the tree had changes), torch and python versions."""
    import torch

    from ccdist_plugin.version import __version__

    out: dict[str, Any] = {
        "package_version": __version__,
        "git_commit": None,
        "git_dirty": None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            status = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "ccdist_plugin"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            out["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def checkpoint_info(
    path: str | os.PathLike, payload: dict[str, Any] | None = None, feature_dim: int | None = None
) -> dict[str, Any]:
    """Provenance of a checkpoint: path, SHA-256, role, run name, loss method, epoch, seed, training
    time (sum of the per-epoch ``time_s``), the main parameters (α, β resolved to 5/w when null, ε)
    and the full config."""
    if payload is None:
        from ccdist_plugin.checkpoint import load_checkpoint

        payload = load_checkpoint(path)
    cfg = payload.get("config") or {}
    loss = cfg.get("loss") or {}
    history = payload.get("history") or []
    times = [row.get("time_s") for row in history if isinstance(row, dict)]
    times = [t for t in times if isinstance(t, (int, float))]
    beta = loss.get("beta")
    cls = _loss_class(loss.get("method"))
    distilled = cls is not None and (
        cls.teacher_use == "required"
        or (cls.teacher_use == "optional" and (cfg.get("teacher") or {}).get("checkpoint"))
    )
    # the loss's default β (5/w for CC-Dist, 10⁴/w Logit-Dist); on the earlier feature space it is
    # 2/w′ with w′ that layer's width, which the checkpoint's config does not state: left unresolved
    on_features = loss.get("distill_layer", "features") == "features"
    if beta is None and feature_dim and distilled and on_features:
        beta = cls.beta_per_width / feature_dim
    return {
        "path": str(path),
        "sha256": file_sha256(path),
        "role": payload.get("role", cfg.get("role")),
        "name": cfg.get("name"),
        "method": loss.get("method"),
        "epoch": payload.get("epoch"),
        "seed": cfg.get("seed"),
        "train_time_s": float(sum(times)) if times else None,
        "params": {"alpha": loss.get("alpha"), "beta": beta, "eps": cfg.get("eps")},
        "config": cfg,
    }


def _loss_class(method: Any):
    """The registered loss class of ``method`` (None when not registered)."""
    from ccdist_plugin.losses import list_losses, loss_class

    return loss_class(method) if method in list_losses() else None


def default_label(info: dict[str, Any]) -> str:
    """A table label from a checkpoint's loss method: the loss class's ``label`` (``CC-Dist``,
    ``CC-IBP``, ``PGD teacher``...); a teacher without a recorded method is a PGD teacher."""
    method = info.get("method")
    if info.get("role") == "teacher" and method is None:
        return "PGD teacher"
    cls = _loss_class(method)
    return cls.label if cls is not None else str(method or info.get("name") or "model")


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def make_record(
    result: Any,
    checkpoint: dict[str, Any],
    data: dict[str, Any],
    label: str | None = None,
    eps_curve: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """An ``eval.json`` record from an :class:`~ccdist_plugin.evaluation.EvalResult`."""
    res = result.to_dict()
    record = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "label": label or default_label(checkpoint),
        "code": code_version(),
        "checkpoint": checkpoint,
        "data": data,
        "eps": res["eps"],
        "count": res["count"],
        "settings": res["settings"],
        "metrics": res["metrics"],
        "timings_s": res["timings_s"],
        "autoattack": res["autoattack"],
        "bab": res["bab"],
        "eps_curve": eps_curve or [],
        "soundness_alarms": res["soundness_alarms"],
        "per_example": res["per_example"],
    }
    validate_record(record)
    return record


def validate_record(record: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming what is missing or malformed in an ``eval.json`` record."""
    if not isinstance(record, dict):
        raise ValueError(f"an eval record must be a JSON object, got {type(record).__name__}")
    problems = []
    for key, tp in _REQUIRED.items():
        if key not in record:
            problems.append(f"missing key {key!r}")
        elif not isinstance(record[key], tp) or isinstance(record[key], bool):
            problems.append(f"{key!r} has type {type(record[key]).__name__}")
    if record.get("schema") not in (None, SCHEMA):
        problems.append(f"schema {record.get('schema')!r} is not {SCHEMA!r}")
    metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
    for key in _REQUIRED_METRICS:
        if key not in metrics:
            problems.append(f"metrics.{key} missing")
            continue
        value = metrics[key]
        if value is not None and not isinstance(value, (int, float)):
            problems.append(f"metrics.{key} is not a number or null")
        elif value is not None and key != "ibp_loss" and not 0.0 <= value <= 1.0:
            problems.append(f"metrics.{key} = {value} is not a fraction in [0, 1]")
    settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    for key in _REQUIRED_SETTINGS:
        if key not in settings:
            problems.append(f"settings.{key} missing")
    ckpt = record.get("checkpoint") if isinstance(record.get("checkpoint"), dict) else {}
    if "sha256" not in ckpt:
        problems.append("checkpoint.sha256 missing")
    aa = record.get("autoattack") if isinstance(record.get("autoattack"), dict) else {}
    if metrics.get("autoattack_acc") is not None and not aa.get("run"):
        problems.append("metrics.autoattack_acc is set but autoattack.run is not true")
    if problems:
        raise ValueError("invalid eval record: " + "; ".join(problems))


def write_json(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a record atomically (temporary file + ``os.replace``) as strict JSON: a NaN or
    infinite number (a diverged model's loss, say) is written as ``null`` and its key listed
    under ``"non_finite"``, so that every JSON reader can load the file."""
    bad: list[str] = []
    clean = _finite_or_null(record, "", bad)
    if bad:
        clean["non_finite"] = {"keys": bad, "note": "NaN or infinite values, written as null"}
    return atomic_write_text(path, json.dumps(clean, indent=1, allow_nan=False) + "\n")


def _finite_or_null(value: Any, key: str, bad: list[str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        bad.append(key or "(top level)")
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v, f"{key}.{k}" if key else str(k), bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v, f"{key}[{i}]", bad) for i, v in enumerate(value)]
    return value


def load_record(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate an ``eval.json`` (a file, or a run folder holding ``eval.json`` or
    ``eval/eval.json``)."""
    p = Path(path)
    if p.is_dir():
        for candidate in (p / "eval.json", p / "eval" / "eval.json"):
            if candidate.is_file():
                p = candidate
                break
        else:
            raise ValueError(f"{str(path)!r} holds no eval.json (run `ccdist eval --checkpoint ...` first)")
    if not p.is_file():
        raise ValueError(f"{str(path)!r} does not exist")
    try:
        record = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(p)!r} is not valid JSON: {err}") from err
    validate_record(record)
    record.setdefault("_path", str(p))
    return record


_PARAM_ALIASES = {"beta": "loss.beta", "alpha": "loss.alpha"}


def record_param(record: dict[str, Any], param: str) -> Any:
    """A run parameter of a record: ``beta``/``alpha``/``eps`` (resolved, from ``checkpoint.params``)
    or any dotted config key (``loss.attack.steps``)."""
    params = record.get("checkpoint", {}).get("params", {})
    if param in params and params[param] is not None:
        return params[param]
    node: Any = record.get("checkpoint", {}).get("config", {})
    for part in _PARAM_ALIASES.get(param, param).split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _pct(value: float | None, digits: int = 2) -> str:
    return "not run" if value is None else f"{100 * value:.{digits}f}"


def _eps_text(eps: float) -> str:
    for den in (255, 100, 10):
        num = eps * den
        if abs(num - round(num)) < 1e-9 and round(num) != 0:
            return f"{round(num)}/{den}" if den == 255 else f"{eps:g}"
    return f"{eps:g}"


def _secs(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3g}" if value < 1000 else f"{value:.3e}"


def eval_table(records: Sequence[dict[str, Any]]) -> str:
    """Table 1 layout: one row per record, accuracies in %, training and evaluation time in s.

    BaB is the branch-and-bound certified accuracy on the first ``bab.count`` points (noted in the
    cell when fewer than the row's N); ``not run`` marks figures that were not computed.
    """
    head = [
        "Method",
        "ε",
        "N",
        "Std.",
        "PGD-40",
        "AA",
        "IBP",
        "CROWN",
        "CROWN-IBP",
        "BaB",
        "Train time [s]",
        "Eval time [s]",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in records:
        m = r["metrics"]
        bab = _pct(m.get("bab_cert_acc"))
        bab_n = (r.get("bab") or {}).get("count")
        if m.get("bab_cert_acc") is not None and bab_n and bab_n != r["count"]:
            bab += f" (N={bab_n})"
        cells = [
            r["label"],
            _eps_text(r["eps"]),
            str(r["count"]),
            _pct(m.get("standard_acc")),
            _pct(m.get("pgd_acc")),
            _pct(m.get("autoattack_acc")),
            _pct(m.get("ibp_cert_acc")),
            _pct(m.get("crown_cert_acc")),
            _pct(m.get("crown_ibp_cert_acc")),
            bab,
            _secs(r["checkpoint"].get("train_time_s")),
            _secs(r["timings_s"].get("total")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    s = records[0]["settings"] if records else {}
    if s:
        attack = s.get("attack_description") or (
            f"PGD-{s['pgd_steps']} (step {s['pgd_step_rel']:g}·ε, {s['pgd_restarts']} start(s), random start)"
        )
        source = f" [{s['attack_source']}]" if s.get("attack_source") else ""
        notes.append(
            f"Attack: {attack}{source}. IBP/CROWN/CROWN-IBP: sound float64 bounds (CROWN: CROWN intermediate "
            "bounds; CROWN-IBP: IBP intermediate bounds); accuracies in %."
        )
    for r in records:
        same = (r.get("bab") or {}).get("same_points")
        if same and r["metrics"].get("bab_cert_acc") is not None and r["bab"]["count"] != r["count"]:
            names = {
                "correct": "Std.",
                "pgd_robust": "PGD",
                "ibp_certified": "IBP",
                "crown_certified": "CROWN",
                "crown_ibp_certified": "CROWN-IBP",
            }
            figures = ", ".join(f"{names[k]} {_pct(v)}" for k, v in same.items() if k in names)
            notes.append(f"{r['label']}: BaB ran on the first {r['bab']['count']} points; there: {figures}.")
    for r in records:
        if r["autoattack"].get("run") is False and r["settings"].get("attack") == "autoattack":
            notes.append(f"{r['label']}: AutoAttack not run ({r['autoattack'].get('reason')}).")
        if r.get("soundness_alarms"):
            notes.append(f"**{r['label']}: SOUNDNESS ALARMS: {'; '.join(r['soundness_alarms'])}**")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "not run"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def _group(records: Sequence[dict[str, Any]], by: str) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if by == "label":
            key = f"{r['label']} (ε={_eps_text(r['eps'])})"
        else:
            key = f"{r['label']} {by}={record_param(r, by)}"
        groups.setdefault(key, []).append(r)
    return groups


def compare_table(records: Sequence[dict[str, Any]], group_by: str = "label") -> str:
    """Mean ± sample standard deviation (over the records of a group, e.g. seeds) of every metric.

    Args:
        group_by: ``"label"`` (method and ε) or a run parameter (``beta``, ``loss.alpha``...).
    """
    if not records:
        raise ValueError("compare_table: no records")
    head = ["Run", "runs", "N", *METRIC_LABELS.values(), "IBP loss", "Train time [s]"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for key, group in _group(records, group_by).items():
        cells = [key, str(len(group)), "/".join(sorted({str(r["count"]) for r in group}))]
        for metric in METRIC_LABELS:
            cells.append(
                _mean_std([r["metrics"][metric] for r in group if r["metrics"].get(metric) is not None])
            )
        losses = [r["metrics"]["ibp_loss"] for r in group if r["metrics"].get("ibp_loss") is not None]
        cells.append(
            "not run"
            if not losses
            else f"{statistics.fmean(losses):.4g}"
            + (f" ± {statistics.stdev(losses):.2g}" if len(losses) > 1 else "")
        )
        times = [r["checkpoint"].get("train_time_s") for r in group if r["checkpoint"].get("train_time_s")]
        cells.append(_secs(statistics.fmean(times)) if times else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return (
        "\n".join(lines) + "\n\nAccuracies in %, mean ± sample standard deviation over the runs of a row.\n"
    )


def teacher_table(teacher: dict[str, Any], student: dict[str, Any]) -> str:
    """Table 2 layout: teacher vs student on the same first N test points (accuracies in %).

    "Certified" is the best sound certified accuracy computed (IBP, CROWN or BaB); the attack column
    is AutoAttack when it ran for both, else PGD (named in the header).
    """
    both_aa = all(r["metrics"].get("autoattack_acc") is not None for r in (teacher, student))
    attack_key, attack_name = ("autoattack_acc", "AutoAttack") if both_aa else ("pgd_acc", "PGD-40")
    if teacher["count"] != student["count"] or teacher["eps"] != student["eps"]:
        raise ValueError(
            f"teacher and student were evaluated on different settings (N {teacher['count']} vs "
            f"{student['count']}, ε {teacher['eps']} vs {student['eps']})"
        )
    head = ["Model", "Std.", attack_name, "Certified", "certified by"]
    lines = [
        f"Teacher vs student, first {student['count']} test points, ε = {_eps_text(student['eps'])}",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---:|---:|---:|---|",
    ]
    for role, r in (("teacher", teacher), ("student", student)):
        best, how = None, "–"
        for key in ("ibp_cert_acc", "crown_cert_acc", "crown_ibp_cert_acc", "bab_cert_acc"):
            name = METRIC_LABELS[key]
            v = r["metrics"].get(key)
            if v is not None and (best is None or v > best):
                best, how = v, name
        cells = [
            f"{r['label']} ({role})",
            _pct(r["metrics"]["standard_acc"]),
            _pct(r["metrics"].get(attack_key)),
        ]
        cells += [_pct(best), how]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------

_CURVE_METRICS = ("standard_acc", "pgd_acc", "ibp_cert_acc", "crown_cert_acc", "crown_ibp_cert_acc")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_vs_eps(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Accuracy (%) against ε from the records' ``eps_curve``: one panel per metric, one line per record."""
    curves = [r for r in records if r.get("eps_curve")]
    if not curves:
        raise ValueError("no record has an eps_curve (run `ccdist eval` with --curve-eps)")
    plt = _pyplot()
    metrics = [m for m in _CURVE_METRICS if any(p.get(m) is not None for r in curves for p in r["eps_curve"])]
    titles = {
        "standard_acc": "standard",
        "pgd_acc": "PGD-40",
        "ibp_cert_acc": "IBP-certified",
        "crown_cert_acc": "CROWN-certified",
        "crown_ibp_cert_acc": "CROWN-IBP-certified",
    }
    # one record: one panel with a line per metric; several: one panel per metric, a line per record
    panels = [None] if len(curves) == 1 else metrics
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels) + 1, 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for r in curves:
            for metric in metrics if panel is None else [panel]:
                pts = sorted((p["eps"], p[metric]) for p in r["eps_curve"] if p.get(metric) is not None)
                name = titles[metric] if panel is None else r["label"]
                if pts:
                    ax.plot([e for e, _ in pts], [100 * v for _, v in pts], marker="o", label=name)
            ax.axvline(r["eps"], color="grey", lw=0.6, ls=":")
        ax.set_title(f"{curves[0]['label']}: accuracy vs ε" if panel is None else f"{titles[panel]} accuracy")
        ax.set_xlabel("ε (pixel units)")
        ax.set_ylabel("accuracy [%]")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def plot_sweep(records: Sequence[dict[str, Any]], path: str | os.PathLike, param: str = "beta") -> Path:
    """Figure 1: standard, PGD, IBP/CROWN-certified and BaB-certified accuracy (%) against a run
    parameter (β by default), mean over the runs sharing a value with a ±1 std error bar."""
    points: dict[float, list[dict[str, Any]]] = {}
    for r in records:
        value = record_param(r, param)
        if value is None:
            raise ValueError(f"record {r.get('_path', r['label'])!r} has no parameter {param!r}")
        points.setdefault(float(value), []).append(r)
    if len(points) < 1:
        raise ValueError("plot_sweep: no records")
    plt = _pyplot()
    xs = sorted(points)
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    series = [
        ("standard_acc", "standard"),
        ("pgd_acc", "PGD-40"),
        ("autoattack_acc", "AutoAttack"),
        ("ibp_cert_acc", "IBP-certified"),
        ("crown_cert_acc", "CROWN-certified"),
        ("crown_ibp_cert_acc", "CROWN-IBP-certified"),
        ("bab_cert_acc", "BaB-certified"),
    ]
    for key, name in series:
        x_vals, means, stds = [], [], []
        for x in xs:
            vals = [100 * r["metrics"][key] for r in points[x] if r["metrics"].get(key) is not None]
            if vals:
                x_vals.append(x)
                means.append(statistics.fmean(vals))
                stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        if x_vals:
            ax.errorbar(x_vals, means, yerr=stds, marker="o", capsize=3, label=name)
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(param)
    ax.set_ylabel("accuracy [%]")
    eps = sorted({r["eps"] for r in records})
    ax.set_title(f"{param} sweep (ε = {', '.join(_eps_text(e) for e in eps)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)

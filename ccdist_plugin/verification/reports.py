"""The summary of a verification: pre-filter outcomes and α,β-CROWN verdicts, counted and checked.

:func:`summarize` counts a verdict record only when it matches the current manifest (export id,
model and VNN-LIB hashes, ε, test index: :mod:`ccdist_plugin.verification.records`) and came
within the time budget (later ones are ``late``). Certified accuracy = (pre-certified by our
IBP/CROWN + α,β-CROWN ``safe``) / total. Every summary checks soundness: a point our bounds
certified must never be broken (by our PGD or by α,β-CROWN), a point PGD broke (or misclassified)
must never come back ``safe``, and two records of one instance must not say ``safe`` and
``unsafe``. A disagreement is logged as ``SOUNDNESS ALARM``, listed, and the point counted as
``alarm``: never certified.

:meth:`VerificationResult.table` is the Markdown report; :func:`write_summary` writes
``verification.json`` and ``verification.md`` (or a shard's partial summary) and
:func:`merge_shards` joins the shards' verdicts.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ccdist_plugin.fileio import atomic_write_text
from ccdist_plugin.install import INSTALL_HINT
from ccdist_plugin.verification.records import VERIFY_DIR, check_export, load_manifest, read_results

__all__ = [
    "SUMMARY_NAME",
    "TABLE_NAME",
    "CATEGORIES",
    "INSTALL_HELP",
    "VerificationResult",
    "summarize",
    "write_summary",
    "merge_shards",
]

logger = logging.getLogger(__name__)

SUMMARY_NAME = "verification.json"
TABLE_NAME = "verification.md"
#: Every point of a summary falls in exactly one of these.
CATEGORIES = (
    "misclassified",
    "pre-certified",
    "attacked",
    "safe",
    "unsafe",
    "timeout",
    "error",
    "late",
    "excluded",
    "missing",
    "alarm",
)

INSTALL_HELP = f"""α,β-CROWN was not found: {INSTALL_HINT},
or point ABCROWN_DIR (or --abcrown) at an α,β-CROWN complete_verifier folder."""


#: the table's row of each category
_CATEGORY_LABELS = {
    "misclassified": "misclassified (clean)",
    "pre-certified": "pre-certified by IBP/CROWN",
    "attacked": "broken by PGD before BaB",
    "safe": "α,β-CROWN safe (BaB) within the budget",
    "unsafe": "α,β-CROWN unsafe",
    "timeout": "α,β-CROWN timeout/unknown",
    "error": "α,β-CROWN error (not certified)",
    "late": "verdict after the budget (not counted)",
    "excluded": "failed the integrity check (not run, not certified)",
    "missing": "no α,β-CROWN result (not certified)",
    "alarm": "soundness alarm (not certified)",
}


@dataclass
class VerificationResult:
    """Summary of an export directory's verification (``verification.json``).

    Counts are over all exported test points; every point falls in exactly one category of
    ``counts`` (:data:`CATEGORIES`): ``misclassified``, ``pre-certified``, ``attacked`` (outcomes
    of the pre-filter); for points sent to branch-and-bound α,β-CROWN's verdict ``safe`` /
    ``unsafe`` / ``timeout`` / ``error``, ``late`` (a verdict after the budget), ``excluded``
    (failed the integrity check, not run) or ``missing`` (no result yet, or α,β-CROWN not
    installed); and ``alarm`` (a soundness disagreement: never certified).
    """

    export_dir: str
    total: int
    counts: dict[str, int]
    certified: int
    certified_accuracy: float
    clean_accuracy: float
    ibp_certified_accuracy: float | None
    crown_certified_accuracy: float | None
    pgd_accuracy: float
    eps: float
    abcrown_ran: bool
    message: str = ""
    budget_s: float | None = None
    export_id: str = ""
    instances: list[dict[str, Any]] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    late: list[dict[str, Any]] = field(default_factory=list)
    excluded: dict[int, str] = field(default_factory=dict)
    integrity_problems: list[str] = field(default_factory=list)
    ignored_records: list[dict[str, Any]] = field(default_factory=list)
    soundness_alarms: list[str] = field(default_factory=list)
    cross_checks: dict[str, int] = field(default_factory=dict)
    time_per_instance_s: dict[str, float] = field(default_factory=dict)
    workers: dict[str, dict[str, int]] = field(default_factory=dict)
    missing_by_shard: dict[str, list[int]] = field(default_factory=dict)
    results_files: list[str] = field(default_factory=list)
    #: ``"i/n"`` for the summary a shard's run writes: partial, the instances no shard has verified
    #: yet count as missing until :func:`merge_shards` writes the whole export's summary
    shard: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A Markdown table of the counts, accuracies, time per instance and everything excluded."""
        return "\n".join(self._heading() + self._count_rows() + self._details()) + "\n"

    def _row(self, name: str, count: int | None, acc: float | None = None) -> str:
        n = max(self.total, 1)
        pct = (
            f"{100 * (count / n if acc is None else acc):.2f}" if count is not None or acc is not None else ""
        )
        return f"| {name} | {'' if count is None else count} | {pct} |"

    def _heading(self) -> list[str]:
        budget = f", budget {self.budget_s:g} s per instance" if self.budget_s is not None else ""
        lines = [f"Verification of {self.export_dir} (ε = {self.eps:.6g}, {self.total} test points{budget})"]
        if self.shard is not None:
            lines += [
                "",
                f"**Partial: written by shard {self.shard}.** It counts the verdicts every shard has written "
                "so far; instances without one are missing (not certified). Once all shards have run, "
                "`ccdist verify --export DIR --merge` writes the summary of the whole export.",
            ]
        return lines

    def _count_rows(self) -> list[str]:
        """The table: accuracies, then one row per category, then the certified accuracy."""
        row = self._row
        lines = ["", "| | points | % of total |", "|---|---:|---:|"]
        lines.append(row("clean accuracy", round(self.clean_accuracy * self.total)))
        if self.ibp_certified_accuracy is not None:
            lines.append(row("IBP-certified", round(self.ibp_certified_accuracy * self.total)))
        if self.crown_certified_accuracy is not None:
            lines.append(row("CROWN-certified", round(self.crown_certified_accuracy * self.total)))
        lines.append(row("PGD-robust (upper bound)", round(self.pgd_accuracy * self.total)))
        for key, name in _CATEGORY_LABELS.items():
            if key in ("late", "excluded", "alarm") and not self.counts.get(key):
                continue
            lines.append(row(name, self.counts.get(key, 0)))
        label = (
            "certified accuracy"
            if self.shard is None
            else f"certified accuracy (partial, shard {self.shard})"
        )
        lines.append(f"| **{label}** | **{self.certified}** | **{100 * self.certified_accuracy:.2f}** |")
        return lines

    def _details(self) -> list[str]:
        """Below the table: times, workers, what is missing, late, excluded or ignored, and alarms."""
        lines: list[str] = []
        t = self.time_per_instance_s
        if t:
            lines += [
                "",
                f"α,β-CROWN wall time per instance (s, {int(t['count'])} instances): mean {t['mean']:.1f}, "
                f"median {t['median']:.1f}, max {t['max']:.1f}",
            ]
        if self.workers:
            lines += ["", "| worker | instances done | retried after a crash |", "|---|---:|---:|"]
            lines += [f"| {w} | {c['done']} | {c['retried']} |" for w, c in sorted(self.workers.items())]
        if self.missing_by_shard:
            lines += ["", "Missing per shard: " + "; ".join(
                f"{s}: {len(m)}" for s, m in sorted(self.missing_by_shard.items())
            )]  # fmt: skip
        if self.late:
            lines += ["", f"Late verdicts (after the {self.budget_s:g} s budget, not counted):"]
            lines += [
                f"- instance {r['instance']} (test point {r['index']}): {r['verdict']} "
                f"after {r['time_s']:.1f} s"
                for r in self.late
            ]
        if self.cross_checks:
            lines += [
                "",
                "Cross-checks (pre-filtered points also sent to α,β-CROWN): "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.cross_checks.items())),
            ]
        return lines + self._exclusions()

    def _exclusions(self) -> list[str]:
        lines: list[str] = []
        if self.integrity_problems or self.excluded:
            lines += ["", "**Integrity check** (these instances were not run and are not certified):"]
            lines += [f"- {p}" for p in self.integrity_problems]
        if self.ignored_records:
            lines += ["", f"Ignored {len(self.ignored_records)} record(s) that are not about this export:"]
            lines += [f"- {r['file']}:{r['line']}: {r['reason']}" for r in self.ignored_records[:20]]
            if len(self.ignored_records) > 20:
                lines.append(f"- … {len(self.ignored_records) - 20} more in verification.json")
        if self.soundness_alarms:
            lines += ["", f"**SOUNDNESS ALARMS ({len(self.soundness_alarms)})**:"]
            lines += [f"- {a}" for a in self.soundness_alarms]
        if self.message:
            lines += ["", self.message]
        return lines


def _is_late(rec: dict[str, Any], budget_s: float) -> bool:
    return rec["verdict"] in ("safe", "unsafe") and float(rec["time_s"]) > budget_s


def _decide(recs: list[dict[str, Any]], budget_s: float) -> tuple[dict[str, Any], str, bool]:
    """One instance's record, category and whether its records conflict, whatever their order.

    Safe and unsafe on one instance conflict (even when one is late); otherwise an in-budget
    safe/unsafe beats a late one, which beats timeout, which beats error.
    """
    verdicts = {r["verdict"] for r in recs}
    conflict = {"safe", "unsafe"} <= verdicts

    def rank(r: dict[str, Any]) -> tuple[int, float]:
        if r["verdict"] in ("safe", "unsafe"):
            return (0 if not _is_late(r, budget_s) else 1, float(r["time_s"]))
        return (2 if r["verdict"] == "timeout" else 3, float(r["time_s"]))

    best = min(recs, key=rank)
    category = "late" if _is_late(best, budget_s) else best["verdict"]
    return best, category, conflict


def write_summary(export: Path, result: VerificationResult, shard: tuple[int, int] | None) -> None:
    verify_dir = export / VERIFY_DIR
    verify_dir.mkdir(exist_ok=True)
    if shard is None:
        atomic_write_text(export / SUMMARY_NAME, json.dumps(result.to_dict(), indent=1))
        atomic_write_text(export / TABLE_NAME, result.table())
    else:
        name = f"summary_shard_{shard[0]}_of_{shard[1]}"
        atomic_write_text(verify_dir / f"{name}.json", json.dumps(result.to_dict(), indent=1))
        atomic_write_text(verify_dir / f"{name}.md", result.table())


def merge_shards(export_dir: str | os.PathLike, budget_s: float | None = None) -> VerificationResult:
    """Join the results of every shard under ``<export>/verify/`` into ``verification.json``.

    Instances with no result (e.g. a shard that died) are reported as ``missing``: not certified.
    Copy the ``verify/results_*.jsonl`` files of shards run elsewhere into this folder first.
    """
    export = Path(export_dir).resolve()
    result = summarize(export, abcrown_ran=True, budget_s=budget_s)
    if result.missing:
        logger.warning(
            "%d instances have no α,β-CROWN result (counted as not certified): %s",
            len(result.missing),
            result.missing,
        )
    write_summary(export, result, None)
    return result


# --------------------------------------------------------------------------------------------
# Summary and consistency checks
# --------------------------------------------------------------------------------------------


def summarize(
    export_dir: str | os.PathLike,
    abcrown_ran: bool = True,
    message: str = "",
    budget_s: float | None = None,
) -> VerificationResult:
    """Combine the manifest's pre-filter outcomes with every α,β-CROWN record about this export,
    and check their consistency (see the module docstring).

    Args:
        budget_s: the time budget a verdict must meet to count (default: the export's timeout).
    """
    export = Path(export_dir).resolve()
    manifest = load_manifest(export)
    budget = float(budget_s) if budget_s is not None else float(manifest.get("timeout_s", 600.0))
    records, ignored, files = read_results(export, manifest)
    integrity = check_export(export)
    for rec in ignored:
        logger.warning("ignored verdict record %s:%s: %s", rec["file"], rec["line"], rec["reason"])
    points = manifest["points"]
    methods = manifest.get("methods", [])
    tally = _tally(points, records, integrity.excluded, budget, methods)
    for a in tally.alarms:
        logger.error("SOUNDNESS ALARM: %s", a)
    total = len(points)
    n = max(total, 1)

    def acc(key: str) -> float | None:
        return sum(bool(p.get(key)) for p in points) / n if key.split("_")[0] in methods else None

    if not abcrown_ran and not message:
        message = INSTALL_HELP
    return VerificationResult(
        export_dir=str(export),
        total=total,
        counts=tally.counts,
        certified=tally.certified,
        certified_accuracy=tally.certified / n,
        clean_accuracy=sum(bool(p["correct"]) for p in points) / n,
        ibp_certified_accuracy=acc("ibp_certified"),
        crown_certified_accuracy=acc("crown_certified"),
        pgd_accuracy=(total - _known_broken(points, records)) / n,
        eps=float(manifest["eps"]),
        abcrown_ran=abcrown_ran,
        message=message,
        budget_s=budget,
        export_id=manifest["export_id"],
        instances=sorted(tally.instances, key=lambda r: r["instance"]),
        missing=sorted(tally.missing),
        late=sorted(tally.late, key=lambda r: r["instance"]),
        excluded=tally.excluded,
        integrity_problems=integrity.problems,
        ignored_records=ignored,
        soundness_alarms=tally.alarms,
        cross_checks=tally.cross,
        time_per_instance_s=_bab_timing(tally.instances),
        workers=_per_worker(records),
        missing_by_shard=_missing_by_shard(records, files, tally.missing),
        results_files=files,
    )


@dataclass
class _Tally:
    """Every point of an export, counted in its category (:func:`_tally`)."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    certified: int = 0
    alarms: list[str] = field(default_factory=list)
    cross: dict[str, int] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)
    late: list[dict[str, Any]] = field(default_factory=list)
    excluded: dict[int, str] = field(default_factory=dict)
    instances: list[dict[str, Any]] = field(default_factory=list)


def _point_alarms(p: dict[str, Any], verdicts: set[str], conflict: bool, methods: Sequence[str]) -> list[str]:
    """The soundness disagreements about one point (its pre-filter outcome against the verdicts)."""
    outcome, inst = p["outcome"], p.get("instance")
    where = f"test point {p['index']} (label {p['label']}, instance {inst})"
    alarms = []
    if conflict:
        alarms.append(f"{where}: α,β-CROWN said safe in one run and unsafe in another")
    if outcome == "pre-certified" and p.get("pgd_broken"):
        alarms.append(
            f"{where}: certified by our {'/'.join(methods).upper()} bounds but our PGD found a counterexample"
        )
    if outcome == "pre-certified" and "unsafe" in verdicts:
        alarms.append(
            f"{where}: certified by our {'/'.join(methods).upper()} bounds but α,β-CROWN found it unsafe"
        )
    if outcome in ("attacked", "misclassified") and "safe" in verdicts:
        what = "PGD found a counterexample" if outcome == "attacked" else "the clean prediction is wrong"
        alarms.append(f"{where}: {what}, but α,β-CROWN proved it safe")
    elif outcome == "bab" and "safe" in verdicts and p.get("pgd_broken"):
        alarms.append(f"{where}: PGD found a counterexample, but α,β-CROWN proved it safe")
    return alarms


def _tally(
    points: list[dict[str, Any]],
    records: dict[int, list[dict[str, Any]]],
    excluded: dict[int, str],
    budget: float,
    methods: Sequence[str],
) -> _Tally:
    """Each point's category (:data:`CATEGORIES`) and whether it is certified: its pre-filter
    outcome, else its α,β-CROWN verdict; ``alarm`` whenever the two disagree."""
    tally = _Tally()
    for p in points:
        outcome, inst = p["outcome"], p.get("instance")
        recs = records.get(int(inst), []) if inst is not None else []
        rec, category, conflict = _decide(recs, budget) if recs else (None, None, False)
        verdicts = {r["verdict"] for r in recs}
        point_alarms = _point_alarms(p, verdicts, conflict, methods)
        tally.alarms += point_alarms
        if outcome == "bab":
            if rec is None:
                category = "missing"
                if inst in excluded:
                    category = "excluded"
                    tally.excluded[int(inst)] = excluded[int(inst)]
                else:
                    tally.missing.append(int(inst))
            is_certified = category == "safe"
        else:
            category = outcome
            is_certified = outcome == "pre-certified"
            for v in sorted(verdicts):
                key = f"{outcome}->{v}"
                tally.cross[key] = tally.cross.get(key, 0) + 1
        if point_alarms:
            category, is_certified = "alarm", False
        tally.counts[category] += 1
        tally.certified += int(is_certified)
        if rec is not None:
            entry = {**rec, "outcome": outcome, "label": p["label"], "certified": is_certified}
            entry["category"] = category
            tally.instances.append(entry)
            tally.late += [r for r in recs if _is_late(r, budget)]
    return tally


def _bab_timing(instances: list[dict[str, Any]]) -> dict[str, float]:
    """Count, mean, median, max and total seconds of the branch-and-bound instances' verdicts."""
    bab_times = [r["time_s"] for r in instances if r["outcome"] == "bab"]
    if not bab_times:
        return {}
    return {
        "count": float(len(bab_times)),
        "mean": statistics.fmean(bab_times),
        "median": statistics.median(bab_times),
        "max": max(bab_times),
        "total": sum(bab_times),
    }


def _per_worker(records: dict[int, list[dict[str, Any]]]) -> dict[str, dict[str, int]]:
    """Instances done, and retried after a crash, per worker."""
    workers: dict[str, dict[str, int]] = {}
    for recs in records.values():
        for r in recs:
            w = workers.setdefault(r.get("worker") or r.get("shard") or "?", {"done": 0, "retried": 0})
            w["done"] += 1
            w["retried"] += int(r.get("attempts", 1) > 1)
    return workers


def _missing_by_shard(
    records: dict[int, list[dict[str, Any]]], files: list[str], missing: list[int]
) -> dict[str, list[int]]:
    """The missing instances of each shard that wrote a record or a results file."""
    shards = {r.get("shard", "") for recs in records.values() for r in recs}
    shards |= {Path(f).stem.removeprefix("results_") for f in files}
    missing_by_shard: dict[str, list[int]] = {}
    for s in sorted(shards):
        parts = s.split("_")
        if len(parts) == 4 and parts[0] == "shard":
            i, n = int(parts[1]), int(parts[3])
            missing_by_shard[s] = [m for m in missing if m % n == i]
        elif s == "all":
            missing_by_shard[s] = list(missing)
    return missing_by_shard


def _known_broken(points: list[dict[str, Any]], records: dict[int, list[dict[str, Any]]]) -> int:
    """The attack's upper bound: every point with a known counterexample (whatever its category)."""
    return sum(
        not p["correct"]
        or bool(p.get("pgd_broken"))
        or (
            p.get("instance") is not None
            and any(r["verdict"] == "unsafe" for r in records.get(int(p["instance"]), []))
        )
        for p in points
    )

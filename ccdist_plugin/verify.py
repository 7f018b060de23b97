"""Run α,β-CROWN on an export directory and bring its verdicts back into our reports.

**What is run.** Every instance of the export (``manifest.json`` → one VNN-LIB file and one row
of ``instances.csv``) is verified by α,β-CROWN, unmodified, in single-instance mode
(``--config <export>/abcrown.yaml --onnx_path … --vnnlib_path … --results_file … --timeout``).
By default (``mode="worker"``) a long-lived worker process imports α,β-CROWN once and takes the
instances one after the other (``ccdist_plugin/abcrown_worker.py``); ``mode="process"`` starts
one process per instance. Either way the verifier runs in its own process group, which is
killed as a whole when an instance outlives the hard limit (α,β-CROWN checks its own timeout
only between branch-and-bound rounds) and which kills itself when this process dies. A worker
that dies or hangs costs only the instance it was on: that instance is recorded (a crash is
retried once in a fresh single-instance process) and a new worker takes the next one.

**Verdicts.** The first line of α,β-CROWN's results file: ``unsat`` → ``safe`` (certified),
``sat`` → ``unsafe``, ``timeout`` → ``timeout``; a crash, a non-zero exit or an unreadable file →
``error``. Each verdict is appended, as soon as it exists, as one fsync'ed JSON line to
``<export>/verify/results_<shard>.jsonl``, and carries what it is a verdict about: the export id,
the sha256 of the ONNX model and of the VNN-LIB file that were verified, ε, the test index and the
time budget. Runs are resumable (instances with a verdict are skipped) and shardable
(``shard=(i, n)``: the instances ``r`` with ``r % n == i``; ``merge_shards`` joins the files).

**What counts.** :func:`summarize` counts a record only when it matches the current manifest
(export id, model and VNN-LIB hashes, ε, test index); others are listed in
``ignored_records`` and never counted. Before running, :func:`check_export` compares
``model.onnx``, every VNN-LIB file and every csv row with the manifest; an instance that does
not match is not run and is reported as ``excluded`` with the reason. A verdict counts only when
it came within the time budget (``budget_s``, stated in the report); later ones are reported as
``late``. Certified accuracy = (pre-certified by our IBP/CROWN + α,β-CROWN ``safe``) / total.

**Soundness checks** on every summary: a point our bounds certified must never be broken (by our
PGD or by α,β-CROWN), a point PGD broke (or misclassified) must never come back ``safe``, and two
records of one instance must not say ``safe`` and ``unsafe`` (whatever the order of the files).
A disagreement is logged as ``SOUNDNESS ALARM``, listed, and the point is counted as ``alarm``:
never certified.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import queue
import selectors
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ccdist_plugin.export import CONFIG_NAME, CSV_NAME, MANIFEST_NAME, ONNX_NAME, export_id_of
from ccdist_plugin.fileio import atomic_write_text, file_sha256
from ccdist_plugin.install import INSTALL_HINT, locate_verifier

__all__ = [
    "INSTALL_HELP",
    "AbcrownNotFoundError",
    "VerdictWriteError",
    "InstanceResult",
    "IntegrityReport",
    "VerificationResult",
    "check_export",
    "find_abcrown",
    "hard_limit_s",
    "parse_shard",
    "run_instance",
    "run_verification",
    "merge_shards",
    "summarize",
]

logger = logging.getLogger(__name__)

VERIFY_DIR = "verify"
SUMMARY_NAME = "verification.json"
TABLE_NAME = "verification.md"
WORKER_SCRIPT = Path(__file__).resolve().parent / "abcrown_worker.py"
VERDICTS = ("safe", "unsafe", "timeout", "error")
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
#: A worker that crashes this many times in a row is replaced by one process per instance.
MAX_WORKER_CRASHES = 3
#: Seconds a worker may take to import α,β-CROWN (torch, auto_LiRPA) before it counts as failed.
WORKER_START_LIMIT_S = 600.0

INSTALL_HELP = f"""α,β-CROWN was not found: {INSTALL_HINT},
or point ABCROWN_DIR (or --abcrown) at an α,β-CROWN complete_verifier folder."""


class AbcrownNotFoundError(FileNotFoundError):
    """No ``abcrown.py`` at the given path, ``$ABCROWN_DIR`` or the recorded install."""


class VerdictWriteError(OSError):
    """A verdict could not be written to disk (e.g. the disk is full); the run stopped.

    The instance has no record, so it is not counted and a resumed run verifies it again.
    ``result`` is the summary of what was written before the failure.
    """

    def __init__(self, message: str, result: VerificationResult | None = None) -> None:
        super().__init__(errno.EIO, message)
        self.result = result

    def __str__(self) -> str:
        return str(self.strerror)


def hard_limit_s(budget_s: float, grace_s: float | None = None) -> float:
    """The wall-clock limit after which an instance's verifier is killed: the one place it is derived.

    ``budget_s + grace_s``, by default ``grace_s = max(5, budget_s / 10)``. A verdict that arrives
    after ``budget_s`` is reported as ``late`` and never counts; the grace only lets α,β-CROWN
    write its own ``timeout`` (it checks its clock between branch-and-bound rounds) before the
    process group is killed.
    """
    if not budget_s > 0:
        raise ValueError(f"the time budget must be positive, got {budget_s}")
    grace = max(5.0, budget_s / 10) if grace_s is None else float(grace_s)
    if grace < 0:
        raise ValueError(f"grace_s must be >= 0, got {grace_s}")
    return float(budget_s) + grace


@dataclass
class InstanceResult:
    """α,β-CROWN's outcome on one instance, and what it is an outcome about.

    Attributes:
        instance: the csv row number.
        index: the test point's dataset index.
        verdict: ``safe`` | ``unsafe`` | ``timeout`` | ``error``.
        time_s: wall-clock seconds of the instance (a worker: from the request to the answer; a
            process per instance: the process, start-up included).
        returncode: the process exit status (None when killed or run by a worker).
        killed: the hard wall-clock limit was hit and the process group killed.
        detail: what went wrong for ``error`` (and the log path).
        shard, worker: who ran it (``all`` or ``shard_i_of_n``; ``<shard>/w<k>``).
        finished: Unix time of the verdict.
        export_id, onnx_sha256, vnnlib_sha256, eps: the export, model, property and radius verified.
        budget_s: the time budget of the run.
        attempts: 2 when the instance was retried after its worker crashed.
        mode: ``worker`` or ``process``.
    """

    instance: int
    index: int
    verdict: str
    time_s: float
    returncode: int | None
    killed: bool = False
    detail: str = ""
    shard: str = ""
    finished: float = 0.0
    export_id: str = ""
    onnx_sha256: str = ""
    vnnlib_sha256: str = ""
    eps: float = float("nan")
    budget_s: float = float("nan")
    worker: str = ""
    attempts: int = 1
    mode: str = ""


@dataclass
class IntegrityReport:
    """What :func:`check_export` found: the instances that may be run, and why others may not."""

    instances: list[int]
    excluded: dict[int, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A Markdown table of the counts, accuracies, time per instance and everything excluded."""
        n = max(self.total, 1)

        def row(name: str, count: int | None, acc: float | None = None) -> str:
            pct = (
                f"{100 * (count / n if acc is None else acc):.2f}"
                if count is not None or acc is not None
                else ""
            )
            return f"| {name} | {'' if count is None else count} | {pct} |"

        budget = f", budget {self.budget_s:g} s per instance" if self.budget_s is not None else ""
        lines = [f"Verification of {self.export_dir} (ε = {self.eps:.6g}, {self.total} test points{budget})"]
        lines += ["", "| | points | % of total |", "|---|---:|---:|"]
        lines.append(row("clean accuracy", round(self.clean_accuracy * self.total)))
        if self.ibp_certified_accuracy is not None:
            lines.append(row("IBP-certified", round(self.ibp_certified_accuracy * self.total)))
        if self.crown_certified_accuracy is not None:
            lines.append(row("CROWN-certified", round(self.crown_certified_accuracy * self.total)))
        lines.append(row("PGD-robust (upper bound)", round(self.pgd_accuracy * self.total)))
        labels = {
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
        for key, name in labels.items():
            if key in ("late", "excluded", "alarm") and not self.counts.get(key):
                continue
            lines.append(row(name, self.counts.get(key, 0)))
        lines.append(
            f"| **certified accuracy** | **{self.certified}** | **{100 * self.certified_accuracy:.2f}** |"
        )
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
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Locating α,β-CROWN and reading an export
# --------------------------------------------------------------------------------------------


def find_abcrown(abcrown_dir: str | os.PathLike | None = None) -> Path:
    """The α,β-CROWN ``complete_verifier`` folder (holding ``abcrown.py``).

    Looks at ``abcrown_dir``, else ``$ABCROWN_DIR``, else the folder recorded by ``ccdist
    install-verifier`` (:func:`ccdist_plugin.install.locate_verifier`); accepts the repository
    root too.

    Raises:
        AbcrownNotFoundError: saying where it looked, with the install command.
    """
    if abcrown_dir is not None:
        folder, where = Path(abcrown_dir), str(abcrown_dir)
    else:
        located = locate_verifier()
        if located.abcrown_dir is None:
            raise AbcrownNotFoundError(
                "α,β-CROWN is not installed (ABCROWN_DIR is unset and no install is recorded): "
                + INSTALL_HINT
            )
        folder, where = located.abcrown_dir, f"{located.abcrown_dir} (from {located.origin})"
    for p in (folder, folder / "complete_verifier"):
        if (p / "abcrown.py").is_file():
            return p.resolve()
    raise AbcrownNotFoundError(f"no abcrown.py under {where}: {INSTALL_HINT}")


def parse_shard(text: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"i/n"`` → ``(i, n)`` with 0 <= i < n (None stays None)."""
    if text is None:
        return None
    if isinstance(text, str):
        try:
            i_s, n_s = text.split("/")
            i, n = int(i_s), int(n_s)
        except ValueError:
            raise ValueError(f"shard must look like 'i/n' (e.g. 0/4), got {text!r}") from None
    else:
        i, n = (int(v) for v in text)
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need n >= 1 and 0 <= i < n")
    return i, n


def _shard_name(shard: tuple[int, int] | None) -> str:
    return "all" if shard is None else f"shard_{shard[0]}_of_{shard[1]}"


def _load_manifest(export_dir: Path) -> dict[str, Any]:
    manifest_path = export_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ValueError(
            f"{export_dir} is not an export directory: {MANIFEST_NAME} is missing (run ccdist export)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as err:  # garbled or truncated: nothing in it can be trusted
        raise ValueError(f"{manifest_path} is not valid JSON ({err}); export again (ccdist export)") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("points"), list):
        raise ValueError(f"{manifest_path} is not an export manifest (no list of points); export again")
    if not manifest.get("export_id") or not manifest.get("onnx_sha256"):
        raise ValueError(
            f"{manifest_path} has no export id or model hash: it was written by an older ccdist export, "
            "whose verdicts cannot be tied to the model they are about. Export again (ccdist export)."
        )
    content_id = export_id_of(
        manifest["onnx_sha256"], manifest["eps"], manifest.get("timeout_s", 600.0), manifest["points"]
    )
    if content_id != manifest["export_id"]:
        raise ValueError(
            f"{manifest_path} was edited after the export (its export id does not match its content): "
            "nothing in it can be trusted. Export again (ccdist export)."
        )
    return manifest


def _instance_points(manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(p["instance"]): p for p in manifest["points"] if p.get("instance") is not None}


def check_export(export_dir: str | os.PathLike) -> IntegrityReport:
    """Compare what α,β-CROWN would verify with what the manifest says was exported.

    Checks the sha256 of ``model.onnx`` (a mismatch excludes every instance), of each instance's
    VNN-LIB file, and that csv row ``r`` is ``model.onnx,<the manifest's VNN-LIB of instance r>,
    <timeout>``. An instance that fails is excluded (not run, never certified) with the reason.
    """
    export = Path(export_dir).resolve()
    manifest = _load_manifest(export)
    by_instance = _instance_points(manifest)
    excluded: dict[int, str] = {}
    problems: list[str] = []

    def exclude(r: int, reason: str) -> None:
        if r not in excluded:
            excluded[r] = reason
            problems.append(f"instance {r} (test point {by_instance[r]['index']}): {reason}")

    onnx_path = export / manifest.get("onnx", ONNX_NAME)
    onnx_hash = file_sha256(onnx_path) if onnx_path.is_file() else None
    if onnx_hash != manifest["onnx_sha256"]:
        what = "is missing" if onnx_hash is None else f"has sha256 {onnx_hash[:12]}…"
        problems.append(
            f"{onnx_path.name} {what}, the manifest's is {manifest['onnx_sha256'][:12]}…: "
            "not the exported model, so no instance is run"
        )
        for r in by_instance:
            excluded[r] = f"{onnx_path.name} differs from the exported model"
    csv_path = export / CSV_NAME
    rows: list[list[str]] = []
    if csv_path.is_file():
        with open(csv_path, newline="") as f:
            rows = [[c.strip() for c in row] for row in csv.reader(f) if row]
    timeout = f"{float(manifest['timeout_s']):g}"
    for r, p in sorted(by_instance.items()):
        expected = [manifest.get("onnx", ONNX_NAME), p["vnnlib"], timeout]
        if r >= len(rows):
            exclude(r, f"{CSV_NAME} has no row {r}")
        elif rows[r] != expected:
            exclude(
                r, f"{CSV_NAME} row {r} is {','.join(rows[r])!r}, the export wrote {','.join(expected)!r}"
            )
        vnnlib = export / p["vnnlib"]
        if not vnnlib.is_file():
            exclude(r, f"{p['vnnlib']} is missing")
        elif file_sha256(vnnlib) != p.get("vnnlib_sha256"):
            exclude(r, f"{p['vnnlib']} differs from the exported property (sha256 mismatch)")
    if len(rows) > len(by_instance):
        problems.append(
            f"{CSV_NAME} has {len(rows)} rows but the export has {len(by_instance)} instances: "
            "the extra rows are not run"
        )
    for msg in problems:
        logger.error("integrity check: %s", msg)
    return IntegrityReport(sorted(r for r in by_instance if r not in excluded), excluded, problems)


def _record_mismatch(rec: dict[str, Any], manifest: dict[str, Any], points: dict[int, dict[str, Any]]) -> str:
    """Why a verdict record is not about the current export ("" when it is)."""
    try:
        inst = int(rec["instance"])
    except (KeyError, TypeError, ValueError):
        return "no instance number"
    if rec.get("export_id") != manifest["export_id"]:
        return f"instance {inst}: another export ({rec.get('export_id') or 'no export id'})"
    if rec.get("onnx_sha256") != manifest["onnx_sha256"]:
        return f"instance {inst}: another model (ONNX sha256 {str(rec.get('onnx_sha256'))[:12]}…)"
    p = points.get(inst)
    if p is None:
        return f"instance {inst}: no such instance in this export"
    if rec.get("index") != p["index"]:
        return f"instance {inst}: test point {rec.get('index')}, the export's is {p['index']}"
    if rec.get("vnnlib_sha256") != p.get("vnnlib_sha256"):
        return f"instance {inst}: another property (VNN-LIB sha256 mismatch)"
    if rec.get("eps") != manifest["eps"]:
        return f"instance {inst}: ε {rec.get('eps')}, the export's is {manifest['eps']}"
    if rec.get("verdict") not in VERDICTS:
        return f"instance {inst}: unknown verdict {rec.get('verdict')!r}"
    return ""


def _read_results(
    export_dir: Path, manifest: dict[str, Any]
) -> tuple[dict[int, list[dict[str, Any]]], list[dict[str, Any]], list[str]]:
    """Every record under ``verify/`` that is about this export (per instance, all of them), the
    records ignored with the reason, and the files read."""
    points = _instance_points(manifest)
    records: dict[int, list[dict[str, Any]]] = {}
    ignored: list[dict[str, Any]] = []
    files = sorted((export_dir / VERIFY_DIR).glob("results_*.jsonl"))
    for f in files:
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError
            except ValueError:
                # a line cut short by a kill or a full disk: its instance is simply run again
                ignored.append({"file": f.name, "line": n, "reason": "unreadable (cut-short) line"})
                continue
            reason = _record_mismatch(rec, manifest, points)
            if reason:
                ignored.append({"file": f.name, "line": n, "reason": reason})
            else:
                records.setdefault(int(rec["instance"]), []).append(rec)
    return records, ignored, [str(f) for f in files]


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


# --------------------------------------------------------------------------------------------
# Running α,β-CROWN
# --------------------------------------------------------------------------------------------


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _verifier_python(python: str | None) -> str:
    return python or os.environ.get("ABCROWN_PYTHON") or sys.executable


def _abcrown_args(
    config: Path, onnx_path: Path, vnnlib_path: Path, results_file: Path, timeout_s: float | None, extra_args
) -> list[str]:
    args = ["--config", str(config), "--onnx_path", str(onnx_path), "--vnnlib_path", str(vnnlib_path)]
    args += ["--results_file", str(results_file)]
    if timeout_s is not None:
        args += ["--timeout", f"{float(timeout_s):g}"]
    return args + list(extra_args)


def _read_verdict(results_file: Path, log_path: Path) -> tuple[str, str]:
    first = ""
    if results_file.is_file():
        lines = results_file.read_text(errors="replace").splitlines()
        first = lines[0].strip() if lines else ""
    verdict = {"unsat": "safe", "sat": "unsafe", "timeout": "timeout"}.get(first)
    if verdict is None:
        return "error", f"unreadable result {first!r} in {results_file}; log {log_path}"
    return verdict, ""


def run_instance(
    abcrown_dir: Path,
    config: Path,
    onnx_path: Path,
    vnnlib_path: Path,
    work_dir: Path,
    timeout_s: float | None = None,
    hard_limit_s: float = 900.0,
    python: str | None = None,
    extra_args: Sequence[str] = (),
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> tuple[str, float, int | None, bool, str]:
    """Run α,β-CROWN on one instance in a new process of its own process group.

    The process group is killed after ``hard_limit_s`` seconds, on any exception here
    (``KeyboardInterrupt`` included), and by the process itself when this process dies.

    Returns:
        ``(verdict, seconds, returncode, killed, detail)`` with verdict ``safe`` / ``unsafe`` /
        ``timeout`` / ``error``.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    results_file = work_dir / "result.txt"
    log_path = work_dir / "abcrown.log"
    results_file.unlink(missing_ok=True)
    args = _abcrown_args(config, onnx_path, vnnlib_path, results_file, timeout_s, extra_args)
    cmd = [_verifier_python(python), str(WORKER_SCRIPT), str(abcrown_dir), "--once", *args]
    shown = [_verifier_python(python), str(Path(abcrown_dir) / "abcrown.py"), *args]
    (work_dir / "command.txt").write_text(" ".join(shlex.quote(c) for c in shown) + "\n")
    start = time.monotonic()
    killed = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=work_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        if on_start is not None:
            on_start(proc)
        try:
            rc: int | None = proc.wait(timeout=hard_limit_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, killed = None, True
        except BaseException:
            _kill_group(proc)
            raise
        else:
            _kill_group(proc)  # whatever α,β-CROWN left running in its group (e.g. MIP solvers)
    seconds = time.monotonic() - start
    if killed:
        return (
            "timeout",
            seconds,
            None,
            True,
            f"killed after the hard limit of {hard_limit_s:g} s; log {log_path}",
        )
    if rc != 0:
        return "error", seconds, rc, False, f"α,β-CROWN exited with status {rc}; log {log_path}"
    verdict, detail = _read_verdict(results_file, log_path)
    return verdict, seconds, rc, False, detail


class _WorkerGone(RuntimeError):
    """The persistent worker could not start, or died."""


class _PersistentVerifier:
    """One long-lived ``abcrown_worker.py --serve`` process (its own process group)."""

    def __init__(
        self,
        abcrown_dir: Path,
        python: str | None,
        work_root: Path,
        name: str,
        on_start: Callable[[subprocess.Popen], None] | None = None,
    ) -> None:
        self.abcrown_dir, self.python, self.name, self.on_start = abcrown_dir, python, name, on_start
        self.work_root = work_root
        self.proc: subprocess.Popen | None = None
        self._buffer = b""
        self.starts = 0

    def _read_line(self, limit_s: float) -> bytes | None:
        """One line from the worker, or None when ``limit_s`` passed; raises _WorkerGone on EOF."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + limit_s
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(timeout=left):
                    return None
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise _WorkerGone(f"worker {self.name} exited (status {self.proc.wait()})")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def start(self) -> None:
        self.work_root.mkdir(parents=True, exist_ok=True)
        log = self.work_root / f"worker_{self.name.replace('/', '_')}.log"
        env = {**os.environ, "CCDIST_WORKER_LOG": str(log)}
        self.proc = subprocess.Popen(
            [_verifier_python(self.python), str(WORKER_SCRIPT), str(self.abcrown_dir), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=self.work_root,
            env=env,
            start_new_session=True,
        )
        if self.on_start is not None:
            self.on_start(self.proc)
        self._buffer = b""
        self.starts += 1
        try:
            line = self._read_line(WORKER_START_LIMIT_S)
        except _WorkerGone as err:
            self.close()
            raise _WorkerGone(f"{err}; log {log}") from None
        hello = json.loads(line) if line else {}
        if not hello.get("ready"):
            self.close()
            detail = str(hello.get("detail", "")).strip().splitlines()
            why = "it did not start in time" if line is None else (detail[-1] if detail else "no reason")
            raise _WorkerGone(f"worker {self.name} could not import α,β-CROWN: {why}; log {log}")
        logger.info("verifier worker %s ready (α,β-CROWN imported in %.1f s)", self.name, hello["import_s"])

    def run(self, args: list[str], work_dir: Path, limit_s: float) -> tuple[str, int | None, bool, str]:
        """``(status, code, killed, detail)``; raises _WorkerGone when the worker died on it."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        request = {"args": args, "cwd": str(work_dir), "log": str(work_dir / "abcrown.log")}
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.close()
            raise _WorkerGone(f"worker {self.name} is gone") from None
        try:
            line = self._read_line(limit_s)
        except _WorkerGone:
            self.close()
            raise
        if line is None:  # hung past the hard limit: the whole group goes, a new worker takes the next one
            self.close()
            return "killed", None, True, ""
        answer = json.loads(line)
        return answer["status"], answer.get("code"), False, answer.get("detail", "")

    def close(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    pipe.close()
            self.proc = None


@dataclass
class _Job:
    """What every instance of one run shares."""

    export: Path
    abcrown: Path
    config: Path
    onnx: Path
    manifest: dict[str, Any]
    budget_s: float
    hard_limit: float
    python: str | None
    extra_args: list[str]
    shard_name: str
    results_path: Path
    mode: str
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    write_error: list[str] = field(default_factory=list)
    #: every verifier process started, so that an interrupted run kills them at once
    processes: list[subprocess.Popen] = field(default_factory=list)

    def started(self, proc: subprocess.Popen) -> None:
        with self.write_lock:
            self.processes[:] = [p for p in self.processes if p.poll() is None] + [proc]


def _write_verdict_bytes(fd: int, data: bytes) -> int:
    """The one write of a verdict line (a seam for the tests' full-disk fault)."""
    return os.write(fd, data)


def _append_record(path: Path, rec: InstanceResult) -> None:
    """Append one verdict line and fsync it; one ``write`` call, so concurrent appenders
    (``O_APPEND``) never interleave inside a line."""
    line = json.dumps(asdict(rec)) + "\n"
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a line cut short by a kill: start a fresh one
                line = "\n" + line
    data = line.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if _write_verdict_bytes(fd, data) != len(data):
            raise OSError(errno.ENOSPC, f"short write of a verdict to {path}")
        os.fsync(fd)
    finally:
        os.close(fd)


def _run_one(
    job: _Job, r: int, point: dict[str, Any], verifier: _PersistentVerifier | None, worker: str
) -> tuple[InstanceResult | None, bool]:
    """Verify instance ``r``; returns its record (None when the run was interrupted) and whether
    the persistent worker failed on it."""
    vnnlib = job.export / point["vnnlib"]
    # what is verified, hashed when it is verified: a file swapped during the run cannot borrow the
    # manifest's hash (the record would not match and would be ignored)
    vnnlib_sha, onnx_sha = file_sha256(vnnlib), file_sha256(job.onnx)
    work_dir = job.export / VERIFY_DIR / "work" / f"instance_{r:06d}"
    work_dir.mkdir(parents=True, exist_ok=True)
    attempts, worker_failed, mode = 1, False, "process"
    verdict = ""
    if verifier is not None:
        mode = "worker"
        results_file = work_dir / "result.txt"
        results_file.unlink(missing_ok=True)
        args = _abcrown_args(job.config, job.onnx, vnnlib, results_file, job.budget_s, job.extra_args)
        (work_dir / "command.txt").write_text(
            " ".join(
                shlex.quote(c) for c in [_verifier_python(job.python), str(job.abcrown / "abcrown.py"), *args]
            )
            + "\n"
        )
        start = time.monotonic()
        try:
            status, code, killed, detail = verifier.run(args, work_dir, job.hard_limit)
        except _WorkerGone as err:
            # the worker died on this instance: run it once more on its own to tell a bad
            # instance from a worker in a bad state
            logger.warning("instance %d: %s; retrying it in a fresh process", r, err)
            worker_failed, attempts = True, 2
        else:
            seconds, rc = time.monotonic() - start, None
            if killed:
                verdict = "timeout"
                detail = (
                    f"killed after the hard limit of {job.hard_limit:g} s; log {work_dir / 'abcrown.log'}"
                )
            elif status == "ok" or (status == "exit" and code == 0):
                verdict, detail = _read_verdict(results_file, work_dir / "abcrown.log")
            elif status == "exit":
                verdict, rc = "error", code
                detail = f"α,β-CROWN exited with status {code}; log {work_dir / 'abcrown.log'}"
            else:
                verdict = "error"
                detail = f"α,β-CROWN raised: {detail.strip().splitlines()[-1] if detail.strip() else '?'}"
    if not verdict and worker_failed and job.stop.is_set():
        return None, worker_failed  # the run was interrupted: no verdict, the instance stays missing
    if not verdict:
        mode = "process" if verifier is None else "worker+retry"
        verdict, seconds, rc, killed, detail = run_instance(
            job.abcrown,
            job.config,
            job.onnx,
            vnnlib,
            work_dir,
            timeout_s=job.budget_s,
            hard_limit_s=job.hard_limit,
            python=job.python,
            extra_args=job.extra_args,
            on_start=job.started,
        )
    if (file_sha256(vnnlib), file_sha256(job.onnx)) != (vnnlib_sha, onnx_sha):
        verdict = "error"
        detail = f"{job.onnx.name} or {point['vnnlib']} changed while it was verified: verdict discarded"
    rec = InstanceResult(
        instance=r,
        index=int(point["index"]),
        verdict=verdict,
        time_s=round(seconds, 3),
        returncode=rc,
        killed=killed,
        detail=detail,
        shard=job.shard_name,
        finished=time.time(),
        export_id=job.manifest["export_id"],
        onnx_sha256=onnx_sha,
        vnnlib_sha256=vnnlib_sha,
        eps=job.manifest["eps"],
        budget_s=job.budget_s,
        worker=worker,
        attempts=attempts,
        mode=mode,
    )
    return rec, worker_failed


def _worker_loop(job: _Job, tasks: queue.Queue, worker: str, persistent: bool) -> None:
    work_root = job.export / VERIFY_DIR / "work"
    verifier = (
        _PersistentVerifier(job.abcrown, job.python, work_root, worker, job.started) if persistent else None
    )
    crashes = 0
    try:
        while not job.stop.is_set():
            try:
                r, point = tasks.get_nowait()
            except queue.Empty:
                return
            if verifier is not None and verifier.proc is None:
                try:
                    verifier.start()
                except _WorkerGone as err:
                    logger.warning("%s; running one α,β-CROWN process per instance instead", err)
                    verifier = None
            rec, failed = _run_one(job, r, point, verifier, worker)
            if rec is None:
                return
            crashes = crashes + 1 if failed else 0
            if verifier is not None and crashes >= MAX_WORKER_CRASHES:
                logger.warning(
                    "worker %s crashed on %d instances in a row; running one process per instance instead",
                    worker,
                    crashes,
                )
                verifier.close()
                verifier = None
            if rec.verdict == "error":
                logger.error("instance %d (test point %d): %s", r, rec.index, rec.detail)
            else:
                logger.info(
                    "instance %d (test point %d): %s in %.1f s", r, rec.index, rec.verdict, rec.time_s
                )
            with job.write_lock:
                if job.write_error:  # the disk is full: the run is stopping
                    return
                try:
                    _append_record(job.results_path, rec)
                except OSError as err:
                    job.write_error.append(
                        f"could not write the verdict of instance {r} "
                        f"(test point {rec.index}: {rec.verdict}) to {job.results_path}: {err}. "
                        "The run stopped; that instance is not counted and a "
                        "resumed run verifies it again"
                    )
                    job.stop.set()
                    return
    finally:
        if verifier is not None:
            verifier.close()


def run_verification(
    export_dir: str | os.PathLike,
    abcrown_dir: str | os.PathLike | None = None,
    shard: tuple[int, int] | str | None = None,
    timeout_s: float | None = None,
    grace_s: float | None = None,
    extra_args: Sequence[str] = (),
    retry_errors: bool = False,
    python: str | None = None,
    workers: int = 1,
    mode: str = "worker",
) -> VerificationResult:
    """Verify every instance of an export directory that has no verdict yet, then summarize.

    Args:
        export_dir: written by :func:`ccdist_plugin.export.export_instances`.
        abcrown_dir: α,β-CROWN's ``complete_verifier`` folder (default ``$ABCROWN_DIR``). When it
            is not found, the install steps are logged and the summary reports our own IBP/CROWN
            results with the branch-and-bound instances ``missing``.
        shard: ``(i, n)`` or ``"i/n"``: only the instances ``r`` with ``r % n == i``; the summary
            goes to ``verify/summary_shard_i_of_n.json`` (join shards with :func:`merge_shards`).
        timeout_s: the time budget per instance (default: the export's): α,β-CROWN's
            ``--timeout``, and the wall time within which a verdict counts.
        grace_s: the process group is killed ``grace_s`` seconds after the budget (default:
            :func:`hard_limit_s`).
        extra_args: more α,β-CROWN command-line options, e.g. ``["--device", "cpu"]``.
        retry_errors: run again the instances whose earlier result is ``error``.
        python: the interpreter with α,β-CROWN installed (default ``$ABCROWN_PYTHON``, else ours).
        workers: verifier processes run side by side on this machine, taking instances from
            one queue.
        mode: ``"worker"`` (α,β-CROWN loaded once per worker) or ``"process"`` (one process
            per instance).

    Raises:
        VerdictWriteError: a verdict could not be written (e.g. disk full); the run stopped.
    """
    if mode not in ("worker", "process"):
        raise ValueError(f"mode must be 'worker' or 'process', got {mode!r}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    export = Path(export_dir).resolve()
    manifest = _load_manifest(export)
    shard_t = parse_shard(shard)
    budget = float(timeout_s) if timeout_s is not None else float(manifest.get("timeout_s", 600.0))
    hard_limit = hard_limit_s(budget, grace_s)
    if python is None and abcrown_dir is None:
        python = locate_verifier().python  # the interpreter the recorded install went into
    try:
        abcrown = find_abcrown(abcrown_dir)
    except AbcrownNotFoundError as err:
        # the summary's table shows the message with the install command: the log says it once
        logger.error("branch and bound not run: α,β-CROWN not found")
        result = summarize(export, abcrown_ran=False, message=str(err), budget_s=budget)
        _write_summary(export, result, shard_t)
        return result

    integrity = check_export(export)
    verify_dir = export / VERIFY_DIR
    verify_dir.mkdir(exist_ok=True)
    shard_name = _shard_name(shard_t)
    records, _, _ = _read_results(export, manifest)
    points = _instance_points(manifest)
    tasks: queue.Queue = queue.Queue()
    for r in integrity.instances:
        if shard_t is not None and r % shard_t[1] != shard_t[0]:
            continue
        done = records.get(r, [])
        if done and not (retry_errors and all(rec["verdict"] == "error" for rec in done)):
            continue
        tasks.put((r, points[r]))
    logger.info(
        "α,β-CROWN at %s: %d instances to run (%s, %d %s worker(s)), budget %g s, hard limit %g s",
        abcrown,
        tasks.qsize(),
        shard_name,
        workers,
        mode,
        budget,
        hard_limit,
    )
    job = _Job(
        export=export,
        abcrown=abcrown,
        config=export / CONFIG_NAME,
        onnx=export / manifest.get("onnx", ONNX_NAME),
        manifest=manifest,
        budget_s=budget,
        hard_limit=hard_limit,
        python=python,
        extra_args=list(extra_args),
        shard_name=shard_name,
        results_path=verify_dir / f"results_{shard_name}.jsonl",
        mode=mode,
    )
    n_workers = min(int(workers), max(tasks.qsize(), 1))
    threads = [
        threading.Thread(
            target=_worker_loop, args=(job, tasks, f"{shard_name}/w{k}", mode == "worker"), daemon=True
        )
        for k in range(n_workers)
    ]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except BaseException:
        job.stop.set()
        with job.write_lock:
            running = list(job.processes)
        for proc in running:  # interrupted: no verifier outlives the run
            _kill_group(proc)
        for t in threads:
            t.join(5)
        raise
    result = summarize(export, abcrown_ran=True, budget_s=budget)
    if job.write_error:
        result.message = "\n".join([*job.write_error, result.message]).strip()
        logger.error("%s", job.write_error[0])
        try:
            _write_summary(export, result, shard_t)
        except OSError as err:
            logger.error("the summary could not be written either: %s", err)
        raise VerdictWriteError(job.write_error[0], result)
    _write_summary(export, result, shard_t)
    return result


def _write_summary(export: Path, result: VerificationResult, shard: tuple[int, int] | None) -> None:
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
    _write_summary(export, result, None)
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
    manifest = _load_manifest(export)
    budget = float(budget_s) if budget_s is not None else float(manifest.get("timeout_s", 600.0))
    records, ignored, files = _read_results(export, manifest)
    integrity = check_export(export)
    for rec in ignored:
        logger.warning("ignored verdict record %s:%s: %s", rec["file"], rec["line"], rec["reason"])
    points = manifest["points"]
    total = len(points)
    methods = manifest.get("methods", [])
    counts = dict.fromkeys(CATEGORIES, 0)
    alarms: list[str] = []
    cross: dict[str, int] = {}
    certified = 0
    missing: list[int] = []
    late: list[dict[str, Any]] = []
    excluded: dict[int, str] = {}
    instances = []
    for p in points:
        outcome, inst = p["outcome"], p.get("instance")
        recs = records.get(int(inst), []) if inst is not None else []
        rec, category, conflict = _decide(recs, budget) if recs else (None, None, False)
        verdicts = {r["verdict"] for r in recs}
        where = f"test point {p['index']} (label {p['label']}, instance {inst})"
        point_alarms = []
        if conflict:
            point_alarms.append(f"{where}: α,β-CROWN said safe in one run and unsafe in another")
        if outcome == "pre-certified" and p.get("pgd_broken"):
            point_alarms.append(
                f"{where}: certified by our {'/'.join(methods).upper()} bounds "
                "but our PGD found a counterexample"
            )
        if outcome == "pre-certified" and "unsafe" in verdicts:
            point_alarms.append(
                f"{where}: certified by our {'/'.join(methods).upper()} bounds but α,β-CROWN found it unsafe"
            )
        if outcome in ("attacked", "misclassified") and "safe" in verdicts:
            what = "PGD found a counterexample" if outcome == "attacked" else "the clean prediction is wrong"
            point_alarms.append(f"{where}: {what}, but α,β-CROWN proved it safe")
        elif outcome == "bab" and "safe" in verdicts and p.get("pgd_broken"):
            point_alarms.append(f"{where}: PGD found a counterexample, but α,β-CROWN proved it safe")
        alarms += point_alarms
        if outcome == "bab":
            if rec is None:
                category = "missing"
                if inst in integrity.excluded:
                    category = "excluded"
                    excluded[int(inst)] = integrity.excluded[int(inst)]
                else:
                    missing.append(int(inst))
            is_certified = category == "safe"
        else:
            category = outcome
            is_certified = outcome == "pre-certified"
            for v in sorted(verdicts):
                key = f"{outcome}->{v}"
                cross[key] = cross.get(key, 0) + 1
        if point_alarms:
            category, is_certified = "alarm", False
        counts[category] += 1
        certified += int(is_certified)
        if rec is not None:
            entry = {**rec, "outcome": outcome, "label": p["label"], "certified": is_certified}
            entry["category"] = category
            instances.append(entry)
            if any(_is_late(r, budget) for r in recs):
                late += [r for r in recs if _is_late(r, budget)]
    for a in alarms:
        logger.error("SOUNDNESS ALARM: %s", a)
    bab_times = [r["time_s"] for r in instances if r["outcome"] == "bab"]
    timing = {}
    if bab_times:
        timing = {
            "count": float(len(bab_times)),
            "mean": statistics.fmean(bab_times),
            "median": statistics.median(bab_times),
            "max": max(bab_times),
            "total": sum(bab_times),
        }
    workers: dict[str, dict[str, int]] = {}
    shards = set()
    for recs in records.values():
        for r in recs:
            w = workers.setdefault(r.get("worker") or r.get("shard") or "?", {"done": 0, "retried": 0})
            w["done"] += 1
            w["retried"] += int(r.get("attempts", 1) > 1)
            shards.add(r.get("shard", ""))
    for f in files:
        shards.add(Path(f).stem.removeprefix("results_"))
    missing_by_shard: dict[str, list[int]] = {}
    for s in sorted(shards):
        parts = s.split("_")
        if len(parts) == 4 and parts[0] == "shard":
            i, n = int(parts[1]), int(parts[3])
            missing_by_shard[s] = [m for m in missing if m % n == i]
        elif s == "all":
            missing_by_shard[s] = list(missing)
    n = max(total, 1)

    def acc(key: str) -> float | None:
        return sum(bool(p.get(key)) for p in points) / n if key.split("_")[0] in methods else None

    # the attack's upper bound: every point with a known counterexample (whatever its category)
    broken = sum(
        not p["correct"]
        or bool(p.get("pgd_broken"))
        or (
            p.get("instance") is not None
            and any(r["verdict"] == "unsafe" for r in records.get(int(p["instance"]), []))
        )
        for p in points
    )
    if not abcrown_ran and not message:
        message = INSTALL_HELP
    return VerificationResult(
        export_dir=str(export),
        total=total,
        counts=counts,
        certified=certified,
        certified_accuracy=certified / n,
        clean_accuracy=sum(bool(p["correct"]) for p in points) / n,
        ibp_certified_accuracy=acc("ibp_certified"),
        crown_certified_accuracy=acc("crown_certified"),
        pgd_accuracy=(total - broken) / n,
        eps=float(manifest["eps"]),
        abcrown_ran=abcrown_ran,
        message=message,
        budget_s=budget,
        export_id=manifest["export_id"],
        instances=sorted(instances, key=lambda r: r["instance"]),
        missing=sorted(missing),
        late=sorted(late, key=lambda r: r["instance"]),
        excluded=excluded,
        integrity_problems=integrity.problems,
        ignored_records=ignored,
        soundness_alarms=alarms,
        cross_checks=cross,
        time_per_instance_s=timing,
        workers=workers,
        missing_by_shard=missing_by_shard,
        results_files=files,
    )

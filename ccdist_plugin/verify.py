"""Run α,β-CROWN on an export directory and bring its verdicts back into our reports.

Each instance of ``instances.csv`` runs in its own α,β-CROWN process (``abcrown.py --config
<export>/abcrown.yaml --onnx_path … --vnnlib_path … --results_file …``), in a new process group
that is killed when it outlives a hard wall-clock limit (α,β-CROWN checks its own ``bab.timeout``
only between branch-and-bound rounds, not during the attack or the root bounds). The verdict is
the first line of its results file: ``unsat`` → ``safe`` (certified), ``sat`` → ``unsafe``,
``timeout`` → ``timeout``; a crash, a non-zero exit or an unreadable file → ``error``. Only
``safe`` certifies.

Results are appended, one JSON line per finished instance, to ``<export>/verify/results_*.jsonl``
(one file per shard), so a run can be interrupted and resumed, and shards (``shard=(i, n)``: the
instances ``r`` with ``r % n == i``) can run in separate processes or machines; ``merge_shards``
joins every results file found and reports instances with no result as ``missing`` (never
certified).

Certified accuracy = (pre-certified by our IBP/CROWN + α,β-CROWN ``safe``) / total. Every summary
checks consistency: a point our bounds certified must never come back ``unsafe``, and a point PGD
broke (or the clean prediction got wrong) must never come back ``safe``; a disagreement is logged
as ``SOUNDNESS ALARM`` and recorded, and the point is not counted as certified.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ccdist_plugin.export import CONFIG_NAME, CSV_NAME, MANIFEST_NAME
from ccdist_plugin.fileio import atomic_write_text

__all__ = [
    "INSTALL_HELP",
    "AbcrownNotFoundError",
    "InstanceResult",
    "VerificationResult",
    "find_abcrown",
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

INSTALL_HELP = """α,β-CROWN was not found. Install it, then point ABCROWN_DIR at its complete_verifier folder:
  # from GitHub, at the commits this package is tested with (alpha-beta-CROWN 8250d5fbd530,
  # auto_LiRPA 9d100ec07086; see docs/verification.md):
  git clone --recursive https://github.com/Verified-Intelligence/alpha-beta-CROWN.git
  pip install -e alpha-beta-CROWN/auto_LiRPA   # plus the packages in complete_verifier/requirements.txt
  export ABCROWN_DIR=$PWD/alpha-beta-CROWN/complete_verifier
Then run: ccdist verify --export DIR   (or pass --abcrown PATH)"""


class AbcrownNotFoundError(FileNotFoundError):
    """No ``abcrown.py`` at the given path or ``$ABCROWN_DIR``."""


@dataclass
class InstanceResult:
    """α,β-CROWN's outcome on one row of ``instances.csv``.

    Attributes:
        instance: the csv row number.
        index: the test point's dataset index.
        verdict: ``safe`` | ``unsafe`` | ``timeout`` | ``error``.
        time_s: wall-clock seconds of the α,β-CROWN process (start-up included).
        returncode: the process exit status (None when killed).
        killed: the hard wall-clock limit was hit and the process group killed.
        detail: what went wrong for ``error`` (and the log path).
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


@dataclass
class VerificationResult:
    """Summary of an export directory's verification (``verification.json``).

    Counts are over all exported test points; every point falls in exactly one category of
    ``counts``: ``misclassified``, ``pre-certified``, ``attacked`` (outcomes of the pre-filter)
    or, for points sent to branch-and-bound, α,β-CROWN's verdict ``safe`` / ``unsafe`` /
    ``timeout`` / ``error``, or ``missing`` (no result yet, or α,β-CROWN not installed).
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
    instances: list[dict[str, Any]] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    soundness_alarms: list[str] = field(default_factory=list)
    cross_checks: dict[str, int] = field(default_factory=dict)
    time_per_instance_s: dict[str, float] = field(default_factory=dict)
    results_files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A Markdown table of the counts, accuracies and time per instance."""
        n = max(self.total, 1)

        def row(name: str, count: int | None, acc: float | None = None) -> str:
            pct = (
                f"{100 * (count / n if acc is None else acc):.2f}"
                if count is not None or acc is not None
                else ""
            )
            return f"| {name} | {'' if count is None else count} | {pct} |"

        lines = [f"Verification of {self.export_dir} (ε = {self.eps:.6g}, {self.total} test points)", ""]
        lines += ["| | points | % of total |", "|---|---:|---:|"]
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
            "safe": "α,β-CROWN safe (BaB)",
            "unsafe": "α,β-CROWN unsafe",
            "timeout": "α,β-CROWN timeout/unknown",
            "error": "α,β-CROWN error (not certified)",
            "missing": "no α,β-CROWN result (not certified)",
        }
        for key, name in labels.items():
            lines.append(row(name, self.counts.get(key, 0)))
        lines.append(
            f"| **certified accuracy** | **{self.certified}** | **{100 * self.certified_accuracy:.2f}** |"
        )
        t = self.time_per_instance_s
        if t:
            lines += [
                "",
                f"α,β-CROWN time per instance (s, process wall-clock incl. start-up, "
                f"{int(t['count'])} instances): mean {t['mean']:.1f}, median {t['median']:.1f}, "
                f"max {t['max']:.1f}",
            ]
        if self.cross_checks:
            lines += [
                "",
                "Cross-checks (pre-filtered points also sent to α,β-CROWN): "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.cross_checks.items())),
            ]
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

    Looks at ``abcrown_dir``, then ``$ABCROWN_DIR``; accepts the repository root too.

    Raises:
        AbcrownNotFoundError: with the install steps.
    """
    candidates = [abcrown_dir] if abcrown_dir is not None else [os.environ.get("ABCROWN_DIR")]
    for c in candidates:
        if not c:
            continue
        for p in (Path(c), Path(c) / "complete_verifier"):
            if (p / "abcrown.py").is_file():
                return p.resolve()
    where = f"{abcrown_dir}" if abcrown_dir is not None else f"$ABCROWN_DIR={os.environ.get('ABCROWN_DIR')!r}"
    raise AbcrownNotFoundError(f"no abcrown.py under {where}.\n{INSTALL_HELP}")


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


def _load_export(export_dir: Path) -> tuple[dict[str, Any], list[list[str]]]:
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
    csv_path = export_dir / CSV_NAME
    rows = (
        [line.split(",") for line in csv_path.read_text().splitlines() if line.strip()]
        if csv_path.is_file()
        else []
    )
    return manifest, rows


def _read_results(export_dir: Path) -> tuple[dict[int, dict[str, Any]], list[str], list[str]]:
    """All instance records under ``verify/`` (last one wins), the files read, and conflicts."""
    records: dict[int, dict[str, Any]] = {}
    files = sorted((export_dir / VERIFY_DIR).glob("results_*.jsonl"))
    conflicts = []
    for f in files:
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
                inst = int(rec["instance"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill: that instance is simply re-run
            old = records.get(inst)
            if old is not None and {old["verdict"], rec["verdict"]} == {"safe", "unsafe"}:
                conflicts.append(
                    f"instance {inst} (test point {rec.get('index')}): α,β-CROWN said {old['verdict']} "
                    f"in one run and {rec['verdict']} in another"
                )
            if old is None or old["verdict"] == "error" or rec["verdict"] != "error":
                records[inst] = rec
    return records, [str(f) for f in files], conflicts


# --------------------------------------------------------------------------------------------
# Running α,β-CROWN
# --------------------------------------------------------------------------------------------


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


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
) -> tuple[str, float, int | None, bool, str]:
    """Run α,β-CROWN on one instance in its own process group.

    Returns:
        ``(verdict, seconds, returncode, killed, detail)`` with verdict ``safe`` / ``unsafe`` /
        ``timeout`` / ``error``.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    results_file = work_dir / "result.txt"
    log_path = work_dir / "abcrown.log"
    results_file.unlink(missing_ok=True)
    cmd = [
        python or os.environ.get("ABCROWN_PYTHON") or sys.executable,
        str(abcrown_dir / "abcrown.py"),
        "--config",
        str(config),
        "--onnx_path",
        str(onnx_path),
        "--vnnlib_path",
        str(vnnlib_path),
        "--results_file",
        str(results_file),
    ]
    if timeout_s is not None:
        cmd += ["--timeout", f"{float(timeout_s):g}"]
    cmd += list(extra_args)
    (work_dir / "command.txt").write_text(" ".join(shlex.quote(c) for c in cmd) + "\n")
    start = time.monotonic()
    killed = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=work_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc: int | None = proc.wait(timeout=hard_limit_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, killed = None, True
        except BaseException:
            _kill_group(proc)
            raise
    seconds = time.monotonic() - start
    if killed:
        return (
            "timeout",
            seconds,
            None,
            True,
            f"killed after the hard limit of {hard_limit_s:g} s; log {log_path}",
        )
    first = ""
    if results_file.is_file():
        lines = results_file.read_text().splitlines()
        first = lines[0].strip() if lines else ""
    if rc != 0:
        return "error", seconds, rc, False, f"α,β-CROWN exited with status {rc}; log {log_path}"
    verdict = {"unsat": "safe", "sat": "unsafe", "timeout": "timeout"}.get(first)
    if verdict is None:
        return "error", seconds, rc, False, f"unreadable result {first!r} in {results_file}; log {log_path}"
    return verdict, seconds, rc, False, ""


def _append_record(path: Path, rec: InstanceResult) -> None:
    line = json.dumps(asdict(rec)) + "\n"
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a line cut short by a kill: start a fresh one
                line = "\n" + line
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def run_verification(
    export_dir: str | os.PathLike,
    abcrown_dir: str | os.PathLike | None = None,
    shard: tuple[int, int] | str | None = None,
    timeout_s: float | None = None,
    grace_s: float | None = None,
    extra_args: Sequence[str] = (),
    retry_errors: bool = False,
    python: str | None = None,
) -> VerificationResult:
    """Verify every instance of an export directory not verified yet, then summarize.

    Args:
        export_dir: written by :func:`ccdist_plugin.export.export_instances`.
        abcrown_dir: α,β-CROWN's ``complete_verifier`` folder (default ``$ABCROWN_DIR``). When it
            is not found, the install steps are logged and the summary reports our own IBP/CROWN
            results with the branch-and-bound instances ``missing``.
        shard: ``(i, n)`` or ``"i/n"``: only the instances ``r`` with ``r % n == i``; the summary
            goes to ``verify/summary_shard_i_of_n.json`` (join shards with :func:`merge_shards`).
        timeout_s: α,β-CROWN's time limit per instance (default: the export's).
        grace_s: the hard wall-clock limit per process is ``timeout_s + grace_s`` (default
            ``max(60, timeout_s / 2)``): attack, model loading and root bounds are not bounded
            by α,β-CROWN's timeout.
        extra_args: more α,β-CROWN command-line options, e.g. ``["--device", "cpu"]``.
        retry_errors: run again the instances whose earlier result is ``error``.
    """
    export = Path(export_dir).resolve()
    manifest, rows = _load_export(export)
    shard_t = parse_shard(shard)
    try:
        abcrown = find_abcrown(abcrown_dir)
    except AbcrownNotFoundError as err:
        logger.error("%s", err)
        result = summarize(export, abcrown_ran=False, message=str(err))
        _write_summary(export, result, shard_t)
        return result

    timeout = float(timeout_s) if timeout_s is not None else float(manifest.get("timeout_s", 600.0))
    if timeout <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout}")
    hard_limit = timeout + (float(grace_s) if grace_s is not None else max(60.0, timeout / 2))
    verify_dir = export / VERIFY_DIR
    verify_dir.mkdir(exist_ok=True)
    shard_name = "all" if shard_t is None else f"shard_{shard_t[0]}_of_{shard_t[1]}"
    results_path = verify_dir / f"results_{shard_name}.jsonl"
    done, _, _ = _read_results(export)
    by_instance = {p["instance"]: p for p in manifest["points"] if p.get("instance") is not None}
    todo = []
    for r, row in enumerate(rows):
        if shard_t is not None and r % shard_t[1] != shard_t[0]:
            continue
        rec = done.get(r)
        if rec is not None and not (retry_errors and rec["verdict"] == "error"):
            continue
        todo.append((r, row))
    logger.info(
        "α,β-CROWN at %s: %d instances to run (%s), timeout %g s, hard limit %g s",
        abcrown,
        len(todo),
        shard_name,
        timeout,
        hard_limit,
    )
    config = export / CONFIG_NAME
    for r, row in todo:
        index = int(by_instance.get(r, {}).get("index", -1))
        verdict, seconds, rc, killed, detail = run_instance(
            abcrown,
            config,
            export / row[0],
            export / row[1],
            verify_dir / "work" / f"instance_{r:06d}",
            timeout_s=timeout,
            hard_limit_s=hard_limit,
            python=python,
            extra_args=extra_args,
        )
        if verdict == "error":
            logger.error("instance %d (test point %d): %s", r, index, detail)
        else:
            logger.info("instance %d (test point %d): %s in %.1f s", r, index, verdict, seconds)
        _append_record(
            results_path,
            InstanceResult(r, index, verdict, round(seconds, 3), rc, killed, detail, shard_name, time.time()),
        )
    result = summarize(export, abcrown_ran=True)
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


def merge_shards(export_dir: str | os.PathLike) -> VerificationResult:
    """Join the results of every shard under ``<export>/verify/`` into ``verification.json``.

    Instances with no result (e.g. a shard that died) are reported as ``missing``: not certified.
    Copy the ``verify/results_*.jsonl`` files of shards run elsewhere into this folder first.
    """
    export = Path(export_dir).resolve()
    result = summarize(export, abcrown_ran=True)
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
    export_dir: str | os.PathLike, abcrown_ran: bool = True, message: str = ""
) -> VerificationResult:
    """Combine the manifest's pre-filter outcomes with every α,β-CROWN result found, and check
    their consistency (see the module docstring)."""
    export = Path(export_dir).resolve()
    manifest, _ = _load_export(export)
    records, files, conflicts = _read_results(export)
    points = manifest["points"]
    total = len(points)
    methods = manifest.get("methods", [])
    counts = dict.fromkeys(
        ("misclassified", "pre-certified", "attacked", "safe", "unsafe", "timeout", "error", "missing"), 0
    )
    alarms = list(conflicts)
    cross: dict[str, int] = {}
    certified = 0
    missing: list[int] = []
    instances = []
    for p in points:
        outcome, inst = p["outcome"], p.get("instance")
        rec = records.get(inst) if inst is not None else None
        verdict = rec["verdict"] if rec is not None else None
        where = f"test point {p['index']} (label {p['label']}, instance {inst})"
        alarm = None
        if outcome == "pre-certified" and verdict == "unsafe":
            alarm = (
                f"{where}: certified by our {'/'.join(methods).upper()} bounds but α,β-CROWN found it unsafe"
            )
        elif outcome in ("attacked", "misclassified") and verdict == "safe":
            what = "PGD found a counterexample" if outcome == "attacked" else "the clean prediction is wrong"
            alarm = f"{where}: {what}, but α,β-CROWN proved it safe"
        elif outcome == "bab" and verdict == "safe" and p.get("pgd_broken"):
            alarm = f"{where}: PGD found a counterexample, but α,β-CROWN proved it safe"
        if alarm is not None:
            alarms.append(alarm)
        if outcome == "bab":
            category = verdict if verdict is not None else "missing"
            if verdict is None:
                missing.append(inst)
            is_certified = verdict == "safe" and alarm is None
        else:
            category = outcome
            is_certified = outcome == "pre-certified" and alarm is None
            if verdict is not None:
                key = f"{outcome}->{verdict}"
                cross[key] = cross.get(key, 0) + 1
        counts[category] += 1
        certified += int(is_certified)
        if rec is not None:
            instances.append({**rec, "outcome": outcome, "label": p["label"], "certified": is_certified})
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
    n = max(total, 1)

    def acc(key: str) -> float | None:
        return sum(bool(p.get(key)) for p in points) / n if key.split("_")[0] in methods else None

    broken = counts["misclassified"] + counts["attacked"] + counts["unsafe"]
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
        instances=sorted(instances, key=lambda r: r["instance"]),
        missing=sorted(missing),
        soundness_alarms=alarms,
        cross_checks=cross,
        time_per_instance_s=timing,
        results_files=files,
    )

"""Verdict records: what α,β-CROWN said about one instance, and what it is a verdict about.

Each verdict is one fsync'ed JSON line of ``<export>/verify/results_<shard>.jsonl``
(:func:`append_record`, an :class:`InstanceResult`). It carries the export id, the sha256 of the
ONNX model and of the VNN-LIB file that were verified, ε, the test index and the time budget;
:func:`read_results` keeps only the records that match the current manifest (:func:`load_manifest`,
which refuses an edited one) and lists the others with the reason. :func:`check_export` compares
the files on disk with the manifest before anything is run.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ccdist_plugin.fileio import file_sha256
from ccdist_plugin.verification.export import export_id_of
from ccdist_plugin.verification.writers import CSV_NAME, MANIFEST_NAME, ONNX_NAME

__all__ = [
    "VERIFY_DIR",
    "VERDICTS",
    "InstanceResult",
    "IntegrityReport",
    "check_export",
    "parse_shard",
    "load_manifest",
    "read_results",
    "append_record",
]

logger = logging.getLogger(__name__)

VERIFY_DIR = "verify"
VERDICTS = ("safe", "unsafe", "timeout", "error")


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


def shard_name(shard: tuple[int, int] | None) -> str:
    return "all" if shard is None else f"shard_{shard[0]}_of_{shard[1]}"


def load_manifest(export_dir: Path) -> dict[str, Any]:
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


def instance_points(manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(p["instance"]): p for p in manifest["points"] if p.get("instance") is not None}


def check_export(export_dir: str | os.PathLike) -> IntegrityReport:
    """Compare what α,β-CROWN would verify with what the manifest says was exported.

    Checks the sha256 of ``model.onnx`` (a mismatch excludes every instance), of each instance's
    VNN-LIB file, and that csv row ``r`` is ``model.onnx,<the manifest's VNN-LIB of instance r>,
    <timeout>``. An instance that fails is excluded (not run, never certified) with the reason.
    """
    export = Path(export_dir).resolve()
    manifest = load_manifest(export)
    by_instance = instance_points(manifest)
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


def read_results(
    export_dir: Path, manifest: dict[str, Any]
) -> tuple[dict[int, list[dict[str, Any]]], list[dict[str, Any]], list[str]]:
    """Every record under ``verify/`` that is about this export (per instance, all of them), the
    records ignored with the reason, and the files read."""
    points = instance_points(manifest)
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


def _write_verdict_bytes(fd: int, data: bytes) -> int:
    """The one write of a verdict line (a seam for the tests' full-disk fault)."""
    return os.write(fd, data)


def append_record(path: Path, rec: InstanceResult) -> None:
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

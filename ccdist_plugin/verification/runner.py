"""Run α,β-CROWN on an export directory: the instances of a shard, through a pool of workers.

**What is run.** Every instance of the export (``manifest.json`` → one VNN-LIB file and one row
of ``instances.csv``) is verified by α,β-CROWN, unmodified, in single-instance mode
(``--config <export>/abcrown.yaml --onnx_path … --vnnlib_path … --results_file … --timeout``).
By default (``mode="worker"``) a long-lived worker process imports α,β-CROWN once and takes the
instances one after the other (``ccdist_plugin/verification/abcrown_worker.py``);
``mode="process"`` starts one process per instance (:mod:`ccdist_plugin.verification.processes`).
Either way the verifier runs in its own process group, which is killed as a whole when an
instance outlives the hard limit (α,β-CROWN checks its own timeout only between
branch-and-bound rounds) and which kills itself when this process dies. A worker that dies or
hangs costs only the instance it was on: that instance is recorded (a crash is retried once in a
fresh single-instance process) and a new worker takes the next one.

**Verdicts.** The first line of α,β-CROWN's results file: ``unsat`` → ``safe`` (certified),
``sat`` → ``unsafe``, ``timeout`` → ``timeout``; a crash, a non-zero exit or an unreadable file →
``error``. Each verdict is appended as soon as it exists (:mod:`ccdist_plugin.verification.records`).
Runs are resumable (instances with a verdict are skipped) and shardable (``shard=(i, n)``: the
instances ``r`` with ``r % n == i``; :func:`~ccdist_plugin.verification.reports.merge_shards`
joins the files). Before running, :func:`~ccdist_plugin.verification.records.check_export`
compares the files with the manifest; an instance that does not match is not run. What counts:
:mod:`ccdist_plugin.verification.reports`.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccdist_plugin.fileio import file_sha256
from ccdist_plugin.install import INSTALL_HINT, locate_verifier
from ccdist_plugin.verification.processes import (
    PersistentVerifier,
    WorkerGone,
    abcrown_args,
    exit_status_outcome,
    kill_group,
    killed_outcome,
    read_verdict,
    run_instance,
    write_command,
)
from ccdist_plugin.verification.records import (
    VERIFY_DIR,
    InstanceResult,
    append_record,
    check_export,
    instance_points,
    load_manifest,
    parse_shard,
    read_results,
    shard_name,
)
from ccdist_plugin.verification.reports import VerificationResult, summarize, write_summary
from ccdist_plugin.verification.writers import CONFIG_NAME, ONNX_NAME

__all__ = [
    "MAX_WORKER_CRASHES",
    "AbcrownNotFoundError",
    "VerdictWriteError",
    "find_abcrown",
    "hard_limit_s",
    "run_verification",
]

logger = logging.getLogger(__name__)

#: A worker that crashes this many times in a row is replaced by one process per instance.
MAX_WORKER_CRASHES = 3


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
    #: an unexpected exception of a worker thread, re-raised by the main thread (a bug, not a fault)
    crashed: list[BaseException] = field(default_factory=list)
    #: every verifier process started, so that an interrupted run kills them at once
    processes: list[subprocess.Popen] = field(default_factory=list)

    def started(self, proc: subprocess.Popen) -> None:
        with self.write_lock:
            self.processes[:] = [p for p in self.processes if p.poll() is None] + [proc]


def _workers_phrase(workers: int, mode: str) -> str:
    """How a run verifies, for its log: ``"1 worker, α,β-CROWN loaded once per worker"``,
    ``"2 workers, one α,β-CROWN process per instance"``."""
    how = "α,β-CROWN loaded once per worker" if mode == "worker" else "one α,β-CROWN process per instance"
    return f"{workers} worker{'s' if workers != 1 else ''}, {how}"


def _run_one(
    job: _Job, r: int, point: dict[str, Any], verifier: PersistentVerifier | None, worker: str
) -> tuple[InstanceResult | None, bool]:
    """Verify instance ``r``; returns its record (None when the run was interrupted) and whether
    the persistent worker failed on it."""
    vnnlib = job.export / point["vnnlib"]
    # what is verified, hashed when it is verified: a file swapped during the run cannot borrow the
    # manifest's hash (the record would not match and would be ignored)
    vnnlib_sha, onnx_sha = file_sha256(vnnlib), file_sha256(job.onnx)
    work_dir = job.export / VERIFY_DIR / "work" / f"instance_{r:06d}"
    work_dir.mkdir(parents=True, exist_ok=True)
    outcome, attempts, worker_failed, mode = None, 1, False, "process"
    if verifier is not None:
        mode = "worker"
        try:
            outcome = _run_in_worker(job, vnnlib, work_dir, verifier)
        except WorkerGone as err:
            # the worker died on this instance: run it once more on its own to tell a bad
            # instance from a worker in a bad state
            logger.warning("instance %d: %s; retrying it in a fresh process", r, err)
            worker_failed, attempts = True, 2
    if outcome is None and worker_failed and job.stop.is_set():
        return None, worker_failed  # the run was interrupted: no verdict, the instance stays missing
    if outcome is None:
        mode = "process" if verifier is None else "worker+retry"
        outcome = run_instance(
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
    verdict, seconds, rc, killed, detail = outcome
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


def _run_in_worker(
    job: _Job, vnnlib: Path, work_dir: Path, verifier: PersistentVerifier
) -> tuple[str, float, int | None, bool, str]:
    """One instance on the persistent worker: ``(verdict, seconds, returncode, killed, detail)``,
    as :func:`run_instance` has it; raises :class:`WorkerGone` when the worker died on it."""
    results_file = work_dir / "result.txt"
    results_file.unlink(missing_ok=True)
    args = abcrown_args(job.config, job.onnx, vnnlib, results_file, job.budget_s, job.extra_args)
    write_command(work_dir, job.python, job.abcrown, args)
    log = work_dir / "abcrown.log"
    start = time.monotonic()
    status, code, killed, detail = verifier.run(args, work_dir, job.hard_limit)
    seconds = time.monotonic() - start
    if killed:
        return killed_outcome(seconds, job.hard_limit, log)
    if status == "ok" or (status == "exit" and code == 0):
        verdict, why = read_verdict(results_file, log)
        return verdict, seconds, None, False, why
    if status == "exit":
        return exit_status_outcome(seconds, code, log)
    why = detail.strip().splitlines()[-1] if detail.strip() else "?"
    return "error", seconds, None, False, f"α,β-CROWN raised: {why}"


def _worker_loop(job: _Job, tasks: queue.Queue, worker: str, persistent: bool) -> None:
    work_root = job.export / VERIFY_DIR / "work"
    verifier = (
        PersistentVerifier(job.abcrown, job.python, work_root, worker, job.started) if persistent else None
    )
    crashes, r, point = 0, None, None
    try:
        while not job.stop.is_set():
            try:
                r, point = tasks.get_nowait()
            except queue.Empty:
                return
            if verifier is not None and verifier.proc is None:
                try:
                    verifier.start()
                except WorkerGone as err:
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
                    append_record(job.results_path, rec)
                except OSError as err:
                    job.write_error.append(
                        f"could not write the verdict of instance {r} "
                        f"(test point {rec.index}: {rec.verdict}) to {job.results_path}: {err}. "
                        "The run stopped; that instance is not counted and a "
                        "resumed run verifies it again"
                    )
                    job.stop.set()
                    return
    except OSError as err:  # e.g. a full disk while the instance's files were written
        where = "" if r is None else f" at instance {r} (test point {point['index']})"
        with job.write_lock:
            job.write_error.append(
                f"verification stopped{where}: {err} (working files under {work_root}). Instances "
                "without a verdict are not counted; a resumed run verifies them"
            )
        job.stop.set()
    except Exception as err:  # noqa: BLE001  (handed to the main thread, which raises it)
        with job.write_lock:
            job.crashed.append(err)
        job.stop.set()
    finally:
        if verifier is not None:
            verifier.close()


# Over 80 lines only for its docstring (the public API's reference); the body is ~50 lines of
# named steps.
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
        export_dir: written by :func:`ccdist_plugin.verification.export.export_instances`.
        abcrown_dir: α,β-CROWN's ``complete_verifier`` folder (default ``$ABCROWN_DIR``). When it
            is not found, the install steps are logged and the summary reports our own IBP/CROWN
            results with the branch-and-bound instances ``missing``.
        shard: ``(i, n)`` or ``"i/n"``: only the instances ``r`` with ``r % n == i``; the summary
            goes to ``verify/summary_shard_i_of_n.json`` (join shards with
            :func:`~ccdist_plugin.verification.reports.merge_shards`).
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
    manifest = load_manifest(export)
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
        result = _summary_of_run(export, shard_t, budget, abcrown_ran=False, message=str(err))
        write_summary(export, result, shard_t)
        return result

    integrity = check_export(export)
    verify_dir = export / VERIFY_DIR
    verify_dir.mkdir(exist_ok=True)
    name = shard_name(shard_t)
    tasks = _instances_to_run(export, manifest, integrity.instances, shard_t, retry_errors)
    logger.info(
        "α,β-CROWN at %s: %d instances to run (%s, %s), budget %g s, hard limit %g s",
        abcrown,
        tasks.qsize(),
        name,
        _workers_phrase(int(workers), mode),
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
        shard_name=name,
        results_path=verify_dir / f"results_{name}.jsonl",
        mode=mode,
    )
    _run_pool(job, tasks, int(workers))
    result = _summary_of_run(export, shard_t, budget, abcrown_ran=True)
    if job.write_error:  # the error raised below says it; the summary keeps it too
        result.message = "\n".join([*job.write_error, result.message]).strip()
        try:
            write_summary(export, result, shard_t)
        except OSError as err:
            logger.error("the summary could not be written either: %s", err)
        raise VerdictWriteError(job.write_error[0], result)
    write_summary(export, result, shard_t)
    return result


def _summary_of_run(
    export: Path, shard: tuple[int, int] | None, budget_s: float, abcrown_ran: bool, message: str = ""
) -> VerificationResult:
    """The summary a run writes (marked partial when the run was one shard's)."""
    result = summarize(export, abcrown_ran=abcrown_ran, message=message, budget_s=budget_s)
    result.shard = None if shard is None else f"{shard[0]}/{shard[1]}"
    return result


def _instances_to_run(
    export: Path,
    manifest: dict[str, Any],
    runnable: list[int],
    shard: tuple[int, int] | None,
    retry_errors: bool,
) -> queue.Queue:
    """The queue of ``(instance, manifest point)`` of the shard that passed the integrity check and
    have no verdict yet (or only ``error`` ones, with ``retry_errors``)."""
    records, _, _ = read_results(export, manifest)
    points = instance_points(manifest)
    tasks: queue.Queue = queue.Queue()
    for r in runnable:
        if shard is not None and r % shard[1] != shard[0]:
            continue
        done = records.get(r, [])
        if done and not (retry_errors and all(rec["verdict"] == "error" for rec in done)):
            continue
        tasks.put((r, points[r]))
    return tasks


def _run_pool(job: _Job, tasks: queue.Queue, workers: int) -> None:
    """Verify the queued instances with ``workers`` threads, each driving one verifier; an
    interruption (or a worker thread's unexpected exception, raised here) kills every verifier."""
    threads = [
        threading.Thread(
            target=_worker_loop,
            args=(job, tasks, f"{job.shard_name}/w{k}", job.mode == "worker"),
            daemon=True,
        )
        for k in range(min(workers, max(tasks.qsize(), 1)))
    ]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
        if job.crashed:  # a worker thread failed unexpectedly: raised here, not printed by the thread
            raise job.crashed[0]
    except BaseException:
        job.stop.set()
        with job.write_lock:
            running = list(job.processes)
        for proc in running:  # interrupted: no verifier outlives the run
            kill_group(proc)
        for t in threads:
            t.join(5)
        raise

"""Run folders shared between invocations and processes: the settings a run records and when a later
invocation may reuse it (``settings.json``), and the lock a process takes on a run it trains."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ccdist_plugin.runlock import TRAINING_OUTPUTS, remove_run_outputs

from .jobs import Job

log = logging.getLogger("reproduce_cpu")

#: a run's recorded settings (see the module docstring)
SETTINGS_NAME = "settings.json"
#: ``Job`` fields that do not change what a run trains or reports: its folder's name, where the teacher file
#: is (its weights are compared instead), which splits are evaluated (a missing one is added to the kept
#: result) and the training device
UNRECORDED_FIELDS = ("name", "teacher", "evaluate_test", "evaluate_val", "device")
#: ``Job`` fields of the students that a teacher's run does not use
TEACHER_UNUSED_FIELDS = ("epochs", "alpha", "beta_w")
#: what this script writes in a run's folder: what ``--overwrite`` removes there before the run is retrained
RUN_OUTPUTS = (
    *TRAINING_OUTPUTS,  # the training run's own (``Trainer.fit``)
    SETTINGS_NAME,
    "train_time.json",
    "result.json",
    "bab",
    "bab.json",
)


#: what a user can do about a run folder whose recorded settings differ from this invocation's
OTHER_SETTINGS_CHOICES = (
    "Run with the settings it was trained with, choose another --out, or pass --overwrite to retrain the "
    "runs that differ"
)
#: ... and about a run whose outputs are incomplete
INCOMPLETE_CHOICES = (
    "Restore the file, choose another --out, or pass --overwrite to retrain the run (and the runs trained "
    "from it)"
)


class RunSettingsError(ValueError):
    """A run folder holds a run with other settings, or an incomplete one; nothing was changed."""


def job_settings(job: Job, teacher_sha256: str | None = None) -> dict[str, Any]:
    """What a run records and a later invocation compares (JSON values): the job without
    :data:`UNRECORDED_FIELDS`, and for CC-Dist the teacher's weights (``state_sha256``) when known."""
    settings = {k: v for k, v in dataclasses.asdict(job).items() if k not in UNRECORDED_FIELDS}
    if job.kind == "teacher":  # the students' settings, which a teacher does not use
        for key in TEACHER_UNUSED_FIELDS:
            settings.pop(key, None)
    if job.kind == "cc_dist" and teacher_sha256 is not None:
        settings["teacher_sha256"] = teacher_sha256
    return json.loads(json.dumps(settings))


def teacher_weights_sha256(job: Job, wait: bool = True) -> str | None:
    """The weights hash of a CC-Dist job's teacher (None for other jobs, or when ``wait`` is false and the
    teacher has not finished training). ``wait``: wait for a teacher that another process is training."""
    if job.kind != "cc_dist" or not job.teacher:
        return None
    run = Path(job.teacher).parent
    if wait:
        wait_for_run(run)
    elif not (run / "train_time.json").is_file():
        return None
    return weights_sha256(Path(job.teacher))


def weights_sha256(checkpoint: Path) -> str:
    """``state_sha256`` of a finished run's network (``RunSettingsError`` when its checkpoint is missing)."""
    if not checkpoint.is_file():
        raise RunSettingsError(
            f"{checkpoint.parent} has finished but its {checkpoint.name} is missing (deleted?); nothing was "
            f"changed. {INCOMPLETE_CHOICES}"
        )
    from ccdist_plugin.checkpoint import load_model, state_sha256

    with torch.random.fork_rng(devices=[]):  # building the network must not move this process's generator
        return state_sha256(load_model(checkpoint))


def _recorded_settings(out: Path) -> dict[str, Any] | None:
    """The settings a run folder records: ``settings.json``, or (runs from before it existed) the job in its
    ``result.json``; None when there is neither."""
    if (out / SETTINGS_NAME).is_file():
        return json.loads((out / SETTINGS_NAME).read_text())
    if (out / "result.json").is_file():
        result = json.loads((out / "result.json").read_text())
        job = result.get("job") or result.get("run") or {}  # reproduce_cpu's jobs, resnet_cpu's runs
        return {k: v for k, v in job.items() if k not in UNRECORDED_FIELDS}
    return None


def settings_differences(recorded: dict[str, Any], wanted: dict[str, Any], keys: Iterable[str]) -> list[str]:
    """Each of ``keys`` that both hold with different values, in words (``key: X there, Y now``)."""
    return [
        f"{key}: {recorded[key]!r} there, {wanted[key]!r} now"
        for key in keys
        if key in recorded and recorded[key] != wanted[key]
    ]


def run_folder_problem(out: Path, settings: dict[str, Any]) -> tuple[str, str] | None:
    """Why the run in ``out`` cannot be reused for ``settings`` (its settings differ, or its outputs are
    incomplete) and what the user can do, in words; None when it can (or the folder holds no run)."""
    recorded = _recorded_settings(out)
    if recorded is not None:
        differ = settings_differences(recorded, settings, settings)
        if differ:
            return f"holds a run with other settings ({'; '.join(differ)})", OTHER_SETTINGS_CHOICES
    finished = [n for n in ("result.json", "train_time.json") if (out / n).is_file()]
    if finished and not (out / "checkpoint.pt").is_file():
        return f"holds {finished[0]} but not the run's checkpoint.pt (deleted?)", INCOMPLETE_CHOICES
    return None


def check_run_folder(out: Path, settings: dict[str, Any], overwrite: bool, record: bool = True) -> None:
    """Before a job reuses or trains anything in ``out``: refuse a run there that cannot be reused
    (:class:`RunSettingsError`, one line), or with ``overwrite`` remove its outputs (:data:`RUN_OUTPUTS`);
    then (``record``) record ``settings``."""
    found = run_folder_problem(out, settings)
    if found is not None:
        problem, choices = found
        if not overwrite:
            raise RunSettingsError(f"{out} {problem}; nothing was changed. {choices}")
        remove_run_outputs(out, RUN_OUTPUTS)
        log.warning("--overwrite: %s %s; its outputs were removed, it is retrained", out, problem)
    if record:
        from ccdist_plugin.fileio import atomic_write_text

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / SETTINGS_NAME, json.dumps(settings, indent=1))


def preflight(jobs: list[Job], root: str, overwrite: bool) -> None:
    """Refuse, before anything starts, a stage whose runs cannot be reused (see :func:`check_run_folder`);
    a CC-Dist run's teacher is compared only when the teacher has finished training."""
    if overwrite:
        return
    for job in jobs:
        out = Path(root) / job.name
        check_run_folder(out, job_settings(job, teacher_weights_sha256(job, wait=False)), False, record=False)


def add_run_folder_options(parser: argparse.ArgumentParser) -> None:
    """The options of a script that keeps its runs in run folders: ``--overwrite`` and ``--debug``."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="retrain the runs whose recorded settings differ from this invocation's, or whose outputs are "
        "incomplete (without it such a run stops the script, exit 2); runs with the same settings are reused",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error instead of one line"
    )


def run_script(main: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    """``main(args)``; a setting or a run folder that cannot be used (``ValueError``, ``OSError``) ends
    the script with one line and exit 2 (with ``--debug``: the traceback)."""
    try:
        main(args)
    except (ValueError, OSError) as err:
        if args.debug:
            raise
        print(f"error: {err}  (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def wait_for_run(run_dir: Path, poll_s: float = 2.0) -> None:
    """Wait until the run in ``run_dir`` has finished training (another process may be training it)."""
    while not (run_dir / "train_time.json").is_file():
        time.sleep(poll_s)


def wait_or_lock(lock: Path, done: Path, poll_s: float = 20.0) -> None:
    """Take ``lock`` (another process of this script may be running the same job: then wait for
    ``done``). The lock names its process and host: a lock of a dead process on this host is stale at once
    (a killed run resumes without waiting); one from another host is stale after 3 hours without change."""
    me = f"{os.getpid()} {socket.gethostname()}"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, me.encode())
            os.close(fd)
            return
        except FileExistsError:
            if done.is_file():
                return
            if lock_is_stale(lock):
                lock.unlink(missing_ok=True)
                continue
            time.sleep(poll_s)


def lock_is_stale(lock: Path) -> bool:
    try:
        owner = lock.read_text().split()
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if len(owner) == 2 and owner[1] == socket.gethostname():
        try:
            os.kill(int(owner[0]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            pass
        return False
    return age > 3 * 3600  # an old-format lock or another host's

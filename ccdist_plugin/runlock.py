"""A run owns its output folder: an advisory lock held for the whole of ``Trainer.fit``.

Two runs writing into one folder would overwrite each other's checkpoint while both report
success. The first run holds ``<folder>/.ccdist.lock`` (an ``fcntl.flock`` on that file, which the
operating system releases when the process ends, however it ends) and records its pid, host and
command line in it; a second run refuses with a :class:`RunFolderLockedError` that names them.

A lock file left behind by a crashed run (kill -9, power loss) is not held by any process, so the
next run simply takes it over: stale locks need no manual clean-up. Where ``fcntl`` is missing
(Windows), the recorded pid is checked instead.

Holding the lock also makes every temporary file of an interrupted atomic write in the folder
(``.checkpoint.pt.<random>.tmp``, ...) stale: they are removed when the lock is taken.

The lock guards runs at the same time; :func:`claim_output_folder` guards the results of an earlier
run. Every command that writes results (``ccdist train``, ``train-teacher``, ``eval``, ``sweep``,
``demo``) asks it first: a folder holding what an earlier run wrote (a checkpoint, finished or not;
an ``eval.json``; a sweep's runs) is refused with a :class:`RunExistsError` naming what was found
and the choices (``--resume`` where the command can continue, another folder, ``--overwrite``).
``--overwrite`` removes the earlier run's own outputs (the files the command writes, listed by the
command) before the new run starts, and nothing else in the folder.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_NAME",
    "RunFolderLockedError",
    "run_folder_lock",
    "prepare_output_folder",
    "RunExistsError",
    "TRAINING_OUTPUTS",
    "describe_earlier_run",
    "remove_run_outputs",
    "claim_output_folder",
]

log = logging.getLogger(__name__)

LOCK_NAME = ".ccdist.lock"


class RunFolderLockedError(ValueError):
    """Another live process holds the run folder."""


class RunExistsError(ValueError):
    """The output folder holds an earlier run's results and the command was told neither to
    continue it (``--resume``) nor to replace it (``--overwrite``); nothing was changed."""


#: what a training run writes into its folder (``Trainer.fit``): what ``--overwrite`` removes there
TRAINING_OUTPUTS = (
    "checkpoint.pt",
    "config.yaml",
    "metrics.csv",
    "metrics.jsonl",
    "curves.png",
    "tensorboard",
)


def prepare_output_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and parents) and check it is a writable folder; ``ValueError`` saying what
    is wrong otherwise (a file in the way, no write permission)."""
    folder = Path(folder)
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"output folder {str(folder)!r} cannot be created: {str(parent)!r} is a file")
        if parent.exists():
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"output folder {str(folder)!r} cannot be created: {err.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {str(folder)!r} is not writable (check its permissions)")
    return folder


def _holder_text(info: dict) -> str:
    pid, host = info.get("pid", "?"), info.get("hostname", "?")
    command = info.get("command") or "?"
    started = info.get("started", "?")
    return f"pid {pid} on {host} (since {started}): {command}"


def _read_info(path: Path) -> dict:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporary files of interrupted atomic writes (see ``fileio.atomic_write``): ``.<name>.<x>.tmp``."""
    removed = []
    for tmp in folder.glob(".*.tmp"):
        if tmp.is_file():
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp.name)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted write in %s", len(removed), folder)


@contextlib.contextmanager
def run_folder_lock(folder: str | os.PathLike, command: str | None = None) -> Iterator[Path]:
    """Hold ``<folder>/.ccdist.lock`` for the duration of the ``with`` block.

    Creates the folder (see :func:`prepare_output_folder`) and removes stale temporary files in it.
    Raises :class:`RunFolderLockedError` when a live process already holds it.
    """
    folder = prepare_output_folder(folder)
    path = folder / LOCK_NAME
    info = {
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "command": command if command is not None else shlex.join(sys.argv),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    fd = _acquire(path, folder)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        _remove_stale_temporaries(folder)
        yield folder
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # before unlocking: a waiting process then finds a fresh file
        os.close(fd)


def _acquire(path: Path, folder: Path) -> int:
    for _ in range(10):  # the file may be replaced between open and lock; retry then
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        flocked = False
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise _locked(folder, _read_info(path)) from None
                # a file system without flock (some network mounts): fall back to the recorded pid
                log.warning("%s: file locking unsupported (%s); checking the recorded pid", path, err)
        if not flocked:  # a recorded pid on this host that is alive, or any on another host, holds it
            holder = _read_info(path)
            pid = holder.get("pid")
            here = holder.get("hostname") == socket.gethostname()
            if isinstance(pid, int) and pid != os.getpid() and (not here or _pid_alive(pid)):
                os.close(fd)
                hint = "" if here else f" (if that run has ended, delete {path})"
                raise RunFolderLockedError(str(_locked(folder, holder)) + hint)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            previous = _read_info(path)
            if previous.get("pid") is not None:
                log.info("taking over the lock of an ended run in %s (%s)", folder, _holder_text(previous))
            return fd
        os.close(fd)
    raise RunFolderLockedError(f"run folder {str(folder)!r}: could not take {LOCK_NAME} (it keeps changing)")


def _locked(folder: Path, holder: dict) -> RunFolderLockedError:
    return RunFolderLockedError(
        f"run folder {str(folder)!r} is in use by another run, {_holder_text(holder)}. "
        "Wait for it to finish, or choose another --output-dir"
    )


# ------------------------------------------------------------------------------ earlier runs


def describe_earlier_run(folder: str | os.PathLike, markers: tuple[str, ...]) -> str | None:
    """What an earlier run left in ``folder``, in words, or None.

    ``markers`` are glob patterns relative to ``folder`` whose matches mean "a run was here" (e.g.
    ``checkpoint.pt``, ``eval.json``, ``*/seed*/checkpoint.pt``). A checkpoint is described by its
    progress (finished, or stopped after k of n epochs); the first two matches are named, the rest
    counted.
    """
    from ccdist_plugin.checkpoint import describe_checkpoint

    folder = Path(folder)
    if not folder.is_dir():
        return None
    found: list[Path] = []
    for pattern in markers:
        found += sorted(p for p in folder.glob(pattern) if p not in found)
    if not found:
        return None
    words = []
    for path in found[:2]:
        rel = path.relative_to(folder)
        text = describe_checkpoint(path) if path.suffix == ".pt" else path.name
        words.append(text.replace(path.name, str(rel), 1))
    more = f" and {len(found) - 2} more" if len(found) > 2 else ""
    return ", ".join(words) + more


def remove_run_outputs(folder: str | os.PathLike, outputs: tuple[str, ...]) -> list[Path]:
    """Remove what matches ``outputs`` (glob patterns relative to ``folder``: a run's own files and
    folders) and nothing else; returns what was removed."""
    import shutil

    folder = Path(folder)
    removed = []
    for pattern in outputs:
        for path in sorted(folder.glob(pattern)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            else:
                continue
            removed.append(path)
    return removed


def claim_output_folder(
    folder: str | os.PathLike,
    markers: tuple[str, ...],
    outputs: tuple[str, ...],
    *,
    overwrite: bool,
    resume_option: str | None = "--resume",
    folder_option: str = "--output-dir",
    what: str = "run",
) -> list[Path]:
    """Before a new run writes into ``folder``: refuse, or with ``overwrite`` clear, an earlier run.

    Args:
        markers: glob patterns whose matches mean an earlier run is there (see
            :func:`describe_earlier_run`).
        outputs: glob patterns of everything the command writes; with ``overwrite`` these (and only
            these) are removed before the new run starts.
        overwrite: replace an earlier run (``--overwrite``) instead of refusing.
        resume_option: how this command continues an earlier run (None: it cannot).
        folder_option: how this command is given another folder.
        what: what the command writes, for the message ("run", "evaluation", "sweep", "demo").

    Returns the paths removed (empty when the folder held no earlier run).

    Raises:
        RunExistsError: the folder holds an earlier run and ``overwrite`` is false (one line naming
            the run found and the choices; nothing was changed).
    """
    found = describe_earlier_run(folder, markers)
    if found is None:
        return []
    if not overwrite:
        choices = [f"{resume_option} to continue it"] if resume_option else []
        choices += [f"another {folder_option} to keep it", "--overwrite to replace it"]
        raise RunExistsError(
            f"{str(folder)!r} already holds an earlier {what}: {found}; nothing was changed. "
            f"Pass {', '.join(choices[:-1])}, or {choices[-1]}"
        )
    removed = remove_run_outputs(folder, outputs)
    log.warning("--overwrite: removed the earlier %s in %s (%s)", what, folder, found)
    return removed

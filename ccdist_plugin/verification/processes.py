"""α,β-CROWN in processes of its own: one process per instance (:func:`run_instance`), or a
long-lived worker that imports α,β-CROWN once and takes instances one after the other
(:class:`PersistentVerifier`). Both run ``abcrown_worker.py`` (this folder; the standard library
only) in a new process group, killed as a whole when an instance outlives its hard limit and by
itself when this process dies.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "WORKER_SCRIPT",
    "WORKER_START_LIMIT_S",
    "WorkerGone",
    "PersistentVerifier",
    "run_instance",
    "abcrown_args",
    "read_verdict",
    "write_command",
    "killed_outcome",
    "exit_status_outcome",
    "kill_group",
    "verifier_python",
]

logger = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).resolve().parent / "abcrown_worker.py"
#: Seconds a worker may take to import α,β-CROWN (torch, auto_LiRPA) before it counts as failed.
WORKER_START_LIMIT_S = 600.0


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def verifier_python(python: str | None) -> str:
    return python or os.environ.get("ABCROWN_PYTHON") or sys.executable


def abcrown_args(
    config: Path, onnx_path: Path, vnnlib_path: Path, results_file: Path, timeout_s: float | None, extra_args
) -> list[str]:
    args = ["--config", str(config), "--onnx_path", str(onnx_path), "--vnnlib_path", str(vnnlib_path)]
    args += ["--results_file", str(results_file)]
    if timeout_s is not None:
        args += ["--timeout", f"{float(timeout_s):g}"]
    return args + list(extra_args)


def read_verdict(results_file: Path, log_path: Path) -> tuple[str, str]:
    first = ""
    if results_file.is_file():
        lines = results_file.read_text(errors="replace").splitlines()
        first = lines[0].strip() if lines else ""
    verdict = {"unsat": "safe", "sat": "unsafe", "timeout": "timeout"}.get(first)
    if verdict is None:
        return "error", f"unreadable result {first!r} in {results_file}; log {log_path}"
    return verdict, ""


def write_command(work_dir: Path, python: str | None, abcrown_dir: Path, args: Sequence[str]) -> None:
    """Record in ``work_dir/command.txt`` the α,β-CROWN command line an instance amounts to (what a
    user runs by hand to reproduce it), however it is actually run."""
    shown = [verifier_python(python), str(Path(abcrown_dir) / "abcrown.py"), *args]
    (work_dir / "command.txt").write_text(" ".join(shlex.quote(c) for c in shown) + "\n")


def killed_outcome(seconds: float, hard_limit_s: float, log_path: Path) -> tuple[str, float, None, bool, str]:
    """The ``(verdict, seconds, returncode, killed, detail)`` of an instance killed at its hard limit."""
    return (
        "timeout",
        seconds,
        None,
        True,
        f"killed after the hard limit of {hard_limit_s:g} s; log {log_path}",
    )


def exit_status_outcome(seconds: float, returncode: int, log_path: Path) -> tuple[str, float, int, bool, str]:
    """The ``(verdict, seconds, returncode, killed, detail)`` of an α,β-CROWN run that exited with a
    non-zero status."""
    return "error", seconds, returncode, False, f"α,β-CROWN exited with status {returncode}; log {log_path}"


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
    args = abcrown_args(config, onnx_path, vnnlib_path, results_file, timeout_s, extra_args)
    cmd = [verifier_python(python), str(WORKER_SCRIPT), str(abcrown_dir), "--once", *args]
    write_command(work_dir, python, abcrown_dir, args)
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
            kill_group(proc)
            rc, killed = None, True
        except BaseException:
            kill_group(proc)
            raise
        else:
            kill_group(proc)  # whatever α,β-CROWN left running in its group (e.g. MIP solvers)
    seconds = time.monotonic() - start
    if killed:
        return killed_outcome(seconds, hard_limit_s, log_path)
    if rc != 0:
        return exit_status_outcome(seconds, rc, log_path)
    verdict, detail = read_verdict(results_file, log_path)
    return verdict, seconds, rc, False, detail


class WorkerGone(RuntimeError):
    """The persistent worker could not start, or died."""


class PersistentVerifier:
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
        """One line from the worker, or None when ``limit_s`` passed; raises WorkerGone on EOF."""
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
                    raise WorkerGone(f"worker {self.name} exited (status {self.proc.wait()})")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def start(self) -> None:
        self.work_root.mkdir(parents=True, exist_ok=True)
        log = self.work_root / f"worker_{self.name.replace('/', '_')}.log"
        env = {**os.environ, "CCDIST_WORKER_LOG": str(log)}
        self.proc = subprocess.Popen(
            [verifier_python(self.python), str(WORKER_SCRIPT), str(self.abcrown_dir), "--serve"],
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
        except WorkerGone as err:
            self.close()
            raise WorkerGone(f"{err}; log {log}") from None
        hello = json.loads(line) if line else {}
        if not hello.get("ready"):
            self.close()
            detail = str(hello.get("detail", "")).strip().splitlines()
            why = "it did not start in time" if line is None else (detail[-1] if detail else "no reason")
            raise WorkerGone(f"worker {self.name} could not import α,β-CROWN: {why}; log {log}")
        logger.info("verifier worker %s ready (α,β-CROWN imported in %.1f s)", self.name, hello["import_s"])

    def run(self, args: list[str], work_dir: Path, limit_s: float) -> tuple[str, int | None, bool, str]:
        """``(status, code, killed, detail)``; raises WorkerGone when the worker died on it."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        request = {"args": args, "cwd": str(work_dir), "log": str(work_dir / "abcrown.log")}
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.close()
            raise WorkerGone(f"worker {self.name} is gone") from None
        try:
            line = self._read_line(limit_s)
        except WorkerGone:
            self.close()
            raise
        if line is None:  # hung past the hard limit: the whole group goes, a new worker takes the next one
            self.close()
            return "killed", None, True, ""
        answer = json.loads(line)
        return answer["status"], answer.get("code"), False, answer.get("detail", "")

    def close(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    pipe.close()
            self.proc = None

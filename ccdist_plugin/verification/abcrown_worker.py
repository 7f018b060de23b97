"""Run α,β-CROWN (unmodified) for :mod:`ccdist_plugin.verification.runner`, in one of two ways.

``python abcrown_worker.py ABCROWN_DIR --once ARGS…``
    One instance, exactly as ``python ABCROWN_DIR/abcrown.py ARGS…`` would run it.

``python abcrown_worker.py ABCROWN_DIR --serve``
    A long-lived worker: imports α,β-CROWN once, then reads one JSON request a line on stdin
    (``{"args": [...], "cwd": DIR, "log": FILE}``), runs ``abcrown.ABCROWN(args).main()`` with
    its output sent to ``log``, and answers one JSON line on stdout (``{"status": "ok"}``,
    ``{"status": "exit", "code": N}`` or ``{"status": "exception", "detail": …}``). The first
    line it writes is ``{"ready": true, …}`` once the import is done. α,β-CROWN re-reads its
    whole configuration from its defaults for every ``ABCROWN(args)``, so one instance's
    command-line options do not leak into the next.

In both modes the script is the leader of its own process group (the caller starts it with
``start_new_session``) and a watchdog thread kills that whole group (α,β-CROWN's own children
included) as soon as the process that started it is gone: a verification killed with SIGKILL
leaves no verifier running beside its retry.

The script uses the standard library only, so it runs under whichever interpreter has
α,β-CROWN installed (``$ABCROWN_PYTHON``), with or without this package. It is run by path;
its own folder (the package's ``verification/``, whose module names such as ``export`` or
``reports`` are common words) is taken off ``sys.path`` so that no module of α,β-CROWN or of its
dependencies imports one of them by mistake.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import threading
import time
import traceback

WATCH_INTERVAL_S = 0.5


def _watch_parent(parent: int) -> None:
    """Kill our process group when the process that started us has gone (we were re-parented)."""
    while True:
        time.sleep(WATCH_INTERVAL_S)
        if os.getppid() != parent:
            try:
                os.killpg(os.getpgid(0), signal.SIGKILL)
            finally:
                os._exit(137)


def _start_watchdog() -> None:
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True, name="parent-watch").start()


def _redirect_output(path: str) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _once(abcrown_dir: str, args: list[str]) -> None:
    script = os.path.join(abcrown_dir, "abcrown.py")
    sys.path.insert(0, abcrown_dir)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


def _serve(abcrown_dir: str) -> None:
    # Replies go to a private copy of the original stdout: α,β-CROWN prints freely on fd 1.
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    worker_log = os.environ.get("CCDIST_WORKER_LOG", os.devnull)
    _redirect_output(worker_log)
    sys.path.insert(0, abcrown_dir)
    start = time.monotonic()
    try:
        import abcrown  # noqa: PLC0415  (α,β-CROWN's entry module, from ABCROWN_DIR)

        entry = abcrown.ABCROWN
    except BaseException:  # noqa: BLE001  (any import failure is reported, then we exit)
        reply.write(json.dumps({"ready": False, "detail": traceback.format_exc()[-2000:]}) + "\n")
        sys.exit(1)
    reply.write(json.dumps({"ready": True, "import_s": time.monotonic() - start, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        _redirect_output(request["log"])
        os.chdir(request["cwd"])
        answer: dict = {"status": "ok"}
        try:
            entry(args=list(request["args"])).main()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            answer = {"status": "exit", "code": code}
        except BaseException:  # noqa: BLE001  (reported to the caller as this instance's error)
            answer = {"status": "exception", "detail": traceback.format_exc()[-2000:]}
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        _redirect_output(worker_log)
        reply.write(json.dumps(answer) + "\n")


def _forget_own_folder() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]


def main(argv: list[str]) -> None:
    _forget_own_folder()
    if len(argv) < 2 or argv[1] not in ("--once", "--serve"):
        sys.exit("usage: abcrown_worker.py ABCROWN_DIR (--serve | --once ARGS...)")
    _start_watchdog()
    if argv[1] == "--once":
        _once(argv[0], argv[2:])
    else:
        _serve(argv[0])


if __name__ == "__main__":
    main(sys.argv[1:])

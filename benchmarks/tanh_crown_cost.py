"""Full CROWN on a tanh CNN-7 at 32×32 (appendix E.8's network, narrowed): native against auto_LiRPA.

One point at a time, the two backends interleaved (their order alternating from point to point), on
one thread in float64; wall and CPU seconds per point side by side (the CPU time is what a shared,
loaded machine does not inflate), the 1-minute load average before and after each call, and the
largest relative difference of the margin lower bounds::

    python benchmarks/tanh_crown_cost.py --channels 4,4,8,8,8 --width 32 --points 3 --out docs/results

With ``--out DIR`` it writes ``DIR/NAME.json`` and the table ``DIR/NAME.md`` (``--name``, by default
``tanh_crown``; ``benchmarks/make_results.py`` puts them into docs/RESULTS.md).

``--auto-lirpa-timeout S`` runs each auto_LiRPA call in a fresh process and stops it after S seconds
of wall time (counted from the start of the call, after the imports and the network's construction):
such a point is reported as a budget hit with the CPU and wall seconds it had spent, not dropped, and
the process's peak resident memory is reported either way. ``--backends native`` times the native
CROWN alone; the peak resident memory of this process is then the native CROWN's.

The network is untrained (the cost of a bound depends on the shapes only; BatchNorm statistics come
from a batch of random images). The bounds differ by the tangent points of the tanh relaxation:
auto_LiRPA reads them off a 0.01 grid, the native CROWN solves for them
(``ccdist_plugin.bounds.relaxations.tanh_relaxation``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ccdist_plugin.bounds import crown_margin_lower_bound
from ccdist_plugin.models import cnn7

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crown_cost import _timed  # noqa: E402  (wall and CPU seconds of one call)

BACKENDS = {"native": "native", "auto_LiRPA": "auto_lirpa"}


def _load() -> float:
    """The 1-minute load average (two decimals)."""
    return round(os.getloadavg()[0], 2)


def _problem(args: argparse.Namespace):
    """The network and the points (the same in every process: everything is seeded)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    channels = [int(c) for c in args.channels.split(",")]
    model = cnn7(3, 32, 10, width=args.width, channels=channels, activation="tanh").double()
    with torch.no_grad():
        model.train()(torch.rand(64, 3, 32, 32, dtype=torch.float64))
    model.eval()
    x = torch.rand(args.points, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (args.points,))
    return channels, model, x, y


def _bound(args: argparse.Namespace, model, x, y, name: str, i: int) -> torch.Tensor:
    return crown_margin_lower_bound(
        model, x[i : i + 1], y[i : i + 1], args.eps, intermediate="crown", backend=BACKENDS[name]
    )


class _PrintLog(logging.Handler):
    """Each log record as a json line on stdout, at once: the parent keeps them if it stops the child."""

    def emit(self, record: logging.LogRecord) -> None:
        print(json.dumps({"log": record.getMessage()}), flush=True)


def _child(args: argparse.Namespace) -> None:
    """One call in this (fresh) process: a line when the call starts, then its result as json."""
    _, model, x, y = _problem(args)
    # the backend logs (INFO) when auto_LiRPA's patches mode fails and it falls back to the dense matrices
    crown_log = logging.getLogger("ccdist_plugin.bounds.crown")
    crown_log.setLevel(logging.INFO)
    crown_log.addHandler(_PrintLog())
    print(json.dumps({"started_cpu_s": time.process_time()}), flush=True)
    wall, cpu, lb = _timed(lambda: _bound(args, model, x, y, args.child, args.child_point))
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "lb": lb.tolist()}), flush=True)


def _rss_mib(pid: int) -> float | None:
    """The resident memory of process ``pid`` now (Linux's /proc; None where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _in_child(args: argparse.Namespace, name: str, i: int) -> dict[str, Any]:
    """One call in a fresh process, stopped after ``--auto-lirpa-timeout`` wall seconds of the call or
    when its resident memory passes ``--auto-lirpa-memory-mib`` (checked every 0.2 s: a shared machine
    must not reach its out-of-memory killer)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-point", str(i)]
    cmd += ["--channels", args.channels, "--width", str(args.width), "--points", str(args.points)]
    cmd += ["--eps", repr(args.eps)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    started = json.loads(proc.stdout.readline() or "{}")
    t0 = time.perf_counter()
    stopped: list[str] = []
    finished = threading.Event()

    def watch() -> None:
        while not finished.wait(0.2):
            if args.auto_lirpa_timeout is not None and time.perf_counter() - t0 > args.auto_lirpa_timeout:
                stopped.append("time")
            rss = _rss_mib(proc.pid)
            if (
                args.auto_lirpa_memory_mib is not None
                and rss is not None
                and rss > args.auto_lirpa_memory_mib
            ):
                stopped.append("memory")
            if stopped:
                proc.kill()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rest = proc.stdout.read()  # until the child exits (or is killed)
    wall = time.perf_counter() - t0
    finished.set()
    watcher.join()  # before the reaping, so that the watcher never signals a reused process id
    # wait4 reaps the child with its resource usage: CPU time and peak memory even when it was killed
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak_mib = round(usage.ru_maxrss / 1024)
    if "started_cpu_s" not in started:
        raise RuntimeError(
            f"{name} on point {i}: the child process failed before the call (exit {proc.returncode})"
        )
    cpu = usage.ru_utime + usage.ru_stime - started["started_cpu_s"]
    run: dict[str, Any] = {"finished": False, "wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak_mib}
    lines = [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
    if any("log" in line for line in lines):
        run["log"] = [line["log"] for line in lines if "log" in line]
    done = next((line for line in lines if "lb" in line), None)
    if proc.returncode == 0 and done is not None:  # done, even if the watcher fired as it exited
        run.update(finished=True, wall_s=done["wall_s"], cpu_s=done["cpu_s"])
        run["lb"] = torch.tensor(done["lb"], dtype=torch.float64)
    elif stopped:
        run["stopped_by"] = stopped[0]
    elif proc.returncode < 0:  # a signal from elsewhere: the kernel's out-of-memory killer, say
        run["stopped_by"] = f"signal {-proc.returncode}"
    else:
        raise RuntimeError(f"{name} on point {i}: the child process failed (exit {proc.returncode})")
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", default="4,4,8,8,8", help="the five convolution widths")
    ap.add_argument("--width", type=int, default=32, help="the dense layer's width")
    ap.add_argument("--points", type=int, default=3)
    ap.add_argument("--eps", type=float, default=2 / 255)
    ap.add_argument("--backends", default="native,auto_LiRPA", help="comma-separated: native, auto_LiRPA")
    ap.add_argument(
        "--auto-lirpa-timeout",
        type=float,
        default=None,
        metavar="S",
        help="run each auto_LiRPA call in a fresh process, stopped after S wall seconds (a budget hit)",
    )
    ap.add_argument(
        "--auto-lirpa-memory-mib",
        type=float,
        default=None,
        metavar="M",
        help="run each auto_LiRPA call in a fresh process, stopped when its resident memory passes M MiB",
    )
    ap.add_argument("--out", default=None, help="folder for NAME.{json,md}")
    ap.add_argument("--name", default="tanh_crown", help="file name stem of the outputs")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite OUT/NAME.md from OUT/NAME.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-point", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.markdown_only:
        out = Path(args.out or ".")
        (out / f"{args.name}.md").write_text(_markdown(json.loads((out / f"{args.name}.json").read_text())))
        return
    warnings.simplefilter("ignore")  # auto_LiRPA's tracing warnings
    if args.child is not None:
        _child(args)
        return
    names = [n.strip() for n in args.backends.split(",")]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        ap.error(f"--backends takes native and/or auto_LiRPA, got {args.backends!r}")
    in_child = args.auto_lirpa_timeout is not None or args.auto_lirpa_memory_mib is not None
    channels, model, x, y = _problem(args)
    per_point = []
    for i in range(args.points):
        order = names if i % 2 == 0 else names[::-1]
        done: dict[str, dict[str, Any]] = {}
        for name in order:
            before = _load()
            if name == "auto_LiRPA" and in_child:
                run = _in_child(args, name, i)
            else:
                wall, cpu, lb = _timed(lambda name=name, i=i: _bound(args, model, x, y, name, i))
                run = {"finished": True, "wall_s": wall, "cpu_s": cpu, "lb": lb}
            run["load_1min"] = [before, _load()]
            done[name] = run
        point: dict[str, Any] = {
            "wall_s": {k: round(v["wall_s"], 2) for k, v in done.items()},
            "cpu_s": {k: round(v["cpu_s"], 2) for k, v in done.items()},
            "finished": {k: v["finished"] for k, v in done.items()},
            "stopped_by": {k: v["stopped_by"] for k, v in done.items() if "stopped_by" in v},
            "log": {k: v["log"] for k, v in done.items() if "log" in v},
            "load_1min_before_after": {k: v["load_1min"] for k, v in done.items()},
        }
        point["peak_rss_mib"] = {k: v["peak_rss_mib"] for k, v in done.items() if "peak_rss_mib" in v}
        both = all(n in done and done[n]["finished"] for n in BACKENDS)
        if both:
            ours, theirs = done["native"]["lb"], done["auto_LiRPA"]["lb"]
            off = torch.arange(10) != y[i]
            rel = ((ours - theirs).abs() / theirs.abs())[:, off].max()
            point["max_rel_diff"] = float(f"{float(rel):.3g}")
            point["native_minus_auto_lirpa_mean"] = float(f"{float((ours - theirs)[:, off].mean()):.3g}")
        per_point.append(point)
        print(json.dumps({"point": i, **point}), flush=True)

    def per(key: str, name: str) -> float | None:
        """Mean over the points where ``name`` finished (None if it finished on none)."""
        vals = [p[key][name] for p in per_point if p["finished"][name]]
        return round(sum(vals) / len(vals), 2) if vals else None

    summary: dict[str, Any] = {
        "command": "python benchmarks/tanh_crown_cost.py " + " ".join(sys.argv[1:]),
        "channels": channels,
        "width": args.width,
        "eps": args.eps,
        "points": args.points,
        "backends": names,
        "auto_lirpa_timeout_s": args.auto_lirpa_timeout,
        "auto_lirpa_memory_cap_mib": args.auto_lirpa_memory_mib,
        "budget_hits": {n: sum(not p["finished"][n] for p in per_point) for n in names},
        "wall_s_per_point": {n: per("wall_s", n) for n in names},
        "cpu_s_per_point": {n: per("cpu_s", n) for n in names},
        # this process's peak: the native CROWN's own when auto_LiRPA ran in child processes or not at all
        "process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "native_alone_in_process": "auto_LiRPA" not in names or in_child,
        "torch": torch.__version__,
        "per_point": per_point,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    diffs = [p["max_rel_diff"] for p in per_point if "max_rel_diff" in p]
    summary["max_rel_diff"] = max(diffs) if diffs else None
    if len(names) == 2:
        cpu = {n: sum(p["cpu_s"][n] for p in per_point) for n in names}
        ratio = cpu["native"] / cpu["auto_LiRPA"]
        # with a budget hit, auto_LiRPA's CPU seconds at the budget bound its cost from below, so the
        # ratio is an upper bound
        exact = not summary["budget_hits"]["auto_LiRPA"]
        summary["cpu_ratio_native_over_auto_lirpa" + ("" if exact else "_at_most")] = round(ratio, 3)
    print(json.dumps(summary, indent=1))
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.json").write_text(json.dumps(summary, indent=1) + "\n")
        (out / f"{args.name}.md").write_text(_markdown(summary))


def _markdown(summary: dict) -> str:
    """The table of docs/RESULTS.md's tanh section (figures from ``summary`` only)."""
    points = summary["per_point"]
    names = summary.get("backends", ["native", "auto_LiRPA"])
    timeout = summary.get("auto_lirpa_timeout_s")
    cap = summary.get("auto_lirpa_memory_cap_mib")
    title = {"native": "native full CROWN", "auto_LiRPA": "auto_LiRPA full CROWN"}

    def cell(p: dict, key: str, name: str) -> str:
        if p.get("finished", {}).get(name, True):  # results written before budgets existed finished
            return f"{p[key][name]:.2f}"
        why = p.get("stopped_by", {}).get(name, "time")
        if why == "time":
            why = f"did not finish within {timeout:g} s"
        elif why == "memory":
            why = f"stopped at the {cap:g} MiB memory cap"
        else:
            why = f"killed by {why}"
        return f"{why} ({p[key][name]:.1f} s spent)"

    def each(key: str, name: str) -> str:
        return ", ".join(cell(p, key, name) for p in points)

    def loads(name: str) -> str:
        return ", ".join("{:.1f}/{:.1f}".format(*p["load_1min_before_after"][name]) for p in points)

    recorded = all("load_1min_before_after" in p for p in points)
    if recorded:
        everything = [a for p in points for pair in p["load_1min_before_after"].values() for a in pair]
    else:  # results written before the load was read around each call: one reading per point
        everything = [p["load_average"][0] for p in points]
    setting = (
        f"An untrained tanh CNN-7 at 32×32 (channels {','.join(map(str, summary['channels']))}, width "
        f"{summary['width']}), ε = {summary['eps']:.4g}, float64, one thread"
    )
    if len(names) == 2:
        setting += "; the two backends alternate per point"
    limits = []
    if timeout is not None:
        limits.append(f"after {timeout:g} s of wall time")
    if cap is not None:
        limits.append(f"when its resident memory passes {cap:g} MiB")
    if limits:
        setting += (
            f"; each auto_LiRPA call in a fresh process, stopped {' or '.join(limits)} (a budget hit, "
            "reported with the seconds it had spent)"
        )
    lines = [
        f"<!-- {summary['command']} -->",
        "",
        f"{setting}; 1-minute load average {min(everything):.1f}-{max(everything):.1f} on the shared machine "
        "(compare CPU times):",
        "",
        "| per point | " + " | ".join(title[n] for n in names) + " |",
        "|---|" + "---:|" * len(names),
        "| CPU seconds (each point) | " + " | ".join(each("cpu_s", n) for n in names) + " |",
        "| wall seconds (each point) | " + " | ".join(each("wall_s", n) for n in names) + " |",
    ]
    if recorded:
        lines.append("| load (1-min, before/after) | " + " | ".join(loads(n) for n in names) + " |")
    peaks = []
    for n in names:
        in_child = [p["peak_rss_mib"][n] for p in points if n in p.get("peak_rss_mib", {})]
        if in_child:
            peaks.append(f"{max(in_child)} (its process)")
        elif n == "native" and summary.get("native_alone_in_process"):
            peaks.append(f"{summary['process_peak_rss_mib']} (the benchmark's process)")
        else:
            peaks.append("")
    if any(peaks):
        lines.append("| peak resident memory (MiB) | " + " | ".join(peaks) + " |")
    lines.append("")
    tail = []
    if "cpu_ratio_native_over_auto_lirpa" in summary:
        tail.append(f"CPU time native / auto_LiRPA: {summary['cpu_ratio_native_over_auto_lirpa']:.2g}×.")
    elif "cpu_ratio_native_over_auto_lirpa_at_most" in summary:
        hits = summary["budget_hits"]["auto_LiRPA"]
        tail.append(f"auto_LiRPA hit its budget on {hits} of {len(points)} point(s)")
        if all(p.get("stopped_by", {}).get("auto_LiRPA", "time") == "time" for p in points):
            tail[-1] += (
                "; counting its CPU seconds at the budget, CPU time native / auto_LiRPA is at most "
                f"{summary['cpu_ratio_native_over_auto_lirpa_at_most']:.2g}×."
            )
        else:  # stopped for memory or killed: its time to a bound is unknown, not merely longer
            tail[-1] += (
                ", at least one on memory or by a signal: its time to a bound is unknown, so no ratio of "
                "times is given."
            )
    if summary.get("max_rel_diff") is not None:
        tail.append(f"Largest relative difference of the margin lower bounds: {summary['max_rel_diff']:.2g}.")
    elif len(names) == 2:
        tail.append("No point was bounded by both backends, so the bounds are not compared.")
    logged = sorted({m for p in points for msgs in p.get("log", {}).values() for m in msgs})
    if logged:
        # e.g. auto_LiRPA's patches mode failing and the fallback to its dense matrices
        quoted = "; ".join(f"“{m}”" for m in logged)
        tail.append(f"Logged during the calls in fresh processes: {quoted}.")
    tail.append(f"Measured {summary['date_utc']} UTC, torch {summary['torch']}.")
    lines.append(" ".join(tail))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

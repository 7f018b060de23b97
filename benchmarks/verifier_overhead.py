"""What `ccdist verify` costs per instance against one α,β-CROWN process over the same csv.

For each dataset asked for, the script trains a small cnn3 for a few hundred steps (plain cross
entropy: the point is the verifier's overhead, not the model), exports ``--points`` test points
with every point sent to α,β-CROWN (``verify_all``), and then times, on the same instances:

- **csv**: one ``abcrown.py --config <export>/abcrown.yaml`` process over ``instances.csv``
  (α,β-CROWN's own batch mode; start-up paid once);
- **ours**: :func:`ccdist_plugin.verify.run_verification` (by default one persistent worker,
  ``--mode worker``; ``--mode process`` times one process per instance).

The two routes run ``--rounds`` times, interleaved (csv, ours | ours, csv | ...), so that a change
of load over the run falls on both. Per route and round the script reports the wall-clock time and
the CPU time (user + system of this process and of its children, each waited for before it is
read) per instance, start-up included, and the number of instances that hit the time budget
(``timeout``): on a shared machine a budget hit in one route and not the other moves the wall time
without any change of cost, so a ratio is only evidence where the budget hits agree. The figures
are the ratios ours / csv in wall and in CPU time, per round and their median (goal ≤ 1.2). The
verdicts of the two routes are compared instance by instance (a timeout in one and a verdict in the
other can differ near the time limit; any safe/unsafe disagreement is a bug). Nothing is asserted;
results go to ``--out`` (JSON and a Markdown table).

    ccdist install-verifier   # once (or set ABCROWN_DIR to α,β-CROWN's complete_verifier)
    python benchmarks/verifier_overhead.py --points 12 --timeout 10 --rounds 4
    python benchmarks/verifier_overhead.py --points 8 --cifar-root DIR   # + a CIFAR-10 (JPEG subset) cnn3

The CIFAR-10 export uses ``abcrown_configs/cifar10.yaml`` with its CPU override unless ``--device
cuda``. Both runs get the same α,β-CROWN options (``--abcrown-args``) and the same thread count.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ccdist_plugin.data import load_dataset  # noqa: E402
from ccdist_plugin.install import locate_verifier  # noqa: E402
from ccdist_plugin.models import cnn3  # noqa: E402
from ccdist_plugin.verification import (  # noqa: E402
    export_instances,  # noqa: E402
    find_abcrown,
    run_verification,
)
from ccdist_plugin.verification.records import VERIFY_DIR  # noqa: E402

CPU_OVERRIDE = ["--device", "cpu", "--batch_size", "64", "--pgd_restarts", "10", "--pgd_steps", "100"]


def train_small_cnn3(data, steps: int, seed: int) -> nn.Module:
    spec = data.spec
    torch.manual_seed(seed)
    model = cnn3(spec.in_channels, spec.input_size, spec.num_classes, width=64, mean=spec.mean, std=spec.std)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    n = len(data.train)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, n, (64,)).tolist()
        xs = torch.stack([data.train[i][0] for i in idx])
        ys = torch.stack([torch.as_tensor(data.train[i][1]) for i in idx])
        opt.zero_grad()
        nn.functional.cross_entropy(model(xs), ys).backward()
        opt.step()
        if step % 100 == 0:
            logging.info("training step %d/%d", step, steps)
    return model.eval()


def csv_verdicts(results_pkl: Path) -> list[str]:
    """α,β-CROWN's csv-mode results, in csv order, as safe / unsafe / timeout."""
    with open(results_pkl, "rb") as f:
        results = pickle.load(f)["results"]
    out = []
    for status, _seconds in results:
        if "unsafe" in status:
            out.append("unsafe")
        elif "safe" in status and "timed out" not in status:
            out.append("safe")
        else:
            out.append("timeout")
    return out


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its reaped children so far.

    A child's time is added to ``RUSAGE_CHILDREN`` only once it has been waited for: both routes
    wait for theirs (``subprocess.run``; :func:`run_verification` closes every worker, which kills
    its process group and waits for it, before it returns)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(run: Callable[[], list[str | None]]) -> dict:
    """Run one route; its wall and CPU seconds, the load average before it, and its verdicts."""
    load = os.getloadavg()[0]
    cpu0, wall0 = _cpu_seconds(), time.monotonic()
    verdicts = run()
    wall, cpu = time.monotonic() - wall0, _cpu_seconds() - cpu0
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "load_before": round(load, 2),
        "verdicts": verdicts,
    }


def run_csv(export_dir: Path, abcrown: Path, extra: list[str], n: int) -> list[str | None]:
    """One α,β-CROWN process over ``instances.csv``; its verdicts in csv order."""
    results_pkl = export_dir / "csv_run_results.pkl"
    results_pkl.unlink(missing_ok=True)
    python = locate_verifier().python
    cmd = [python, str(abcrown / "abcrown.py"), "--config", str(export_dir / "abcrown.yaml")]
    cmd += ["--results_file", str(results_pkl), *extra]
    logging.info("one α,β-CROWN process over %d instances: %s", n, shlex.join(cmd))
    with open(export_dir / "csv_run.log", "w") as log:
        subprocess.run(cmd, cwd=export_dir, stdout=log, stderr=subprocess.STDOUT, check=True)
    theirs = csv_verdicts(results_pkl)
    return [theirs[r] if r < len(theirs) else None for r in range(n)]


def run_ours(export_dir: Path, abcrown: Path, extra: list[str], n: int, mode: str, timeout: float) -> list:
    """:func:`run_verification` from scratch (earlier rounds' verdicts removed); its verdicts."""
    shutil.rmtree(export_dir / VERIFY_DIR, ignore_errors=True)
    logging.info("ccdist verify (%s mode) over the same %d instances", mode, n)
    res = run_verification(export_dir, abcrown_dir=abcrown, extra_args=extra, mode=mode, timeout_s=timeout)
    ours = {r["instance"]: r["verdict"] for r in res.instances}
    return [ours.get(r) for r in range(n)]


DECIDED = ("safe", "unsafe", "timeout")  # anything else (error, no verdict) is an error


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def summarize_rounds(rounds: list[dict[str, dict]], n: int) -> dict:
    """Per route and per round: seconds per instance (wall, CPU), budget hits (``timeout``
    verdicts), and the ratios ours / csv with their medians over the rounds; the verdict
    agreement per round, and the safe/unsafe disagreements over all rounds (any is a bug).

    ``rounds[k][route]`` for route ``csv`` and ``ours`` holds ``wall_s``, ``cpu_s`` (whole run)
    and ``verdicts`` (per instance: safe / unsafe / timeout / error / None)."""
    out: dict = {"rounds": len(rounds)}
    for route in ("csv", "ours"):
        out[route] = {
            "wall_per_instance_s": [round(r[route]["wall_s"] / n, 3) for r in rounds],
            "cpu_per_instance_s": [round(r[route]["cpu_s"] / n, 3) for r in rounds],
            "budget_hits": [sum(v == "timeout" for v in r[route]["verdicts"]) for r in rounds],
            "errors": [sum(v not in DECIDED for v in r[route]["verdicts"]) for r in rounds],
        }
        for key in ("wall_per_instance_s", "cpu_per_instance_s"):
            out[route][f"median_{key}"] = _median(out[route][key])
    for kind in ("wall", "cpu"):
        ratios = [round(r["ours"][f"{kind}_s"] / r["csv"][f"{kind}_s"], 3) for r in rounds]
        out[f"{kind}_ratio"] = ratios
        out[f"median_{kind}_ratio"] = _median(ratios)
    pairs = [list(zip(r["ours"]["verdicts"], r["csv"]["verdicts"], strict=True)) for r in rounds]
    out["same_verdicts"] = [sum(a == b for a, b in p) for p in pairs]
    out["safe_unsafe_disagreements"] = sum({a, b} == {"safe", "unsafe"} for p in pairs for a, b in p)
    return out


def measure(
    name: str, export_dir: Path, abcrown: Path, extra: list[str], mode: str, timeout: float, rounds: int
) -> dict:
    """The two routes over the same instances, ``rounds`` times, interleaved: csv, ours | ours,
    csv | csv, ours ... so that a change of load over the run falls on both."""
    n = sum(1 for line in (export_dir / "instances.csv").read_text().splitlines() if line.strip())
    runs = {
        "csv": lambda: run_csv(export_dir, abcrown, extra, n),
        "ours": lambda: run_ours(export_dir, abcrown, extra, n, mode, timeout),
    }
    measured = []
    for k in range(rounds):
        order = ("csv", "ours") if k % 2 == 0 else ("ours", "csv")
        this = {}
        for route in order:
            logging.info("%s: round %d/%d, %s", name, k + 1, rounds, route)
            this[route] = _timed(runs[route])
        measured.append(this)
    return {
        "dataset": name,
        "instances": n,
        "mode": mode,
        "timeout_s": timeout,
        "abcrown_args": extra,
        "torch_threads": torch.get_num_threads(),
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        **summarize_rounds(measured, n),
        "measured": measured,
    }


def _fmt(values: list, spec: str = ".2f") -> str:
    return ", ".join(format(v, spec) for v in values)


def markdown(rows: list[dict], command: str) -> str:
    """The Markdown table written beside the JSON (every figure from ``rows``)."""
    lines = [
        "| dataset | instances, budget | route | wall s/instance (per round) | CPU s/instance (per round) "
        "| budget hits (per round) | same verdicts (per round) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for route, label in (("csv", "one α,β-CROWN over the csv"), ("ours", f"ccdist verify ({r['mode']})")):
            d = r[route]
            lines.append(
                f"| {r['dataset']} | {r['instances']}, {r['timeout_s']:g} s | {label} "
                f"| {d['median_wall_per_instance_s']:.2f} ({_fmt(d['wall_per_instance_s'])}) "
                f"| {d['median_cpu_per_instance_s']:.2f} ({_fmt(d['cpu_per_instance_s'])}) "
                f"| {_fmt(d['budget_hits'], 'd')} | {_fmt(r['same_verdicts'], 'd')} of {r['instances']} |"
            )
        lines.append(
            f"| {r['dataset']} | | **ratio ours / csv** (median) | **{r['median_wall_ratio']:.2f}** "
            f"({_fmt(r['wall_ratio'])}) | **{r['median_cpu_ratio']:.2f}** ({_fmt(r['cpu_ratio'])}) "
            f"| | {r['safe_unsafe_disagreements']} safe/unsafe disagreements |"
        )
    loads = ", ".join(
        f"{r['dataset']}: {_fmt([m[route]['load_before'] for m in r['measured'] for route in m])}"
        for r in rows
    )
    note = (
        "Rounds interleaved (csv first in odd rounds, ours first in even ones); medians over rounds; "
        "CPU = user + system seconds of the benchmark process and its reaped children. "
        f"1-minute load average before each run: {loads}."
    )
    return f"`{command}`\n\n" + "\n".join(lines) + f"\n\n{note}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=8, help="test points exported (all sent to α,β-CROWN)")
    ap.add_argument("--timeout", type=float, default=60.0, help="budget per instance (s)")
    ap.add_argument("--mode", choices=["worker", "process"], default="worker")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the small cnn3")
    ap.add_argument("--digits-eps", type=float, default=0.05)
    ap.add_argument("--cifar-root", default=None, help="folder with cifar10-jpeg-*.npz (default: skip CIFAR)")
    ap.add_argument("--cifar-eps", type=float, default=2 / 255)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="α,β-CROWN's device for CIFAR")
    ap.add_argument(
        "--abcrown",
        default=None,
        help="α,β-CROWN's complete_verifier (default: as ccdist verify finds it)",
    )
    ap.add_argument("--abcrown-args", default="", help="extra α,β-CROWN options for both runs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of the two routes")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "verifier_overhead.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    abcrown = find_abcrown(args.abcrown)
    work = Path(args.work or tempfile.mkdtemp(prefix="verifier_overhead_"))
    extra = shlex.split(args.abcrown_args)
    jobs = [("digits", load_dataset("digits"), args.digits_eps, "digits", [])]
    if args.cifar_root:
        cifar = load_dataset("cifar10-jpeg", args.cifar_root)
        jobs.append(
            ("cifar10-jpeg", cifar, args.cifar_eps, "cifar10", CPU_OVERRIDE if args.device == "cpu" else [])
        )
    rows = []
    for name, data, eps, template, override in jobs:
        model = train_small_cnn3(data, args.steps, seed=0)
        export = export_instances(
            model,
            data.test,
            work / name,
            eps,
            count=args.points,
            timeout_s=args.timeout,
            template=template,
            methods=("ibp",),
            verify_all=True,
            dataset_name=name,
        )
        rows.append(
            measure(name, export.out_dir, abcrown, override + extra, args.mode, args.timeout, args.rounds)
        )
        logging.info("%s", json.dumps({k: v for k, v in rows[-1].items() if k != "measured"}))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": shlex.join(sys.argv), "results": rows}, indent=1) + "\n")
    text = markdown(rows, shlex.join(sys.argv))
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

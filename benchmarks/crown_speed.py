"""Native full CROWN against auto_LiRPA's full CROWN, side by side (1 thread, CPU, float64).

Each point is bounded by both engines in turn (the order alternates from point to point, so that a
change of load hits both alike); auto_LiRPA's ``BoundedModule`` (patches mode) is built once,
outside the timings. Reports CPU seconds beside wall seconds per point for each engine, their
ratios (native / auto_LiRPA, per point and in total), the largest relative difference of the two
engines' margin lower bounds, and the peak resident memory: of this process, and (``--rss``) of
each engine alone, each in a process of its own::

    python benchmarks/crown_speed.py --channels 16,16,32,32,32 --width 128 --points 4 --rss \
        --out docs/results/crown_speed_narrow.json
    python benchmarks/crown_speed.py --channels 64,64,128,128,128 --width 512 --points 1 \
        --out docs/results/crown_speed_paper.json
    python benchmarks/crown_speed.py --table docs/results/crown_speed_narrow.json \
        docs/results/crown_speed_paper.json > docs/results/crown_speed.md   # for docs/RESULTS.md

The networks are untrained (BatchNorm statistics from random inputs): the time of a bound depends on
the shapes and on how many neurons are unstable, not on what the network learned.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from ccdist_plugin.bounds import crown_margin_lower_bound
from ccdist_plugin.bounds.lirpa import margin_spec
from ccdist_plugin.bounds.patches import PATCH_BUDGET
from ccdist_plugin.models import cnn7

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crown_cost import _timed  # noqa: E402  (wall and CPU seconds of one call)


def _model(channels: list[int], width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = cnn7(3, 32, 10, width=width, channels=channels).double()
    with torch.no_grad():  # BatchNorm statistics of real-looking activations
        model.train()(torch.rand(64, 3, 32, 32, dtype=torch.float64))
    return model.eval()


def _auto_lirpa(model: torch.nn.Module, x: torch.Tensor):
    """auto_LiRPA's full CROWN on one point at a time, its BoundedModule built once."""
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

    torch.set_default_dtype(torch.float64)  # some auto_LiRPA operators build default-dtype tensors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opts = {"conv_mode": "patches"}
        bounded = BoundedModule(model, x[:1], device="cpu", verbose=False, bound_opts=opts)

    def bound(xi: torch.Tensor, yi: torch.Tensor, eps: float) -> torch.Tensor:
        lo, hi = (xi - eps).clamp(0, 1), (xi + eps).clamp(0, 1)
        ptb = PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=lo, x_U=hi)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            lb, _ = bounded.compute_bounds(
                x=(BoundedTensor(xi, ptb),), C=margin_spec(yi, 10, xi), method="CROWN", bound_upper=False
            )
        return lb.detach()

    return bound


def _peak_rss_mb() -> int:
    """Peak resident memory of this process in MB: VmHWM (reset by exec, unlike ``ru_maxrss``,
    which a child started by ``subprocess`` inherits from its parent on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


#: this script, resolved when imported (the package may change the working directory later)
_SCRIPT = os.path.abspath(__file__)


def _peak_rss_alone(engine: str) -> int:
    """Peak resident memory (MB) of a process that runs ``engine`` alone on the same points."""
    argv = [a for a in sys.argv[1:] if a != "--rss"]
    out = subprocess.run(
        [sys.executable, _SCRIPT, *argv, "--only", engine], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)["max_rss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", default="16,16,32,32,32", help="the five convolution widths")
    ap.add_argument("--width", type=int, default=128, help="the dense layer's width")
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--eps", type=float, default=2 / 255)
    ap.add_argument("--budget", type=int, default=PATCH_BUDGET, help="patches memory budget (elements)")
    ap.add_argument("--rss", action="store_true", help="also each engine's peak memory alone")
    ap.add_argument("--only", choices=("native", "auto_lirpa"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="also write the result to this JSON file")
    ap.add_argument("--table", nargs="+", default=None, help="print the markdown table of these JSON results")
    args = ap.parse_args()
    if args.table:
        print(_table([json.loads(open(p).read()) for p in args.table]), end="")
        return
    torch.set_num_threads(1)
    channels = [int(c) for c in args.channels.split(",")]
    model = _model(channels, args.width)
    torch.manual_seed(1)
    x = torch.rand(args.points, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (args.points,))
    engines = {
        "native": lambda xi, yi: crown_margin_lower_bound(
            model, xi, yi, args.eps, intermediate="crown", backend="native", patch_budget=args.budget
        ),
    }
    if args.only != "native":
        engines["auto_lirpa"] = (lambda b: lambda xi, yi: b(xi, yi, args.eps))(_auto_lirpa(model, x))
    if args.only:
        engines = {args.only: engines[args.only]}
    times = {k: [] for k in engines}
    bounds = {k: [] for k in engines}
    for i in range(args.points):
        order = list(engines) if i % 2 == 0 else list(reversed(engines))
        for name in order:
            xi, yi = x[i : i + 1], y[i : i + 1]
            wall, cpu, lb = _timed(lambda name=name, xi=xi, yi=yi: engines[name](xi, yi))
            times[name].append((wall, cpu))
            bounds[name].append(lb)
    out: dict = {
        "command": "python benchmarks/crown_speed.py " + " ".join(sys.argv[1:]),
        "channels": channels,
        "width": args.width,
        "points": args.points,
        "eps": args.eps,
        "patch_budget": args.budget,
        "wall_s_per_point": {k: [round(w, 3) for w, _ in v] for k, v in times.items()},
        "cpu_s_per_point": {k: [round(c, 3) for _, c in v] for k, v in times.items()},
    }
    if len(engines) == 2:
        nat, ref = torch.cat(bounds["native"]), torch.cat(bounds["auto_lirpa"])
        finite = ref.isfinite() & (ref != 0)
        rel = ((nat - ref).abs() / ref.abs().clamp(min=1e-12))[finite]
        out["max_rel_bound_diff"] = float(rel.max()) if rel.numel() else 0.0
        for kind, col in (("cpu", 1), ("wall", 0)):
            per_point = [n[col] / a[col] for n, a in zip(times["native"], times["auto_lirpa"], strict=True)]
            total = sum(n[col] for n in times["native"]) / sum(a[col] for a in times["auto_lirpa"])
            out[f"{kind}_ratio_native_over_auto_lirpa"] = {
                "per_point": [round(r, 3) for r in per_point],
                "total": round(total, 3),
            }
    out["max_rss_mb"] = _peak_rss_mb()
    out["load_average"] = os.getloadavg()
    out["torch"] = torch.__version__
    if args.rss and not args.only:
        print(json.dumps(out), flush=True)  # the timings first: the memory runs take as long again
        out["max_rss_mb_alone"] = {e: _peak_rss_alone(e) for e in ("native", "auto_lirpa")}
    out["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(out, indent=1) + "\n")


def _table(results: list[dict]) -> str:
    """docs/RESULTS.md's table of native vs auto_LiRPA full CROWN, from ``--out`` results only."""
    lines = [
        "<!-- " + "; ".join(r["command"] for r in results) + " -->",
        "",
        "Each point bounded by the native full CROWN (patches form) and by auto_LiRPA's full CROWN "
        "(`BoundedModule` built once), in turn, the order alternating per point; untrained 32×32 CNN-7, "
        "float64, 1 thread, on the shared machine (compare the ratios, measured side by side).",
        "",
        "| network (channels / width) | native CPU s/point | auto_LiRPA CPU s/point "
        "| CPU ratio (total; per point) | wall ratio | max rel. bound difference "
        "| peak RSS alone, native / auto_LiRPA (MB) | load average |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cpu, ratio = r["cpu_s_per_point"], r["cpu_ratio_native_over_auto_lirpa"]
        alone = r.get("max_rss_mb_alone")
        rss = (
            f"{alone['native']:.0f} / {alone['auto_lirpa']:.0f}" if alone else f"{r['max_rss_mb']:.0f} (both)"
        )
        native, theirs = (", ".join(f"{c:.2f}" for c in cpu[e]) for e in ("native", "auto_lirpa"))
        per_point = ", ".join(f"{p:.2f}" for p in ratio["per_point"])
        wall = r["wall_ratio_native_over_auto_lirpa"]["total"]
        lines.append(
            f"| {','.join(map(str, r['channels']))} / {r['width']} | {native} | {theirs} "
            f"| {ratio['total']:.3f}; {per_point} | {wall:.3f} | {r['max_rel_bound_diff']:.2g} | {rss} "
            f"| {r['load_average'][0]:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

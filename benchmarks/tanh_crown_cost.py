"""Full CROWN on a tanh CNN-7 at 32×32 (appendix E.8's network, narrowed): native against auto_LiRPA.

One point at a time, the two backends interleaved (their order alternating from point to point), on
one thread in float64; wall and CPU seconds per point side by side (the CPU time is what a shared,
loaded machine does not inflate), and the largest relative difference of the margin lower bounds::

    python benchmarks/tanh_crown_cost.py --channels 4,4,8,8,8 --width 32 --points 3 --out docs/results

With ``--out DIR`` it writes ``DIR/tanh_crown.json`` and the table ``DIR/tanh_crown.md`` (which
``benchmarks/make_results.py`` puts into docs/RESULTS.md).

The network is untrained (the cost of a bound depends on the shapes only; BatchNorm statistics come
from a batch of random images). The bounds differ by the tangent points of the tanh relaxation:
auto_LiRPA reads them off a 0.01 grid, the native CROWN solves for them
(``ccdist_plugin.bounds.relaxations.tanh_relaxation``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from ccdist_plugin.bounds import crown_margin_lower_bound
from ccdist_plugin.models import cnn7

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crown_cost import _timed  # noqa: E402  (wall and CPU seconds of one call)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", default="4,4,8,8,8", help="the five convolution widths")
    ap.add_argument("--width", type=int, default=32, help="the dense layer's width")
    ap.add_argument("--points", type=int, default=3)
    ap.add_argument("--eps", type=float, default=2 / 255)
    ap.add_argument("--out", default=None, help="folder for tanh_crown.{json,md}")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # auto_LiRPA's tracing warnings
    torch.set_num_threads(1)
    torch.manual_seed(0)
    channels = [int(c) for c in args.channels.split(",")]
    model = cnn7(3, 32, 10, width=args.width, channels=channels, activation="tanh").double()
    with torch.no_grad():
        model.train()(torch.rand(64, 3, 32, 32, dtype=torch.float64))
    model.eval()
    x = torch.rand(args.points, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (args.points,))
    runs = {
        "native": lambda i: crown_margin_lower_bound(
            model, x[i : i + 1], y[i : i + 1], args.eps, intermediate="crown", backend="native"
        ),
        "auto_LiRPA": lambda i: crown_margin_lower_bound(
            model, x[i : i + 1], y[i : i + 1], args.eps, intermediate="crown", backend="auto_lirpa"
        ),
    }
    per_point = []
    for i in range(args.points):
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]
        done = {name: _timed(lambda name=name, i=i: runs[name](i)) for name in order}
        ours, theirs = done["native"][2], done["auto_LiRPA"][2]
        off = torch.arange(10) != y[i]
        rel = ((ours - theirs).abs() / theirs.abs())[:, off].max()
        per_point.append(
            {
                "wall_s": {k: round(v[0], 2) for k, v in done.items()},
                "cpu_s": {k: round(v[1], 2) for k, v in done.items()},
                "max_rel_diff": float(f"{float(rel):.3g}"),
                "native_minus_auto_lirpa_mean": float(f"{float((ours - theirs)[:, off].mean()):.3g}"),
                "load_average": [round(a, 1) for a in os.getloadavg()],
            }
        )
        print(json.dumps({"point": i, **per_point[-1]}), flush=True)

    def total(key: str, name: str) -> float:
        return sum(p[key][name] for p in per_point)

    summary = {
        "command": "python benchmarks/tanh_crown_cost.py " + " ".join(sys.argv[1:]),
        "channels": channels,
        "width": args.width,
        "eps": args.eps,
        "points": args.points,
        "wall_s_per_point": {n: round(total("wall_s", n) / args.points, 2) for n in runs},
        "cpu_s_per_point": {n: round(total("cpu_s", n) / args.points, 2) for n in runs},
        "cpu_ratio_native_over_auto_lirpa": round(total("cpu_s", "native") / total("cpu_s", "auto_LiRPA"), 2),
        "max_rel_diff": max(p["max_rel_diff"] for p in per_point),
        "torch": torch.__version__,
        "per_point": per_point,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    print(json.dumps(summary, indent=1))
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tanh_crown.json").write_text(json.dumps(summary, indent=1) + "\n")
        (out / "tanh_crown.md").write_text(_markdown(summary))


def _markdown(summary: dict) -> str:
    """The table of docs/RESULTS.md's tanh section (figures from ``summary`` only)."""
    points = summary["per_point"]

    def each(key: str, name: str) -> str:
        return ", ".join(f"{p[key][name]:.2f}" for p in points)

    loads = [p["load_average"][0] for p in points]
    lines = [
        f"<!-- {summary['command']} -->",
        "",
        f"An untrained tanh CNN-7 at 32×32 (channels {','.join(map(str, summary['channels']))}, width "
        f"{summary['width']}), ε = {summary['eps']:.4g}, float64, one thread; the two backends alternate per "
        f"point; 1-minute load average {min(loads):.1f}-{max(loads):.1f} on the shared machine (compare CPU "
        "times):",
        "",
        "| per point | native full CROWN | auto_LiRPA full CROWN |",
        "|---|---:|---:|",
        f"| CPU seconds (each point) | {each('cpu_s', 'native')} | {each('cpu_s', 'auto_LiRPA')} |",
        f"| wall seconds (each point) | {each('wall_s', 'native')} | {each('wall_s', 'auto_LiRPA')} |",
        "",
        f"CPU time native / auto_LiRPA: {summary['cpu_ratio_native_over_auto_lirpa']:.2f}×. Largest relative "
        f"difference of the margin lower bounds: {summary['max_rel_diff']:.2g}. Measured "
        f"{summary['date_utc']} UTC, torch {summary['torch']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

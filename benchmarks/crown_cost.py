"""What full CROWN costs on a CIFAR-size CNN-7, next to CROWN-IBP and IBP (1 thread, CPU).

``ccdist eval`` names its CROWN figure by the intermediate bounds it used: ``crown_ibp_cert_acc``
(CROWN with IBP intermediate bounds, the default on CIFAR-size networks) or ``crown_cert_acc`` (full
CROWN, ``--crown-intermediate crown``). This measures seconds per point of each on a randomly
initialized CNN-7 of the given channel widths at 32×32, natively and (when installed) through
auto_LiRPA, and the largest resident memory of the process::

    python benchmarks/crown_cost.py --channels 4,4,8,8,8 --width 32 --points 2

The networks are untrained: the time of a bound does not depend on the weights, only on the shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from ccdist_plugin.bounds import certify, crown_margin_lower_bound, resolve_crown_intermediate
from ccdist_plugin.models import cnn7


def _timed(fn) -> tuple[float, float, torch.Tensor]:
    """Wall and CPU seconds of ``fn()`` (CPU time is what a loaded machine does not inflate)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", default="4,4,8,8,8", help="the five convolution widths")
    ap.add_argument("--width", type=int, default=32, help="the dense layer's width")
    ap.add_argument("--points", type=int, default=2)
    ap.add_argument("--eps", type=float, default=2 / 255)
    ap.add_argument("--auto-lirpa", action="store_true", help="also auto_LiRPA's full CROWN")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    channels = [int(c) for c in args.channels.split(",")]
    model = cnn7(3, 32, 10, width=args.width, channels=channels).eval().double()
    with torch.no_grad():  # BatchNorm statistics of real-looking activations
        model.train()(torch.rand(64, 3, 32, 32, dtype=torch.float64))
    model.eval()
    x = torch.rand(args.points, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (args.points,))
    rows = {"ibp": _timed(lambda: certify(model, x, y, args.eps).margin_lb)}
    for kind in ("ibp", "crown"):
        rows[f"native crown, {kind} intermediate"] = _timed(
            lambda kind=kind: crown_margin_lower_bound(model, x, y, args.eps, intermediate=kind)
        )
    if args.auto_lirpa:
        rows["auto_LiRPA crown, crown intermediate"] = _timed(
            lambda: crown_margin_lower_bound(
                model, x, y, args.eps, intermediate="crown", backend="auto_lirpa"
            )
        )
    out = {
        "command": "python benchmarks/crown_cost.py " + " ".join(os.sys.argv[1:]),
        "channels": channels,
        "width": args.width,
        "points": args.points,
        "auto_resolves_to": resolve_crown_intermediate(model),
        "wall_s_per_point": {k: round(t / args.points, 3) for k, (t, _, _) in rows.items()},
        "cpu_s_per_point": {k: round(c / args.points, 3) for k, (_, c, _) in rows.items()},
        "mean_margin_lb": {k: round(float(v[v.isfinite()].mean()), 4) for k, (_, _, v) in rows.items()},
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""What α-CROWN costs per point with the intermediate layers' slopes optimized, next to the
final-only α-CROWN and CROWN, on a trained checkpoint (1 thread, CPU, float64 as ``certify``).

Per test point, one at a time, interleaved (the order of the two α-CROWN modes alternates from
point to point, so that a change of load falls on both): CROWN's bound, α-CROWN with the final
back-substitution's slopes only (``optimize_intermediate=False``, full CROWN intermediate bounds)
and α-CROWN with every layer's slopes (the default). Reports wall and CPU seconds
(``time.process_time``: what a loaded machine does not inflate) per point of each, the smallest
logit-difference bound of each (positive: certified) and the largest resident memory::

    python benchmarks/alpha_crown_cost.py --checkpoint runs/e2e-cnn3/checkpoint.pt --points 4

(the checkpoint of ``benchmarks/cifar_end_to_end.py``'s docstring). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import sys
from pathlib import Path

import torch

from ccdist_plugin.bounds import alpha_crown_margin_lower_bound, crown_margin_lower_bound
from ccdist_plugin.checkpoint import load_checkpoint, model_from_payload
from ccdist_plugin.data import load_dataset
from ccdist_plugin.fileio import file_sha256

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crown_cost import _timed  # noqa: E402  (wall and CPU seconds of one call)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--eps", type=float, default=None, help="default: the checkpoint's")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the rows and the summary here (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    payload = load_checkpoint(args.checkpoint)
    net = model_from_payload(payload, args.checkpoint).double().eval()
    config = payload.get("config", {})
    eps = args.eps if args.eps is not None else float(config["eps"])
    test = load_dataset(config["data"]["name"], args.data_root).test
    rows = []
    for i in range(args.start, args.start + args.points):
        x, y = test[i][0].unsqueeze(0).double(), torch.tensor([int(test[i][1])])
        runs = {
            "crown": lambda x=x, y=y: crown_margin_lower_bound(
                net, x, y, eps, intermediate="crown", backend="native"
            ),
            "final_only": lambda x=x, y=y: alpha_crown_margin_lower_bound(
                net, x, y, eps, intermediate="crown", optimize_intermediate=False
            ),
            "all_layers": lambda x=x, y=y: alpha_crown_margin_lower_bound(net, x, y, eps),
        }
        order = ["crown", "final_only", "all_layers"] if i % 2 == 0 else ["crown", "all_layers", "final_only"]
        row: dict = {"index": i}
        for name in order:
            wall, cpu, lb = _timed(runs[name])
            margin = lb.scatter(1, y.view(-1, 1), float("inf")).min().item()
            row[name] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "min_margin_lb": margin}
        print(json.dumps(row), flush=True)
        rows.append(row)
    summary = {
        name: {
            "mean_wall_s": sum(r[name]["wall_s"] for r in rows) / len(rows),
            "mean_cpu_s": sum(r[name]["cpu_s"] for r in rows) / len(rows),
        }
        for name in ("crown", "final_only", "all_layers")
    }
    summary["eps"] = eps
    summary["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # which network (two trainings by one command differ) and how loaded the machine was
    summary["checkpoint_sha256"] = file_sha256(args.checkpoint)
    summary["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(summary, indent=1))
    if args.out is not None:
        command = shlex.join(["python", "benchmarks/alpha_crown_cost.py", *sys.argv[1:]])
        record = {"command": command, "rows": rows, "summary": summary}
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()

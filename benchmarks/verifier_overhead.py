"""What `ccdist verify` costs per instance against one α,β-CROWN process over the same csv.

For each dataset asked for, the script trains a small cnn3 for a few hundred steps (plain cross
entropy: the point is the verifier's overhead, not the model), exports ``--points`` test points
with every point sent to α,β-CROWN (``verify_all``), and then times, on the same instances:

- **csv**: one ``abcrown.py --config <export>/abcrown.yaml`` process over ``instances.csv``
  (α,β-CROWN's own batch mode; start-up paid once);
- **ours**: :func:`ccdist_plugin.verify.run_verification` (by default one persistent worker,
  ``--mode worker``; ``--mode process`` times one process per instance);

each as the whole run's wall-clock time divided by the number of instances, start-up included.
The figure is the ratio ours / csv (goal ≤ 1.2). The verdicts of the two runs are compared
instance by instance (a timeout in one and a verdict in the other can differ near the time
limit; any safe/unsafe disagreement is a bug). Nothing is asserted; results go to
``--out`` (JSON and a Markdown line).

    ccdist install-verifier   # once (or set ABCROWN_DIR to α,β-CROWN's complete_verifier)
    python benchmarks/verifier_overhead.py --points 8
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
import shlex
import subprocess
import sys
import tempfile
import time
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


def measure(name: str, export_dir: Path, abcrown: Path, extra: list[str], mode: str, timeout: float) -> dict:
    python = locate_verifier().python
    n = sum(1 for line in (export_dir / "instances.csv").read_text().splitlines() if line.strip())
    results_pkl = export_dir / "csv_run_results.pkl"
    cmd = [python, str(abcrown / "abcrown.py"), "--config", str(export_dir / "abcrown.yaml")]
    cmd += ["--results_file", str(results_pkl), *extra]
    logging.info("%s: one α,β-CROWN process over %d instances: %s", name, n, shlex.join(cmd))
    start = time.monotonic()
    with open(export_dir / "csv_run.log", "w") as log:
        subprocess.run(cmd, cwd=export_dir, stdout=log, stderr=subprocess.STDOUT, check=True)
    csv_s = time.monotonic() - start
    logging.info("%s: ccdist verify (%s mode) over the same instances", name, mode)
    start = time.monotonic()
    res = run_verification(export_dir, abcrown_dir=abcrown, extra_args=extra, mode=mode, timeout_s=timeout)
    ours_s = time.monotonic() - start
    ours = {r["instance"]: r["verdict"] for r in res.instances}
    theirs = csv_verdicts(results_pkl)
    pairs = [(ours.get(r), theirs[r] if r < len(theirs) else None) for r in range(n)]
    return {
        "dataset": name,
        "instances": n,
        "mode": mode,
        "abcrown_args": extra,
        "csv_total_s": round(csv_s, 2),
        "ours_total_s": round(ours_s, 2),
        "csv_per_instance_s": round(csv_s / n, 3),
        "ours_per_instance_s": round(ours_s / n, 3),
        "ratio": round(ours_s / csv_s, 3),
        "same_verdicts": sum(a == b for a, b in pairs),
        "safe_unsafe_disagreements": sum({a, b} == {"safe", "unsafe"} for a, b in pairs),
        "verdicts_ours": [a for a, _ in pairs],
        "verdicts_csv": [b for _, b in pairs],
        "torch_threads": torch.get_num_threads(),
    }


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
        rows.append(measure(name, export.out_dir, abcrown, override + extra, args.mode, args.timeout))
        logging.info("%s", json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("verdicts")}))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": shlex.join(sys.argv), "results": rows}, indent=1) + "\n")
    lines = [
        "| dataset | instances | one α,β-CROWN over the csv (s/instance) | ccdist verify (s/instance) "
        "| ratio | same verdicts |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['dataset']} | {r['instances']} | {r['csv_per_instance_s']:.2f} "
        f"| {r['ours_per_instance_s']:.2f} ({r['mode']}) | {r['ratio']:.2f} "
        f"| {r['same_verdicts']}/{r['instances']} |"
        for r in rows
    ]
    out.with_suffix(".md").write_text(f"`{shlex.join(sys.argv)}`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

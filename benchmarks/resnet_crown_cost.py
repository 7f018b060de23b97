"""What full CROWN (CROWN intermediate bounds, native engine) costs per point on a PreActResNet18 at 32×32.

Full CROWN back-substitutes every pre-activation neuron that is unstable under its reference interval (IBP
from the CROWN bounds below it), each to the input, so its cost is (unstable neurons) × (cost of one
neuron's back-substitution, which grows with depth). Two modes, one thread (``--threads``), CPU time
beside wall time and the peak resident memory of the process::

    # measured: full CROWN on --points points (and CROWN-IBP and IBP beside it)
    python benchmarks/resnet_crown_cost.py --width 8 --points 1 --dtype float64
    # estimated: per activation, the cost per neuron of --sample-rows neurons, times the neurons unstable
    # under IBP (what full CROWN would bound if no CROWN bound below tightened anything: an upper estimate)
    python benchmarks/resnet_crown_cost.py --width 64 --estimate --sample-rows 8

``--checkpoint`` takes a trained model (a ``ccdist`` checkpoint, e.g. a ``benchmarks/resnet_cpu.py`` run)
instead of a randomly initialized one (BatchNorm statistics from 64 random images): a certifiably trained
network has far fewer unstable neurons, so it costs far less. With ``--certified-points N`` it reports the
full-CROWN-certified accuracy of that model on the first N images of the CIFAR-10 JPEG test subset
(``$CCDIST_DATA``) beside IBP and CROWN-IBP, as ``resnet_cpu.py --crown-points N`` does::

    CCDIST_DATA=DIR python benchmarks/resnet_crown_cost.py --checkpoint CKPT --certified-points 50

Points are random images otherwise. Certificates are float64 (``bounds.certify``); float32 here measures the
arithmetic only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time

import torch
from torch import nn

from ccdist_plugin.bounds import crown_margin_lower_bound, input_box, margin_lower_bound
from ccdist_plugin.bounds.crown import _CROWN_BUDGET, back_substitute, crown_relaxation
from ccdist_plugin.bounds.ibp import native_intervals
from ccdist_plugin.malloc import retain_freed_memory
from ccdist_plugin.models import CertifiedNet, preact_resnet18


def _timed(fn) -> tuple[float, float, object]:
    """Wall and CPU seconds of ``fn()`` (CPU time is what a loaded machine does not inflate)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def _rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def build(args: argparse.Namespace, dtype: torch.dtype) -> tuple[CertifiedNet, torch.Tensor, torch.Tensor]:
    if args.checkpoint:
        from ccdist_plugin.checkpoint import load_model

        model = load_model(args.checkpoint).eval().to(dtype)
    else:
        torch.manual_seed(0)
        model = preact_resnet18(3, args.size, 10, width=args.width).to(dtype)
        with torch.no_grad():  # BatchNorm statistics of real-looking activations
            model.train()(torch.rand(64, 3, args.size, args.size, dtype=dtype))
        model.eval()
    g = torch.Generator().manual_seed(1)
    shape = tuple(model.input_shape)
    x = torch.rand(args.points, *shape, generator=g).to(dtype)
    y = torch.randint(0, model.num_classes, (args.points,), generator=g)
    return model, x, y


def measure(model: CertifiedNet, x: torch.Tensor, y: torch.Tensor, eps: float, chunk: int) -> dict:
    """Full CROWN, CROWN-IBP and IBP on the points, and how many neurons full CROWN back-substituted."""
    n = x.shape[0]
    rows = {"ibp": _timed(lambda: margin_lower_bound(model, x, y, eps))}
    rows["crown-ibp"] = _timed(lambda: crown_margin_lower_bound(model, x, y, eps, intermediate="ibp"))
    rows["full crown"] = _timed(
        lambda: crown_margin_lower_bound(
            model, x, y, eps, intermediate="crown", backend="native", chunk=chunk
        )
    )
    relax = crown_relaxation(model, x[:1], eps, "crown")
    lo, hi = input_box(x[:1], eps)
    ibp = native_intervals(model.features, lo, hi, x[:1], keep_all=True, update_running_stats=False)
    unstable_crown = sum(int(((l < 0) & (u > 0)).sum()) for l, u in relax.preact.values())
    unstable_ibp = sum(
        int(((lb < 0) & (ub > 0)).sum())
        for k, (lb, ub) in enumerate(ibp.layer_bounds)
        if k + 2 < len(relax.nodes) and isinstance(relax.nodes[k + 2].layer, nn.ReLU)
    )
    return {
        "wall_s_per_point": {k: round(t / n, 3) for k, (t, _, _) in rows.items()},
        "cpu_s_per_point": {k: round(c / n, 3) for k, (_, c, _) in rows.items()},
        "mean_margin_lb": {k: round(float(v[v.isfinite()].mean()), 5) for k, (_, _, v) in rows.items()},
        "unstable_after_crown_first_point": unstable_crown,
        "unstable_under_ibp_first_point": unstable_ibp,
    }


def estimate(model: CertifiedNet, x: torch.Tensor, eps: float, sample_rows: int) -> dict:
    """Per activation: CPU seconds per neuron of one back-substitution of ``sample_rows`` neurons (lower
    and upper) with CROWN-IBP relaxations below (the cost does not depend on the bounds' values), times
    the neurons unstable under IBP; summed, an estimate of one point's full CROWN."""
    x = x[:1]
    relax = crown_relaxation(model, x, eps, "ibp")
    layers, total = [], 0.0
    first = True
    for n, node in enumerate(relax.nodes):
        if not isinstance(node.layer, nn.ReLU):
            continue
        l, u = relax.preact[n]
        if first:  # exact from IBP: no back-substitution
            first = False
            continue
        src, shape = node.inputs[0], relax.shapes[node.inputs[0]]
        unstable = int(((l < 0) & (u > 0)).sum())
        k = min(sample_rows, math.prod(shape))
        rows = x.new_zeros(k, math.prod(shape))
        rows[torch.arange(k), torch.arange(k)] = 1.0
        rows = rows.reshape(k, *shape)
        spec = torch.cat([rows, -rows]).unsqueeze(0)
        wall, cpu, _ = _timed(
            lambda spec=spec, src=src: back_substitute(
                relax.nodes, src, relax.shapes, relax.preact, relax.affine, spec,
                x.new_zeros(1, spec.shape[1]), relax.lo, relax.hi,
            )
        )  # fmt: skip
        per_neuron = cpu / k
        total += per_neuron * unstable
        layers.append(
            {"node": n, "shape": list(shape), "unstable_ibp": unstable, "cpu_ms_per_neuron": 1e3 * per_neuron}
        )
        print(json.dumps(layers[-1]), flush=True)
    return {"estimated_cpu_s_per_point": round(total, 1), "layers": layers}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=8, help="first-stage channels (8; the paper's: 64)")
    ap.add_argument("--size", type=int, default=32, help="input height and width")
    ap.add_argument("--points", type=int, default=1)
    ap.add_argument("--eps", type=float, default=2 / 255)
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--chunk", type=int, default=512, help="neurons per back-substitution (crown's chunk)")
    ap.add_argument("--estimate", action="store_true", help="estimate from --sample-rows neurons per layer")
    ap.add_argument("--sample-rows", type=int, default=16)
    ap.add_argument("--checkpoint", default=None, help="a trained model instead of a random one")
    ap.add_argument(
        "--certified-points",
        type=int,
        default=0,
        help="with --checkpoint: certified accuracy on N test images",
    )
    ap.add_argument(
        "--soundness-samples",
        type=int,
        default=0,
        help="with --certified-points: check each full-CROWN bound against this many sampled points of its "
        "ball and PGD-20 (0: no check)",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: CPU time is then one core's time)"
    )
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as the ccdist command line does
    dtype = getattr(torch, args.dtype)
    model, x, y = build(args, dtype)
    out = {
        "command": "python benchmarks/resnet_crown_cost.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "width": args.width if not args.checkpoint else model.arch.get("width"),
        "input": list(model.input_shape),
        "dtype": args.dtype,
        "points": args.points,
        "budget_elements": _CROWN_BUDGET,
        "threads": args.threads,
    }
    if args.checkpoint:
        from ccdist_plugin.fileio import file_sha256

        out["checkpoint_sha256"] = file_sha256(args.checkpoint)  # which network (a path names none)
    if args.certified_points:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from reproduction.measure import evaluate_full_crown, split_tensors

        from ccdist_plugin.data import load_dataset

        xt, yt = split_tensors(load_dataset("cifar10-jpeg", val_split=1000).test, args.certified_points)
        out |= {
            "full_crown": evaluate_full_crown(
                model.float(), xt, yt, args.eps, args.certified_points, args.soundness_samples
            )
        }
    else:
        with torch.no_grad():
            out |= (
                estimate(model, x, args.eps, args.sample_rows)
                if args.estimate
                else measure(model, x, y, args.eps, args.chunk)
            )
    out |= {"max_rss_mb": _rss_mb(), "load_average": os.getloadavg(), "torch": torch.__version__}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

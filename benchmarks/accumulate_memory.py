"""Peak memory of a training step with gradient accumulation (``optim.accumulate``), and how far the
accumulated gradient of a BatchNorm network is from the one-batch gradient.

    python benchmarks/accumulate_memory.py            # → docs/results/accumulate_memory.{json,md}

Memory and time: for each k (default 1 and 4; k > 1 with each ``optim.batchnorm_gradient``, exact
and micro_batch), a fresh subprocess builds CNN-7 (64-64-128-128-128, w = 512) and a
frozen teacher of the same architecture, then runs 2 CC-Dist steps (α = 0.5, β = 5/w, the 1-step 10ε
attack, ε = 2/255, in the ramp with the Shi regularizer, Adam, clipping at 10) on one batch of 128
32×32 images (the CIFAR-10 JPEG subset when ``CCDIST_DATA`` finds it, else uniform noise: the same
cost). The weights are the Shi et al. initialization, with running statistics taken from that batch;
the teacher is a copy of the student read in eval mode (memory needs no trained network). It
reports ``ru_maxrss`` (the process's peak resident memory) before the steps and at the end, with
``ccdist_plugin.malloc.retain_freed_memory`` applied as the ``ccdist`` command applies it, and the
wall and CPU seconds per step, and the 1-minute load average just before and after each row's process
(read in this, the parent, process). The rows run in separate processes because a peak, once reached,
stays; ``--rounds`` repeats them, the order reversed in even rounds (a shared machine's load drifts).
``--steps`` (default 2) sets the steps per row; fewer make a quick check of the script.

Gradient: in one more subprocess, the gradient of the warm-up step (clean cross-entropy; the random
network's IBP bounds are too loose for the CC-Dist loss to be at an ordinary scale) with k = 1 and with
each other k and mode, from the same weights: the relative ℓ2 distance ‖g_k − g_1‖/‖g_1‖ over all
parameters, and the logged losses of both (docs/training.md, "Gradient accumulation").
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import _batch, _machine  # noqa: E402

EPS = 2 / 255
#: optim.batchnorm_gradient values compared for k > 1
MODES = ("exact", "micro_batch")


def _setup(k: int, mode: str = "exact"):
    from ccdist_plugin.config import TrainConfig
    from ccdist_plugin.models import cnn7
    from ccdist_plugin.trainer import build_loss, build_optimizer

    cfg = TrainConfig().override(
        [
            "device=cpu",
            f"eps={EPS}",
            "loss.method=cc_dist",
            "loss.alpha=0.5",
            "optim.batch_size=128",
            f"optim.accumulate={k}",
            f"optim.batchnorm_gradient={mode}",
            "optim.shi_lambda=0.5",
        ]
    )
    torch.manual_seed(0)
    model = cnn7(3, 32, 10)
    x, _, _ = _batch(128)
    # running statistics of this batch (a cumulative average over one pass), so that the teacher, a
    # copy read in eval mode, gives features of the student's scale rather than unnormalized ones
    with torch.no_grad():
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()(x)
        for bn in bns:
            bn.momentum = 0.1
    teacher = copy.deepcopy(model).eval()
    loss = build_loss(cfg, teacher)
    return cfg, model, loss, build_optimizer(cfg, model)


def child(k: int, mode: str, steps: int) -> dict[str, Any]:
    from ccdist_plugin.trainer import training_step

    cfg, model, loss, optimizer = _setup(k, mode)
    x, y, _ = _batch(128)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        training_step(model, loss, optimizer, x, y, EPS / 2, cfg.optim.lr, "ramp", cfg)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "k": k,
        "mode": mode if k > 1 else "-",
        "maxrss_before_mib": before / 1024,
        "maxrss_mib": after / 1024,
        "steps": steps,
        "wall_s_per_step": wall / steps,
        "cpu_s_per_step": cpu / steps,
    }


def _gradient(k: int, mode: str, dtype: torch.dtype, x: torch.Tensor, y: torch.Tensor):
    """The warm-up step's gradient (all parameters, flattened, float64) and logged loss."""
    from ccdist_plugin.step import _accumulated_gradients, step_objective

    cfg, model, loss, optimizer = _setup(k, mode)
    model.to(dtype).train()
    x = x.to(dtype)
    if k == 1:
        total, terms, _ = step_objective(model, loss, x, y, EPS / 2, "warmup", cfg)
        total.backward()
        value = float(terms["loss"])
    else:
        terms, _ = _accumulated_gradients(model, loss, optimizer, x, y, EPS / 2, "warmup", cfg)
        value = terms["loss"]
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double(), value


def gradient_child(ks: list[int]) -> dict[str, Any]:
    """Float32 gradients of each k and mode against the float32 one-batch gradient and against the
    float64 one-batch gradient (the reference: how far float32 rounding alone moves a gradient)."""
    x, y, _ = _batch(128)
    reference, _ = _gradient(1, "exact", torch.float64, x, y)
    base, base_loss = _gradient(1, "exact", torch.float32, x, y)
    out: dict[str, Any] = {
        "1/-": {
            "k": 1,
            "mode": "-",
            "relative_l2": 0.0,
            "relative_l2_float64_reference": float((base - reference).norm() / reference.norm()),
            "loss": base_loss,
            "loss_k1": base_loss,
        }
    }
    for k in ks:
        for mode in MODES:
            grad, value = _gradient(k, mode, torch.float32, x, y)
            out[f"{k}/{mode}"] = {
                "k": k,
                "mode": mode,
                "relative_l2": float((grad - base).norm() / base.norm()),
                "relative_l2_float64_reference": float((grad - reference).norm() / reference.norm()),
                "loss": value,
                "loss_k1": base_loss,
            }
        grad64, _ = _gradient(k, "exact", torch.float64, x, y)
        out[f"{k}/exact/float64"] = {
            "k": k,
            "mode": "exact, float64",
            "relative_l2": float((grad64 - reference).norm() / reference.norm()),
            "relative_l2_float64_reference": float((grad64 - reference).norm() / reference.norm()),
            "loss": float("nan"),
            "loss_k1": base_loss,
        }
    return out


def _run_child(args: list[str]) -> dict[str, Any]:
    """The child's json, with the 1-minute load average before and after it (a shared machine)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    before = os.getloadavg()[0]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    after = os.getloadavg()[0]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["load_1min_before_after"] = [round(before, 2), round(after, 2)]
    return out


def _loads(pairs: list[list[float]] | None) -> str:
    """Each round's 1-minute load average before/after its process; empty where not recorded."""
    return ", ".join(f"{b:.1f}/{a:.1f}" for b, a in pairs or [])


def _markdown(result: dict[str, Any]) -> str:
    steps = result["memory"][0].get("steps", 2) if result["memory"] else 2
    steps_text = f"{steps} step" + ("" if steps == 1 else "s")
    lines = [
        "<!-- python benchmarks/accumulate_memory.py"
        + "".join(f" {a}" for a in result.get("argv", []))
        + "  (memory, time and gradient tables; equality: "
        "python -m pytest tests/test_accumulate.py) -->",
        "",
        '`optim.accumulate: k` (docs/training.md, "Gradient accumulation"). Equality, checked by '
        "`tests/test_accumulate.py`: k = 1, 2, 4 give the same step to 1e-5 (CC-Dist, SABR, MTL-IBP, "
        "PGD-AT, warm-up), with and without BatchNorm (with BatchNorm: `optim.batchnorm_gradient: exact`, "
        "the default), and one digits epoch with k = 1 and k = 2 ends at the same weights to 1e-4 (an MLP, "
        "and a BatchNorm CNN in float64). With BatchNorm the logged losses and the running statistics are "
        "the one-batch step's in both modes; the gradient is the one-batch step's in `exact` mode and not "
        "in `micro_batch` mode (second table).",
        "",
        f"Peak resident memory and time of a process running {steps_text} of CC-Dist (ramp, Shi regularizer "
        "on) on CNN-7 (64-64-128-128-128, w = 512), batch 128, 32×32, each row in a fresh process; "
        f"{result.get('rounds', 1)} round(s), the order reversed in even rounds; medians over rounds; the "
        "load column gives each round's 1-minute load average before/after the row's process (2 cores, "
        "shared: compare CPU times):",
        "",
        "| k (micro-batches of 128/k) | BatchNorm gradient | peak RSS before the steps (MiB) | "
        f"peak RSS after {steps_text} (MiB) | growth during the steps (MiB) | CPU s/step | wall s/step | "
        "load (1-min, before/after) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["memory"]:
        growth = row["maxrss_mib"] - row["maxrss_before_mib"]
        before, after = row["maxrss_before_mib"], row["maxrss_mib"]
        lines.append(
            f"| {row['k']} | {row.get('mode', '-')} | {before:.0f} | {after:.0f} | {growth:.0f} | "
            f"{row.get('cpu_s_per_step', math.nan):.2f} | {row.get('wall_s_per_step', math.nan):.2f} | "
            f"{_loads(row.get('load_1min_before_after_rounds'))} |"
        )
    lines += [
        "",
        "Distance of the accumulated gradient from the one-batch gradient on that CNN-7 (BatchNorm after "
        "every layer), warm-up step, same weights and batch; g_1 is the float32 one-batch gradient, g* the "
        "float64 one (so the last column shows what float32 rounding alone does, k = 1 included)"
        + (
            f"; one process, 1-minute load average {_loads([result['gradient_load_1min_before_after']])}"
            if "gradient_load_1min_before_after" in result
            else ""
        )
        + ":",
        "",
        "| k | BatchNorm gradient | ‖g_k − g_1‖ / ‖g_1‖ | ‖g_k − g*‖ / ‖g*‖ | logged loss, k | "
        "logged loss, k = 1 |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in result["gradient"].items():
        k, mode = row.get("k", key), row.get("mode", "micro_batch")
        ref = row.get("relative_l2_float64_reference")
        ref_text = "" if ref is None else f"{ref:.3g}"
        loss = "" if math.isnan(row["loss"]) else f"{row['loss']:.6f}"
        lines.append(
            f"| {k} | {mode} | {row['relative_l2']:.3g} | {ref_text} | {loss} | {row['loss_k1']:.6f} |"
        )
    m = result["machine"]
    lines.append("")
    lines.append(
        f"Machine: {m.get('cpu', '?')}, torch {m.get('torch', '?')}, {result['threads']} thread(s), "
        f"{m['date_utc']} UTC; data: {result['data']}."
    )
    return "\n".join(lines) + "\n"


def _median_rows(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per configuration (the rows of the first round), the median of each figure over the rounds."""
    out = []
    for i, first in enumerate(rounds[0]):
        row = dict(first)
        for key in ("maxrss_before_mib", "maxrss_mib", "wall_s_per_step", "cpu_s_per_step"):
            row[key] = statistics.median(r[i][key] for r in rounds)
        row["cpu_s_per_step_rounds"] = [r[i]["cpu_s_per_step"] for r in rounds]
        row["load_1min_before_after_rounds"] = [r[i]["load_1min_before_after"] for r in rounds]
        del row["load_1min_before_after"]
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", default="1,4", help="comma-separated values of optim.accumulate")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--out", default="docs/results", help="folder for accumulate_memory.{json,md}")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the memory/time runs")
    parser.add_argument("--steps", type=int, default=2, help="training steps per memory/time row")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="exact", help=argparse.SUPPRESS)
    parser.add_argument("--gradient-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the .json")
    parser.add_argument(
        "--gradient-only",
        action="store_true",
        help="rerun the gradient table only, keeping the .json's memory rows",
    )
    args = parser.parse_args(argv)
    if args.markdown_only:
        result = json.loads((Path(args.out) / "accumulate_memory.json").read_text())
        (Path(args.out) / "accumulate_memory.md").write_text(_markdown(result))
        return
    torch.set_num_threads(args.threads)
    from ccdist_plugin.malloc import retain_freed_memory

    retain_freed_memory()  # as the ccdist command does
    if args.child is not None:
        print(json.dumps(child(args.child, args.mode, steps=args.steps)))
        return
    if args.gradient_child is not None:
        print(json.dumps(gradient_child([int(k) for k in args.gradient_child.split(",")])))
        return
    ks = [int(k) for k in args.ks.split(",")]
    threads = ["--threads", str(args.threads)]
    configs = [(k, mode) for k in ks for mode in (("exact",) if k == 1 else MODES)]
    if args.gradient_only:
        earlier = json.loads((Path(args.out) / "accumulate_memory.json").read_text())
        memory, args.rounds = earlier["memory"], earlier.get("rounds", 1)
    else:
        rounds = []
        for r in range(args.rounds):
            order = configs if r % 2 == 0 else configs[::-1]
            done = {
                c: _run_child(["--child", str(c[0]), "--mode", c[1], "--steps", str(args.steps), *threads])
                for c in order
            }
            rounds.append([done[c] for c in configs])
        memory = _median_rows(rounds)
    others = sorted({2, *(k for k in ks if k != 1)})
    gradient = _run_child(["--gradient-child", ",".join(map(str, others)), *threads])
    gradient_load = gradient.pop("load_1min_before_after")
    data = "CIFAR-10 JPEG subset" if _batch(1)[2] is not None else "uniform noise (CCDIST_DATA not set)"
    result = {
        "machine": _machine(),
        "threads": args.threads,
        "data": data,
        "argv": sys.argv[1:] if argv is None else argv,
        "rounds": args.rounds,
        "memory": memory,
        "gradient": gradient,
        "gradient_load_1min_before_after": gradient_load,
        "time_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accumulate_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    md = _markdown(result)
    (out / "accumulate_memory.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

"""What the paper's 8-step training attack costs, and what the `paper-cpu` protocol costs in all.

    nice -n 19 python benchmarks/attack_cost.py --repeats 5   # → docs/results/attack_cost.{json,md}

On the narrow CNN-7 of the ``cifar10-jpeg-cpu`` preset (channels 16, 16, 32, 32, 32; w = 128), batch 128,
32×32, one thread, side by side (as ``speed.interleaved``: every variant once per round, order rotated; a
ratio is the median over rounds of the per-round ratio), timed in CPU seconds of the process
(``time.process_time``), so that a machine loaded by other jobs slows the run but not the figures much:

- a CC-Dist step (α = 0.01, β = 5/w, teacher forward included) with the paper's 2/255 training attack
  (8 steps of 0.25ε′ on ε′ = 2.1ε) vs with the 1-step attack (10ε) of the earlier CPU runs; the same for
  CC-IBP; and the teacher's PGD-10 step (0.25ε);
- one evaluation of the protocol's test metrics (PGD-40 + IBP + CROWN-IBP) on 250 test points.

From the absolute medians it writes an **estimate** of the whole ``--protocol paper-cpu`` run of
``reproduce_cpu.py`` (teacher, α and β selection, 5 × 2 paired students, their evaluation, BaB) in core-hours
on this CPU; the GPU-hours figure beside it is a guess, labelled as such, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import EPS, _batch, _machine, _pgd, _step_fn, interleaved, paired_ratio  # noqa: E402

#: the preset's narrow CNN-7
NARROW = {"width": 128, "channels": (16, 16, 32, 32, 32)}
#: the paper-cpu protocol's size (reproduce_cpu.PAPER_CPU; kept equal by tests/test_paired_analysis.py)
TRAIN_IMAGES = 9000
BATCH = 128
TEST_IMAGES = 2000


def _narrow_cnn7():
    from ccdist_plugin.models import cnn7

    return cnn7(3, 32, 10, **NARROW)


def measure(repeats: int, x, y) -> dict[str, Any]:
    """Interleaved steps of CC-Dist / CC-IBP with both attacks and of the PGD-10 teacher."""
    from ccdist_plugin.losses import make_loss

    torch.manual_seed(0)
    teacher = _narrow_cnn7().eval()
    attacks = {"1-step (10ε)": _pgd(1, 10.0), "8-step (0.25ε′, ε′ = 2.1ε)": _pgd(8, 0.25, 2.1)}
    variants = {}
    for tag, attack in attacks.items():
        for method in ("CC-Dist", "CC-IBP"):
            torch.manual_seed(0)
            model = _narrow_cnn7()
            opt = torch.optim.Adam(model.parameters(), lr=1e-6)  # tiny lr: the network barely moves
            if method == "CC-Dist":
                loss = make_loss("cc_dist", teacher=teacher, alpha=0.01, attack=attack)
            else:
                loss = make_loss("cc_ibp", alpha=0.01, attack=attack)
            variants[f"{method}, {tag}"] = _step_fn(model, loss, x, y, opt)
    torch.manual_seed(0)
    tmodel = _narrow_cnn7()
    topt = torch.optim.SGD(tmodel.parameters(), lr=1e-6, momentum=0.9)
    variants["teacher PGD-10 (0.25ε)"] = _step_fn(
        tmodel, make_loss("pgd_at", attack=_pgd(10, 0.25)), x, y, topt
    )
    times = interleaved(variants, repeats, clock=time.process_time)  # CPU seconds: robust to load
    one, eight = attacks
    ratios = {
        f"CC-Dist step, {eight} / {one}": paired_ratio(times, f"CC-Dist, {eight}", f"CC-Dist, {one}"),
        f"CC-IBP step, {eight} / {one}": paired_ratio(times, f"CC-IBP, {eight}", f"CC-IBP, {one}"),
        f"CC-Dist / CC-IBP step, {eight}": paired_ratio(times, f"CC-Dist, {eight}", f"CC-IBP, {eight}"),
        f"teacher PGD-10 step / CC-Dist step, {eight}": paired_ratio(
            times, "teacher PGD-10 (0.25ε)", f"CC-Dist, {eight}"
        ),
    }
    return {"ratios": ratios, "median_s": {k: statistics.median(v) for k, v in times.items()}}


def time_evaluation(x, y, points: int = 250) -> float:
    """Seconds of ``reproduce_cpu.evaluate`` (PGD-40, IBP, CROWN-IBP where PGD fails) on ``points`` images
    of a briefly trained narrow CNN-7 (an untrained one is certified nowhere, which would skip CROWN)."""
    from reproduce_cpu import evaluate

    from ccdist_plugin.losses import make_loss

    torch.manual_seed(0)
    model = _narrow_cnn7()
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    step = _step_fn(model, make_loss("cc_ibp", alpha=0.5, attack=_pgd(1, 10.0)), x[:128], y[:128], opt)
    for _ in range(20):  # a few steps so that some points are robust and CROWN has work
        step()
    xs, ys = x[:points], y[:points]
    t0 = time.process_time()
    evaluate(model.eval(), xs, ys, EPS, pgd_steps=40)
    return time.process_time() - t0


def estimate(median_s: dict[str, float], eval_s_per_point: float, plan: dict[str, Any]) -> dict[str, Any]:
    """Core-hours of the protocol from measured per-step medians (1 thread = 1 core)."""
    steps = math.ceil(TRAIN_IMAGES / BATCH)
    eight = "8-step (0.25ε′, ε′ = 2.1ε)"
    student_epoch = {m: steps * median_s[f"{m}, {eight}"] for m in ("CC-Dist", "CC-IBP")}
    teacher_epoch = steps * median_s["teacher PGD-10 (0.25ε)"]
    e = plan["epochs"]
    n_ibp = plan["seeds"] + len(plan["alphas"]) - 1  # seed 0 of each α candidate, then the other seeds
    # CC-Dist: seed 0 of each β·w of the sweep, then seeds 1-4 at 5/w and (when validation picks another
    # value) at the chosen one too: the worst case is counted
    n_dist = len(plan["beta_sweep"]) + 2 * (plan["seeds"] - 1)
    train_s = plan["teacher_epochs"] * teacher_epoch + e * (
        n_ibp * student_epoch["CC-IBP"] + n_dist * student_epoch["CC-Dist"]
    )
    n_models = n_ibp + n_dist + 1
    eval_s = n_models * (TEST_IMAGES + 1000) * eval_s_per_point  # test + validation split
    bab_models = {"primary (CC-IBP, CC-Dist 5/w)": 2 * plan["seeds"], "with the chosen β": 3 * plan["seeds"]}
    bab_s_max = {k: n * plan["bab_count"] * plan["bab_timeout"] for k, n in bab_models.items()}
    return {
        "steps_per_epoch": steps,
        "student_epoch_s": student_epoch,
        "teacher_epoch_s": teacher_epoch,
        "student_runs": {"CC-IBP": n_ibp, "CC-Dist": n_dist},
        "train_core_h": train_s / 3600,
        "eval_core_h": eval_s / 3600,
        "bab_models": bab_models,
        "bab_core_h_upper": {k: v / 3600 for k, v in bab_s_max.items()},
    }


def to_markdown(result: dict[str, Any]) -> str:
    m, est, plan = result["machine"], result["estimate"], result["plan"]
    lines = [
        "<!-- generated by: python benchmarks/attack_cost.py " + " ".join(result["argv"]) + " -->",
        f"Generated {m['date_utc']} UTC on {m['cpu']} ({m['logical_cpus']} logical CPUs, shared with other "
        f"jobs; load average at start {m['load_average_at_start'][0]:.1f}), torch {m['torch']}, "
        f"torch.set_num_threads(1), `nice`, {result['repeats']} interleaved rounds timed in process CPU "
        "seconds, median of per-round ratios. Narrow CNN-7 (16, 16, 32, 32, 32; w = 128), batch 128, "
        f"32×32, ε = 2/255; inputs: {result['images']}.",
        "",
        "| ratio (side by side) | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.2f}× |" for k, v in result["ratios"].items()]
    lines += [
        "",
        "Medians in CPU seconds (context only: a loaded machine also slows a process through its caches): "
        + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in result["median_s"].items())
        + f"; evaluation (PGD-40, IBP, CROWN-IBP) {1000 * result['eval_s_per_point']:.1f} ms per test point.",
        "",
        "**Estimate** of `reproduce_cpu.py --protocol paper-cpu` from these medians "
        f"({est['steps_per_epoch']} steps per epoch; teacher {plan['teacher_epochs']} epochs, "
        f"students {plan['epochs']} epochs, "
        f"{est['student_runs']['CC-IBP']} CC-IBP and {est['student_runs']['CC-Dist']} CC-Dist runs including "
        "the α and β selection runs): "
        f"training {est['train_core_h']:.1f} core-hours, evaluation {est['eval_core_h']:.1f} core-hours, "
        "BaB at most "
        + ", ".join(
            f"{v:.0f} core-hours for {est['bab_models'][k]} models ({k})"
            for k, v in est["bab_core_h_upper"].items()
        )
        + f" ({plan['bab_count']} points × {plan['bab_timeout']:g} s each if every point timed out; points "
        "that are misclassified, broken by PGD or certified by IBP skip it). On 2 cores divide by 2.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="docs/results", help="folder of attack_cost.{json,md}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from ccdist_plugin.malloc import retain_freed_memory

    retain_freed_memory()  # as the ccdist command and reproduce_cpu.py do
    from reproduce_cpu import PAPER_CPU

    x, y, data = _batch(BATCH)
    res = measure(args.repeats, x, y)
    xe, ye, _ = _batch(250)
    eval_s = time_evaluation(xe, ye) / 250
    result = {
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": _machine(),
        "repeats": args.repeats,
        "images": "CIFAR-10 JPEG train images" if data is not None else "uniform noise (dataset not found)",
        **res,
        "eval_s_per_point": eval_s,
        "plan": PAPER_CPU,
        "estimate": estimate(res["median_s"], eval_s, PAPER_CPU),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attack_cost.json").write_text(json.dumps(result, indent=1))
    md = to_markdown(result)
    (out / "attack_cost.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

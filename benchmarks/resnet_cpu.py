"""CPU-scale CC-IBP vs CC-Dist on a narrow PreActResNet18 (paper appendix E.8, Table 11b, at CPU scale).

One command trains and evaluates everything, resumably (a finished run's ``result.json`` is reused)::

    CCDIST_DATA=DIR python benchmarks/resnet_cpu.py --out runs/resnet-cpu --workers 2

What it runs, all with the package's own code (``Trainer``, the ``cifar10-2-prn18*`` presets with the
overrides below, ``evaluation.prefilter``):

- data: the CIFAR-10 JPEG subset (docs/data.md; 10k train of which 1000 are held out, 2k test), ε = 2/255;
- model: ``preact_resnet18`` of ``--width`` channels in the first stage (8: 8-16-32-64, feature width 64),
  for teacher and students alike, the average pooling before the last BatchNorm + ReLU (E.5);
- teacher: PGD-``--teacher-steps`` (step 2.5ε/steps) adversarial training, ``--teacher-epochs`` epochs, ℓ1
  5e-6 (E.8), the preset's cyclic SGD (not trained when ``--only`` names no CC-Dist run);
- students: CC-IBP and CC-Dist (β = 5/w, E.8) at α = 0.05 (``ALPHA``), ``--seeds`` paired seeds (the same
  seed gives both methods the same initial weights and batches), ``--epochs`` epochs with the preset's
  160-epoch schedule scaled (1 warm-up epoch, ramp over half of the rest, lr decays in the last two), and the
  one-step training attack (10ε, as the ``cifar10-jpeg-cpu`` preset) instead of the paper's 8 steps;
- evaluation on the 2000 test images: standard, PGD-40 (``attacks.EVAL_PGD``), IBP-certified and
  CROWN-IBP-certified accuracy (float64, sound). CROWN-IBP on all of them, not the paper's full CROWN from
  auto_LiRPA: auto_LiRPA at 9d100ec fails on this 32×32 network (a patches-mode shape error; its dense mode
  ran out of memory), and the native full CROWN (equal to auto_LiRPA's where auto_LiRPA finishes) costs
  seconds to minutes per point on a CPU (``benchmarks/resnet_crown_cost.py``);
- ``--crown-points N``: also full-CROWN-certified accuracy (``crown_cert_acc``: CROWN with CROWN
  intermediate bounds, native, float64, sound) on the first N test images, beside IBP- and CROWN-IBP-certified
  accuracy on the same N (``result.json``'s ``full_crown``; added to a finished run without retraining), for
  the students only (the PGD teacher's would cost hours: IBP certifies none of its points).

Output: ``<out>/<run>/result.json`` per run, then ``docs/results/resnet_cpu.{json,md}`` (``--docs``).

A run already in ``--out`` is reused only when its recorded settings (``<run>/settings.json``: the run's
width, epochs, seed, β, ... and, for CC-Dist, the teacher's weights by hash) equal this invocation's and its
outputs are complete; otherwise the script stops before training with one line naming the run (exit 2).
``--overwrite`` retrains exactly those runs (see ``reproduce_cpu.check_run_folder``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_analysis import paired_t_interval, per_seed_differences  # noqa: E402
from reproduce_cpu import (  # noqa: E402
    VAL_SIZE,
    add_run_folder_options,
    build_student,
    check_run_folder,
    evaluate,
    run_script,
    split_tensors,
    weights_sha256,
)

EPS = 2 / 255
#: α = 0.05: the value chosen on validation for this subset and ε at CPU scale (cnn3, docs/RESULTS.md); the
#: preset's 0.01 (the paper's, for 160 epochs) certified almost nothing there in 8 epochs
ALPHA = 0.05


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    kind: str  # teacher | cc_ibp | cc_dist
    seed: int
    width: int
    epochs: int
    teacher_steps: int = 5
    teacher: str | None = None
    beta_w: float = 5.0  # CC-Dist's β·w (w the feature width); 5 is the paper's (E.8)


def overrides(run: Run, out: Path) -> list[str]:
    """``--set`` overrides of the ``cifar10-2-prn18`` (student) or ``-teacher`` preset for one run."""
    common = [
        f"seed={run.seed}",
        "device=cpu",
        "data.name=cifar10-jpeg",
        f"data.val_split={VAL_SIZE}",
        f"model.width={run.width}",
        f"schedule.epochs={run.epochs}",
        f"log.output_dir={out}",
        "log.progress=false",
        "log.tensorboard=false",
        "log.val_size=500",
        "log.checkpoint_every=1",
    ]
    if run.kind == "teacher":
        return common + [
            f"loss.attack.steps={run.teacher_steps}",
            f"loss.attack.step_size={2.5 / run.teacher_steps}",
        ]
    return common + [
        f"loss.method={run.kind}",
        f"loss.alpha={ALPHA}",
        # β = beta_w / w, w = 8 × width (the PreActResNet18's feature width); 5/w is the preset's default
        *(
            [f"loss.beta={run.beta_w / (8 * run.width)}"]
            if run.kind == "cc_dist" and run.beta_w != 5.0
            else []
        ),
        "loss.attack.steps=1",
        "loss.attack.step_size=10.0",
        "loss.attack.eps_factor=1.0",
        "schedule.warmup_epochs=1",
        f"schedule.ramp_up_epochs={max(1, (run.epochs - 1) // 2)}",
        f"optim.lr_decay_epochs=[{run.epochs - 2}, {run.epochs - 1}]",
    ]


def run_settings(run: Run, teacher_known: bool = True) -> dict[str, Any]:
    """What a run records and a later invocation compares: the run without its name and teacher path, and
    for CC-Dist the teacher's weights by hash (when ``teacher_known``: the teacher has finished)."""
    settings = {k: v for k, v in dataclasses.asdict(run).items() if k not in ("name", "teacher")}
    if run.kind == "teacher":
        settings.pop("beta_w")  # a student's setting
    if run.kind == "cc_dist" and run.teacher and teacher_known:
        settings["teacher_sha256"] = weights_sha256(Path(run.teacher))
    return json.loads(json.dumps(settings))


def run_one(run: Run, root: str, overwrite: bool = False, crown_points: int = 0) -> dict[str, Any]:
    """Train (resuming a killed run) and evaluate one run; writes ``<root>/<name>/result.json``. A run
    already in its folder is reused only when its recorded settings equal this one's (``overwrite``: it is
    retrained otherwise). ``crown_points``: full CROWN on that many test images too (``full_crown``), added
    to a reused result that lacks it."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    from ccdist_plugin.config import load_config
    from ccdist_plugin.data import load_dataset
    from ccdist_plugin.trainer import Trainer

    out = Path(root) / run.name
    result_path = out / "result.json"
    check_run_folder(out, run_settings(run), overwrite)
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        return add_full_crown(result, out, crown_points)
    out.mkdir(parents=True, exist_ok=True)
    preset = "cifar10-2-prn18-teacher" if run.kind == "teacher" else "cifar10-2-prn18"
    cfg = load_config(preset, overrides(run, out))
    data = load_dataset("cifar10-jpeg", val_split=VAL_SIZE)
    ckpt = out / "checkpoint.pt"
    t0 = time.perf_counter()
    trainer = Trainer(
        build_student(cfg, data.spec), cfg, teacher=run.teacher if run.kind == "cc_dist" else None
    )
    model = trainer.fit(data.train, data.val, resume=ckpt.is_file()).model.cpu().eval()
    train_s = time.perf_counter() - t0
    xt, yt = split_tensors(data.test)
    result = {
        "run": dataclasses.asdict(run),
        "train_s": train_s,
        "eps": EPS,
        "width": model.feature_dim,
        "beta": None if run.kind != "cc_dist" else run.beta_w / model.feature_dim,
        "test": evaluate(model, xt, yt, EPS, pgd_steps=40, points=True),
    }
    result_path.write_text(json.dumps(result, indent=1))
    return add_full_crown(result, out, crown_points, model)


def add_full_crown(result: dict[str, Any], out: Path, points: int, model=None) -> dict[str, Any]:
    """``result`` with full-CROWN-certified accuracy on the first ``points`` test images
    (``reproduction.measure.evaluate_full_crown``), computed once per point count and saved in
    ``<out>/result.json``; unchanged when ``points`` is 0."""
    if points <= 0 or result.get("full_crown", {}).get("points") == points:
        return result
    if result["run"]["kind"] == "teacher":
        # the PGD teacher is not certifiably trained: IBP certifies none of its points, so full CROWN
        # would bound every correct one at its dearest (hours on a CPU) for a figure no table shows
        return result
    from reproduction.measure import evaluate_full_crown

    from ccdist_plugin.checkpoint import load_model
    from ccdist_plugin.data import load_dataset

    torch.set_num_threads(1)
    if model is None:
        model = load_model(out / "checkpoint.pt").cpu().eval()
    xt, yt = split_tensors(load_dataset("cifar10-jpeg", val_split=VAL_SIZE).test, points)
    result["full_crown"] = evaluate_full_crown(model, xt, yt, EPS, points)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


METRICS = (
    ("std", "standard"),
    ("pgd40", "PGD-40"),
    ("ibp_cert", "IBP-cert"),
    ("crown_cert", "CROWN-IBP-cert"),
)


#: the full-CROWN table's columns (``evaluate_full_crown``), all on the same first ``--crown-points`` images
FULL_CROWN_METRICS = (
    ("points", "points"),
    ("ibp_cert_acc", "IBP-cert"),
    ("crown_ibp_cert_acc", "CROWN-IBP-cert"),
    ("crown_cert_acc", "CROWN-cert"),
    ("crown_bounded_points", "points full CROWN bounded"),
    ("crown_cpu_s_per_point", "full CROWN CPU s per bounded point"),
    ("unsound_points", "certified and broken by PGD-40"),
)


def _with_crown(results: list[dict]) -> list[dict]:
    return [r for r in results if "full_crown" in r]


def _group(res: dict) -> str:
    """teacher | cc_ibp | cc_dist@<β·w> (results written before β·w was recorded are 5/w runs)."""
    run = res["run"]
    return f"cc_dist@{run.get('beta_w', 5.0):g}" if run["kind"] == "cc_dist" else run["kind"]


def _paired(ibp: dict[int, dict], dist: dict[int, dict]) -> dict[str, Any]:
    common = set(ibp) & set(dist)  # only seeds both methods ran are paired
    out: dict[str, Any] = {"seeds": sorted(common)}
    for key, label in METRICS:
        _, diffs = per_seed_differences(
            {s: dist[s]["test"][key] for s in common}, {s: ibp[s]["test"][key] for s in common}, scale=1.0
        )
        interval = paired_t_interval(diffs) if len(diffs) > 1 else None
        out[key] = {
            "label": label,
            "differences": diffs,
            "mean": statistics.mean(diffs) if diffs else None,
            "ci95": None if interval is None else [interval.low, interval.high],
            "dist_higher_in": sum(d > 0 for d in diffs),
        }
    return out


def report(results: dict[str, dict], args: argparse.Namespace) -> dict[str, Any]:
    """The table (mean ± std over seeds) and, per β, the paired CC-Dist − CC-IBP differences per metric
    (only seeds that both methods ran)."""
    rows: dict[str, list[dict]] = {}
    for res in sorted(results.values(), key=lambda r: r["run"]["seed"]):
        rows.setdefault(_group(res), []).append(res)
    order = [
        "teacher",
        "cc_ibp",
        *sorted((g for g in rows if g.startswith("cc_dist@")), key=lambda g: -float(g[8:])),
    ]
    by_seed = {g: {r["run"]["seed"]: r for r in rows[g]} for g in order if g in rows}
    ibp = by_seed.get("cc_ibp", {})
    any_row = next(iter(ibp.values()), None)
    return {
        "args": {k: v for k, v in vars(args).items() if k != "docs"},
        "eps": EPS,
        "alpha": ALPHA,
        "rows": {
            g: {key: [r["test"][key] for r in rows[g]] for key, _ in METRICS}
            | {
                "seeds": [r["run"]["seed"] for r in rows[g]],
                "train_s": [r["train_s"] for r in rows[g]],
                "unsound_points": sum(r["test"]["unsound_points"] for r in rows[g]),
            }
            for g in order
            if g in rows
        },
        "paired": {g: _paired(ibp, by_seed[g]) for g in order if g.startswith("cc_dist@") and g in by_seed},
        "attack": None if any_row is None else any_row["test"]["attack"],
        "width": None if any_row is None else any_row["width"],
        "full_crown": {
            g: {
                key: [r["full_crown"][key] for r in rows[g] if "full_crown" in r]
                for key, _ in FULL_CROWN_METRICS
            }
            | {"seeds": [r["run"]["seed"] for r in rows[g] if "full_crown" in r]}
            for g in order
            if _with_crown(rows.get(g, []))
        },
    }


def _name(group: str) -> str:
    if group.startswith("cc_dist@"):
        return f"CC-Dist (β = {group[8:]}/w)"
    return {"teacher": "PGD teacher", "cc_ibp": "CC-IBP"}[group]


def markdown(summary: dict[str, Any]) -> str:
    a = summary["args"]
    betas = ",".join(g[8:] for g in summary["paired"])
    lines = [
        "# CC-IBP vs CC-Dist on a narrow PreActResNet18 (CPU scale)",
        "",
        f"Command: `python benchmarks/resnet_cpu.py --width {a['width']} --seeds {a['seeds']} --epochs "
        f"{a['epochs']} --teacher-epochs {a['teacher_epochs']} --teacher-steps {a['teacher_steps']} "
        f"--betas {betas} --workers {a['workers']}` (2 CPU cores, one thread per run).",
        "",
        "CIFAR-10 JPEG subset (9000 train, 2000 test images), ε = 2/255; "
        f"PreActResNet18 of width {a['width']} (feature width {summary['width']}) for teacher and students; "
        f"α = {summary['alpha']}; paired seeds (same initial weights and batches for both methods).",
        f"Evaluation on all 2000 test images: {summary['attack']}; certificates in float64. Mean ± sample",
        "standard deviation over seeds, in %.",
        "",
        # no time column: the runs shared 2 cores with up to three others, and a killed run that
        # resumed records only its resumed part (train_s in the JSON)
        "| model | seeds | " + " | ".join(label for _, label in METRICS) + " |",
        "|---" * (len(METRICS) + 2) + "|",
    ]
    for group, row in summary["rows"].items():
        cells = [_ms(row[key]) for key, _ in METRICS]
        seeds = ",".join(str(s) for s in row["seeds"])
        lines.append(f"| {_name(group)} | {seeds} | " + " | ".join(cells) + " |")
    for group, paired in summary["paired"].items():
        lines += [
            "",
            f"Paired differences {_name(group)} − CC-IBP (percentage points, per seed {paired['seeds']}; "
            "95 % t-interval):",
            "",
            "| metric | per seed | mean | 95 % interval | CC-Dist higher in |",
            "|---|---|---|---|---|",
        ]
        for key, _ in METRICS:
            p = paired[key]
            per = ", ".join(f"{100 * d:+.2f}" for d in p["differences"])
            ci = "n/a" if p["ci95"] is None else f"[{100 * p['ci95'][0]:+.2f}, {100 * p['ci95'][1]:+.2f}]"
            mean = "n/a" if p["mean"] is None else f"{100 * p['mean']:+.2f}"
            lines.append(
                f"| {p['label']} | {per} | {mean} | {ci} | {p['dist_higher_in']}/{len(p['differences'])} |"
            )
    unsound = sum(r["unsound_points"] for r in summary["rows"].values())
    lines += ["", f"Certified points broken by PGD-40 (must be 0): {unsound}.", ""]
    lines += _full_crown_markdown(summary.get("full_crown", {}))
    return "\n".join(lines)


def _full_crown_markdown(full: dict[str, dict]) -> list[str]:
    """The full-CROWN table (``--crown-points``), per group: mean over the seeds that have it."""
    if not full:
        return []
    lines = [
        "Full CROWN (CROWN intermediate bounds, the paper's Table 11b verifier; native, float64, equal to",
        "auto_LiRPA's CROWN where auto_LiRPA finishes) on the first test images only, beside IBP and",
        "CROWN-IBP on the same images (a point counts as certified when IBP or the CROWN variant certifies",
        "it). In %, mean over the seeds listed; CPU seconds per point that full CROWN bounded (one thread).",
        "",
        "| model | seeds | " + " | ".join(label for _, label in FULL_CROWN_METRICS) + " |",
        "|---" * (len(FULL_CROWN_METRICS) + 2) + "|",
    ]
    for group, row in full.items():
        cells = []
        for key, _ in FULL_CROWN_METRICS:
            mean = statistics.mean(row[key])
            cells.append(
                f"{100 * mean:.2f}"
                if key.endswith("_acc")
                else f"{mean:.1f}"
                if key.endswith("point")
                else f"{mean:g}"
            )
        seeds = ",".join(str(s) for s in row["seeds"])
        lines.append(f"| {_name(group)} | {seeds} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/resnet-cpu")
    p.add_argument("--width", type=int, default=8, help="first-stage channels of the PreActResNet18 (8)")
    p.add_argument("--seeds", type=int, default=4, help="paired seeds per method (4)")
    p.add_argument("--epochs", type=int, default=12, help="student epochs (12)")
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--teacher-steps", type=int, default=5, help="PGD steps of the teacher (step 2.5ε/steps)")
    p.add_argument("--betas", default="5", help="β·w of the CC-Dist rows, comma-separated (5, the paper's)")
    p.add_argument("--workers", type=int, default=2, help="parallel training processes (1 thread each)")
    p.add_argument(
        "--only",
        default="",
        help="run only these students (names, comma-separated), no report; no teacher unless one is CC-Dist",
    )
    p.add_argument("--docs", default="docs/results", help="where resnet_cpu.{json,md} go ('' for nowhere)")
    p.add_argument(
        "--crown-points",
        type=int,
        default=0,
        help="also full-CROWN-certified accuracy on the first N test images (seconds to minutes per point)",
    )
    add_run_folder_options(p)
    run_script(_main, p.parse_args(argv))


def _main(args: argparse.Namespace) -> None:
    root = Path(args.out)
    teacher = Run("teacher", "teacher", 0, args.width, args.teacher_epochs, args.teacher_steps)
    ckpt = str(root / "teacher" / "checkpoint.pt")
    betas = [float(b) for b in args.betas.split(",")]
    students = [Run(f"cc_ibp-s{seed}", "cc_ibp", seed, args.width, args.epochs) for seed in range(args.seeds)]
    students += [
        Run(
            f"cc_dist-s{seed}" if beta == 5.0 else f"cc_dist-b{beta:g}-s{seed}",
            "cc_dist",
            seed,
            args.width,
            args.epochs,
            teacher=ckpt,
            beta_w=beta,
        )
        for beta in betas
        for seed in range(args.seeds)
    ]
    if args.only:  # e.g. one more run beside a running invocation (each run's folder is locked)
        students = [s for s in students if s.name in args.only.split(",")]
    # the report needs the teacher's row, the CC-Dist runs its checkpoint; `--only cc_ibp-s0` needs neither
    needs_teacher = not args.only or any(s.kind == "cc_dist" for s in students)
    if not args.overwrite:  # before anything starts: runs that cannot be reused stop the script
        teacher_done = (root / "teacher" / "result.json").is_file()
        for r in [teacher, *students] if needs_teacher else students:
            check_run_folder(root / r.name, run_settings(r, teacher_done), False, record=False)
    results: dict[str, dict] = {}
    with ProcessPoolExecutor(args.workers) as pool:
        submit = lambda r: pool.submit(run_one, r, str(root), args.overwrite, args.crown_points)  # noqa: E731
        t_future = submit(teacher) if needs_teacher else None
        futures = {s.name: submit(s) for s in students if s.kind == "cc_ibp"}
        if t_future is not None:
            results["teacher"] = t_future.result()  # the CC-Dist runs need its checkpoint
        futures |= {s.name: submit(s) for s in students if s.kind == "cc_dist"}
        for name, fut in futures.items():
            results[name] = fut.result()
            print(f"{name}: {json.dumps({k: results[name]['test'][k] for k, _ in METRICS})}", flush=True)
    if args.only:
        return
    summary = report(results, args)
    text = markdown(summary)
    print(text)
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        (docs / "resnet_cpu.json").write_text(json.dumps(summary, indent=1))
        (docs / "resnet_cpu.md").write_text(text)


if __name__ == "__main__":
    main()

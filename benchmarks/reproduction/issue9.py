"""The issue-9 protocol (``--protocol issue9``, the default): the published cnn3 runs. Stage 1 trains the
teacher and the α candidates; stage 2, in priority order, CC-Dist, more seeds, the β sweep, digits and
branch and bound; then the report (``issue9_report.py``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from .bab import run_bab
from .issue9_report import long_teacher_name, report_from_disk, select_alpha
from .jobs import Job
from .plan import CIFAR_EPS, parse_floats
from .runfolders import preflight
from .train import run_job

log = logging.getLogger("reproduce_cpu")


#: the issue-9 values of the options whose defaults differ between protocols (``None`` on the command line)
ISSUE9_DEFAULTS: dict[str, Any] = dict(
    out="runs/repro-cpu",
    seeds=3,
    epochs=8,
    teacher_epochs=10,
    teacher_steps=5,
    alphas="0.01,0.05",
    beta_sweep="0,1,5,20,100",
    bab_count=100,
    bab_timeout=30.0,
)
#: the CIFAR teacher's run
TEACHER = "teacher-s0"


def run_issue9(args: argparse.Namespace) -> None:
    """The issue-9 protocol: both stages and the report (or only BaB of ``--bab-only``'s runs, or only the
    report with ``--report-only``). Every run is resumable (finished runs are reused)."""
    for key, value in ISSUE9_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    root = str(Path(args.out))
    Path(root).mkdir(parents=True, exist_ok=True)
    started = time.time()
    alphas = parse_floats(args.alphas, "--alphas")
    sweep = parse_floats(args.beta_sweep, "--beta-sweep")
    main_betas = parse_floats(args.main_betas, "--main-betas")
    kw = dict(epochs=args.epochs, teacher_epochs=args.teacher_epochs, teacher_steps=args.teacher_steps)
    if args.bab_only:
        run_bab_only(args.bab_only.split(","), root, args)
        return
    if args.report_only:
        report_from_disk(root, alphas, sweep, args, time.time() - started)
        return
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        first, best_alpha = run_stage1(pool, args, root, alphas, kw)
        queue = stage2_queue(args, root, best_alpha, alphas, sweep, main_betas, kw)
        preflight([item for what, item in queue if what == "train"], root, args.overwrite)
        futures = []
        for what, item in queue:
            if what == "train":
                futures.append((item.name, pool.submit(run_job, item, root, args.overwrite)))
            else:
                args_bab = (item, root, "cifar10-jpeg", CIFAR_EPS, args.bab_count, args.bab_timeout)
                futures.append((f"bab:{item}", pool.submit(run_bab, *args_bab)))
        if len(alphas) == 1:
            futures = list(first.items()) + futures
        for name, fut in futures:
            try:
                res = fut.result()
            except Exception as err:  # noqa: BLE001 - reported; a failed BaB never counts as certified
                log.error("%s failed: %r", name, err)
                continue
            log.info(
                "done %s: %s", name, json.dumps(res.get("test") or res.get("val") or res, default=str)[:400]
            )
    report_from_disk(root, alphas, sweep, args, time.time() - started)


def run_bab_only(names: list[str], root: str, args: argparse.Namespace) -> None:
    """Branch and bound of the named runs only, in parallel (each waits for its run)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(len(names), args.workers)) as threads:  # --workers verifiers at once
        done = threads.map(
            lambda n: run_bab(n, root, "cifar10-jpeg", CIFAR_EPS, args.bab_count, args.bab_timeout), names
        )
        for n, res in zip(names, done, strict=True):
            log.info("BaB %s: %s", n, json.dumps(res, default=str)[:400])


def run_stage1(
    pool: ProcessPoolExecutor, args: argparse.Namespace, root: str, alphas: list[float], kw: dict[str, Any]
) -> tuple[dict[str, Future], float]:
    """Stage 1: the teacher, the α candidates (CC-IBP seed 0) and the digits teacher, submitted; with several
    α candidates, waits for them and chooses α on validation. Returns the submitted runs and α."""
    stage1 = [Job(TEACHER, "cifar10-jpeg", "teacher", 0, **kw)]
    stage1 += [Job(f"cc_ibp-a{a:g}-s0", "cifar10-jpeg", "cc_ibp", 0, alpha=a, **kw) for a in alphas]
    stage1 += [] if args.skip_digits else [Job("digits-teacher-s0", "digits", "teacher", 0)]
    preflight(stage1, root, args.overwrite)
    first = {job.name: pool.submit(run_job, job, root, args.overwrite) for job in stage1}
    if len(alphas) > 1:  # α is chosen on validation before the other runs start
        results: dict[str, dict] = {}
        for name, fut in first.items():
            results[name] = fut.result()
            log.info("done %s: %s", name, json.dumps(results[name].get("test") or results[name].get("val")))
        best_alpha = select_alpha(results, alphas)
        log.info("selected alpha=%g on validation", best_alpha)
    else:
        best_alpha = alphas[0]
        log.info("alpha=%g given (no selection)", best_alpha)
    return first, best_alpha


def stage2_queue(
    args: argparse.Namespace,
    root: str,
    best_alpha: float,
    alphas: list[float],
    sweep: list[float],
    main_betas: list[float],
    kw: dict[str, Any],
) -> list[tuple[str, Any]]:
    """Stage 2 as ``("train", Job)`` and ``("bab", run name)`` items, in priority order: seed 0 of CC-Dist,
    BaB of CC-IBP seed 0, more seeds, the β sweep (validation only), digits, the last seeds, BaB of the
    other runs (each waits for its checkpoint)."""
    a = f"{best_alpha:g}"
    teacher_ckpt = str(Path(root) / TEACHER / "checkpoint.pt")
    bab_on = bool(os.environ.get("ABCROWN_DIR"))
    if not bab_on:
        log.warning("ABCROWN_DIR is not set: no branch-and-bound results")

    def main_job(kind: str, seed: int, bw: float = main_betas[0]) -> Job:
        name = f"cc_ibp-a{a}-s{seed}" if kind == "cc_ibp" else f"cc_dist-a{a}-b{bw:g}-s{seed}"
        return Job(
            name,
            "cifar10-jpeg",
            kind,
            seed,
            alpha=best_alpha,
            beta_w=bw,
            teacher=teacher_ckpt,
            evaluate_val=seed == 0,
            **kw,
        )

    queue: list[tuple[str, Any]] = []
    if len(alphas) == 1:  # these need no teacher: start them while the teacher trains
        queue += [("train", main_job("cc_ibp", s)) for s in range(1, args.seeds)]
    queue += [("train", main_job("cc_dist", 0, bw)) for bw in main_betas]
    if bab_on:
        queue.append(("bab", f"cc_ibp-a{a}-s0"))
    for s in range(1, min(args.seeds, 2)):
        queue += [("train", main_job("cc_ibp", s))] * (len(alphas) > 1) + [
            ("train", main_job("cc_dist", s, bw)) for bw in main_betas
        ]
    for bw in sweep:
        if bw != 0.0 and bw not in main_betas:
            job = Job(
                f"cc_dist-a{a}-b{bw:g}-s0",
                "cifar10-jpeg",
                "cc_dist",
                0,
                alpha=best_alpha,
                beta_w=bw,
                teacher=teacher_ckpt,
                evaluate_test=False,
                **kw,
            )
            queue.append(("train", job))
    if bab_on:
        queue += [("bab", f"cc_dist-a{a}-b{bw:g}-s0") for bw in main_betas]
    if not args.skip_digits:
        dt = str(Path(root) / "digits-teacher-s0" / "checkpoint.pt")
        for s in range(args.seeds):
            for kind in ("cc_ibp", "cc_dist"):
                queue.append(("train", Job(f"digits-{kind}-s{s}", "digits", kind, s, 0.5, 5.0, dt)))
    for s in range(2, args.seeds):
        queue += [("train", main_job("cc_ibp", s))] * (len(alphas) > 1) + [
            ("train", main_job("cc_dist", s, bw)) for bw in main_betas
        ]
    if args.long_teacher_epochs:  # does a better teacher help? (same students, a longer teacher)
        queue += _long_teacher_queue(args, root, main_job, main_betas, kw)
    if bab_on:
        for s in range(1, min(args.bab_seeds, args.seeds)):
            queue += [("bab", f"cc_ibp-a{a}-s{s}")]
            queue += [("bab", f"cc_dist-a{a}-b{bw:g}-s{s}") for bw in main_betas]
        if args.bab_teacher:
            queue.append(("bab", TEACHER))
    return queue


def _long_teacher_queue(
    args: argparse.Namespace,
    root: str,
    main_job: Callable[..., Job],
    main_betas: list[float],
    kw: dict[str, Any],
) -> list[tuple[str, Any]]:
    """A teacher of ``--long-teacher-epochs`` and the CC-Dist rows again with it."""
    queue: list[tuple[str, Any]] = []
    long_teacher = Job(
        long_teacher_name(args),
        "cifar10-jpeg",
        "teacher",
        0,
        **{**kw, "teacher_epochs": args.long_teacher_epochs},
    )
    queue.append(("train", long_teacher))
    for s in range(args.seeds):
        for bw in main_betas:
            job = main_job("cc_dist", s, bw)
            job.name = f"{job.name}-t{args.long_teacher_epochs}"
            job.teacher = str(Path(root) / long_teacher.name / "checkpoint.pt")
            queue.append(("train", job))
    return queue

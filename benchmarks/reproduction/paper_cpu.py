"""``--protocol paper-cpu`` (issue 17): its stages in order, ``teacher``, ``select-alpha``,
``select-beta``, ``students``, ``bab``, ``report`` (each later stage includes the earlier ones)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .bab import run_bab
from .jobs import Job
from .paper_cpu_report import report_paper_cpu
from .plan import (
    CIFAR_EPS,
    DIGITS_EPS,
    PAPER_CPU_STAGES,
    paper_cpu_names,
    paper_cpu_plan,
    select_by_validation,
)
from .runfolders import preflight
from .train import run_job

log = logging.getLogger("reproduce_cpu")


def run_paper_cpu(args: argparse.Namespace) -> None:
    """``--protocol paper-cpu``: teacher, α on validation (CC-IBP seed 0), β on validation (CC-Dist seed 0),
    ``seeds`` paired seeds of CC-IBP and of CC-Dist at β = 5/w and at the chosen β, BaB, the report.
    Every run is resumable (finished runs are reused; a killed run resumes from its last epoch)."""
    plan = paper_cpu_plan(args)
    root = str(Path(args.out))
    Path(root).mkdir(parents=True, exist_ok=True)
    until = PAPER_CPU_STAGES.index(args.until)
    ds = plan["dataset"]
    common = dict(
        epochs=plan["epochs"],
        teacher_epochs=plan["teacher_epochs"],
        teacher_steps=plan["teacher_steps"],
        protocol="paper-cpu",
        device=plan["device"],
    )
    teacher = Job("teacher-s0", ds, "teacher", 0, **common)
    teacher_ckpt = str(Path(root) / teacher.name / "checkpoint.pt")

    def student(kind: str, seed: int, alpha: float, beta_w: float | None = None, val: bool = False) -> Job:
        name = f"cc_ibp-a{alpha:g}-s{seed}" if kind == "cc_ibp" else f"cc_dist-a{alpha:g}-b{beta_w:g}-s{seed}"
        return Job(name, ds, kind, seed, alpha, beta_w, teacher_ckpt, evaluate_val=val, **common)

    def run_all(pool, jobs: list[Job]) -> dict[str, dict]:
        preflight(jobs, root, args.overwrite)
        futures = {j.name: pool.submit(run_job, j, root, args.overwrite) for j in jobs}
        done = {}
        for name, fut in futures.items():
            done[name] = fut.result()
            log.info("done %s: %s", name, _brief(done[name]))
        return done

    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        # the teacher and the α candidates (which need no teacher to train) start together
        alpha_jobs = [student("cc_ibp", 0, a, val=True) for a in plan["alphas"]]
        done = run_all(pool, [teacher] + (alpha_jobs if until >= 1 else []))
        if until < 1:
            return
        alpha = select_by_validation({j.alpha: done[j.name] for j in alpha_jobs})
        log.info("selected alpha=%g on validation", alpha)
        if until < 2:
            return
        beta_jobs = [student("cc_dist", 0, alpha, bw, val=True) for bw in plan["beta_sweep"]]
        done.update(run_all(pool, beta_jobs))
        beta = select_by_validation({j.beta_w: done[j.name] for j in beta_jobs})
        log.info("selected beta*w=%g on validation (the paper's 5 is run too)", beta)
        if until < 3:
            return
        betas = sorted({5.0, beta})
        jobs = [student("cc_ibp", s, alpha) for s in range(1, plan["seeds"])]
        jobs += [student("cc_dist", s, alpha, bw) for s in range(1, plan["seeds"]) for bw in betas]
        run_all(pool, jobs)
    if until >= 4:
        if os.environ.get("ABCROWN_DIR"):
            names = paper_cpu_names(plan, alpha)["cc_ibp"]
            for bw in betas:
                names += paper_cpu_names(plan, alpha, bw)["cc_dist"]
            from concurrent.futures import ThreadPoolExecutor

            eps = CIFAR_EPS if ds == "cifar10-jpeg" else DIGITS_EPS
            with ThreadPoolExecutor(args.workers) as threads:  # --workers verifiers at once
                bab_args = (root, ds, eps, plan["bab_count"], plan["bab_timeout"], plan["device"])
                for n, res in zip(names, threads.map(lambda n: run_bab(n, *bab_args), names), strict=True):
                    log.info("BaB %s: %s", n, json.dumps(res, default=str)[:300])
        else:
            log.warning("ABCROWN_DIR is not set: no branch-and-bound; the primary metric is not available")
    report_paper_cpu(root, plan, Path(args.docs))


def _brief(result: dict) -> str:
    split = result.get("test") or result.get("val") or {}
    return json.dumps({k: v for k, v in split.items() if k != "points"})[:300]

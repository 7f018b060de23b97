"""Stages ``teacher``, ``select-alpha``, ``select-beta`` and ``students``, one run at a time: train a job
(unless its checkpoint exists) and evaluate it, resumably and safely beside other processes."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from .jobs import Job, build_student, build_unseeded, issue9_config, paper_cpu_config
from .measure import diagnostics, evaluate, split_tensors
from .plan import DIGITS_VAL, VAL_SIZE
from .runfolders import check_run_folder, job_settings, teacher_weights_sha256, wait_for_run, wait_or_lock


def run_job(job: Job, root: str, overwrite: bool = False) -> dict[str, Any]:
    """Train (unless its checkpoint exists) and evaluate one job; writes ``<root>/<name>/result.json``.
    A run already in its folder is reused only when its recorded settings equal this job's
    (:func:`check_run_folder`; ``overwrite``: retrain it otherwise)."""
    if job.device == "cpu":
        torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    from ccdist_plugin.checkpoint import load_model
    from ccdist_plugin.data import load_dataset
    from ccdist_plugin.fileio import file_sha256
    from ccdist_plugin.trainer import Trainer

    out = Path(root) / job.name
    result_path = out / "result.json"
    check_run_folder(out, job_settings(job, teacher_weights_sha256(job)), overwrite)
    if result_path.is_file() and not _missing_splits(job, result_path):
        return json.loads(result_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    if not result_path.is_file():
        wait_or_lock(out / "running.lock", result_path)
    if result_path.is_file() and not _missing_splits(job, result_path):
        return json.loads(result_path.read_text())
    if job.kind == "cc_dist":  # the teacher may still be training in another process
        wait_for_run(Path(job.teacher).parent)
    if job.protocol == "paper-cpu":
        cfg = paper_cpu_config(job, out)
        eps = cfg.eps
        val = VAL_SIZE if job.dataset == "cifar10-jpeg" else DIGITS_VAL
        data = load_dataset(job.dataset, val_split=val)
        loss = None  # built by the Trainer from cfg.loss (attack included)
    else:
        cfg, data, eps, loss = issue9_config(job, out)
    ckpt = out / "checkpoint.pt"
    if ckpt.is_file() and (out / "train_time.json").is_file():
        model = load_model(ckpt)
        train_s = json.loads((out / "train_time.json").read_text())["train_s"]
    else:
        model = (
            build_student(cfg, data.spec) if job.protocol == "paper-cpu" else build_unseeded(cfg, data.spec)
        )
        t0 = time.perf_counter()
        # paper-cpu: the Trainer builds the config's loss with this teacher; a loss object carries its own
        teacher = job.teacher if loss is None and job.kind == "cc_dist" else None
        trainer = Trainer(model, cfg, teacher=teacher, loss=loss)
        resume = job.protocol == "paper-cpu" and ckpt.is_file()  # killed mid-run: continue from its epoch
        fit = trainer.fit(data.train, data.val, resume=resume)
        train_s = time.perf_counter() - t0
        (out / "train_time.json").write_text(json.dumps({"train_s": train_s, "resumed": resume}))
        model = fit.model
    model = model.cpu().eval()
    result: dict[str, Any] = {
        "job": dataclasses.asdict(job),
        "train_s": train_s,
        "eps": eps,
        "width": model.feature_dim,
    }
    if result_path.is_file():  # a finished run asked for a split it was not evaluated on: keep the rest
        result = {**json.loads(result_path.read_text()), "job": dataclasses.asdict(job)}
    paper = job.protocol == "paper-cpu"
    if job.evaluate_val and data.val is not None and "val" not in result:
        xv, yv = split_tensors(data.val)
        result["val"] = evaluate(model, xv, yv, eps, pgd_steps=10)
    if job.evaluate_test and "test" not in result:
        xt, yt = split_tensors(data.test)
        result["test"] = evaluate(model, xt, yt, eps, pgd_steps=40, points=paper)
        if paper:  # appendix E.1 diagnostics; CC-IBP too is measured against the teacher
            teacher = None
            if job.teacher:
                wait_for_run(Path(job.teacher).parent)
                teacher = load_model(job.teacher).cpu().eval()
            result["test"].update(diagnostics(model, teacher, xt, yt, eps))
            result["checkpoint_sha256"] = file_sha256(ckpt)
    result_path.write_text(json.dumps(result, indent=1))
    return result


def _missing_splits(job: Job, result_path: Path) -> bool:
    """Whether a finished run lacks an evaluation this job asks for (e.g. a β-sweep run, evaluated on
    validation only, that became a main run evaluated on test)."""
    done = json.loads(result_path.read_text())
    return (job.evaluate_test and "test" not in done) or (job.evaluate_val and "val" not in done)

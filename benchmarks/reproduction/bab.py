"""Stage ``bab``: branch and bound (α,β-CROWN) on the first test points of a finished run."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch

from .measure import split_tensors
from .plan import VAL_SIZE
from .runfolders import wait_or_lock

#: α,β-CROWN settings for CPU: our export already ran PGD-50 × 3 restarts on every point it sends, so the
#: verifier's own attack is cut from 500 steps × 100 restarts (the template's GPU setting) to 20 × 2
BAB_CPU_OVERRIDES = {
    "general.device": "cpu",
    "attack.pgd_steps": 20,
    "attack.pgd_restarts": 2,
    "solver.batch_size": 64,
}


_EXPORT_LOCK = threading.Lock()


def _export_for_bab(
    model,
    x,
    y,
    out: Path,
    eps: float,
    count: int,
    timeout_s: float,
    template: str,
    dataset: str,
    device: str = "cpu",
) -> None:
    """ONNX + VNN-LIB of the first ``count`` points, with α,β-CROWN's CPU settings."""
    from ccdist_plugin.verification import export_instances

    export_instances(
        model,
        (x, y),
        out / "bab",
        eps,
        count=count,
        timeout_s=timeout_s,
        template=template,
        # our IBP pre-check only: export's CROWN pre-check runs certify() in batches of 256, which for
        # cnn3 on CIFAR needs ~19 GB (killed by the OOM killer here); α,β-CROWN bounds the root itself
        methods=("ibp",),
        config_overrides={**BAB_CPU_OVERRIDES, "general.device": device},
        dataset_name=dataset,
        checkpoint_path=str(out / "checkpoint.pt"),
    )


def run_bab(
    name: str, root: str, dataset: str, eps: float, count: int, timeout_s: float, device: str = "cpu"
) -> dict[str, Any]:
    """Export the first ``count`` test points of a run and verify them with α,β-CROWN."""
    torch.set_num_threads(1)
    from ccdist_plugin.checkpoint import load_model
    from ccdist_plugin.data import load_dataset
    from ccdist_plugin.verification import run_verification

    out = Path(root) / name
    path = out / "bab.json"
    if path.is_file():
        return json.loads(path.read_text())
    wait_or_lock(out / "bab.lock", path)
    if path.is_file():
        return json.loads(path.read_text())
    while not (out / "result.json").is_file():  # the run is still training or being evaluated
        time.sleep(20)
    model = load_model(out / "checkpoint.pt")
    data = load_dataset(dataset, val_split=VAL_SIZE if dataset == "cifar10-jpeg" else 200)
    x, y = split_tensors(data.test, count)
    template = (
        "teacher" if name.startswith("teacher") else ("cifar10" if dataset == "cifar10-jpeg" else "digits")
    )
    t0 = time.perf_counter()
    with _EXPORT_LOCK:  # the ONNX exporter is not thread-safe: --bab-only runs several run_bab threads
        finished = (out / "bab" / "manifest.json").is_file() and (out / "bab" / "instances.csv").is_file()
        if (out / "bab").is_dir() and not finished:
            shutil.rmtree(out / "bab")  # an export that died half-way
        if not finished:  # an interrupted verification resumes on the same export (its verdicts kept)
            _export_for_bab(model, x, y, out, eps, count, timeout_s, template, dataset, device)
    # one thread per verifier process, like the training processes: --workers of them share the cores
    os.environ["OMP_NUM_THREADS"] = "1"
    res = run_verification(out / "bab", timeout_s=timeout_s, grace_s=30.0)
    summary = {k: v for k, v in dataclasses.asdict(res).items() if not isinstance(v, list)}
    summary["soundness_alarms"] = list(res.soundness_alarms)
    summary["wall_s"] = time.perf_counter() - t0
    path.write_text(json.dumps(summary, indent=1, default=str))
    return summary

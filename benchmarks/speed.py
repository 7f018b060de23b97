"""Speed benchmarks (issue 9, first half): every figure is a ratio of two things timed side by side.

One command::

    python benchmarks/speed.py                      # → docs/results/speed.json and docs/results/speed.md

What is measured (``benchmarks/README.md`` has the details):

- **training steps** on CNN-7 (batch 128, 32×32, width 512) and on cnn3 (32, 64 channels, w = 256):
  plain CE, PGD-AT (10 steps), IBP, CC-IBP (1-step attack) and CC-Dist (CC-IBP + teacher forward +
  distillation term); a step is loss, backward, gradient clipping and an Adam step, as in the Trainer;
- **the IBP engine**: ``propagate_intervals`` over the whole CNN-7 (batch 128) vs a plain forward pass,
  forward only and forward + backward, BatchNorm in train and in eval mode;
- **vs auto_LiRPA** (when importable): its IBP on the same network, inputs and BatchNorm mode (bounds
  checked equal to 1e-5), and its CROWN vs our native CROWN on a small mlp (margins, elision matrix as C);
- **PreActResNet18** (``--only resnet``, batch 128): the native IBP pass vs a plain forward pass, and
  native vs auto_LiRPA IBP (bounds checked equal), train and eval BatchNorm;
- **data pipeline**: one augmented ``BatchIterator`` batch vs one CC-IBP training step;
- **memory**: peak RSS of a process running CC-Dist steps vs one running CC-IBP steps (fresh subprocesses).

Timing protocol: ``torch.set_num_threads(--threads)`` (reported), warm-up calls, then ``--repeats`` rounds;
in each round every variant of a group runs once, in an order rotated from round to round; a ratio is the
median over rounds of the per-round ratio (paired, so slow phases of a shared machine cancel out). No
absolute time is asserted anywhere; absolute medians are recorded in the JSON only for context.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

EPS = 2 / 255


# ------------------------------------------------------------------------------------- helpers


def interleaved(
    variants: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``repeats`` rounds, order rotated each round. ``clock``:
    wall seconds by default; ``time.process_time`` counts only this process's CPU seconds (with one
    thread, the time a loaded machine gives to other jobs is then not counted)."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = clock()
            variants[name]()
            times[name].append(clock() - t0)
    return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of time[num] / time[den]."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def _pgd(steps: int, step: float, eps_factor: float = 1.0):
    """``PGD`` with a step relative to ε (field ``step_size`` or ``step_size_rel``, whichever exists)."""
    import dataclasses

    from ccdist_plugin.attacks import PGD

    key = "step_size_rel" if "step_size_rel" in {f.name for f in dataclasses.fields(PGD)} else "step_size"
    return PGD(steps=steps, eps_factor=eps_factor, **{key: step})


def _batch(n: int = 128, size: int = 32, channels: int = 3, seed: int = 0):
    """Real CIFAR-10 JPEG images when the data is found, else uniform noise (timing is the same)."""
    try:
        from ccdist_plugin.data import load_dataset

        data = load_dataset("cifar10-jpeg")
        import numpy as np

        x, y = data.train.uint8_batch(np.arange(n))
        return torch.from_numpy(x).float().div_(data.train.scale), torch.from_numpy(y), data
    except Exception:  # noqa: BLE001 - data absent: noise has the same cost
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, channels, size, size, generator=g), torch.randint(0, 10, (n,), generator=g), None


def _arch(name: str):
    from ccdist_plugin.models import cnn3, cnn7

    if name == "cnn7":
        return cnn7(3, 32, 10, width=512)
    if name == "cnn3":
        return cnn3(3, 32, 10)
    raise ValueError(f"unknown architecture {name!r}")


def _losses(arch: str, alpha: float = 0.5):
    from ccdist_plugin.losses import make_loss

    teacher = _arch(arch).eval()
    one_step = _pgd(1, 10.0)
    return {
        "plain CE": None,
        "PGD-AT (10 steps)": make_loss("pgd_at", attack=_pgd(10, 0.25)),
        "IBP": make_loss("ibp"),
        "CC-IBP": make_loss("cc_ibp", alpha=alpha, attack=one_step),
        "CC-Dist": make_loss("cc_dist", teacher=teacher, alpha=alpha, attack=one_step),
    }


def _step_fn(model, loss, x, y, optimizer):
    def step():
        model.train()
        if loss is None:
            total = F.cross_entropy(model(x), y)
        else:
            total = loss(model, x, y, EPS).loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()

    return step


# ----------------------------------------------------------------------------------- benchmarks


def bench_steps(arch: str, repeats: int, x, y, data) -> dict[str, Any]:
    """Training-step cost of each loss on ``arch`` (batch of ``x``), plus one loader batch."""
    torch.manual_seed(0)
    model = _arch(arch)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)  # tiny lr: the network barely moves
    variants = {name: _step_fn(model, loss, x, y, optimizer) for name, loss in _losses(arch).items()}
    if data is not None:
        from ccdist_plugin.data import BatchIterator

        it = BatchIterator(data.train, x.shape[0], shuffle=True, augment=True, seed=0, drop_last=True)
        state = {"iter": iter(it), "epoch": 0}

        def loader_batch():
            try:
                next(state["iter"])
            except StopIteration:
                state["epoch"] += 1
                it.set_epoch(state["epoch"])
                state["iter"] = iter(it)
                next(state["iter"])

        variants["loader batch (augmented)"] = loader_batch
    times = interleaved(variants, repeats)
    ratios = {
        "CC-Dist / CC-IBP": paired_ratio(times, "CC-Dist", "CC-IBP"),
        "CC-IBP / plain CE": paired_ratio(times, "CC-IBP", "plain CE"),
        "IBP / plain CE": paired_ratio(times, "IBP", "plain CE"),
        "PGD-AT / plain CE": paired_ratio(times, "PGD-AT (10 steps)", "plain CE"),
        "CC-Dist / plain CE": paired_ratio(times, "CC-Dist", "plain CE"),
    }
    ratios.update(gemm_share(variants["CC-IBP"], variants["plain CE"]))
    if "loader batch (augmented)" in times:
        ratios["loader batch / CC-IBP step"] = paired_ratio(times, "loader batch (augmented)", "CC-IBP")
        ratios["loader batch / plain CE step"] = paired_ratio(times, "loader batch (augmented)", "plain CE")
    return {"ratios": ratios, "median_s": {k: statistics.median(v) for k, v in times.items()}}


#: the matrix-multiply kernels of a CPU training step: convolutions forward and backward, linear layers
_GEMM_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::mm", "aten::addmm", "aten::bmm")


def gemm_share(
    cc_ibp_step: Callable[[], None], plain_step: Callable[[], None], rounds: int = 3
) -> dict[str, float]:
    """Self CPU time of the matrix-multiply kernels in one CC-IBP step over that in one plain step
    (``torch.profiler``, one step each, side by side; the round with the median ratio): the part of
    the step-cost ratio that element-wise work cannot reduce. A CC-IBP step multiplies by every weight
    11 times (attack: forward and input gradient; adversarial, centre and radius passes: forward, input
    and weight gradients) where a plain step does 3, so this sits near 11/3 whatever the engine does."""
    from torch.profiler import ProfilerActivity, profile

    def split(step: Callable[[], None]) -> tuple[float, float]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = prof.key_averages()
        gemm = sum(e.self_cpu_time_total for e in events if e.key in _GEMM_OPS)
        return gemm, sum(e.self_cpu_time_total for e in events) - gemm

    rounds = [(split(cc_ibp_step), split(plain_step)) for _ in range(rounds)]  # paired, median below
    (cc_gemm, cc_other), (plain_gemm, plain_other) = min(
        rounds, key=lambda r: abs(r[0][0] / r[1][0] - statistics.median(a[0] / b[0] for a, b in rounds))
    )
    return {
        "CC-IBP / plain CE, matrix-multiply kernels only (profiler)": cc_gemm / plain_gemm,
        "CC-IBP / plain CE, everything else (profiler)": cc_other / plain_other,
        "CC-IBP step: matrix-multiply time / whole step (profiler)": cc_gemm / (cc_gemm + cc_other),
    }


def bench_channels_last(repeats: int, x, y) -> dict[str, Any]:
    """Plain and CC-IBP steps on CNN-7 with the network and batch in channels-last memory format vs the
    default (NCHW): the issue asks to use it where it measurably helps."""
    out: dict[str, Any] = {"ratios": {}, "median_s": {}}
    variants = {}
    for layout in ("NCHW", "channels_last"):
        torch.manual_seed(0)
        model = _arch("cnn7")
        xs = x
        if layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            xs = x.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)
        losses = _losses("cnn7")
        variants[f"plain CE, {layout}"] = _step_fn(model, None, xs, y, optimizer)
        variants[f"CC-IBP, {layout}"] = _step_fn(model, losses["CC-IBP"], xs, y, optimizer)
    times = interleaved(variants, repeats)
    for name in ("plain CE", "CC-IBP"):
        out["ratios"][f"{name} step: channels_last / NCHW"] = paired_ratio(
            times, f"{name}, channels_last", f"{name}, NCHW"
        )
    out["median_s"] = {k: statistics.median(v) for k, v in times.items()}
    return out


def allocator_child(kept: bool, repeats: int = 3) -> None:
    """Time ``x + x`` on a CNN-7 activation (128×64×32×32) and plain / CC-IBP steps in this fresh
    process, with ``retain_freed_memory`` applied or not; print medians as JSON."""
    from ccdist_plugin.malloc import retain_freed_memory

    if kept:
        retain_freed_memory()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)
    torch.manual_seed(0)
    model = _arch("cnn7")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)
    act = torch.rand(128, 64, 32, 32)
    work = {
        "x + x": lambda: act + act,
        "plain CE step": _step_fn(model, None, x, y, optimizer),
        "CC-IBP step": _step_fn(model, _losses("cnn7")["CC-IBP"], x, y, optimizer),
    }
    times = interleaved(work, repeats)
    print(json.dumps({k: statistics.median(v) for k, v in times.items()}))


def bench_allocator(threads: int, rounds: int = 3) -> dict[str, Any]:
    """``ccdist_plugin.malloc.retain_freed_memory`` on vs off, in fresh subprocesses alternated (glibc
    keeps what a process's heap once held, so the two settings cannot be compared inside one process)."""
    runs: dict[str, list[dict]] = {"kept": [], "default": []}
    for _ in range(rounds):
        for mode in runs:
            cmd = [sys.executable, __file__, "--threads", str(threads), "--allocator-child", mode]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
    names = list(runs["kept"][0])
    ratios = {
        f"{name}: freed memory kept / glibc default (alternated processes)": statistics.median(
            k[name] / d[name] for k, d in zip(runs["kept"], runs["default"], strict=True)
        )
        for name in names
    }
    for mode in runs:
        ratios[f"CC-IBP / plain CE step, {mode} (alternated processes)"] = statistics.median(
            r["CC-IBP step"] / r["plain CE step"] for r in runs[mode]
        )
    return {"ratios": ratios, "median_s": {m: [r for r in v] for m, v in runs.items()}}


def bench_ibp_engine(repeats: int, x) -> dict[str, Any]:
    """Our IBP pass vs a plain forward pass on CNN-7, forward and forward+backward, both BN modes."""
    from ccdist_plugin.bounds import input_box, propagate_intervals

    torch.manual_seed(0)
    model = _arch("cnn7")
    lo, hi = input_box(x, EPS)
    out: dict[str, Any] = {"ratios": {}, "median_s": {}}
    for mode in ("train", "eval"):
        model.train(mode == "train")

        def fwd():
            with torch.no_grad():
                model(x)

        def ibp():
            with torch.no_grad():
                propagate_intervals(model, lo, hi)

        def fwd_bwd():
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()

        def ibp_bwd():
            model.zero_grad(set_to_none=True)
            r = propagate_intervals(model, lo, hi)
            (r.upper.sum() - r.lower.sum()).backward()

        times = interleaved(
            {"forward": fwd, "IBP": ibp, "forward+backward": fwd_bwd, "IBP+backward": ibp_bwd}, repeats
        )
        out["ratios"][f"IBP / forward ({mode} BN, no grad)"] = paired_ratio(times, "IBP", "forward")
        out["ratios"][f"IBP+backward / forward+backward ({mode} BN)"] = paired_ratio(
            times, "IBP+backward", "forward+backward"
        )
        out["median_s"].update({f"{k} ({mode})": statistics.median(v) for k, v in times.items()})
    model.eval()
    return out


def bench_vs_auto_lirpa(repeats: int, x, y) -> dict[str, Any]:
    """Our IBP vs auto_LiRPA's IBP on CNN-7 (bounds equal to 1e-5), our CROWN vs theirs on an mlp."""
    try:
        from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
    except ImportError as err:
        return {"skipped": f"auto_LiRPA not importable ({err})"}
    import copy

    from ccdist_plugin.bounds import crown_margin_lower_bound, input_box, propagate_intervals
    from ccdist_plugin.models import mlp

    out: dict[str, Any] = {"ratios": {}, "median_s": {}, "max_abs_diff": {}, "max_rel_diff": {}}
    torch.manual_seed(0)
    model = _arch("cnn7")
    # a few training-mode forward passes give the running statistics non-trivial values
    with torch.no_grad():
        for _ in range(3):
            model.train()(x)
    lo, hi = input_box(x, EPS)

    def one_mode(mode: str) -> None:
        model.train(mode == "train")
        theirs = BoundedModule(copy.deepcopy(model), x, device="cpu", verbose=False)
        theirs.train(mode == "train")
        ptb = PerturbationLpNorm(norm=float("inf"), eps=EPS, x_L=lo, x_U=hi)
        bx = BoundedTensor(x, ptb)

        # train mode: both derive BatchNorm statistics from x (ours via reference=x, which also runs
        # the forward pass; auto_LiRPA from the forward pass it runs on x before bounding)
        ref = x if mode == "train" else None

        def ours(grad: bool):
            with torch.set_grad_enabled(grad):
                r = propagate_intervals(model, lo, hi, reference=ref)
            return r.lower, r.upper

        def auto(grad: bool):
            with torch.set_grad_enabled(grad):
                if mode == "train":
                    theirs(bx)
                lb, ub = theirs.compute_bounds(x=(bx,), method="IBP")
            return lb, ub

        with torch.no_grad():
            a, b = ours(False), auto(False)
        diff = max(float((a[0] - b[0]).abs().max()), float((a[1] - b[1]).abs().max()))
        scale = max(float(b[0].abs().max()), float(b[1].abs().max()), 1.0)
        out["max_abs_diff"][f"IBP CNN-7 ({mode} BN)"] = diff
        out["max_rel_diff"][f"IBP CNN-7 ({mode} BN), relative to the largest |bound| {scale:.3g}"] = (
            diff / scale
        )

        def ours_bwd():
            model.zero_grad(set_to_none=True)
            lb, ub = ours(True)
            (ub.sum() - lb.sum()).backward()

        def auto_bwd():
            theirs.zero_grad(set_to_none=True)
            lb, ub = auto(True)
            (ub.sum() - lb.sum()).backward()

        variants = {"ours": lambda: ours(False), "auto_LiRPA": lambda: auto(False)}
        # auto_LiRPA's IBP with eval-mode BatchNorm returns bounds without an autograd graph
        with torch.enable_grad():
            has_graph = auto(True)[0].requires_grad
        if has_graph:
            variants.update({"ours+backward": ours_bwd, "auto_LiRPA+backward": auto_bwd})
        else:
            out.setdefault("notes", []).append(
                f"auto_LiRPA IBP ({mode} BN) returns bounds without a graph: no backward comparison"
            )
        times = interleaved(variants, repeats)
        out["ratios"][f"our IBP / auto_LiRPA IBP (CNN-7, {mode} BN, no grad)"] = paired_ratio(
            times, "ours", "auto_LiRPA"
        )
        if has_graph:
            out["ratios"][f"our IBP / auto_LiRPA IBP (CNN-7, {mode} BN, +backward)"] = paired_ratio(
                times, "ours+backward", "auto_LiRPA+backward"
            )
        out["median_s"].update({f"IBP {k} ({mode})": statistics.median(v) for k, v in times.items()})

    for mode in ("eval", "train"):
        one_mode(mode)
    model.eval()

    # CROWN on a small mlp (every layer small enough for full CROWN in the native backend)
    torch.manual_seed(0)
    small = mlp(3, 8, 10, width=128, depth=2).eval()
    xs = torch.rand(64, 3, 8, 8)
    ys = torch.randint(0, 10, (64,))
    eps_s = 4 / 255
    slo, shi = input_box(xs, eps_s)
    bounded = BoundedModule(copy.deepcopy(small), xs, device="cpu", verbose=False)
    bounded.eval()
    sptb = PerturbationLpNorm(norm=float("inf"), eps=eps_s, x_L=slo, x_U=shi)
    sbx = BoundedTensor(xs, sptb)
    eye = torch.eye(10)
    c = eye[ys].unsqueeze(1) - eye.unsqueeze(0)

    def native():
        return crown_margin_lower_bound(small, xs, ys, eps_s, intermediate="crown")

    def auto_crown():
        with torch.no_grad():
            lb, _ = bounded.compute_bounds(x=(sbx,), C=c, method="CROWN", bound_upper=False)
        return lb

    a, b = native(), auto_crown()
    mask = ~torch.nn.functional.one_hot(ys, 10).bool()
    cdiff = float((a.double() - b.double())[mask].abs().max())
    out["max_abs_diff"]["CROWN mlp margins"] = cdiff
    cscale = max(float(b.double()[mask].abs().max()), 1.0)
    out["max_rel_diff"][f"CROWN mlp margins, relative to the largest |bound| {cscale:.3g}"] = cdiff / cscale
    times = interleaved({"ours": native, "auto_LiRPA": auto_crown}, repeats)
    out["ratios"]["our CROWN / auto_LiRPA CROWN (mlp 192-128-128-10, batch 64, no grad)"] = paired_ratio(
        times, "ours", "auto_LiRPA"
    )
    out["median_s"].update({f"CROWN {k}": statistics.median(v) for k, v in times.items()})
    return out


def bench_resnet(repeats: int, x, y) -> dict[str, Any]:
    """PreActResNet18 (64-128-256-512, batch 128): the native IBP pass vs a plain forward pass (train-mode
    BatchNorm; no grad: the IBP pass alone, as for CNN-7, and with the reference batch's forward pass
    that a training step runs alongside; with backward: the training pass), and native vs auto_LiRPA
    IBP (ratios, bounds checked equal), both BatchNorm modes."""
    import copy

    from ccdist_plugin.bounds import input_box, propagate_intervals
    from ccdist_plugin.models import preact_resnet18

    torch.manual_seed(0)
    size = x.shape[-1]
    model = preact_resnet18(3, size, 10)
    with torch.no_grad():
        model.train()(x)  # running statistics other than (0, 1) for the eval-mode rows
    lo, hi = input_box(x, EPS)
    out: dict[str, Any] = {"ratios": {}, "median_s": {}, "max_rel_diff": {}}
    model.train()

    def fwd():
        with torch.no_grad():
            model(x)

    def ibp():
        with torch.no_grad():
            propagate_intervals(model.features, lo, hi, backend="native")

    def ibp_ref():
        with torch.no_grad():
            propagate_intervals(model.features, lo, hi, reference=x, backend="native")

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    def ibp_bwd():
        model.zero_grad(set_to_none=True)
        r = propagate_intervals(model.features, lo, hi, reference=x, backend="native")
        (r.upper.sum() - r.lower.sum() + r.value.sum()).backward()

    variants = {"forward": fwd, "IBP": ibp, "IBP+reference": ibp_ref, "forward+backward": fwd_bwd}
    times = interleaved({**variants, "IBP+backward": ibp_bwd}, repeats)
    # train-mode BatchNorm without a reference normalizes with the box centre's statistics
    out["ratios"]["IBP / forward (PreActResNet18, train BN, no grad)"] = paired_ratio(times, "IBP", "forward")
    out["ratios"]["IBP with the reference's forward pass / forward (PreActResNet18, train BN, no grad)"] = (
        paired_ratio(times, "IBP+reference", "forward")
    )
    out["ratios"]["IBP+backward / forward+backward (PreActResNet18, train BN)"] = paired_ratio(
        times, "IBP+backward", "forward+backward"
    )
    out["median_s"].update({f"PreActResNet18 {k}": statistics.median(v) for k, v in times.items()})
    for mode in ("train", "eval"):
        net = copy.deepcopy(model).train(mode == "train")

        def engine(backend: str, net=net):
            with torch.no_grad():
                return propagate_intervals(net.features, lo, hi, reference=x, backend=backend)

        a, b = engine("native"), engine("auto_lirpa")
        rel = max(
            float((p - q).abs().max()) / max(float(q.abs().max()), 1e-12)
            for p, q in ((a.lower, b.lower), (a.upper, b.upper))
        )
        out["max_rel_diff"][f"IBP PreActResNet18 ({mode} BN), relative to the largest |bound|"] = rel
        times = interleaved(
            {"native": lambda: engine("native"), "auto_LiRPA": lambda: engine("auto_lirpa")}, repeats
        )
        out["ratios"][f"native IBP / auto_LiRPA IBP (PreActResNet18, {mode} BN, no grad)"] = paired_ratio(
            times, "native", "auto_LiRPA"
        )
        out["median_s"].update(
            {f"PreActResNet18 IBP {k} ({mode})": statistics.median(v) for k, v in times.items()}
        )
    return out


def rss_child(loss_name: str, arch: str, steps: int) -> None:
    """Run ``steps`` training steps in this (fresh) process and print peak RSS as JSON (noise inputs:
    loading the dataset would set the peak)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)
    torch.manual_seed(0)
    model = _arch(arch)
    loss = _losses(arch)[loss_name]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)
    step = _step_fn(model, loss, x, y, optimizer)
    # current (not peak) resident memory before the steps: the peak may come from start-up
    before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    for _ in range(steps):
        step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_kib": after, "before_steps_kib": before}))


def bench_rss(arch: str, threads: int, malloc_tuning: bool, rounds: int = 2) -> dict[str, Any]:
    """Peak RSS of CC-Dist vs CC-IBP steps, each in fresh subprocesses, alternated."""
    runs: dict[str, list[dict]] = {"CC-Dist": [], "CC-IBP": []}
    for _ in range(rounds):
        for name in ("CC-IBP", "CC-Dist"):
            cmd = [
                sys.executable,
                __file__,
                "--threads",
                str(threads),
                "--rss-child",
                name,
                "--rss-arch",
                arch,
                "--malloc-tuning" if malloc_tuning else "--no-malloc-tuning",
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
    peak = {k: statistics.median(r["peak_rss_kib"] for r in v) for k, v in runs.items()}
    growth = {
        k: statistics.median(r["peak_rss_kib"] - r["before_steps_kib"] for r in v) for k, v in runs.items()
    }
    return {
        "ratios": {
            f"peak RSS CC-Dist / CC-IBP ({arch}, whole process)": peak["CC-Dist"] / peak["CC-IBP"],
            f"step memory CC-Dist / CC-IBP ({arch}, peak − RSS before the steps)": growth["CC-Dist"]
            / growth["CC-IBP"],
        },
        "peak_rss_mib": {k: v / 1024 for k, v in peak.items()},
        "step_growth_mib": {k: v / 1024 for k, v in growth.items()},
    }


# --------------------------------------------------------------------------------------- report


def _machine() -> dict[str, Any]:
    from ccdist_plugin.reports import machine_info

    return {**machine_info(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


GOALS = {
    "CC-Dist / CC-IBP": "≤ 1.10",
    "CC-IBP / plain CE": "≤ 3.5",
    "IBP / forward (train BN, no grad)": "≤ 2.3",
    "IBP+backward / forward+backward (train BN)": "≤ 2.3",
    "IBP / forward (eval BN, no grad)": "≤ 2.3",
    "IBP+backward / forward+backward (eval BN)": "≤ 2.3",
    "loader batch / CC-IBP step": "≪ 1",
    "IBP / forward (PreActResNet18, train BN, no grad)": "≤ 2.5",
    "native IBP / auto_LiRPA IBP (PreActResNet18, train BN, no grad)": "≤ 1",
    "native IBP / auto_LiRPA IBP (PreActResNet18, eval BN, no grad)": "≤ 1",
}


def to_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "<!-- generated by: python benchmarks/speed.py " + " ".join(result["argv"]) + " -->",
        f"Generated {m['date_utc']} UTC on {m['cpu']} ({m['logical_cpus']} logical CPUs, shared; "
        f"load average at start {m['load_average_at_start'][0]:.1f}), torch {m['torch']}, "
        f"torch.set_num_threads({result['threads']}), {result['repeats']} interleaved rounds, "
        "median of per-round ratios; freed memory kept for reuse (`ccdist_plugin.malloc`): "
        f"{'yes' if result.get('malloc_tuning') else 'no'}.",
        "",
        "| benchmark | ratio | goal |",
        "|---|---|---|",
    ]
    for section, label in (
        ("steps_cnn7", "training step, CNN-7 (w=512), batch 128"),
        ("steps_cnn3", "training step, cnn3 (32, 64; w=256), batch 128"),
        ("ibp_engine", "IBP engine, CNN-7, batch 128"),
        ("auto_lirpa", "vs auto_LiRPA"),
        ("resnet", "PreActResNet18, batch 128"),
        ("channels_last", "memory format, CNN-7, batch 128"),
        ("allocator", "allocator (ccdist_plugin.malloc), CNN-7, batch 128"),
        ("rss", "memory"),
    ):
        sec = result.get(section)
        if not sec:
            continue
        if "skipped" in sec:
            lines.append(f"| {label} | skipped: {sec['skipped']} | |")
            continue
        for name, value in sec["ratios"].items():
            shown = f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"
            lines.append(f"| {label}: {name} | {shown}× | {GOALS.get(name, '')} |")
        for name, value in sec.get("max_abs_diff", {}).items():
            lines.append(f"| {label}: max abs difference of the bounds, {name} | {value:.2e} | |")
        for name, value in sec.get("max_rel_diff", {}).items():
            lines.append(f"| {label}: max relative difference of the bounds, {name} | {value:.2e} | ≤ 1e-5 |")
        for note in sec.get("notes", []):
            lines.append(f"| {label}: note | {note} | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds per group")
    parser.add_argument("--out", default="docs/results", help="folder for speed.json and speed.md")
    parser.add_argument(
        "--only",
        default="rss,auto_lirpa,ibp_engine,steps_cnn3,steps_cnn7,channels_last,allocator",
        help="comma-separated sections",
    )
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss-arch", default="cnn7", help=argparse.SUPPRESS)
    parser.add_argument(
        "--allocator-child", choices=("kept", "default"), default=None, help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--malloc-tuning",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep freed memory for reuse, as the ccdist command does (ccdist_plugin.malloc)",
    )
    parser.add_argument("--markdown-only", action="store_true", help="rewrite speed.md from speed.json")
    args = parser.parse_args(argv)
    if args.markdown_only:
        print(_write(json.loads((Path(args.out) / "speed.json").read_text()), Path(args.out)))
        return
    torch.set_num_threads(args.threads)
    if args.allocator_child:  # before the setting below: this child measures it
        allocator_child(args.allocator_child == "kept")
        return
    tuned = False
    if args.malloc_tuning:
        from ccdist_plugin.malloc import retain_freed_memory

        tuned = retain_freed_memory()
    if args.rss_child:
        rss_child(args.rss_child, args.rss_arch, steps=2)
        return
    only = set(args.only.split(","))
    x, y, data = _batch()
    result: dict[str, Any] = {
        "machine": _machine(),
        "threads": args.threads,
        "repeats": args.repeats,
        "malloc_tuning": tuned,
        "argv": sys.argv[1:] if argv is None else argv,
    }
    sections = {
        "steps_cnn7": lambda: bench_steps("cnn7", args.repeats, x, y, data),
        "steps_cnn3": lambda: bench_steps("cnn3", args.repeats, x, y, data),
        "ibp_engine": lambda: bench_ibp_engine(args.repeats, x),
        "auto_lirpa": lambda: bench_vs_auto_lirpa(args.repeats, x, y),
        "channels_last": lambda: bench_channels_last(args.repeats, x, y),
        "allocator": lambda: bench_allocator(args.threads),
        "rss": lambda: bench_rss("cnn7", args.threads, args.malloc_tuning),
        "resnet": lambda: bench_resnet(args.repeats, x, y),
    }
    unknown = only - set(sections)
    if unknown:
        raise SystemExit(f"unknown --only sections {sorted(unknown)}; known: {sorted(sections)}")
    for key in args.only.split(","):  # cheap sections first (default order), results written after each
        fn = sections[key]
        if key in only:
            t0 = time.perf_counter()
            result[key] = fn()
            took = time.perf_counter() - t0
            _write(result, Path(args.out))  # after every section: an interrupted run keeps what finished
            print(f"{key}: {json.dumps(result[key].get('ratios', result[key]))} ({took:.0f} s)", flush=True)
    print(_write(result, Path(args.out)))


def _write(result: dict[str, Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(result, indent=1))
    md = to_markdown(result)
    (out / "speed.md").write_text(md)
    return md


if __name__ == "__main__":
    main()

"""What the reproduction measures of a trained network: the test and validation metrics by the package's
pre-filter, the paper's appendix E.1 diagnostics, and the machine the figures were measured on."""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch


def split_tensors(ds, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` (default: all) images of a split as floats in [0, 1], and their labels."""
    n = len(ds) if count is None else min(count, len(ds))
    x, y = ds.uint8_batch(np.arange(n))
    return torch.from_numpy(x).float().div_(ds.scale), torch.from_numpy(y)


#: the validation split's cheaper selection attack (not a reported figure): PGD-10, step ε/4
VAL_PGD_STEPS, VAL_PGD_STEP = 10, 0.25


def eval_attack_text() -> str:
    """The evaluation attack (PGD-40) in words, for the report."""
    from ccdist_plugin.attacks import EVAL_PGD, EVAL_PGD_SOURCE, describe_pgd

    return f"{describe_pgd(EVAL_PGD)}, as {EVAL_PGD_SOURCE}"


def evaluate(
    model, x: torch.Tensor, y: torch.Tensor, eps: float, pgd_steps: int = 40, points: bool = False
) -> dict[str, Any]:
    """Standard, PGD-``pgd_steps``, IBP- and CROWN-IBP-certified accuracy (fractions) of an eval-mode model,
    by the package's pre-filter (``evaluation.prefilter``, the cascade of ``ccdist eval`` and the export).

    PGD-40 is the evaluation attack ``attacks.EVAL_PGD``; PGD-10 (validation) steps ε/4. ``crown_cert``
    is the fraction certified by IBP or CROWN-IBP (the key keeps its historic name; the tables call it
    CROWN-IBP-cert). ``unsound_points`` counts certified points that PGD broke (must be 0); ``attack``
    names the attack. ``points``: also the per-point outcomes (positions in ``x``: ``labels`` and the
    positions that are ``correct``, ``pgd_robust``, ``crown_certified``), for the paired per-point analysis.
    """
    from ccdist_plugin.attacks import EVAL_PGD, PGD, describe_pgd
    from ccdist_plugin.verification import prefilter

    attack = EVAL_PGD if pgd_steps == EVAL_PGD.steps else PGD(steps=pgd_steps, step_size=VAL_PGD_STEP)
    t0 = time.perf_counter()
    pre = prefilter(model.eval(), x, y, eps, attack=attack, crown_intermediate="ibp", batch_size=250)
    status = pre.status
    n = len(x)
    certified = torch.tensor([st in ("certified_ibp", "certified_crown") for st in status], dtype=torch.bool)
    robust = pre.correct & ~pre.broken
    out: dict[str, Any] = {
        "n": n,
        "attack": describe_pgd(attack),
        "std": float(pre.correct.float().mean()),
        f"pgd{pgd_steps}": float(robust.float().mean()),
        "ibp_cert": float(pre.certified["ibp"].float().mean()),
        "crown_cert": float(certified.float().mean()),
        "unsound_points": status.count("alarm"),
        "eval_s": time.perf_counter() - t0,
    }
    if points:
        out["points"] = {
            "labels": [int(v) for v in y.tolist()],
            **{
                k: [int(i) for i in torch.nonzero(v).flatten().tolist()]
                for k, v in (("correct", pre.correct), ("pgd_robust", robust), ("crown_certified", certified))
            },
        }
    return out


def evaluate_full_crown(
    model, x: torch.Tensor, y: torch.Tensor, eps: float, points: int, soundness_samples: int = 0
) -> dict[str, Any]:
    """Full-CROWN-certified accuracy (CROWN with CROWN intermediate bounds, the native engine, float64, sound)
    on the first ``points`` images, beside IBP- and CROWN-IBP-certified accuracy on the same images.

    The pre-filter (PGD-40, IBP, CROWN-IBP) runs on all of them; full CROWN, which costs seconds to minutes
    per point, only on the correctly classified points that IBP leaves uncertified (PGD-broken ones
    included: a full-CROWN certificate of one of them is a soundness alarm). A point counts as
    CROWN-certified when IBP or full CROWN certifies it (the cascade's rule, as ``crown_ibp_cert_acc``
    counts IBP or CROWN-IBP). ``crown_cpu_s_per_point``: CPU seconds of full CROWN per point it bounded
    (``crown_cpu_s_points``: each point's, in the order of ``crown_bounded``, their positions). A line per
    bounded point goes to stderr (minutes per point at the paper's width).

    ``soundness_samples``: also check each bounded point's full-CROWN margin bounds against the margins
    at that many uniform samples of its ball and at PGD-20 points attacking each class
    (``ccdist_plugin.soundness``); ``bound_violations`` counts the logit differences whose bound exceeds
    one (must be 0), ``bound_slack_min`` is the smallest gap between observed margin and bound.
    """
    from ccdist_plugin.attacks import EVAL_PGD
    from ccdist_plugin.bounds import certify
    from ccdist_plugin.verification import prefilter

    x, y = x[:points], y[:points]
    pre = prefilter(model.eval(), x, y, eps, attack=EVAL_PGD, crown_intermediate="ibp", batch_size=250)
    ibp_cert = pre.certified["ibp"]
    crown_ibp_cert = torch.tensor([st in ("certified_ibp", "certified_crown") for st in pre.status])
    todo = torch.nonzero(pre.correct & ~ibp_cert).flatten().tolist()
    full = ibp_cert.clone()
    walls, cpus = [], []
    check = _BoundCheck(model, eps, soundness_samples) if soundness_samples > 0 else None
    # one point per call: a batch would bound the union of its points' unstable neurons for each
    for k, i in enumerate(todo):
        t0, c0 = time.perf_counter(), time.process_time()
        cert = certify(model, x[i : i + 1], y[i : i + 1], eps, method="crown", intermediate="crown")
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        full[i] = bool(cert.certified[0])
        if check is not None:
            check.add(x[i : i + 1], y[i : i + 1], cert.margin_lb)
        checked = (
            ""
            if check is None
            else f"; so far {check.violations} bound violations, least slack {check.slack_min:.3g}"
        )
        print(
            f"full CROWN {k + 1}/{len(todo)}: point {i} {'certified' if full[i] else 'not certified'}, "
            f"{cpus[-1]:.1f} CPU s, {walls[-1]:.1f} s{checked}",
            file=sys.stderr,
            flush=True,
        )
    n, bounded = len(x), max(1, len(todo))
    extra = {} if check is None else check.summary()
    return extra | {
        "points": n,
        "ibp_cert_acc": float(ibp_cert.float().mean()),
        "crown_ibp_cert_acc": float(crown_ibp_cert.float().mean()),
        "crown_cert_acc": float(full.float().mean()),
        "crown_bounded_points": len(todo),
        "crown_cpu_s_per_point": sum(cpus) / bounded,
        "crown_wall_s_per_point": sum(walls) / bounded,
        "crown_bounded": todo,
        "crown_cpu_s_points": [round(c, 2) for c in cpus],
        "unsound_points": int((full & pre.broken).sum()) + pre.status.count("alarm"),
    }


class _BoundCheck:
    """Full-CROWN margin bounds against the margins observed at sampled and PGD points of each ball."""

    def __init__(self, model, eps: float, samples: int):
        import copy

        # observed margins in float64, as the bounds: no float32 rounding between the two
        self.model, self.eps, self.samples = copy.deepcopy(model).double().eval(), eps, samples
        self.generator = torch.Generator().manual_seed(0)
        self.violations, self.slack_min, self.checked = 0, float("inf"), 0

    def add(self, x: torch.Tensor, y: torch.Tensor, margin_lb: torch.Tensor) -> None:
        from ccdist_plugin.soundness import worst_margins

        observed = worst_margins(self.model, x.double(), y, self.eps, self.samples, self.generator)[0]
        rows = torch.ones_like(margin_lb, dtype=torch.bool).scatter(1, y.view(-1, 1), False)
        slack = (observed - margin_lb)[rows]  # a sound bound never exceeds an observed margin
        self.violations += int((slack < 0).sum())
        self.slack_min = min(self.slack_min, float(slack.min()))
        self.checked += 1

    def summary(self) -> dict[str, Any]:
        return {
            "soundness_samples": self.samples,
            "soundness_checked_points": self.checked,
            "bound_violations": self.violations,
            "bound_slack_min": self.slack_min if self.checked else None,
        }


def diagnostics(model, teacher, x: torch.Tensor, y: torch.Tensor, eps: float) -> dict[str, float]:
    """The paper's appendix E.1 diagnostics that need the network: the IBP loss (mean CE of the IBP
    worst-case logits at ε, eval mode) and, when a teacher is given, the teacher-student feature distance
    (mean over points of Σ_i (h_s,i(x) − h_t,i(x))², clean inputs: the distillation term at ε = 0)."""
    from ccdist_plugin.bounds import margin_lower_bound
    from ccdist_plugin.evaluation import ibp_loss_from_margins

    model.eval()
    losses, dist = [], []
    with torch.no_grad():
        for s in range(0, len(x), 250):
            xb, yb = x[s : s + 250], y[s : s + 250]
            losses.append(ibp_loss_from_margins(margin_lower_bound(model, xb, yb, eps).double(), yb))
            if teacher is not None:
                dist.append(((model.features(xb) - teacher.eval().features(xb)) ** 2).sum(1))
    out = {"ibp_loss": float(torch.cat(losses).mean())}
    if dist:
        out["feature_distance"] = float(torch.cat(dist).double().mean())
    return out


def machine_text() -> str:
    """The machine the figures were measured on, in words, for the reports."""
    from ccdist_plugin.reports import machine_info

    m = machine_info()
    return (
        f"{m['cpu']}, {m['logical_cpus']} logical CPUs (shared with other jobs), torch {m['torch']}, "
        f"Python {m['python']}, {m['system']}"
    )

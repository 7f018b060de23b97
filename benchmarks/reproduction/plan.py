"""The protocols' sizes and plans: ε and the validation splits, ``PAPER_CPU`` and its stages, the run
names of a plan and the choice of α and β on validation."""

from __future__ import annotations

import argparse
from typing import Any

CIFAR_EPS = 2 / 255
DIGITS_EPS = 0.1
VAL_SIZE = 1000
DIGITS_VAL = 200

#: ``--protocol paper-cpu`` (issue 17): the paper's CIFAR-10 2/255 protocol with only scale reduced. Student
#: schedule: the paper's 160 epochs (1 warm-up, 80 ramp, decays at 120 and 140) scaled to ``epochs``; teacher:
#: the paper's 30 epochs of PGD-10 (0.25ε); training attack: 8 steps of 0.25ε′ on ε′ = 2.1ε.
PAPER_CPU: dict[str, Any] = {
    "epochs": 24,
    "teacher_epochs": 30,
    "teacher_steps": 10,
    "attack": {"steps": 8, "step": 0.25, "eps_factor": 2.1},
    "seeds": 5,
    "alphas": [0.01, 0.02, 0.05],
    "beta_sweep": [1.0, 5.0, 20.0],
    "bab_count": 200,
    "bab_timeout": 60.0,
}


def parse_floats(text: str, option: str = "a list") -> list[float]:
    """``"1,5,20"`` → ``[1.0, 5.0, 20.0]``; ``ValueError`` naming ``option`` for anything else."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers (e.g. 1,5,20), got {text!r}") from None


#: --until: the stages of ``--protocol paper-cpu``, in order (each later stage includes the earlier ones)
PAPER_CPU_STAGES = ("teacher", "select-alpha", "select-beta", "students", "bab", "report")


def paper_cpu_plan(args: argparse.Namespace) -> dict[str, Any]:
    """PAPER_CPU with the command line's overrides (``None`` options keep the protocol's values)."""
    plan = {k: (list(v) if isinstance(v, list) else v) for k, v in PAPER_CPU.items()}
    for key in ("epochs", "teacher_epochs", "teacher_steps", "seeds", "bab_count", "bab_timeout"):
        value = getattr(args, key, None)
        if value is not None:
            plan[key] = value
    if getattr(args, "alphas", None) is not None:
        plan["alphas"] = parse_floats(args.alphas, "--alphas")
    if getattr(args, "beta_sweep", None) is not None:
        plan["beta_sweep"] = parse_floats(args.beta_sweep, "--beta-sweep")
    if 5.0 not in plan["beta_sweep"]:
        raise ValueError(
            f"--beta-sweep {args.beta_sweep} must contain 5 (the paper's β = 5/w, the primary comparison), "
            f"e.g. {','.join(f'{b:g}' for b in sorted({*plan['beta_sweep'], 5.0}))}"
        )
    plan["dataset"] = args.dataset
    plan["device"] = args.device
    return plan


def paper_cpu_names(plan: dict[str, Any], alpha: float, beta_w: float | None = None) -> dict[str, Any]:
    """Run names: ``teacher-s0``, ``cc_ibp-a<α>-s<seed>``, ``cc_dist-a<α>-b<β·w>-s<seed>``."""
    a = f"{alpha:g}"
    names: dict[str, Any] = {
        "teacher": "teacher-s0",
        "cc_ibp": [f"cc_ibp-a{a}-s{s}" for s in range(plan["seeds"])],
    }
    if beta_w is not None:
        names["cc_dist"] = [f"cc_dist-a{a}-b{beta_w:g}-s{s}" for s in range(plan["seeds"])]
    return names


def select_by_validation(candidates: dict[float, dict]) -> float:
    """The candidate whose run has the best validation CROWN-certified accuracy (ties: the smaller)."""
    return max(candidates, key=lambda c: (candidates[c]["val"]["crown_cert"], -c))

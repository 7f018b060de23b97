"""ℓ∞ PGD in pixel space (Madry et al. 2018), projected onto the ball ∩ [0, 1].

The network is put in eval mode for the attack (BatchNorm uses running statistics, docs/method.md) and
restored afterwards; gradients are taken with respect to the input only, so no parameter
gradient is accumulated.

Settings used in this project:
- training CC-IBP/CC-Dist: ``PGD(steps=1, step_size=10.0)`` (one step of 10ε from a uniform
  start) or ``PGD(steps=8, step_size=0.25, eps_factor=2.1)`` (8 steps of 0.25ε′ on ε′ = 2.1ε);
- training teachers: ``PGD(steps=10, step_size=0.25)``;
- evaluation: :data:`EVAL_PGD`, the one evaluation attack of every figure (``ccdist eval``, the demo,
  the benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccdist_plugin.bounds import input_box, training_restorer
from ccdist_plugin.validate import eps_tensor

__all__ = ["pgd_attack", "PGD", "EVAL_PGD", "EVAL_PGD_SOURCE", "describe_pgd", "attack_objective"]


def attack_objective(logits: Tensor, y: Tensor, objective: str) -> Tensor:
    """Per-example quantity PGD maximizes: cross-entropy, or the margin max_{j≠y} f_j − f_y."""
    if objective == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if objective == "margin":
        true = logits.gather(1, y.view(-1, 1)).squeeze(1)
        others = logits.scatter(1, y.view(-1, 1), float("-inf"))
        return others.max(1).values - true
    raise ValueError(f"objective must be 'ce' or 'margin', got {objective!r}")


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    steps: int = 10,
    step_size: float | Tensor | None = None,
    random_start: bool = True,
    restarts: int = 1,
    objective: str = "ce",
    early_stop: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient ascent on ``objective`` inside the ball of radius ``eps`` ∩ [0, 1].

    Args:
        model: maps (B, ...) pixel-space inputs to (B, k) logits.
        x: (B, ...) inputs in [0, 1]; y: (B,) labels.
        eps: ball radius in pixel units (float or (B,) tensor).
        steps: gradient steps per restart (0 with ``random_start`` = a uniform random point).
        step_size: absolute step in pixel units (default 0.25·eps).
        random_start: start from a uniform point of the ball ∩ [0, 1] (else from ``x``).
        restarts: independent starts; per example the point with the highest objective is kept
            (a misclassifying point is preferred over any other).
        objective: ``"ce"`` or ``"margin"``.
        early_stop: stop updating an example once it is misclassified.

    Returns:
        (B, ...) adversarial inputs in the ball ∩ [0, 1], detached.
    """
    if steps < 0 or restarts < 1:
        raise ValueError(f"steps must be >= 0 and restarts >= 1, got {steps}, {restarts}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels of shape {tuple(y.shape)} do not match a batch of {x.shape[0]} inputs")
    lo, hi = input_box(x, eps)
    eps_t = eps_tensor(eps, x)
    if not isinstance(eps, Tensor) and float(eps) == 0:  # a tensor ε is not read back: no device sync
        return x.detach().clone()
    step = 0.25 * eps_t if step_size is None else eps_tensor(step_size, x)
    restore_modes = training_restorer(model)
    model.eval()
    try:
        if restarts > 1:  # the best point over the restarts, per example
            best_x = x.detach().clone()
            best_score = torch.full((x.shape[0],), float("-inf"), device=x.device, dtype=x.dtype)
        for _ in range(restarts):
            if random_start:
                u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
                x_adv = lo + (hi - lo) * u
            else:
                x_adv = x.detach().clone()
            active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            for _ in range(steps):
                x_adv.requires_grad_(True)
                with torch.enable_grad():
                    logits = model(x_adv)
                    score = attack_objective(logits, y, objective)
                    (grad,) = torch.autograd.grad(score.sum(), x_adv)
                with torch.no_grad():
                    update = step * grad.sign()
                    if early_stop:  # misclassified examples stay where they are
                        active = active & (logits.argmax(1) == y)
                        update = update * active.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
                    x_adv = x_adv.detach() + update
                    x_adv = torch.minimum(torch.maximum(x_adv, lo), hi)
                if early_stop and not bool(active.any()):
                    break
            if restarts == 1:
                return x_adv.detach()  # one candidate: nothing to choose (saves a forward pass)
            with torch.no_grad():
                logits = model(x_adv)
                score = attack_objective(logits, y, objective)
                # A misclassifying point beats any correctly classified one.
                score = score + (logits.argmax(1) != y).to(score.dtype) * 1e6
                better = score > best_score
                best_score = torch.where(better, score, best_score)
                best_x[better] = x_adv[better]
    finally:
        restore_modes()
    return best_x.detach()


@dataclass(frozen=True)
class PGD:
    """A PGD configuration whose step is relative to the attacked ball's radius.

    The attacked ball has radius ``eps_factor · eps``; the step is ``step_size · eps_factor · eps``.
    With ``eps_factor > 1`` (the 8-step, 2.1ε training attack of De Palma et al. 2024b) the
    adversarial point lies in the enlarged ball.

    >>> PGD(steps=1, step_size=10.0).steps  # the one-step training attack of CC-IBP
    1
    """

    steps: int = 10
    step_size: float = 0.25
    eps_factor: float = 1.0
    restarts: int = 1
    objective: str = "ce"
    random_start: bool = True
    early_stop: bool = False

    def __post_init__(self):
        if self.steps < 0 or self.restarts < 1 or self.step_size < 0 or self.eps_factor <= 0:
            raise ValueError(f"invalid PGD settings: {self}")
        if self.objective not in ("ce", "margin"):
            raise ValueError(f"objective must be 'ce' or 'margin', got {self.objective!r}")

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        eps: float | Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        ball = eps * self.eps_factor
        return pgd_attack(
            model,
            x,
            y,
            ball,
            steps=self.steps,
            step_size=self.step_size * ball,
            random_start=self.random_start,
            restarts=self.restarts,
            objective=self.objective,
            early_stop=self.early_stop,
            generator=generator,
        )


#: The evaluation attack: PGD-40, 40 steps of 0.035·ε from a uniform random start in the ball ∩ [0, 1],
#: one start, cross-entropy objective. It is the attack of the published evaluation commands of
#: De Palma et al. (expressive-losses, ``verify.py --test_att_n_steps 40 --test_att_step_size 0.035``),
#: whose training and evaluation protocol the paper follows (docs/evaluation.md, "The attack").
EVAL_PGD = PGD(steps=40, step_size=0.035, restarts=1, objective="ce", random_start=True)
#: where :data:`EVAL_PGD` comes from, as stated in eval.json and under every table
EVAL_PGD_SOURCE = (
    "github.com/alessandrodepalma/expressive-losses@3df64fa, README verify.py commands: "
    "--test_att_n_steps 40 --test_att_step_size 0.035"
)


def describe_pgd(attack: PGD) -> str:
    """One line for tables and eval.json, e.g. ``PGD-40 (step 0.035·ε, 1 start, random start, ce)``."""
    start = "random start" if attack.random_start else "start at x"
    starts = f"{attack.restarts} start" + ("s" if attack.restarts > 1 else "")
    return (
        f"PGD-{attack.steps} (step {attack.step_size:g}·ε, {starts}, {start}, {attack.objective} objective)"
    )

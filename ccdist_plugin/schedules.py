"""ε and learning-rate schedules (docs/method.md "Student training" and "Teacher").

All schedules are pure functions of the position in training (epoch and batch index, both counted
from 0), so that a resumed run reproduces them exactly.

- :func:`smoothed_eps`: the per-batch smoothed ramp of auto_LiRPA's ``SmoothedScheduler``
  (Shi et al. 2021): ε_t = a·s^β over the first ``mid`` fraction of the ramp, then linear up to ε,
  with ``a`` chosen so that the two pieces meet with the same slope.
- :class:`EpsSchedule`: warm-up (ε = 0, clean loss), ramp-up (smoothed), then constant ε.
- :func:`step_decay_lr`: multiply by ``factor`` at each decay epoch (students, Adam).
- :func:`cyclic_lr`: 0 → peak over the first half of training, back to 0 at the end (teachers, SGD).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["smoothed_eps", "EpsSchedule", "step_decay_lr", "cyclic_lr", "LRSchedule"]


def smoothed_eps(step: float, ramp_steps: float, eps: float, mid: float = 0.25, beta: float = 4.0) -> float:
    """Smoothed ramp value after ``step`` of ``ramp_steps`` ramp batches.

    With ``m = mid · ramp_steps``::

        ε(s) = a · s^β                                     for 0 <= s < m
        ε(s) = a·m^β + (ε − a·m^β) · (s − m)/(ramp_steps − m)  for m <= s <= ramp_steps
        a    = ε / (m^(β−1) · ((ramp_steps − m)·β + m))

    so that the slopes match at ``m`` (a·β·m^(β−1) on both sides); ε(0) = 0, ε(ramp_steps) = ε.

    Args:
        step: batches since the start of the ramp (values < 0 give 0, values >= ``ramp_steps`` give ε).
        ramp_steps: length of the ramp in batches (> 0).
        eps: target ε (pixel space).
        mid: fraction of the ramp covered by the polynomial (0.25).
        beta: polynomial degree (4).

    >>> smoothed_eps(0, 100, 0.1), smoothed_eps(100, 100, 0.1)
    (0.0, 0.1)
    """
    if ramp_steps <= 0:
        return float(eps) if step >= 0 else 0.0
    if step <= 0:
        return 0.0
    if step >= ramp_steps:
        return float(eps)
    m = mid * ramp_steps
    a = eps / (m ** (beta - 1.0) * ((ramp_steps - m) * beta + m))
    if step < m:
        return float(a * step**beta)
    mid_value = a * m**beta
    return float(min(mid_value + (eps - mid_value) * (step - m) / (ramp_steps - m), eps))


@dataclass(frozen=True)
class EpsSchedule:
    """Per-batch ε: ``warmup_epochs`` of ε = 0, a smoothed ramp over ``ramp_up_epochs``, then ε.

    The ramp starts at exactly 0 on its first batch and reaches ε exactly on its last batch.

    Attributes:
        eps: target ε (pixel space).
        warmup_epochs: epochs with the clean loss (ε = 0).
        ramp_up_epochs: epochs of the ramp (0: constant ε after warm-up).
        batches_per_epoch: batches in one epoch.
        mid, beta: shape of the smoothed ramp (0.25, 4).
    """

    eps: float
    warmup_epochs: int
    ramp_up_epochs: int
    batches_per_epoch: int
    mid: float = 0.25
    beta: float = 4.0

    def __post_init__(self) -> None:
        if self.batches_per_epoch < 1:
            raise ValueError(f"EpsSchedule: batches_per_epoch must be >= 1, got {self.batches_per_epoch}")

    def phase(self, epoch: int) -> str:
        """``"warmup"``, ``"ramp"`` or ``"constant"`` for a (0-based) epoch."""
        if epoch < self.warmup_epochs:
            return "warmup"
        if epoch < self.warmup_epochs + self.ramp_up_epochs:
            return "ramp"
        return "constant"

    def __call__(self, epoch: int, batch: int) -> float:
        """ε for batch ``batch`` of epoch ``epoch`` (both 0-based)."""
        if epoch < self.warmup_epochs:
            return 0.0
        ramp_steps = self.ramp_up_epochs * self.batches_per_epoch - 1
        step = (epoch - self.warmup_epochs) * self.batches_per_epoch + batch
        if self.ramp_up_epochs == 0 or ramp_steps <= 0:
            return float(self.eps)
        return smoothed_eps(step, ramp_steps, self.eps, self.mid, self.beta)


def step_decay_lr(base_lr: float, epoch: int, decay_epochs: Sequence[int], factor: float = 0.2) -> float:
    """``base_lr · factor^k`` with k the number of decay epochs <= ``epoch`` (0-based).

    "Decayed at epochs 120 and 140" (of 160) gives ``decay_epochs=(120, 140)``: epochs 0-119 use
    ``base_lr``, 120-139 ``0.2·base_lr``, 140-159 ``0.04·base_lr``.

    >>> step_decay_lr(5e-4, 130, (120, 140))
    0.0001
    """
    k = sum(1 for d in decay_epochs if epoch >= d)
    return float(base_lr * factor**k)


def cyclic_lr(peak_lr: float, epoch: int, batch: int, batches_per_epoch: int, epochs: int) -> float:
    """Triangular schedule: linear 0 → ``peak_lr`` over the first half of training, back to 0 at the end.

    Evaluated at the fractional epoch t = epoch + (batch + 1)/batches_per_epoch, so no batch has lr 0
    except the very last one.
    """
    t = epoch + (batch + 1) / batches_per_epoch
    half = epochs / 2.0
    if t <= half:
        return float(peak_lr * t / half)
    return float(max(peak_lr * (epochs - t) / half, 0.0))


@dataclass(frozen=True)
class LRSchedule:
    """Per-batch learning rate for the ``step``, ``cyclic`` and ``constant`` schedules."""

    kind: str
    base_lr: float
    epochs: int
    batches_per_epoch: int
    decay_epochs: tuple[int, ...] = ()
    decay_factor: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in ("step", "cyclic", "constant"):
            raise ValueError(f"LRSchedule: unknown kind {self.kind!r}; expected step, cyclic or constant")

    def __call__(self, epoch: int, batch: int) -> float:
        if self.kind == "step":
            return step_decay_lr(self.base_lr, epoch, self.decay_epochs, self.decay_factor)
        if self.kind == "cyclic":
            return cyclic_lr(self.base_lr, epoch, batch, self.batches_per_epoch, self.epochs)
        return float(self.base_lr)

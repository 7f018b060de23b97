"""The pure functions of tensors every loss is written with: the margin cross-entropy, the convex
combinations of CC-IBP and CC-Dist, the distillation term R, and the ε-ramp progress."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def margin_ce(z: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of the logit vector −z (entry y of z is 0): CE(−z, y), averaged over the batch."""
    return F.cross_entropy(-z, y)


def cc_combination(adv: Tensor, bound: Tensor, alpha: float) -> Tensor:
    """(1 − α)·adv + α·bound: the convex combinations of CC-IBP (z) and of equation 8 (h)."""
    return (1 - alpha) * adv + alpha * bound


def distillation_term(lo: Tensor, hi: Tensor, teacher_features: Tensor) -> Tensor:
    """R = Σ_i max{(lo_i − h_t,i)², (hi_i − h_t,i)²}, averaged over the batch (Proposition 3.2).

    Args:
        lo, hi: (B, w) lower/upper student features (the CC combinations lo(α), hi(α)).
        teacher_features: (B, w) teacher features h_t(x) on the clean inputs (no gradient).
    """
    if lo.shape != teacher_features.shape or hi.shape != lo.shape:
        raise ValueError(
            f"feature shapes differ: lo {tuple(lo.shape)}, hi {tuple(hi.shape)}, teacher "
            f"{tuple(teacher_features.shape)}"
        )
    per_feature = torch.maximum((lo - teacher_features) ** 2, (hi - teacher_features) ** 2)
    return per_feature.sum(1).mean()


def logit_differences(logits: Tensor, y: Tensor) -> Tensor:
    """z = f_y·1 − f, shape (B, k), entry y is 0."""
    return logits.gather(1, y.view(-1, 1)) - logits


def ramp_progress(eps: float | Tensor, eps_target: float | None) -> float:
    """How far the ε ramp is, ε/ε_target clipped to [0, 1] (1 without a target). A per-example ε
    counts by its mean (the schedules below weigh whole batches)."""
    if eps_target is None:
        return 1.0
    if eps_target <= 0:
        raise ValueError(f"eps_target must be > 0, got {eps_target}")
    value = float(eps.float().mean()) if isinstance(eps, Tensor) else float(eps)
    return min(max(value / eps_target, 0.0), 1.0)

"""Regularizers of certified training: Shi et al. (2021) IBP regularizer and ℓ1 on weights.

:func:`shi_regularizer` is a pure function of the IBP pre-activation bounds that the losses already
compute (``LossOutput.stats.preact_bounds``), so the trainer does not propagate bounds twice.
:func:`ibp_preactivation_bounds` computes those bounds for any ``CertifiedNet`` when a loss does not
provide them (a user's own loss, or ε = 0 batches, where docs/method.md asks for bounds at ε = 1e-6).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

__all__ = [
    "ShiRegularization",
    "shi_regularizer",
    "ibp_preactivation_bounds",
    "normalized_input_box",
    "l1_penalty",
]


class ShiRegularization(NamedTuple):
    """Result of :func:`shi_regularizer` (all 0-d tensors).

    Attributes:
        total: ``tightness + relu_balance`` (multiply by λ(1 − ε_t/ε) in the training loss).
        tightness: mean over ReLU layers of relu(τ − mean(Δ₀)/mean(Δ))/τ.
        relu_balance: mean over ReLU layers of [relu(τ − min(r_m, 1/r_m)) + relu(τ − min(r_v, 1/r_v))]/τ.
    """

    total: torch.Tensor
    tightness: torch.Tensor
    relu_balance: torch.Tensor


def shi_regularizer(
    preact_bounds: Sequence[tuple[torch.Tensor, torch.Tensor]],
    input_lb: torch.Tensor,
    input_ub: torch.Tensor,
    tau: float = 0.5,
    batch_mean: Callable[[torch.Tensor], torch.Tensor] = torch.mean,
) -> ShiRegularization:
    """Shi et al. (2021, eq. 9-11) regularizer from IBP pre-activation bounds (docs/method.md).

    For each ReLU layer with pre-activation bounds [l, u] (shape (B, ...), any layout), with
    Δ = (u − l)/2, c = (u + l)/2, active neurons l > 0 and inactive u < 0, and E[·] the mean over
    all B × neurons entries:

    - tightness = relu(τ − E[Δ₀]/E[Δ]) / τ, with Δ₀ = (input_ub − input_lb)/2 the radius of the input
      box fed to the first affine layer (normalized space);
    - r_m = E[c·1(l>0)] / (−E[c·1(u<0)]): the mean of c over active neurons relative to minus its
      mean over inactive ones (both expectations over all entries, as in Shi et al.);
    - r_v = E[(c − E[c])²·1(l>0)] / E[(c − E[c])²·1(u<0)]: the same for the spread of c;
    - relu balance = [relu(τ − min(r_m, 1/r_m)) + relu(τ − min(r_v, 1/r_v))] / τ.

    Both terms are averaged over the ReLU layers (divided by the number of layers); a layer's term
    that is NaN or infinite (e.g. no active and no inactive neuron) is skipped (contributes 0).

    Args:
        preact_bounds: one (lb, ub) pair per ReLU, in network order.
        input_lb, input_ub: the input box (after normalization), shape (B, C, H, W) or any.
        tau: τ (0.5).
        batch_mean: how a mean over the batch (E[·]) is taken: ``torch.mean``, or, under gradient
            accumulation, the whole batch's mean (:meth:`ccdist_plugin.accumulate.BatchStatistics.
            batch_mean`), so that the regularizer is the whole batch's, not each micro-batch's.

    Returns:
        :class:`ShiRegularization`; differentiable w.r.t. the bounds.
    """
    if len(preact_bounds) == 0:
        raise ValueError("shi_regularizer: no pre-activation bounds (the network has no ReLU?)")
    if tau <= 0:
        raise ValueError(f"shi_regularizer: tau must be > 0, got {tau}")
    ref = preact_bounds[0][0]
    zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
    radius_in = batch_mean((input_ub - input_lb) / 2)
    tightness, balance = zero.clone(), zero.clone()
    for lb, ub in preact_bounds:
        radius = (ub - lb) / 2
        centre = (ub + lb) / 2
        t_term = torch.relu(tau - radius_in / batch_mean(radius).clamp(min=1e-12)) / tau
        if torch.isfinite(t_term):
            tightness = tightness + t_term
        active, inactive = (lb > 0).to(centre.dtype), (ub < 0).to(centre.dtype)
        mean_ratio = batch_mean(centre * active) / -batch_mean(centre * inactive)
        spread = (centre - batch_mean(centre)) ** 2
        var_ratio = batch_mean(spread * active) / batch_mean(spread * inactive)
        mean_ratio = torch.minimum(mean_ratio, 1 / mean_ratio.clamp(min=1e-12))
        var_ratio = torch.minimum(var_ratio, 1 / var_ratio.clamp(min=1e-12))
        b_term = (torch.relu(tau - mean_ratio) + torch.relu(tau - var_ratio)) / tau
        if torch.isfinite(b_term):
            balance = balance + b_term
    n = len(preact_bounds)
    tightness, balance = tightness / n, balance / n
    return ShiRegularization(tightness + balance, tightness, balance)


def normalized_input_box(model: nn.Module, x: torch.Tensor, eps: float | torch.Tensor):
    """The ℓ∞ ball of radius ``eps`` (pixel space) around ``x``, intersected with [0, 1], mapped through
    the model's ``Normalize`` layer (when it has one). Returns (lb, ub) shaped like ``x``."""
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if eps_t.dim() == 1:
        eps_t = eps_t.view(-1, *([1] * (x.dim() - 1)))
    lo, hi = (x - eps_t).clamp(0, 1), (x + eps_t).clamp(0, 1)
    norm = getattr(model, "normalize", None)
    if norm is not None:
        lo, hi = norm(lo), norm(hi)  # std > 0: order is kept
    return lo, hi


def ibp_preactivation_bounds(
    model: nn.Module, x: torch.Tensor, eps: float | torch.Tensor, reference: torch.Tensor | None = None
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """IBP bounds on the input of every activation of ``model.features`` over the ε-ball around ``x``.

    Uses ``ccdist_plugin.bounds.propagate_intervals``; a train-mode BatchNorm uses the batch
    statistics of ``reference`` (default: ``x``), and no running statistics are updated.

    Returns:
        (list of (lb, ub) per activation, (input_lb, input_ub) after normalization).
    """
    from ccdist_plugin.bounds import input_box, propagate_intervals

    features = model.features if hasattr(model, "features") else model
    lb, ub = input_box(x, eps)
    out = propagate_intervals(features, lb, ub, reference=x if reference is None else reference)
    if not out.preact_bounds:
        raise ValueError("ibp_preactivation_bounds: the model has no activation layer")
    return list(out.preact_bounds), normalized_input_box(model, x, eps)


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Σ |W| over the weights of every ``nn.Conv2d``/``nn.Linear`` (biases and BatchNorm excluded)."""
    terms = [
        m.weight.abs().sum() for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))
    ]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()

"""Linear relaxations of activation functions, the one place CROWN-style bounds take them from.

An activation σ on a pre-activation interval [l, u] is enclosed per neuron by two lines,
``lower_slope·z + lower_intercept ≤ σ(z) ≤ upper_slope·z + upper_intercept`` for z ∈ [l, u].
Back-substituting a lower bound of ``a · σ(z)`` takes the lower line where a coefficient is
non-negative and the upper line where it is negative (:func:`apply_lower`); every back-substitution
engine (dense, patches) calls that and nothing activation-specific.

- :func:`relu_relaxation` — CROWN's (Zhang et al. 2018): the chord above; below, a line through
  the origin with CROWN's adaptive slope (1 when u > −l, else 0) or given slopes in [0, 1]
  (α-CROWN); stable neurons exactly.
- :func:`activation_relaxation` — the relaxation of a layer by its type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Relaxation", "relu_relaxation", "activation_relaxation", "apply_lower", "RELAXED_ACTIVATIONS"]

#: activation layers the native CROWN engines relax
RELAXED_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU,)


@dataclass
class Relaxation:
    """Per-neuron enclosing lines of an activation on [l, u] (all shaped like l). An intercept of
    None is zero everywhere (ReLU's lower line), which saves a product in the hot loop."""

    lower_slope: Tensor
    lower_intercept: Tensor | None
    upper_slope: Tensor
    upper_intercept: Tensor | None


def relu_relaxation(l: Tensor, u: Tensor, lower_slope: Tensor | None = None) -> Relaxation:
    """CROWN's ReLU relaxation on [l, u]; ``lower_slope`` (broadcastable, in [0, 1]) replaces the
    adaptive lower slope of the unstable neurons (any such slope gives a line below ReLU)."""
    active, inactive = l >= 0, u <= 0
    unstable = ~(active | inactive)
    denom = torch.where(unstable, u - l, torch.ones_like(u))
    chord = torch.where(unstable, u / denom, torch.zeros_like(u))
    up_slope = torch.where(active, torch.ones_like(u), chord)
    up_icpt = torch.where(unstable, -u * l / denom, torch.zeros_like(u))
    if lower_slope is None:
        low_slope = torch.where(active | (unstable & (u > -l)), torch.ones_like(u), torch.zeros_like(u))
    else:
        # stable neurons keep their exact slope (1 when active, 0 when inactive)
        low_slope = torch.where(unstable, lower_slope, active.to(u.dtype))
    return Relaxation(low_slope, None, up_slope, up_icpt)


def activation_relaxation(
    layer: nn.Module, l: Tensor, u: Tensor, lower_slope: Tensor | None = None
) -> Relaxation:
    """The relaxation of activation ``layer`` on [l, u] (``lower_slope``: ReLU only, α-CROWN)."""
    if isinstance(layer, nn.ReLU):
        return relu_relaxation(l, u, lower_slope)
    raise TypeError(f"no linear relaxation for {layer!r}")


def apply_lower(a: Tensor, bias: Tensor, r: Relaxation) -> tuple[Tensor, Tensor]:
    """Back-substitute ``a · σ(z) + bias`` to a lower bound ``a′ · z + bias′`` through relaxation
    ``r``. ``a`` is (B, m, *neurons), the relaxation's tensors broadcast to it (a leading batch
    dimension B, or 1 for the spec dimension m); ``bias`` is (B, m).

    The intercepts enter by one batched product each (few coefficient-sized temporaries: this is
    most of the cost of a CROWN-IBP training step)."""
    for coeff, icpt in ((a.clamp(max=0), r.upper_intercept), (a.clamp(min=0), r.lower_intercept)):
        if icpt is not None:
            icpt = icpt.expand(a.shape[0], *icpt.shape[1:]) if icpt.shape[0] == 1 else icpt
            bias = bias + torch.bmm(coeff.flatten(2), icpt.reshape(a.shape[0], -1, 1)).squeeze(-1)
    return a * torch.where(a >= 0, r.lower_slope, r.upper_slope), bias

"""Linear relaxations of activation functions, the one place CROWN-style bounds take them from.

An activation σ on a pre-activation interval [l, u] is enclosed per neuron by two lines,
``lower_slope·z + lower_intercept ≤ σ(z) ≤ upper_slope·z + upper_intercept`` for z ∈ [l, u].
Back-substituting a lower bound of ``a · σ(z)`` takes the lower line where a coefficient is
non-negative and the upper line where it is negative (:func:`apply_lower`); every back-substitution
engine (dense, patches) calls that and nothing activation-specific.

- :func:`relu_relaxation` — CROWN's (Zhang et al. 2018): the chord above; below, a line through
  the origin with CROWN's adaptive slope (1 when u > −l, else 0) or given slopes in [0, 1]
  (α-CROWN); stable neurons exactly.
- :func:`tanh_relaxation` — CROWN's for tanh (Zhang et al. 2018, general activations): chord and
  tangent on a convex or concave piece, tangents through an end point across 0; every line made
  sound in floating point by measuring its worst violation over [l, u] and shifting it.
- :func:`activation_relaxation` — the relaxation of a layer by its type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "Relaxation",
    "relu_relaxation",
    "tanh_relaxation",
    "activation_relaxation",
    "apply_lower",
    "RELAXED_ACTIVATIONS",
]

#: activation layers the native CROWN engines relax
RELAXED_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.Tanh)


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


#: bisection steps for a tangent point: the bracket [−p, 0] shrinks to p·2⁻⁶⁰, below float64's resolution
_TANGENT_STEPS = 60
#: the slack added to every tanh line, in units of the dtype's epsilon times the size of the terms
#: of ``s·z + b − tanh(z)``: covers the rounding of that evaluation (each operation and tanh itself
#: within a few ulps) and of the shift, so a line measured sound at the candidate points is sound
_SLACK_ULPS = 8.0


def _dtanh(z: Tensor) -> Tensor:
    """tanh′(z) = 1 − tanh²(z), as 1/cosh²(z): accurate in the tails (0 beyond overflow)."""
    return torch.cosh(z).pow(-2)


def _tangent_point_through(p: Tensor, steps: int = _TANGENT_STEPS) -> Tensor:
    """For p > 0, the d in (−p, 0) whose tangent to tanh passes through (p, tanh p), from below.

    h(d) = tanh d + tanh′(d)(p − d) − tanh p is increasing on d ≤ 0 (h′ = tanh″(d)(p − d) > 0),
    positive at 0 (p > tanh p) and negative at −p (2(p tanh′(p) − tanh p) < 0), so bisection on
    [−p, 0] finds its root. The left end of the final bracket is returned: its tangent passes
    below (p, tanh p) (where h ≤ 0 as evaluated), which is the sound side."""
    left, right = -p, torch.zeros_like(p)
    target = torch.tanh(p)
    for _ in range(steps):
        mid = (left + right) / 2
        above = torch.tanh(mid) + _dtanh(mid) * (p - mid) > target
        left, right = torch.where(above, left, mid), torch.where(above, mid, right)
    return left


def _tanh_excess(slope: Tensor, icpt: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """max over z in [lo, hi] of slope·z + icpt − tanh z (first) and of tanh z − slope·z − icpt.

    Both extremes lie at an end or where tanh′(z) = slope, i.e. at z = ±a with
    a = arcosh(1/√slope) = log((1 + √(1 − slope))/√slope) (none for slope ≥ 1: a = 0 is then a
    harmless extra point; for slope ≤ 0, a = ∞ and the clamp gives the ends): five candidates
    evaluated exactly as the lines are, whatever way the line was chosen."""
    s = slope.clamp(0.0, 1.0)
    a = torch.log((1 + torch.sqrt(1 - s)) / torch.sqrt(s))
    above, below = None, None
    for z in (lo, hi, torch.minimum(torch.maximum(a, lo), hi), torch.minimum(torch.maximum(-a, lo), hi)):
        gap = slope * z + icpt - torch.tanh(z)
        above = gap if above is None else torch.maximum(above, gap)
        below = -gap if below is None else torch.maximum(below, -gap)
    return above, below


def tanh_relaxation(l: Tensor, u: Tensor, tangent_grid: float | None = None) -> Relaxation:
    """CROWN's linear relaxation of tanh on [l, u] (Zhang et al. 2018, general activations), sound
    in floating point. tanh is convex for z ≤ 0 and concave for z ≥ 0:

    - u ≤ 0: the chord above, the tangent at the midpoint m below (l ≥ 0: the mirror image);
    - l < 0 < u, lower line: the chord when it stays below tanh (its slope below tanh′(l)); else
      the tangent at min(d, m), where d ≤ 0 is the point whose tangent passes through (u, tanh u)
      (any tangent point left of d is sound; m keeps the line from jumping as [l, u] moves, as
      auto_LiRPA does); the upper line the mirror image (through (l, tanh l), at max(d′, m)).

    These are auto_LiRPA's choices for CROWN; auto_LiRPA looks d up in a table on a 0.01 grid of
    u (rounded up: a slightly looser line), where this solves for it. ``tangent_grid`` rounds u and
    −l up to that grid first, to reproduce auto_LiRPA's lines in a comparison.

    Every line is then shifted by its measured worst violation over [l, u] (:func:`_tanh_excess`)
    plus a few ulps, so rounding, l == u, saturated or inverted bounds never give a line that
    crosses tanh. Non-finite bounds give the constant lines tanh(l) and tanh(u).
    """
    lo, hi = torch.minimum(l, u), torch.maximum(l, u)
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    lo, hi = torch.where(finite, lo, 0.0), torch.where(finite, hi, 0.0)
    convex, concave = hi <= 0, lo >= 0
    straddle = ~(convex | concave)
    width = hi - lo
    mid = lo / 2 + hi / 2
    has_width = width > 0
    chord = torch.where(
        has_width, (torch.tanh(hi) - torch.tanh(lo)) / torch.where(has_width, width, 1.0), _dtanh(lo)
    )
    chord = chord.clamp(0.0, 1.0)
    # tangent points across 0: through (u, tanh u) below, through (l, tanh l) above (tanh is odd)
    reach_up, reach_down = torch.where(straddle, hi, 1.0), torch.where(straddle, -lo, 1.0)
    if tangent_grid is not None:
        reach_up = (torch.floor(reach_up / tangent_grid) + 1) * tangent_grid
        reach_down = (torch.floor(reach_down / tangent_grid) + 1) * tangent_grid
    d_low = torch.minimum(_tangent_point_through(reach_up), mid)
    d_up = torch.maximum(-_tangent_point_through(reach_down), mid)
    chord_below = concave | (straddle & (chord < _dtanh(lo)))
    chord_above = convex | (straddle & (chord < _dtanh(hi)))
    # the point each non-chord line touches: the midpoint on a convex/concave piece, else d
    touch_low = torch.where(convex, mid, d_low)
    touch_up = torch.where(concave, mid, d_up)
    low_slope = torch.where(chord_below, chord, _dtanh(touch_low))
    up_slope = torch.where(chord_above, chord, _dtanh(touch_up))
    low_icpt = torch.where(
        chord_below, torch.tanh(lo) - chord * lo, torch.tanh(touch_low) - low_slope * touch_low
    )
    up_icpt = torch.where(
        chord_above, torch.tanh(lo) - chord * lo, torch.tanh(touch_up) - up_slope * touch_up
    )
    eps = torch.finfo(lo.dtype).eps
    reach = torch.maximum(lo.abs(), hi.abs())
    low_excess, _ = _tanh_excess(low_slope, low_icpt, lo, hi)
    _, up_excess = _tanh_excess(up_slope, up_icpt, lo, hi)
    low_icpt = (
        low_icpt - low_excess.clamp(min=0) - _SLACK_ULPS * eps * (low_slope * reach + low_icpt.abs() + 1)
    )
    up_icpt = up_icpt + up_excess.clamp(min=0) + _SLACK_ULPS * eps * (up_slope * reach + up_icpt.abs() + 1)
    zero = torch.zeros_like(lo)
    return Relaxation(
        torch.where(finite, low_slope, zero),
        torch.where(finite, low_icpt, torch.tanh(torch.minimum(l, u))),
        torch.where(finite, up_slope, zero),
        torch.where(finite, up_icpt, torch.tanh(torch.maximum(l, u))),
    )


def activation_relaxation(
    layer: nn.Module, l: Tensor, u: Tensor, lower_slope: Tensor | None = None
) -> Relaxation:
    """The relaxation of activation ``layer`` on [l, u] (``lower_slope``: ReLU only, α-CROWN)."""
    if isinstance(layer, nn.ReLU):
        return relu_relaxation(l, u, lower_slope)
    if isinstance(layer, nn.Tanh):
        if lower_slope is not None:
            raise TypeError("optimized lower slopes (α-CROWN) are for ReLU only, not for tanh")
        return tanh_relaxation(l, u)
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

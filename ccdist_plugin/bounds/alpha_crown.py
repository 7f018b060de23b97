"""α-CROWN (Xu et al. 2021): CROWN with the lower-relaxation slopes of its ReLUs optimized per point.

CROWN relaxes an unstable ReLU (l < 0 < u) from below by a line through the origin with slope
1 or 0 (the adaptive choice). Any slope α ∈ [0, 1] gives a line below ReLU (α·z ≤ max(z, 0) for
every z), so the back-substituted bound is a sound lower bound for every choice of α; α-CROWN
picks, per point, per logit difference and per unstable neuron of the final back-substitution,
the α that makes that bound largest, by projected gradient ascent (Adam, then clipping to
[0, 1]). The intermediate (pre-activation) bounds are CROWN's, as the native CROWN computes them
(:func:`ccdist_plugin.bounds.crown.crown_relaxation`); the logit differences are folded into the
head (last-layer elision) as CROWN does.

- :func:`alpha_crown_margin_lower_bound` — the α-CROWN lower bounds on z_j = f_y − f_j, never
  below CROWN's. :func:`ccdist_plugin.bounds.certify` (``method="alpha_crown"``) makes the
  float64 decisions on them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ccdist_plugin.batching import batch_slices
from ccdist_plugin.bounds.crown import (
    CrownRelaxation,
    back_substitute,
    crown_relaxation,
    resolve_crown_intermediate,
)
from ccdist_plugin.bounds.ibp import elision_matrix, native_intervals
from ccdist_plugin.bounds.layers import UnsupportedLayerError, native_unsupported_layer, refuse_uncertifiable
from ccdist_plugin.models import CertifiedNet
from ccdist_plugin.validate import check_inputs, check_labels, check_model

__all__ = ["ALPHA_STEPS", "ALPHA_LR", "alpha_crown_margin_lower_bound"]

#: gradient steps on the slopes per batch of points (α,β-CROWN optimizes its root bounds about as long)
ALPHA_STEPS = 20
#: Adam's learning rate on the slopes (they live in [0, 1])
ALPHA_LR = 0.1

#: elements of the final back-substitution's coefficient tensor per batch (autograd keeps a few per
#: layer): larger batches are split
_ALPHA_BUDGET = 2**24


def _refuse_non_native(model: CertifiedNet) -> None:
    """α-CROWN runs on the native CROWN only, and optimizes ReLU slopes only: name the layer it
    cannot take, and the alternative."""
    layer = native_unsupported_layer(model.features)
    if layer is not None:
        raise UnsupportedLayerError(
            f"α-CROWN needs the native CROWN (ReLU networks of Sequential and Residual blocks), which "
            f"does not take {layer!r}; certify this network with CROWN through auto_LiRPA instead "
            "(without --alpha-crown)"
        )
    tanh = next((m for m in model.features.modules() if isinstance(m, nn.Tanh)), None)
    if tanh is not None:
        raise UnsupportedLayerError(
            f"α-CROWN optimizes the slopes of ReLU networks only, and this one has {tanh!r}; certify "
            "it with CROWN instead (without --alpha-crown: the native CROWN relaxes tanh)"
        )


def _initial_slopes(r: CrownRelaxation, rows: int) -> dict[int, Tensor]:
    """Per ReLU node with an unstable neuron: CROWN's adaptive lower slopes (1 where u > −l, else 0),
    one copy per logit difference, (B, rows, *shape)."""
    slopes = {}
    for n, (l, u) in r.preact.items():
        if bool(((l < 0) & (u > 0)).any()):
            start = (u > -l).to(l.dtype).unsqueeze(1)
            slopes[n] = start.expand(-1, rows, *start.shape[2:]).clone()
    return slopes


def _final_bound(r: CrownRelaxation, w_diff: Tensor, b_diff: Tensor, slopes: dict[int, Tensor]) -> Tensor:
    return back_substitute(
        r.nodes, len(r.nodes) - 1, r.shapes, r.preact, r.affine, w_diff, b_diff, r.lo, r.hi, slopes
    )


def _optimize(
    r: CrownRelaxation, w_diff: Tensor, b_diff: Tensor, steps: int, lr: float
) -> tuple[Tensor, dict[int, Tensor]]:
    """(B, k) the CROWN bound, and the slopes that gave each row its best bound over ``steps``
    Adam steps (each row of each point has its own slopes, so the rows are independent problems)."""
    alpha = _initial_slopes(r, w_diff.shape[1])
    best = {n: a.clone() for n, a in alpha.items()}
    with torch.no_grad():
        crown = _final_bound(r, w_diff, b_diff, alpha)  # the adaptive slopes: CROWN's bound
    if not alpha or steps == 0:
        return crown, best
    best_lb = crown.clone()
    params = [a.requires_grad_() for a in alpha.values()]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        with torch.enable_grad():
            lb = _final_bound(r, w_diff, b_diff, alpha)
            opt.zero_grad()
            (-lb.sum()).backward()
        with torch.no_grad():
            better = lb > best_lb  # the bound at the slopes before this step
            best_lb = torch.where(better, lb, best_lb)
            for n, a in alpha.items():
                mask = better.view(*better.shape, *([1] * (a.ndim - 2)))
                best[n] = torch.where(mask, a, best[n])
        opt.step()
        with torch.no_grad():
            for a in params:
                a.clamp_(0.0, 1.0)  # the projection: any slope in [0, 1] is sound
    return crown, best


@torch.no_grad()
def _alpha_crown(
    model: CertifiedNet, x: Tensor, y: Tensor, eps: float | Tensor, intermediate: str, steps: int, lr: float
) -> Tensor:
    r = crown_relaxation(model, x, eps, intermediate)
    w_diff, b_diff = elision_matrix(model.head, y)
    crown, slopes = _optimize(r, w_diff, b_diff, steps, lr)
    # the decision's bound, recomputed without autograd from the chosen slopes (in the model's dtype:
    # float64 under certify); the maximum with CROWN's keeps it never below CROWN, both being sound
    return torch.maximum(_final_bound(r, w_diff, b_diff, slopes), crown)


def alpha_crown_margin_lower_bound(
    model: CertifiedNet,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    intermediate: str = "auto",
    steps: int = ALPHA_STEPS,
    lr: float = ALPHA_LR,
    max_crown_elements: int = 2**23,
) -> Tensor:
    """α-CROWN lower bounds (B, k) on z_j = f_y − f_j over the ball (entry y is 0), per point never
    below CROWN's (:func:`ccdist_plugin.bounds.crown.crown_margin_lower_bound`, native backend).

    Args:
        intermediate: the pre-activation bounds, as for CROWN: ``"crown"``, ``"ibp"`` or ``"auto"``
            (:func:`ccdist_plugin.bounds.crown.resolve_crown_intermediate`).
        steps, lr: Adam steps and learning rate on the slopes (0 steps: CROWN's bound).

    The model must be in eval mode (the deployed network) and native-boundable: a ReLU network of
    ``nn.Sequential`` and ``Residual`` blocks. The bound is sound whatever the optimization does:
    every slope it can return lies in [0, 1]. The model is not modified.

    Raises:
        UnsupportedLayerError: a layer the native CROWN does not take (named, with the alternative).
    """
    model = check_model(model)
    check_inputs(model, x)
    check_labels(x, y, model.num_classes)
    if model.training:
        raise ValueError("α-CROWN bounds the deployed network: call model.eval() first")
    if steps < 0 or not lr > 0:
        raise ValueError(f"α-CROWN needs steps >= 0 and lr > 0, got {steps} and {lr}")
    refuse_uncertifiable(model.features)
    _refuse_non_native(model)
    kind = resolve_crown_intermediate(model, intermediate, max_crown_elements)
    # one example's final back-substitution holds k × (largest node) coefficients
    first = x[:1]
    ibp = native_intervals(model.features, first, first, None, keep_all=True, update_running_stats=False)
    largest = max(math.prod(x.shape[1:]), *(math.prod(b[0].shape[1:]) for b in ibp.layer_bounds))
    per_batch = max(1, _ALPHA_BUDGET // (model.num_classes * largest))
    eps_t = torch.as_tensor(eps)
    parts = []
    for sl in batch_slices(x.shape[0], per_batch):
        e = eps_t[sl] if eps_t.ndim == 1 else eps
        parts.append(_alpha_crown(model, x[sl], y[sl], e, kind, steps, lr))
    return torch.cat(parts) if parts else x.new_zeros(0, model.num_classes)

"""α-CROWN (Xu et al. 2021): CROWN with the lower-relaxation slopes of its ReLUs optimized per point.

CROWN relaxes an unstable ReLU (l < 0 < u) from below by a line through the origin with slope
1 or 0 (the adaptive choice). Any slope α ∈ [0, 1] gives a line below ReLU (α·z ≤ max(z, 0) for
every z), so the back-substituted bound is a sound lower bound for every choice of α; α-CROWN
picks the slopes that make the bound largest, by projected gradient ascent (Adam, then clipping
to [0, 1]). The design follows α-CROWN (Xu et al. 2021, "Fast and Complete: Enabling Complete
Neural Network Verification with Rapid and Massively Parallel Incomplete Verifiers") as the
auto_LiRPA library implements it (``compute_bounds(method="CROWN-Optimized")``,
github.com/Verified-Intelligence/auto_LiRPA), which α,β-CROWN runs for its root bounds:

- **What is optimized** (default, ``optimize_intermediate=True``): one set of slopes per pair
  (bounded back-substitution, ReLU below it) — the final one (the logit differences, folded into
  the head by last-layer elision) and, for every ReLU node after the first, the back-substitution
  of the lower and upper bounds of its input's neurons that are unstable under CROWN's bounds.
  Every row (logit difference, neuron bound) of every point has its own slopes. Each step
  recomputes those intermediate bounds, lowest layer first, with their slopes and the current
  bounds of the layers below, intersects them with CROWN's (both sound), and then the final
  bound; the loss is minus the sum of the final lower bounds, as auto_LiRPA's. The best final
  bound seen per point and logit difference is kept (every one is sound), never below CROWN's.
- ``optimize_intermediate=False``: the final back-substitution's slopes only, over fixed
  intermediate bounds (CROWN's or CROWN-IBP's, :func:`ccdist_plugin.bounds.crown.crown_relaxation`).

- :func:`alpha_crown_margin_lower_bound` — the α-CROWN lower bounds on z_j = f_y − f_j, never
  below CROWN's. :func:`ccdist_plugin.bounds.certify` (``method="alpha_crown"``) makes the
  float64 decisions on them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

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

__all__ = ["ALPHA_STEPS", "ALPHA_LR", "ALPHA_BUDGET", "alpha_crown_margin_lower_bound"]

logger = logging.getLogger(__name__)

#: gradient steps on the slopes per batch of points (α,β-CROWN optimizes its root bounds about as long)
ALPHA_STEPS = 20
#: Adam's learning rate on the slopes (they live in [0, 1])
ALPHA_LR = 0.1

#: elements (coefficients kept for the backward pass, slopes and their optimizer state) that the
#: optimization of one group of points' intermediate bounds may hold: 1 GiB in float64
ALPHA_BUDGET = 2**27

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


@dataclass
class _Target:
    """A ReLU node whose input's bounds α-CROWN optimizes: per example the neurons unstable under the
    initial bounds (``idx``, flat, padded to the batch's most with the dummy index ``numel``;
    ``valid`` marks the real ones). A neuron stable in an example keeps its initial bound there: its
    relaxation is exact whatever the bound."""

    node: int
    src: int
    idx: Tensor
    valid: Tensor


def _unstable(r: CrownRelaxation, n: int) -> Tensor:
    """(B, neurons) the neurons of ReLU node ``n`` unstable under the relaxation's bounds (l < 0 < u)."""
    l, u = r.preact[n]
    return ((l < 0) & (u > 0)).flatten(1)


def _slope_sets(r: CrownRelaxation) -> dict[int, Tensor]:
    """Per ReLU node with an unstable neuron in some example: those neurons (flat indices, the union
    over the batch). Only they carry slopes: optimized bounds are within the initial ones, so a
    neuron stable initially stays stable, and a stable neuron's relaxation takes no slope."""
    sets = {}
    for n in sorted(r.preact):
        union = _unstable(r, n).any(0).nonzero().flatten()
        if union.numel():
            sets[n] = union
    return sets


def _targets(r: CrownRelaxation) -> list[_Target]:
    """Every ReLU node after the first (whose input is an affine function of the input: its interval
    bounds are exact) with an unstable neuron, in topological order."""
    targets = []
    for n in sorted(r.preact)[1:]:
        unstable = _unstable(r, n)
        counts = unstable.sum(1)
        most = int(counts.max()) if counts.numel() else 0
        if most == 0:
            continue
        # each example's unstable neurons first (a stable sort keeps them in index order)
        order = torch.argsort((~unstable).to(torch.int8), dim=1, stable=True)[:, :most]
        valid = torch.arange(most, device=order.device) < counts.unsqueeze(1)
        idx = torch.where(valid, order, unstable.shape[1])
        targets.append(_Target(n, r.nodes[n].inputs[0], idx, valid))
    return targets


def _initial_slopes(r: CrownRelaxation, m: int, neurons: Tensor, rows: int) -> Tensor:
    """(B, rows, len(neurons)) CROWN's adaptive lower slopes of ReLU node ``m`` at ``neurons``
    (1 where u > −l, else 0), one copy per row, as a leaf to optimize."""
    l, u = r.preact[m]
    start = (u > -l).flatten(1)[:, neurons].to(l.dtype).unsqueeze(1)
    return start.expand(-1, rows, -1).clone().requires_grad_()


def _full_slopes(r: CrownRelaxation, params: dict[int, Tensor], sets: dict[int, Tensor]) -> dict[int, Tensor]:
    """The slope parameters of each ReLU node placed at their neurons, (B, rows, *node shape) (0
    elsewhere: stable neurons, which take no slope)."""
    full = {}
    for m, p in params.items():
        shape = r.preact[m][0].shape[1:]
        dense = p.new_zeros(*p.shape[:2], math.prod(shape)).index_copy(2, sets[m], p)
        full[m] = dense.view(*p.shape[:2], *shape)
    return full


def _optimized_preact(
    r: CrownRelaxation, preact: dict[int, tuple[Tensor, Tensor]], t: _Target, slopes: dict[int, Tensor]
) -> tuple[Tensor, Tensor]:
    """Bounds of ReLU node ``t.node``'s input: its unstable neurons' lower and upper rows back-substituted
    with ``slopes`` over the relaxations of ``preact`` (the current optimized bounds below), intersected
    with the initial bounds (both sound, so is the intersection); the other neurons' initial bounds."""
    l0, u0 = r.preact[t.node]
    bsz, rows = t.idx.shape
    numel = l0[0].numel()
    onehot = l0.new_zeros(bsz, rows, numel + 1).scatter_(2, t.idx.unsqueeze(-1), 1.0)[..., :numel]
    spec = torch.cat([onehot, -onehot], 1).view(bsz, 2 * rows, *l0.shape[1:])
    bound = back_substitute(
        r.nodes, t.src, r.shapes, preact, r.affine, spec, l0.new_zeros(bsz, 2 * rows), r.lo, r.hi, slopes
    )
    out = []
    for initial, new, tighter in ((l0, bound[:, :rows], torch.fmax), (u0, -bound[:, rows:], torch.fmin)):
        # one dummy slot at the end takes the padding rows; fmax/fmin: a NaN never replaces a bound
        flat = torch.cat([initial.flatten(1), initial.new_zeros(bsz, 1)], 1)
        old = flat.gather(1, t.idx)
        flat = flat.scatter(1, t.idx, torch.where(t.valid, tighter(old, new), old))
        out.append(flat[:, :numel].view_as(initial))
    return out[0], out[1]


def _optimize(
    r: CrownRelaxation, w_diff: Tensor, b_diff: Tensor, steps: int, lr: float, targets: list[_Target]
) -> Tensor:
    """(B, k) per point and logit difference the best bound over ``steps`` evaluations of the slopes
    (Adam steps between them, each followed by the projection onto [0, 1]), never below CROWN's.

    Slopes: ``("final", m)`` for the final back-substitution, and with ``targets`` ``(n, m)`` for the
    back-substitution of ReLU node n's input bounds, for every ReLU m below n; every row of every
    point has its own. Each evaluation recomputes the targets' bounds, lowest first, with the current
    slopes and the current bounds below, then the final bound: every evaluated value is a sound bound
    (all slopes in [0, 1], all bounds sound), computed in the model's dtype."""
    final = len(r.nodes) - 1
    crown = back_substitute(r.nodes, final, r.shapes, r.preact, r.affine, w_diff, b_diff, r.lo, r.hi)
    sets = _slope_sets(r)
    if not sets or steps == 0:
        return crown
    params: dict[tuple[int | str, int], Tensor] = {}
    for t in targets:
        for m in sets:
            if m < t.node:  # every node t.node depends on has a smaller index
                params[(t.node, m)] = _initial_slopes(r, m, sets[m], 2 * t.idx.shape[1])
    params.update({("final", m): _initial_slopes(r, m, sets[m], w_diff.shape[1]) for m in sets})
    opt = torch.optim.Adam(params.values(), lr=lr)
    best = crown
    for step in range(steps):
        with torch.enable_grad():
            preact = dict(r.preact)
            for t in targets:
                own = {m: p for (n, m), p in params.items() if n == t.node}
                preact[t.node] = _optimized_preact(r, preact, t, _full_slopes(r, own, sets))
            own = _full_slopes(r, {m: p for (n, m), p in params.items() if n == "final"}, sets)
            lb = back_substitute(r.nodes, final, r.shapes, preact, r.affine, w_diff, b_diff, r.lo, r.hi, own)
            last = step == steps - 1
            if not last:
                opt.zero_grad()
                (-lb.sum()).backward()  # auto_LiRPA's objective: the sum of the final lower bounds
        lb = lb.detach()
        best = torch.where(lb > best, lb, best)  # (a NaN is never better)
        if not last:
            opt.step()
            with torch.no_grad():
                for p in params.values():
                    p.clamp_(0.0, 1.0)  # the projection: any slope in [0, 1] is sound
    return best


def _slice_relaxation(r: CrownRelaxation, sl: slice) -> CrownRelaxation:
    """The relaxation of the examples ``sl`` (the BatchNorm/Normalize affines are per channel)."""
    preact = {n: (l[sl], u[sl]) for n, (l, u) in r.preact.items()}
    return CrownRelaxation(r.nodes, r.shapes, preact, r.affine, r.lo[sl], r.hi[sl])


def _intermediate_cost(r: CrownRelaxation) -> Tensor:
    """(B,) per example the elements the optimization of its intermediate bounds holds: per ReLU node
    n after the first, 2 rows per unstable neuron, each with a coefficient at every node below n
    (autograd keeps them for the backward pass) and 4 copies (slope, gradient, Adam's two moments) of
    the slopes at every unstable neuron of the ReLUs below."""
    sets = _slope_sets(r)
    cost = torch.zeros(r.lo.shape[0], dtype=torch.long, device=r.lo.device)
    for n in sorted(r.preact)[1:]:
        src = r.nodes[n].inputs[0]
        per_row = sum(math.prod(s) for s in r.shapes[: src + 1])
        per_row += 4 * sum(idx.numel() for m, idx in sets.items() if m < n)
        cost += 2 * _unstable(r, n).sum(1) * per_row
    return cost


def _groups(cost: Tensor, budget: int) -> tuple[list[slice], list[int]]:
    """Consecutive groups of examples whose optimization holds at most ``budget`` elements (rows are
    padded to the group's most, so a group costs its size times its largest example), and the
    examples that do not fit alone."""
    groups, alone, start = [], [], 0
    n = cost.numel()
    while start < n:
        if int(cost[start]) > budget:
            alone.append(start)
            start += 1
            continue
        end, most = start + 1, int(cost[start])
        while end < n and (end - start + 1) * max(most, int(cost[end])) <= budget:
            most = max(most, int(cost[end]))
            end += 1
        groups.append(slice(start, end))
        start = end
    return groups, alone


@torch.no_grad()
def _alpha_crown(
    model: CertifiedNet,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    intermediate: str,
    steps: int,
    lr: float,
    optimize_intermediate: bool,
    budget: int,
) -> Tensor:
    r = crown_relaxation(model, x, eps, "crown" if optimize_intermediate else intermediate)
    w_diff, b_diff = elision_matrix(model.head, y)
    if not optimize_intermediate:
        return _optimize(r, w_diff, b_diff, steps, lr, [])
    out = x.new_empty(x.shape[0], model.num_classes)
    groups, alone = _groups(_intermediate_cost(r), budget)
    for sl in groups:
        part = _slice_relaxation(r, sl)
        out[sl] = _optimize(part, w_diff[sl], b_diff[sl], steps, lr, _targets(part))
    for i in alone:
        logger.warning(
            "α-CROWN: optimizing the intermediate bounds of one point needs more than the budget of "
            "%d elements; that point gets the final slopes optimized only (raise alpha_budget)",
            budget,
        )
        sl = slice(i, i + 1)
        out[sl] = _optimize(_slice_relaxation(r, sl), w_diff[sl], b_diff[sl], steps, lr, [])
    return out


def alpha_crown_margin_lower_bound(
    model: CertifiedNet,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    intermediate: str = "auto",
    steps: int = ALPHA_STEPS,
    lr: float = ALPHA_LR,
    max_crown_elements: int = 2**23,
    optimize_intermediate: bool = True,
    alpha_budget: int = ALPHA_BUDGET,
) -> Tensor:
    """α-CROWN lower bounds (B, k) on z_j = f_y − f_j over the ball (entry y is 0), per point never
    below CROWN's (:func:`ccdist_plugin.bounds.crown.crown_margin_lower_bound`, native backend).

    Args:
        intermediate: the pre-activation bounds of the final-only mode, as for CROWN: ``"crown"``,
            ``"ibp"`` or ``"auto"`` (:func:`ccdist_plugin.bounds.crown.resolve_crown_intermediate`).
            With ``optimize_intermediate`` the initial bounds are always CROWN's.
        steps, lr: Adam steps and learning rate on the slopes (0 steps: CROWN's bound).
        optimize_intermediate: True (default): the slopes of every intermediate back-substitution
            are optimized too, and the intermediate bounds recomputed with them at every step (as
            α,β-CROWN's root bounds); False: the final back-substitution's slopes only, over fixed
            intermediate bounds (cheaper; the intermediate bounds are ``intermediate``'s).
        alpha_budget: with ``optimize_intermediate``, the most elements (coefficients autograd keeps,
            slopes and Adam's state) one optimization may hold (default :data:`ALPHA_BUDGET` = 2**27,
            1 GiB in float64). A batch over it is split into groups of points that fit; a point that
            does not fit alone gets the final slopes optimized only, with a warning naming the
            budget. (A fallback rather than an error: the final-only bound is still sound and never
            below CROWN's, so a pre-filter keeps going on a network too large to optimize fully.)

    The model must be in eval mode (the deployed network) and native-boundable: a ReLU network of
    ``nn.Sequential`` and ``Residual`` blocks. The bound is sound whatever the optimization does:
    every slope it evaluates lies in [0, 1], and every bound it returns is one it evaluated in the
    model's dtype (or CROWN's). The model is not modified.

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
    if alpha_budget < 1:
        raise ValueError(f"α-CROWN needs alpha_budget >= 1 element, got {alpha_budget}")
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
        parts.append(
            _alpha_crown(model, x[sl], y[sl], e, kind, steps, lr, optimize_intermediate, alpha_budget)
        )
    return torch.cat(parts) if parts else x.new_zeros(0, model.num_classes)

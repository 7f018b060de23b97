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
  bounds of the layers below, intersects them with the tightest seen so far, CROWN's to start
  (all sound, so is the intersection), and then the final bound; the loss is minus the sum of the
  final lower bounds, as auto_LiRPA's. The best final bound seen per point and logit difference is
  kept (every one is sound), never below CROWN's. A neuron stable in an example keeps its initial
  bound there (its relaxation is exact), so each example bounds only its own unstable neurons.
  The cost is dense back-substitution of two rows per such neuron at every step (no patches form
  yet): 46-104 CPU s per point on CIFAR cnn3s, against about 1 s for the final slopes only
  (docs/evaluation.md).
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
    final_margin_bound,
    resolve_crown_intermediate,
)
from ccdist_plugin.bounds.ibp import elision_matrix, native_intervals
from ccdist_plugin.bounds.layers import UnsupportedLayerError, native_unsupported_layer, refuse_uncertifiable
from ccdist_plugin.models import CertifiedNet
from ccdist_plugin.validate import check_inputs, check_labels, check_model

__all__ = [
    "ALPHA_STEPS",
    "ALPHA_LR",
    "ALPHA_BUDGET",
    "ALPHA_LAYERS",
    "AlphaCrownSettings",
    "alpha_crown_settings",
    "alpha_crown_margin_lower_bound",
]

logger = logging.getLogger(__name__)

#: gradient steps on the slopes per batch of points (α,β-CROWN optimizes its root bounds about as long)
ALPHA_STEPS = 20
#: Adam's learning rate on the slopes (they live in [0, 1])
ALPHA_LR = 0.1

#: elements (coefficients kept for the backward pass, slopes and their optimizer state) that the
#: optimization of one group of points' intermediate bounds may hold: 2 GiB in float64
ALPHA_BUDGET = 2**28

#: what :class:`AlphaCrownSettings`' ``layers`` may be
ALPHA_LAYERS = ("final", "all")


@dataclass(frozen=True)
class AlphaCrownSettings:
    """How a pre-filter's α-CROWN stage bounds the points IBP and CROWN leave uncertified.

    Both modes start from full CROWN (CROWN intermediate bounds, as α,β-CROWN's root bounds), whatever
    intermediate bounds the CROWN stage before it used, so a point CROWN-IBP leaves can still be
    certified by full CROWN here.

    Attributes:
        layers: ``"final"`` (default): the final back-substitution's slopes only, over full CROWN's
            intermediate bounds; ``"all"``: every layer's slopes, the intermediate bounds recomputed
            at every step (α,β-CROWN's root bounds; tighter, and on a CIFAR cnn3 50-100× the CPU
            time: ``benchmarks/alpha_crown_cost.py``).
        steps: Adam steps on the slopes per batch of points.
        lr: Adam's learning rate on the slopes.
        budget: with ``layers="all"``, the most elements one optimization may hold
            (:func:`alpha_crown_margin_lower_bound`'s ``alpha_budget``).
    """

    layers: str = "final"
    steps: int = ALPHA_STEPS
    lr: float = ALPHA_LR
    budget: int = ALPHA_BUDGET

    def __post_init__(self) -> None:
        if self.layers not in ALPHA_LAYERS:
            raise ValueError(f"α-CROWN layers must be one of {ALPHA_LAYERS}, got {self.layers!r}")
        _check_optimizer(self.steps, self.lr, self.budget)

    def bound_kwargs(self) -> dict[str, object]:
        """The keyword arguments of :func:`alpha_crown_margin_lower_bound` these settings mean."""
        return {
            "intermediate": "crown",
            "steps": self.steps,
            "lr": self.lr,
            "optimize_intermediate": self.layers == "all",
            "alpha_budget": self.budget,
        }


def _check_optimizer(steps: int, lr: float, budget: int) -> None:
    """Refuse optimizer settings that cannot run (the settings' and the bound's one check)."""
    if steps < 0 or not lr > 0:
        raise ValueError(f"α-CROWN needs steps >= 0 and lr > 0, got {steps} and {lr}")
    if budget < 1:
        raise ValueError(f"α-CROWN needs alpha_budget >= 1 element, got {budget}")


def alpha_crown_settings(value: bool | AlphaCrownSettings | None) -> AlphaCrownSettings | None:
    """A pre-filter's ``alpha_crown`` argument as settings: False/None (no α-CROWN stage) is None,
    True the defaults."""
    if value is None or value is False:
        return None
    if value is True:
        return AlphaCrownSettings()
    if isinstance(value, AlphaCrownSettings):
        return value
    raise TypeError(f"alpha_crown must be a bool or AlphaCrownSettings, got {type(value).__name__}")


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
    r: CrownRelaxation,
    preact: dict[int, tuple[Tensor, Tensor]],
    t: _Target,
    slopes: dict[int, Tensor],
    reference: tuple[Tensor, Tensor],
) -> tuple[Tensor, Tensor]:
    """Bounds of ReLU node ``t.node``'s input: its unstable neurons' lower and upper rows back-substituted
    with ``slopes`` over the relaxations of ``preact`` (the current optimized bounds below), intersected
    with ``reference`` (sound bounds of the same neurons: both sound, so is the intersection); the
    other neurons keep the initial bounds."""
    l0 = r.preact[t.node][0]
    bsz, rows = t.idx.shape
    numel = l0[0].numel()
    onehot = l0.new_zeros(bsz, rows, numel + 1).scatter_(2, t.idx.unsqueeze(-1), 1.0)[..., :numel]
    spec = torch.cat([onehot, -onehot], 1).view(bsz, 2 * rows, *l0.shape[1:])
    bound = back_substitute(
        r.nodes, t.src, r.shapes, preact, r.affine, spec, l0.new_zeros(bsz, 2 * rows), r.lo, r.hi, slopes
    )
    out = []
    for known, new, tighter in (
        (reference[0], bound[:, :rows], torch.fmax),
        (reference[1], -bound[:, rows:], torch.fmin),
    ):
        # one dummy slot at the end takes the padding rows; fmax/fmin: a NaN never replaces a bound
        flat = torch.cat([known.flatten(1), known.new_zeros(bsz, 1)], 1)
        old = flat.gather(1, t.idx)
        # new first: at a tie (the first step, CROWN's own slopes) fmax/fmin pass the gradient to
        # their first argument, and it must reach the slopes
        flat = flat.scatter(1, t.idx, torch.where(t.valid, tighter(new, old), old))
        out.append(flat[:, :numel].view_as(known))
    return out[0], out[1]


def _slope_params(
    r: CrownRelaxation, targets: list[_Target], sets: dict[int, Tensor], rows: int
) -> dict[tuple[int | str, int], Tensor]:
    """The slopes to optimize, CROWN's adaptive choice to start: ``("final", m)`` for the final
    back-substitution (``rows`` logit differences) and ``(n, m)`` for every target n and every ReLU m
    below it, each (B, rows of that back-substitution, unstable neurons of m)."""
    params: dict[tuple[int | str, int], Tensor] = {}
    for t in targets:
        for m in sets:
            if m < t.node:  # every node t.node depends on has a smaller index
                params[(t.node, m)] = _initial_slopes(r, m, sets[m], 2 * t.idx.shape[1])
    params.update({("final", m): _initial_slopes(r, m, sets[m], rows) for m in sets})
    return params


def _bound_at(
    r: CrownRelaxation,
    w_diff: Tensor,
    b_diff: Tensor,
    params: dict[tuple[int | str, int], Tensor],
    sets: dict[int, Tensor],
    targets: list[_Target],
    reference: dict[int, tuple[Tensor, Tensor]] | None = None,
) -> Tensor:
    """(B, k) the final bound at slopes ``params`` (:func:`_slope_params`' keys): the targets'
    bounds recomputed, lowest first, with their slopes over the current bounds below and intersected
    with ``reference`` (default: the initial bounds; :func:`_optimize` passes the tightest seen so
    far, and updates it in place), then the final back-substitution. Sound whenever every slope lies
    in [0, 1]; differentiable in the slopes."""
    preact = dict(r.preact)
    for t in targets:
        own = {m: p for (n, m), p in params.items() if n == t.node}
        known = reference[t.node] if reference is not None else r.preact[t.node]
        preact[t.node] = _optimized_preact(r, preact, t, _full_slopes(r, own, sets), known)
        if reference is not None:
            reference[t.node] = (preact[t.node][0].detach(), preact[t.node][1].detach())
    own = _full_slopes(r, {m: p for (n, m), p in params.items() if n == "final"}, sets)
    final = len(r.nodes) - 1
    return back_substitute(r.nodes, final, r.shapes, preact, r.affine, w_diff, b_diff, r.lo, r.hi, own)


def _project(params: dict[tuple[int | str, int], Tensor]) -> None:
    """Clip every slope to [0, 1], where every slope gives a line below ReLU: what makes the
    optimized bound sound."""
    with torch.no_grad():
        for p in params.values():
            p.clamp_(0.0, 1.0)


@dataclass
class _Optimization:
    """What the slope optimization of a batch holds, every tensor's first dimension the example: the
    relaxation, the margins' rows, the targets, the tightest intermediate bounds so far, the slopes
    and Adam over them."""

    r: CrownRelaxation
    w_diff: Tensor
    b_diff: Tensor
    targets: list[_Target]
    reference: dict[int, tuple[Tensor, Tensor]]
    params: dict[tuple[int | str, int], Tensor]
    opt: torch.optim.Adam

    def keep(self, keep: Tensor) -> _Optimization:
        """The same optimization for the examples ``keep`` only, Adam's moments and step count kept
        (Adam is elementwise and the objective a sum over examples: each example's slopes follow the
        path they would have followed in the whole batch)."""
        params = {key: p.detach()[keep].clone().requires_grad_() for key, p in self.params.items()}
        opt = torch.optim.Adam(params.values(), lr=self.opt.param_groups[0]["lr"])
        for key, p in self.params.items():
            state = self.opt.state.get(p, {})
            opt.state[params[key]] = {
                name: v[keep].clone() if torch.is_tensor(v) and v.ndim > 0 else v for name, v in state.items()
            }
        return _Optimization(
            _slice_relaxation(self.r, keep),
            self.w_diff[keep],
            self.b_diff[keep],
            [_Target(t.node, t.src, t.idx[keep], t.valid[keep]) for t in self.targets],
            {n: (l[keep], u[keep]) for n, (l, u) in self.reference.items()},
            params,
            opt,
        )


def _optimize(
    r: CrownRelaxation,
    w_diff: Tensor,
    b_diff: Tensor,
    steps: int,
    lr: float,
    targets: list[_Target],
    stop_above: float | None = None,
) -> Tensor:
    """(B, k) per point and logit difference the best bound over ``steps`` evaluations of the slopes
    (:func:`_bound_at`; an Adam step between two, then :func:`_project`), never below CROWN's.

    Every row of every point has its own slopes. Each intermediate bound is intersected with the
    tightest one seen at an earlier step (auto_LiRPA's ``fix_interm_bounds``), so they only tighten.
    Every evaluated value is a sound bound (every slope in [0, 1], every intermediate bound sound)
    computed in the model's dtype, so the best of them is one too. With ``stop_above``, a point
    whose every logit difference's best bound is above it leaves the optimization (as α,β-CROWN stops
    a verified property): its bound is then the best so far, not the best after ``steps``."""
    # CROWN's margins (with, for full CROWN, the interval bound where it is larger): the floor
    crown = final_margin_bound(r, w_diff, b_diff)
    sets = _slope_sets(r)
    if not sets or steps == 0:
        return crown
    params = _slope_params(r, targets, sets, w_diff.shape[1])
    # the tightest intermediate bounds seen so far, every one sound (as auto_LiRPA keeps them)
    reference = {t.node: r.preact[t.node] for t in targets}
    run = _Optimization(
        r, w_diff, b_diff, targets, reference, params, torch.optim.Adam(params.values(), lr=lr)
    )
    best = crown.clone()
    # the label's own row (zero weights and bias) is 0 at every step: no proof to wait for
    own_row = (w_diff.flatten(2) == 0).all(2) & (b_diff == 0)
    active = torch.arange(best.shape[0], device=best.device)
    for step in range(steps):
        if stop_above is not None:
            done = ((best[active] > stop_above) | own_row[active]).all(1)
            if bool(done.all()):
                break
            if bool(done.any()):
                keep = (~done).nonzero().flatten()
                active, run = active[keep], run.keep(keep)
        last = step == steps - 1
        with torch.enable_grad():
            lb = _bound_at(run.r, run.w_diff, run.b_diff, run.params, sets, run.targets, run.reference)
            if not last:
                run.opt.zero_grad()
                (-lb.sum()).backward()  # auto_LiRPA's objective: the sum of the final lower bounds
        lb = lb.detach()
        best[active] = torch.where(lb > best[active], lb, best[active])  # (a NaN is never better)
        if not last:
            run.opt.step()
            _project(run.params)
    return best


def _slice_relaxation(r: CrownRelaxation, sl: slice | Tensor) -> CrownRelaxation:
    """The relaxation of the examples ``sl`` (a slice or indices; the BatchNorm/Normalize affines are
    per channel)."""
    preact = {n: (l[sl], u[sl]) for n, (l, u) in r.preact.items()}
    out = r.output_interval
    sliced = None if out is None else (out[0][sl], out[1][sl])
    return CrownRelaxation(r.nodes, r.shapes, preact, r.affine, r.lo[sl], r.hi[sl], sliced)


class _GroupCost:
    """Elements the optimization of the intermediate bounds of a group of consecutive examples holds
    (rows are padded to the group's most): per ReLU node n after the first, 2 rows per unstable
    neuron, each with the coefficient-sized tensors of the back-substitution and its backward pass
    (about six per neuron of every ReLU below n: the dense slopes, the relaxation's where and
    products, their gradients; measured by the peak resident memory on a CIFAR cnn3), one per input,
    and 4 copies (slope, gradient, Adam's two moments) of its slopes at the unstable neurons (union
    over the group) of every ReLU below n.

    A group grows one example at a time (:meth:`add`), its running maxima and unions updated, so that
    :func:`_groups` is linear in the batch rather than re-measuring every candidate group."""

    def __init__(self, r: CrownRelaxation) -> None:
        self.relus = sorted(r.preact)
        self.unstable = {m: _unstable(r, m) for m in self.relus}
        numel = {m: r.preact[m][0][0].numel() for m in self.relus}
        self.fixed = {
            n: 6 * sum(numel[m] for m in self.relus if m < n) + r.lo[0].numel() for n in self.relus[1:]
        }
        self.start(0)

    def start(self, i: int) -> None:
        """An empty group before example ``i``."""
        self.size, self.next = 0, i
        self.most = dict.fromkeys(self.relus, 0)
        self.union = {m: torch.zeros_like(u[0]) for m, u in self.unstable.items()}

    def add(self) -> int:
        """Add the next example; the group's cost."""
        i = self.next
        self.size, self.next = self.size + 1, i + 1
        for m, u in self.unstable.items():
            self.most[m] = max(self.most[m], int(u[i].sum()))
            self.union[m] |= u[i]
        slopes = {m: int(self.union[m].sum()) for m in self.relus}
        return sum(
            self.size * 2 * self.most[n] * (self.fixed[n] + 4 * sum(slopes[m] for m in self.relus if m < n))
            for n in self.relus[1:]
        )


def _group_cost(r: CrownRelaxation) -> int:
    """:class:`_GroupCost` of all the relaxation's examples."""
    cost = _GroupCost(r)
    return max(cost.add() for _ in range(r.lo.shape[0]))


def _groups(r: CrownRelaxation, budget: int) -> tuple[list[slice], list[int]]:
    """Consecutive groups of examples whose optimization holds at most ``budget`` elements
    (:class:`_GroupCost`), each as large as fits, and the examples that do not fit alone."""
    groups, alone = [], []
    n = r.lo.shape[0]
    cost = _GroupCost(r)
    start = 0
    while start < n:
        if cost.add() > budget:
            alone.append(start)
            start += 1
            cost.start(start)
            continue
        end = start + 1
        while end < n and cost.add() <= budget:
            end += 1
        groups.append(slice(start, end))
        start = end
        cost.start(start)
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
    stop_above: float | None,
) -> Tensor:
    r = crown_relaxation(model, x, eps, "crown" if optimize_intermediate else intermediate)
    w_diff, b_diff = elision_matrix(model.head, y)
    if not optimize_intermediate:
        return _optimize(r, w_diff, b_diff, steps, lr, [], stop_above)
    out = x.new_empty(x.shape[0], model.num_classes)
    groups, alone = _groups(r, budget)
    for sl in groups:
        part = _slice_relaxation(r, sl)
        out[sl] = _optimize(part, w_diff[sl], b_diff[sl], steps, lr, _targets(part), stop_above)
    for i in alone:
        logger.warning(
            "α-CROWN: optimizing the intermediate bounds of one point needs more than the budget of "
            "%d elements; that point gets the final slopes optimized only (raise alpha_budget)",
            budget,
        )
        sl = slice(i, i + 1)
        out[sl] = _optimize(_slice_relaxation(r, sl), w_diff[sl], b_diff[sl], steps, lr, [], stop_above)
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
    stop_above: float | None = None,
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
            slopes and Adam's state) one optimization may hold (default :data:`ALPHA_BUDGET` = 2**28,
            2 GiB in float64). A batch over it is split into groups of points that fit; a point that
            does not fit alone gets the final slopes optimized only, with a warning naming the
            budget. (A fallback rather than an error: the final-only bound is still sound and never
            below CROWN's, so a pre-filter keeps going on a network too large to optimize fully.)
        stop_above: a point whose every logit difference's bound is above this value stops being
            optimized (default None: every point runs all ``steps``). A pre-filter that only needs
            the decision passes its certification tolerance: a point certified early is certified
            all the same, and the points still open keep their slopes' path (Adam acts per element),
            at the cost of the points that are never certified. The returned bound of a point that
            stopped is the best it had reached, sound but not the tightest.

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
    _check_optimizer(steps, lr, alpha_budget)
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
            _alpha_crown(
                model, x[sl], y[sl], e, kind, steps, lr, optimize_intermediate, alpha_budget, stop_above
            )
        )
    return torch.cat(parts) if parts else x.new_zeros(0, model.num_classes)

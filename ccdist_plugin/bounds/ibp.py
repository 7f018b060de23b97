"""Interval bound propagation (IBP) over a network's graph, and last-layer elision.

- :func:`input_box` — the threat model's box: the ℓ∞ ball ∩ [0, 1].
- :func:`interval_bounds` / :func:`propagate_intervals` — IBP (Gowal et al. 2018; appendix A of
  the paper) in centre/radius form: an affine layer maps (c, r) to (W c + b, |W| r); a monotone
  activation maps [l, u] to [σ(l), σ(u)]; BatchNorm is an affine per-channel map with the
  statistics the forward pass uses (:func:`ccdist_plugin.bounds.layers.bn_scale_shift`), its
  scale's sign handled by |scale|; at a residual join the intervals add (centre + centre,
  radius + radius). A network the native engine cannot walk goes through auto_LiRPA
  (:mod:`ccdist_plugin.bounds.lirpa`) with the same BatchNorm semantics.
- :func:`feature_bounds`, :func:`elided_margin_lower_bound`, :func:`margin_lower_bound` —
  bounds on the features h(x′) and on the logit differences z = f_y − f_j, with the difference
  folded into the head (equation 10 of the paper).
- :func:`check_boundable` — which engine bounds a network, refusing one neither can.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccdist_plugin.bounds.layers import (
    MONOTONE,
    PAD_MODES,
    PASSTHROUGH,
    GraphNode,
    UnsupportedLayerError,
    apply_monotone,
    bn_scale_shift,
    check_supported_layer,
    conv_pads,
    native_ibp_supports,
    native_unsupported_layer,
    network_graph,
    refuse_uncertifiable,
)
from ccdist_plugin.bounds.lirpa import LirpaUnsupportedError, check_lirpa_boundable, lirpa_intervals
from ccdist_plugin.models import CertifiedNet, Normalize
from ccdist_plugin.validate import check_box, check_inputs, check_labels, check_model, check_pixel_range
from ccdist_plugin.validate import eps_tensor as _eps_tensor

__all__ = [
    "input_box",
    "IntervalPropagation",
    "native_intervals",
    "propagate_intervals",
    "check_boundable",
    "with_batch_statistics",
    "interval_bounds",
    "feature_bounds",
    "elision_matrix",
    "elided_margin_lower_bound",
    "elided_interval_margin",
    "margin_lower_bound",
    "ReferenceWalk",
]


def input_box(x: Tensor, eps: float | Tensor) -> tuple[Tensor, Tensor]:
    """The ℓ∞ ball of radius ``eps`` around ``x`` intersected with the pixel box [0, 1].

    Args:
        x: (B, ...) inputs in pixel space [0, 1].
        eps: radius in pixel units, a float or a (B,) tensor.

    Returns:
        ``(lo, hi)`` with ``lo = max(x − ε, 0)`` and ``hi = min(x + ε, 1)``.

    >>> lo, hi = input_box(torch.tensor([[0.0, 0.5, 1.0]]), 0.1)
    >>> [round(v, 6) for v in lo[0].tolist()], [round(v, 6) for v in hi[0].tolist()]  # float32 values
    ([0.0, 0.4, 0.9], [0.1, 0.6, 1.0])
    """
    if not torch.is_floating_point(x):
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    check_pixel_range(x)
    eps_t = _eps_tensor(eps, x)
    return (x - eps_t).clamp(0.0, 1.0), (x + eps_t).clamp(0.0, 1.0)


def _channel_view(v: Tensor, ndim: int) -> Tensor:
    return v.view(1, -1, *([1] * (ndim - 2)))


@dataclass
class IntervalPropagation:
    """Result of :func:`propagate_intervals`.

    Attributes:
        lower, upper: bounds on the output.
        value: the module's output on the reference batch (None when no reference was given).
        preact_bounds: (lower, upper) of the input of every activation, in order (for the
            Shi et al. regularizer and for CROWN's relaxations).
        layer_bounds: (lower, upper) after every node of the network's graph, when ``keep_all``
            was set: for a sequential network, after every layer of :func:`flat_layers`; a
            :class:`Residual` contributes its branch's layers, then its shortcut's, then the sum.
        channel_affine: index into ``layer_bounds`` → per-channel (scale, shift) of every
            BatchNorm and Normalize layer as this pass applied it, when ``keep_all`` was set.
    """

    lower: Tensor
    upper: Tensor
    value: Tensor | None = None
    preact_bounds: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    layer_bounds: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    channel_affine: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)


def _affine(layer: nn.Module, x: Tensor, weight: Tensor | None = None, bias: bool = True) -> Tensor:
    w = layer.weight if weight is None else weight
    b = layer.bias if bias else None
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, b)
    if layer.padding_mode == "zeros":
        return F.conv2d(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
    # Padding as its own step, as Conv2d.forward does: replicate/reflect/circular padding copies
    # input entries (a non-negative 0/1 linear map), so the centre and the radius are padded alike.
    x = F.pad(x, conv_pads(layer), mode=PAD_MODES[layer.padding_mode])
    return F.conv2d(x, w, b, layer.stride, 0, layer.dilation, layer.groups)


def _ibp_layer(
    layer: nn.Module,
    centre: Tensor,
    radius: Tensor,
    value: Tensor | None,
    index: int,
    result: IntervalPropagation,
    keep_all: bool,
    update_running_stats: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One leaf layer of IBP in centre/radius form (and of the reference's forward pass)."""
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        if value is not None:
            value = layer(value)
        return _affine(layer, centre), _affine(layer, radius, weight=layer.weight.abs(), bias=False), value
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        # train mode: the reference batch's statistics (or the centre's without a reference)
        stats_input = value if value is not None else centre
        scale, shift, normalized = bn_scale_shift(layer, stats_input, update_running_stats)
        if value is not None:
            value = normalized if normalized is not None else layer(value)
        if normalized is not None and value is None:
            centre = normalized
        else:
            view = centre.ndim
            centre = torch.addcmul(_channel_view(shift, view), centre, _channel_view(scale, view))
        radius = radius * _channel_view(scale.abs(), radius.ndim)
        if keep_all:
            result.channel_affine[index] = (scale, shift)
        return centre, radius, value
    if isinstance(layer, Normalize):
        if keep_all:
            result.channel_affine[index] = ((1 / layer.std).flatten(), (-layer.mean / layer.std).flatten())
        return layer(centre), radius / layer.std.abs(), None if value is None else layer(value)
    if isinstance(layer, MONOTONE):
        lb, ub = centre - radius, centre + radius
        result.preact_bounds.append((lb, ub))
        if value is not None:
            value = apply_monotone(layer, value)
        lb, ub = apply_monotone(layer, lb), apply_monotone(layer, ub)
        # Midpoint and half-width in two passes (lerp is one fused op).
        centre = torch.lerp(lb, ub, 0.5)
        return centre, ub - centre, value
    if isinstance(layer, (nn.Flatten, nn.AvgPool2d)):
        # Flatten moves entries; average pooling is a non-negative linear map: the centre maps
        # through it, so does the radius.
        return layer(centre), layer(radius), None if value is None else layer(value)
    if isinstance(layer, PASSTHROUGH) and native_ibp_supports(layer):
        return centre, radius, value
    raise _unsupported(layer)


def _unsupported(layer: nn.Module) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"no sound interval bound for layer {layer!r} in the native engine: supported are Linear, Conv2d, "
        "BatchNorm1d/2d, ReLU, Tanh, Normalize, Flatten, AvgPool2d, Identity, Dropout in "
        "eval mode, and nn.Sequential / Residual of these; other layers go through backend='auto_lirpa'"
    )


def _join(
    a: tuple[Tensor, Tensor, Tensor | None], b: tuple[Tensor, Tensor, Tensor | None]
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A residual join: the intervals add (centre + centre, radius + radius), as do the values."""
    (c1, r1, v1), (c2, r2, v2) = a, b
    return c1 + c2, r1 + r2, None if v1 is None or v2 is None else v1 + v2


def native_intervals(
    module: nn.Module,
    lower: Tensor,
    upper: Tensor,
    reference: Tensor | None,
    keep_all: bool,
    update_running_stats: bool,
) -> IntervalPropagation:
    """:func:`propagate_intervals` by the native engine alone, without its input checks (the
    engine's own callers, e.g. CROWN, pass boxes they built)."""
    nodes = network_graph(module)
    unsupported = native_unsupported_layer(module)
    if unsupported is not None:  # checked before any work, so nothing is half-updated
        check_supported_layer(unsupported)  # its specific reason, when it has one
        raise _unsupported(unsupported)
    uses = [0] * len(nodes)
    for node in nodes:
        for i in node.inputs:
            uses[i] += 1
    result = IntervalPropagation(lower, upper)
    states: dict[int, tuple[Tensor, Tensor, Tensor | None]] = {
        0: ((upper + lower) / 2, (upper - lower) / 2, reference)
    }
    for index in range(1, len(nodes)):
        node = nodes[index]
        if node.layer is None:
            state = _join(states[node.inputs[0]], states[node.inputs[1]])
        else:
            centre, radius, value = states[node.inputs[0]]
            state = _ibp_layer(
                node.layer, centre, radius, value, index - 1, result, keep_all, update_running_stats
            )
        for i in node.inputs:  # free what no later node reads
            uses[i] -= 1
            if uses[i] == 0:
                del states[i]
        states[index] = state
        if keep_all:
            result.layer_bounds.append((state[0] - state[1], state[0] + state[1]))
    centre, radius, value = states[len(nodes) - 1]
    result.lower, result.upper, result.value = centre - radius, centre + radius, value
    return result


def propagate_intervals(
    module: nn.Module,
    lower: Tensor,
    upper: Tensor,
    reference: Tensor | None = None,
    keep_all: bool = False,
    update_running_stats: bool = False,
    check: bool = True,
    backend: str = "auto",
) -> IntervalPropagation:
    """IBP through ``module``, optionally running the forward pass of a reference batch alongside.

    The reference (e.g. the adversarial batch in training) goes through each layer, and the
    intervals through a train-mode BatchNorm use the reference's batch statistics. With
    ``update_running_stats`` each train-mode BatchNorm's running statistics move exactly as
    ``module(reference)`` would move them (what a training step wants; the batch statistics are
    computed once for both); otherwise nothing in ``module`` is modified. This is how CC-IBP/CC-Dist get the
    adversarial output and the IBP bounds in one pass (docs/method.md, "BatchNorm during training").
    Without a reference, a train-mode BatchNorm uses the statistics of the box centre.

    A :class:`Residual` adds its two branches' intervals (centre + centre, radius + radius); both
    branches see the same input box and the same reference batch.

    Args:
        module: a layer, ``nn.Sequential`` or :class:`CertifiedNet`.
        lower, upper: (B, ...) input bounds with ``lower <= upper``.
        reference: optional (B′, ...) batch propagated by the plain forward pass.
        keep_all: also return the bounds after every graph node and the BatchNorm affine maps
            (native engine only).
        update_running_stats: see above.
        check: verify ``lower <= upper`` (one device sync); the training step passes False for the
            boxes it builds itself (ε-ball ∩ [0, 1], SABR's box), valid by construction.
        backend: ``"native"`` (this module: ``nn.Sequential`` / :class:`Residual` of the layers
            listed in :class:`UnsupportedLayerError`'s message), ``"auto_lirpa"`` (auto_LiRPA's IBP
            with the same train-mode BatchNorm semantics: :mod:`ccdist_plugin.bounds.lirpa`), or ``"auto"``:
            native when it supports every layer, auto_LiRPA otherwise.

    Raises:
        UnsupportedLayerError: naming the layer, when the chosen engine(s) cannot bound it.
    """
    if check:
        check_box(lower, upper)
    elif lower.shape != upper.shape:
        raise ValueError(f"lower {tuple(lower.shape)} and upper {tuple(upper.shape)} differ in shape")
    if backend not in ("auto", "native", "auto_lirpa"):
        raise ValueError(f"backend must be 'auto', 'native' or 'auto_lirpa', got {backend!r}")
    if backend == "auto_lirpa" or (backend == "auto" and native_unsupported_layer(module) is not None):
        refuse_uncertifiable(module)
        if keep_all:
            raise ValueError("keep_all needs the native engine, and this network has layers it cannot bound")
        try:
            lo, hi, value, preact = lirpa_intervals(module, lower, upper, reference, update_running_stats)
        except LirpaUnsupportedError as exc:
            raise _neither(module, exc) from exc
        return IntervalPropagation(lo, hi, value, preact)
    return native_intervals(module, lower, upper, reference, keep_all, update_running_stats)


def _neither(module: nn.Module, exc: Exception) -> UnsupportedLayerError:
    layer = native_unsupported_layer(module)
    native = "" if layer is None else f"the native engine does not support layer {layer!r}, and "
    return UnsupportedLayerError(f"no engine can bound this network: {native}{exc}")


def check_boundable(model: CertifiedNet) -> str:
    """The engine that bounds ``model.features``: ``"native"`` when it supports every layer, else
    ``"auto_lirpa"`` after checking that auto_LiRPA traces and bounds it.

    Raises:
        UnsupportedLayerError: neither engine can bound a layer (the message names it).
    """
    model = _as_certified_net(model)
    if native_unsupported_layer(model.features) is None:
        return "native"
    first = next(iter(model.parameters()), None)
    example = torch.zeros(
        2,
        *model.input_shape,
        dtype=torch.float32 if first is None else first.dtype,
        device=None if first is None else first.device,
    )
    try:
        check_lirpa_boundable(model.features, example)
    except LirpaUnsupportedError as exc:
        raise _neither(model.features, exc) from exc
    return "auto_lirpa"


def with_batch_statistics(model: nn.Module, reference: Tensor) -> nn.Module:
    """An eval-mode copy of ``model`` whose BatchNorms hold the batch statistics of ``reference``.

    This is the function that train-mode bounds describe (every BatchNorm normalizing with the
    statistics of the reference batch): bounds computed in train mode with ``reference`` equal
    the eval-mode bounds of this copy, and the copy can be evaluated on any point of the ball.
    """
    net = copy.deepcopy(model).train()
    stats: dict[nn.Module, tuple[Tensor, Tensor]] = {}

    def record(module, args):
        dims = [d for d in range(args[0].ndim) if d != 1]
        var, mean = torch.var_mean(args[0], dim=dims, unbiased=False)
        stats[module] = (mean, var)

    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    hooks = [m.register_forward_pre_hook(record) for m in bns]
    try:
        with torch.no_grad():
            net(reference)
    finally:
        for h in hooks:
            h.remove()
    for m, (mean, var) in stats.items():
        m.running_mean = mean.detach().clone()
        m.running_var = var.detach().clone()
    return net.eval()


def interval_bounds(
    module: nn.Module, lower: Tensor, upper: Tensor, reference: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """IBP bounds ``(lb, ub)`` on ``module``'s output over the box [lower, upper].

    A train-mode BatchNorm uses the batch statistics of ``reference`` when given (the batch the
    forward pass sees), else of the box centre; an eval-mode one its running statistics.
    """
    out = propagate_intervals(module, lower, upper, reference=reference)
    return out.lower, out.upper


_as_certified_net, _check_input = check_model, check_inputs  # the one set of checks (validate.py)


def _check_labels(model: CertifiedNet, x: Tensor, y: Tensor) -> None:
    check_labels(x, y, model.num_classes)


def feature_bounds(
    model: CertifiedNet, x: Tensor, eps: float | Tensor, reference: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """IBP bounds ``(h_lb, h_ub)``, each (B, w), on the features h(x′) for x′ in the ball.

    In train mode, BatchNorm uses the batch statistics of ``reference`` (default: ``x``, as
    auto_LiRPA does when given the clean batch).
    """
    model = _as_certified_net(model)
    _check_input(model, x)
    lo, hi = input_box(x, eps)
    return interval_bounds(model.features, lo, hi, reference=x if reference is None else reference)


def elision_matrix(head: nn.Linear, y: Tensor) -> tuple[Tensor, Tensor]:
    """The head folded with the logit-difference operator: W̃ = (e_y 1ᵀ − I) W, b̃ likewise.

    Returns:
        ``(W̃, b̃)`` of shapes (B, k, w) and (B, k); row y is zero.
    """
    w, b = head.weight, head.bias
    w_diff = w[y].unsqueeze(1) - w.unsqueeze(0)
    b_diff = (b[y].unsqueeze(1) - b.unsqueeze(0)) if b is not None else w_diff.new_zeros(w_diff.shape[:2])
    return w_diff, b_diff


def elided_margin_lower_bound(head: nn.Linear, h_lb: Tensor, h_ub: Tensor, y: Tensor) -> Tensor:
    """Equation 10: z_lb = [W̃]₊ h_lb + [W̃]₋ h_ub + b̃, shape (B, k), entry y is 0.

    With (h_lb, h_ub) replaced by the CC combinations (lo(α), hi(α)) this is also the CC-IBP
    logit difference z_cc(α) (Lemma 3.3).
    """
    return elided_interval_margin(*elision_matrix(head, y), h_lb, h_ub)


def elided_interval_margin(w_diff: Tensor, b_diff: Tensor, h_lb: Tensor, h_ub: Tensor) -> Tensor:
    """The lower bounds (B, k) of ``w_diff · h + b_diff`` over h ∈ [h_lb, h_ub] (B, d): the elided
    head (:func:`elision_matrix`) over a box of features."""
    pos, neg = w_diff.clamp(min=0), w_diff.clamp(max=0)
    return (
        torch.bmm(pos, h_lb.unsqueeze(-1)).squeeze(-1)
        + torch.bmm(neg, h_ub.unsqueeze(-1)).squeeze(-1)
        + b_diff
    )


def margin_lower_bound(model: CertifiedNet, x: Tensor, y: Tensor, eps: float | Tensor) -> Tensor:
    """IBP lower bounds (B, k) on z_j = f_y(x′) − f_j(x′) over the ball, with last-layer elision."""
    model = _as_certified_net(model)
    _check_labels(model, x, y)
    h_lb, h_ub = feature_bounds(model, x, eps)
    return elided_margin_lower_bound(model.head, h_lb, h_ub, y)


class ReferenceWalk:
    """The reference intervals of full CROWN (:mod:`ccdist_plugin.bounds.crown`), node by node of
    ``network_graph(features)`` in topological order: IBP from the
    pre-activation bounds already set (the input box below the first activation, then every
    activation's output interval from its bounds), through the residual joins, as auto_LiRPA
    computes its reference bounds. A node's interval is freed after its last use."""

    def __init__(
        self, nodes: list[GraphNode], lo: Tensor, hi: Tensor, affine: dict[int, tuple[Tensor, Tensor]]
    ):
        self.nodes, self.affine = nodes, affine
        self.states: dict[int, tuple[Tensor, Tensor]] = {0: ((hi + lo) / 2, (hi - lo) / 2)}
        self.uses = [0] * len(nodes)
        for node in nodes:
            for i in node.inputs:
                self.uses[i] += 1
        self.scratch = IntervalPropagation(lo, hi)

    def interval(self, n: int) -> tuple[Tensor, Tensor]:
        """The reference (lower, upper) of node ``n``."""
        centre, radius = self.states[n]
        return centre - radius, centre + radius

    def step(self, n: int, activation_bounds: tuple[Tensor, Tensor] | None = None) -> None:
        """Set node ``n``'s interval: an activation's from its pre-activation bounds, any other
        node's by IBP from its inputs (BatchNorm/Normalize with the (scale, shift) that the
        full-network IBP applied)."""
        node = self.nodes[n]
        if activation_bounds is not None:
            low, up = (
                apply_monotone(node.layer, activation_bounds[0]),
                apply_monotone(node.layer, activation_bounds[1]),
            )
            centre = torch.lerp(low, up, 0.5)
            self.states[n] = (centre, up - centre)
        elif node.layer is None:
            self.states[n] = _join(
                (*self.states[node.inputs[0]], None), (*self.states[node.inputs[1]], None)
            )[:2]
        elif n in self.affine:
            centre, radius = self.states[node.inputs[0]]
            scale, shift = self.affine[n]
            centre = torch.addcmul(
                _channel_view(shift, centre.ndim), centre, _channel_view(scale, centre.ndim)
            )
            self.states[n] = (centre, radius * _channel_view(scale.abs(), radius.ndim))
        else:
            centre, radius = self.states[node.inputs[0]]
            self.states[n] = _ibp_layer(node.layer, centre, radius, None, n - 1, self.scratch, False, False)[
                :2
            ]
        for i in node.inputs:
            self.uses[i] -= 1
            if self.uses[i] == 0:
                del self.states[i]

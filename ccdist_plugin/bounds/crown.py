"""CROWN back-substitution (Zhang et al. 2018) over a network's graph, for evaluation.

- :func:`back_substitute` — a linear function of one graph node pulled back through the layers to
  the input box, each ReLU or tanh relaxed linearly (:mod:`ccdist_plugin.bounds.relaxations`: for
  ReLU the adaptive lower relaxation of CROWN and the chord above; for tanh CROWN's chords and
  tangents); at a residual join the coefficients go down both branches and add where they meet.
  Differentiable: CROWN-IBP training (:mod:`ccdist_plugin.bounds.crown_ibp`) uses it too.
- :func:`crown_margin_lower_bound` — CROWN lower bounds on the logit differences, with CROWN
  (``intermediate="crown"``) or IBP (``"ibp"``, CROWN-IBP) pre-activation bounds, natively or
  through auto_LiRPA (``backend="auto_lirpa"``) as the reference implementation.
- :func:`resolve_crown_intermediate` — what ``intermediate="auto"`` picks for a network.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccdist_plugin.batching import batch_slices
from ccdist_plugin.bounds.ibp import (
    ReferenceWalk,
    elided_interval_margin,
    elision_matrix,
    input_box,
    native_intervals,
)
from ccdist_plugin.bounds.layers import (
    PAD_MODES,
    PASSTHROUGH,
    GraphNode,
    UnsupportedLayerError,
    apply_monotone,
    check_supported_layer,
    conv_pads,
    native_ibp_supports,
    native_unsupported_layer,
    network_graph,
    refuse_uncertifiable,
)
from ccdist_plugin.bounds.lirpa import (
    import_auto_lirpa,
    margin_spec,
    plain_lirpa_warnings,
    refuse_unsound_lirpa_crown,
)
from ccdist_plugin.bounds.patches import PATCH_BUDGET, fill_open_signs, patch_preact_bounds, patches_supported
from ccdist_plugin.bounds.relaxations import RELAXED_ACTIVATIONS, activation_relaxation, apply_lower
from ccdist_plugin.models import CertifiedNet, Normalize
from ccdist_plugin.validate import check_inputs, check_labels, check_model

__all__ = [
    "back_substitute",
    "CrownRelaxation",
    "crown_relaxation",
    "final_margin_bound",
    "CROWN_INTERMEDIATE",
    "resolve_crown_intermediate",
    "crown_margin_lower_bound",
    "CrownBudgetError",
]

#: elements of one CROWN coefficient tensor (about 0.5 GB in float64); batches are split to fit
_CROWN_BUDGET = 2**26


class CrownBudgetError(ValueError):
    """The memory budget cannot hold even one neuron's back-substitution (the message names it)."""


def _check_budget(budget: int, rows: int, largest: int) -> None:
    """Refuse a ``budget`` (coefficient elements) below one back-substitution of ``rows`` rows for
    one example over a layer of ``largest`` neurons, instead of allocating past it."""
    if budget < rows * largest:
        raise CrownBudgetError(
            f"CROWN memory budget of {budget} coefficient elements is too small for one neuron's "
            f"back-substitution on this network (it needs {rows * largest}: {rows} rows x {largest} "
            "neurons of its largest layer); raise the budget"
        )


def _node_shapes(features: nn.Module, x: Tensor) -> list[torch.Size]:
    """Output shape (without batch) of every node of ``network_graph(features)`` (node 0: the input).

    From an interval pass on the first example, which changes nothing in the model (a forward
    pass would move a train-mode BatchNorm's running statistics, and BatchNorm1d in train mode
    refuses a batch of one).
    """
    first = x[:1]
    ibp = native_intervals(features, first, first, None, keep_all=True, update_running_stats=False)
    return [first.shape[1:]] + [lb.shape[1:] for lb, _ in ibp.layer_bounds]


def _conv_transpose(layer: nn.Conv2d, a: Tensor, in_shape: torch.Size) -> Tensor:
    """The adjoint of ``layer``'s linear part applied to coefficients ``a`` (N, C_out, H', W'):
    the transposed convolution onto the padded input, then the adjoint of the padding."""
    left, right, top, bottom = conv_pads(layer)
    height, width = in_shape[-2] + top + bottom, in_shape[-1] + left + right
    reach = [layer.dilation[d] * (layer.kernel_size[d] - 1) + 1 for d in range(2)]
    # rows/columns of the padded input that no window reaches (stride remainder) get coefficient 0
    extra = (
        height - ((a.shape[-2] - 1) * layer.stride[0] + reach[0]),
        width - ((a.shape[-1] - 1) * layer.stride[1] + reach[1]),
    )
    padded = F.conv_transpose2d(a, layer.weight, None, layer.stride, 0, extra, layer.groups, layer.dilation)
    if layer.padding_mode == "zeros":
        return padded[..., top : top + in_shape[-2], left : left + in_shape[-1]]
    # reflect/replicate/circular padding copies inputs: its adjoint adds each padded entry's
    # coefficient back onto the input it copies (the vector-Jacobian product of F.pad)
    with torch.enable_grad():
        probe = torch.zeros(a.shape[0], *in_shape, dtype=a.dtype, device=a.device, requires_grad=True)
        out = F.pad(probe, (left, right, top, bottom), mode=PAD_MODES[layer.padding_mode])
        # create_graph: in training (CROWN-IBP) the result must stay differentiable in ``a``
        (grad,) = torch.autograd.grad(out, probe, padded, create_graph=padded.requires_grad)
    return grad


def _linear_adjoint(layer: nn.Module, a: Tensor, in_shape: torch.Size) -> Tensor:
    """``a`` pulled back through a bias-free linear layer (a · layer(z) = (layerᵀ a) · z) by autograd."""
    b, m = a.shape[:2]
    with torch.enable_grad():
        z = a.new_zeros(b * m, *in_shape, requires_grad=True)
        out = layer(z)
        # create_graph: in training (CROWN-IBP) the result must stay differentiable in ``a``
        (grad,) = torch.autograd.grad(
            out, z, grad_outputs=a.reshape(b * m, *out.shape[1:]), create_graph=a.requires_grad
        )
    return grad.reshape(b, m, *in_shape)


def _backward_layer(
    layer: nn.Module,
    a: Tensor,
    bias: Tensor,
    in_shape: torch.Size,
    preact: tuple[Tensor, Tensor] | None,
    affine: tuple[Tensor, Tensor] | None,
    lower_slope: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Back-substitute ``a · layer(z) + bias`` to a lower bound ``a′ · z + bias′`` (ReLU and tanh relaxed).

    ``lower_slope``: for a ReLU, the slopes in [0, 1] of the lower relaxation of its unstable
    neurons (broadcastable to ``a``; α-CROWN); None: CROWN's adaptive choice."""
    check_supported_layer(layer)
    b, m = a.shape[:2]
    if isinstance(layer, nn.Linear):
        if layer.bias is not None:
            bias = bias + a @ layer.bias
        return a @ layer.weight, bias
    if isinstance(layer, nn.Conv2d):
        if layer.bias is not None:
            bias = bias + torch.einsum("bmchw,c->bm", a, layer.bias)
        flat = _conv_transpose(layer, a.reshape(b * m, *a.shape[2:]), in_shape)
        return flat.reshape(b, m, *in_shape), bias
    if isinstance(layer, (nn.modules.batchnorm._BatchNorm, Normalize)):
        scale, shift = affine
        view = (1, 1, -1) + (1,) * (a.ndim - 3)
        per_channel = a.flatten(3).sum(-1) if a.ndim > 3 else a  # (B, m, C): sum the positions first
        return a * scale.reshape(view), bias + per_channel @ shift.reshape(-1)
    if isinstance(layer, RELAXED_ACTIVATIONS):
        l, u = preact
        return apply_lower(a, bias, activation_relaxation(layer, l.unsqueeze(1), u.unsqueeze(1), lower_slope))
    if isinstance(layer, nn.Flatten):
        return a.reshape(b, m, *in_shape), bias
    if isinstance(layer, nn.AvgPool2d):
        return _linear_adjoint(layer, a, in_shape), bias
    if isinstance(layer, PASSTHROUGH) and native_ibp_supports(layer):
        return a, bias
    raise UnsupportedLayerError(
        f"native CROWN does not support {layer!r}; use method='ibp' or backend='auto_lirpa'"
    )


def back_substitute(
    nodes: list[GraphNode],
    start: int,
    shapes: list[torch.Size],
    preact: dict[int, tuple[Tensor, Tensor]],
    affine: dict[int, tuple[Tensor, Tensor]],
    a: Tensor,
    bias: Tensor,
    lo: Tensor,
    hi: Tensor,
    lower_slopes: dict[int, Tensor] | None = None,
    stop: int = 0,
) -> Tensor:
    """Lower bound of ``a · node_start(x′) + bias`` over x′ ∈ [lo, hi] by back-substitution.

    ``a`` is (B, m, *shape of node ``start``) and ``bias`` (B, m); ``preact[n]`` are the bounds of
    the input of activation node n and ``affine[n]`` the (scale, shift) of BatchNorm/Normalize node
    n. Nodes are visited in reverse topological order; at a residual join the coefficients go to
    both branches and add up where the branches meet again. Returns (B, m).

    Differentiable (no ``no_grad`` inside): evaluation CROWN (:func:`crown_margin_lower_bound`) and
    CROWN-IBP training (:mod:`ccdist_plugin.bounds.crown_ibp`) both use it. ``lower_slopes[n]``
    (optional, per ReLU node n, broadcastable to (B, m, *its shape), values in [0, 1]) replaces
    CROWN's lower relaxation slopes of that node's unstable neurons (α-CROWN): the bound is sound
    for any such slopes. ``stop`` (default 0, the input): the node where the back-substitution
    ends, whose values [lo, hi] bounds; every path down from ``start`` must pass through it.
    """
    lower_slopes = lower_slopes or {}
    coeffs = {start: a}
    for n in range(start, stop, -1):
        if n not in coeffs:
            continue
        a, node = coeffs.pop(n), nodes[n]
        if node.layer is None:
            targets = [(i, a) for i in node.inputs]
        else:
            a, bias = _backward_layer(
                node.layer, a, bias, shapes[node.inputs[0]], preact.get(n), affine.get(n), lower_slopes.get(n)
            )
            targets = [(node.inputs[0], a)]
        for i, part in targets:
            coeffs[i] = coeffs[i] + part if i in coeffs else part
    a_flat = coeffs.pop(stop).flatten(2)
    centre = ((hi + lo) / 2).flatten(1).unsqueeze(-1)
    radius = ((hi - lo) / 2).flatten(1).unsqueeze(-1)
    return (torch.bmm(a_flat, centre) - torch.bmm(a_flat.abs(), radius)).squeeze(-1) + bias


#: how CROWN obtains the pre-activation bounds of its ReLU and tanh relaxations
CROWN_INTERMEDIATE = ("crown", "ibp", "auto")
#: how CROWN back-substitutes the pre-activation bounds of convolutional feature maps
CONV_MODES = ("patches", "dense")


def _crown_costs(model: CertifiedNet) -> list[int]:
    """Per activation after the first (the first's bounds are exact from IBP): the coefficients one
    example's back-substitution holds, 2 × its neurons × the largest layer below it."""
    x = torch.full(
        (1, *model.input_shape), 0.5, dtype=model.head.weight.dtype, device=model.head.weight.device
    )
    nodes = network_graph(model.features)
    shapes = _node_shapes(model.features, x)
    # an activation node's input is node inputs[0]; every node it depends on has a smaller index
    sources = [node.inputs[0] for node in nodes if isinstance(node.layer, RELAXED_ACTIVATIONS)]
    return [
        2 * math.prod(shapes[s]) * max(math.prod(shape) for shape in shapes[: s + 1]) for s in sources[1:]
    ]


def resolve_crown_intermediate(
    model: CertifiedNet, intermediate: str = "auto", max_crown_elements: int = 2**23
) -> str:
    """What ``intermediate`` means for ``model``: ``"crown"`` (CROWN, every pre-activation
    bound by back-substitution) or ``"ibp"`` (CROWN-IBP, every one from IBP).

    ``"auto"`` is CROWN when every back-substitution holds at most ``max_crown_elements``
    coefficients per example (digits-size networks), else CROWN-IBP (every CIFAR-size CNN-7
    layer is above it: full CROWN there costs seconds per point on a CPU, about 50× CROWN-IBP,
    docs/evaluation.md). Report the result under its own name: a CROWN-IBP certificate is not a
    CROWN one.
    """
    if intermediate not in CROWN_INTERMEDIATE:
        raise ValueError(f"intermediate must be one of {CROWN_INTERMEDIATE}, got {intermediate!r}")
    if intermediate != "auto":
        return intermediate
    model = check_model(model)
    if native_unsupported_layer(model.features) is not None:
        return "crown"  # only auto_LiRPA bounds this network: its full CROWN
    return "crown" if all(c <= max_crown_elements for c in _crown_costs(model)) else "ibp"


def _second_activation_below(nodes: list[GraphNode], src: int) -> int | None:
    """The second activation node below node ``src`` when every node between them has one input
    (no residual join: every path down passes through it), else None."""
    found = []
    for n in range(src, 0, -1):
        if nodes[n].layer is None or nodes[n].inputs != (n - 1,):
            return None
        if isinstance(nodes[n].layer, RELAXED_ACTIVATIONS):
            found.append(n)
            if len(found) == 2:
                return n
    return None


def _dense_bounds(
    r: CrownRelaxation,
    src: int,
    box: tuple[Tensor, Tensor],
    neurons: Tensor,
    rows_per_pass: int,
    stop: int = 0,
) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds (B, n) of the ``neurons`` (flat indices) of node ``src`` by dense
    back-substitution down to node ``stop``, whose values lie in ``box`` (the input box: ``stop=0``)."""
    lo, hi = box
    bsz, shape = lo.shape[0], r.shapes[src]
    lower, upper = [], []
    for s in range(0, neurons.numel(), rows_per_pass):
        idx = neurons[s : s + rows_per_pass]
        rows = lo.new_zeros(idx.numel(), math.prod(shape))
        rows[torch.arange(idx.numel(), device=lo.device), idx] = 1.0
        rows = rows.reshape(-1, *shape)
        spec = torch.cat([rows, -rows]).unsqueeze(0).expand(bsz, -1, *shape)
        bias = lo.new_zeros(bsz, spec.shape[1])
        bound = back_substitute(r.nodes, src, r.shapes, r.preact, r.affine, spec, bias, lo, hi, stop=stop)
        lower.append(bound[:, : idx.numel()])
        upper.append(-bound[:, idx.numel() :])
    return torch.cat(lower, dim=1), torch.cat(upper, dim=1)


@dataclass
class CrownRelaxation:
    """What CROWN's final back-substitution needs (:func:`crown_relaxation`): the graph of the
    features, every node's output shape (node 0: the input), the pre-activation bounds of every
    ReLU and tanh node, the (scale, shift) of every BatchNorm/Normalize node, and the input box."""

    nodes: list[GraphNode]
    shapes: list[torch.Size]
    preact: dict[int, tuple[Tensor, Tensor]]
    affine: dict[int, tuple[Tensor, Tensor]]
    lo: Tensor
    hi: Tensor
    #: full CROWN only: the features' output interval, IBP from the activations' CROWN bounds
    #: (the reference walk's last node); its elided margins can beat CROWN's on some rows
    output_interval: tuple[Tensor, Tensor] | None = None


def _dense_preact_bounds(
    r: CrownRelaxation, src: int, unstable: Tensor, wanted: Tensor | None, rows_per_pass: int, cheap: bool
) -> tuple[Tensor, Tensor]:
    """CROWN bounds (B, n) of the ``unstable`` neurons of node ``src`` by dense back-substitution:
    with ``cheap`` (before a ReLU), first down to the second activation below, then the full pass
    only for the examples (``wanted`` among them) where that leaves a neuron's sign open."""
    stop = _second_activation_below(r.nodes, src) if cheap else None
    if stop is None:
        return _dense_bounds(r, src, (r.lo, r.hi), unstable, rows_per_pass)
    # down to the second activation below only, its output bounded by the interval its
    # pre-activation bounds give (cheap); the full pass only where that leaves the sign open
    act, (pl, pu) = r.nodes[stop].layer, r.preact[stop]
    box = (apply_monotone(act, pl), apply_monotone(act, pu))
    bl, bu = _dense_bounds(r, src, box, unstable, rows_per_pass, stop)

    def full(cols: Tensor) -> tuple[Tensor, Tensor]:
        return _dense_bounds(r, src, (r.lo, r.hi), unstable[cols], rows_per_pass)

    return fill_open_signs(bl, bu, full, wanted)


def _crown_preact_bounds(
    r: CrownRelaxation,
    src: int,
    l: Tensor,
    u: Tensor,
    walk: ReferenceWalk,
    activation: nn.Module,
    chunk: int,
    conv_mode: str,
    patch_budget: int,
    budget: int,
    cheap_pass: bool,
) -> tuple[Tensor, Tensor]:
    """Full CROWN's bounds on node ``src``, the input of ``activation``; ``(l, u)`` are its IBP bounds
    and ``r`` holds the bounds of the activations below.

    Before a ReLU: the reference interval is IBP through the graph from the bounds below (``walk``,
    residual joins included) intersected with ``(l, u)``. Where a neuron is stable under it in an
    example, it keeps it there (a stable ReLU's relaxation is exact, whatever its bounds: auto_LiRPA
    picks its neurons the same way); where unstable, it gets the reference intersected with its
    CROWN bound. That bound comes from a cheap pass down to the second ReLU below when that pass
    proves the neuron stable in the example (patches form or dense; ``cheap_pass``), else from the
    full back-substitution to the input box. Before a tanh (curved everywhere: every neuron's lines
    depend on its bounds), every neuron gets ``(l, u)`` intersected with its full CROWN bound.

    Every choice is made per example, so an example's bounds do not depend on the rest of its batch
    (the neurons are back-substituted for the batch together, and each example takes its own)."""
    relu = isinstance(activation, nn.ReLU)
    ref_l, ref_u = walk.interval(src)
    l, u = torch.maximum(l, ref_l), torch.minimum(u, ref_u)
    if relu:
        wanted = ((l < 0) & (u > 0)).flatten(1)  # (B, neurons): this example needs a CROWN bound
        unstable = wanted.any(0).nonzero().flatten()
        wanted = wanted[:, unstable]
    else:
        unstable = torch.arange(l[0].numel(), device=l.device)
        wanted = None
    if not unstable.numel():
        return l, u
    nodes, shapes, preact, affine, lo, hi = r.nodes, r.shapes, r.preact, r.affine, r.lo, r.hi
    bsz = lo.shape[0]
    largest = max(math.prod(shape) for shape in shapes[: src + 1])
    # neurons per back-substitution: one coefficient tensor (bsz, 2·rows, largest) in budget
    _check_budget(budget, 2 * bsz, largest)
    rows_per_pass = max(1, min(chunk, budget // (2 * bsz * largest)))
    if conv_mode == "patches" and patches_supported(nodes, src, shapes):
        bl, bu = patch_preact_bounds(
            nodes,
            src,
            shapes,
            preact,
            affine,
            lo,
            hi,
            unstable,
            patch_budget,
            skip_stable=relu and cheap_pass,
        )
    else:
        bl, bu = _dense_preact_bounds(r, src, unstable, wanted, rows_per_pass, relu and cheap_pass)
    l_flat, u_flat = l.flatten(1).clone(), u.flatten(1).clone()
    ref_l, ref_u = l_flat[:, unstable], u_flat[:, unstable]
    new_l, new_u = torch.maximum(ref_l, bl), torch.minimum(ref_u, bu)
    if wanted is not None:
        new_l, new_u = torch.where(wanted, new_l, ref_l), torch.where(wanted, new_u, ref_u)
    l_flat[:, unstable], u_flat[:, unstable] = new_l, new_u
    return l_flat.view_as(l), u_flat.view_as(u)


@torch.no_grad()  # evaluation only (docs/method.md: CROWN is not used in training); keeps memory flat
def crown_relaxation(
    model: CertifiedNet,
    x: Tensor,
    eps: float | Tensor,
    intermediate: str,
    chunk: int = 512,
    conv_mode: str = "patches",
    patch_budget: int = PATCH_BUDGET,
    budget: int = _CROWN_BUDGET,
    cheap_pass: bool = True,
) -> CrownRelaxation:
    """The native CROWN's ReLU and tanh relaxations on the ball around ``x``: pre-activation bounds by
    CROWN (``intermediate="crown"``) or IBP (``"ibp"``), over the network's graph (residual blocks
    included). The model must be in eval mode and every layer native (not checked here).

    ``conv_mode="patches"`` (the default) bounds a convolutional feature map whose layers below
    are a chain of convolutions, BatchNorm/Normalize and activations in patches form
    (:mod:`ccdist_plugin.bounds.patches`: each neuron's coefficients on its receptive field alone,
    one coefficient tensor within ``patch_budget`` elements, default 2**24); every other map, and
    every map under ``"dense"``, by dense back-substitution. Both give the same bounds.

    Full CROWN (the rules: :func:`_crown_preact_bounds`) takes each example's decisions on that
    example alone, so its bounds do not depend on the rest of the batch. ``cheap_pass=False``
    back-substitutes every neuron unstable under its reference to the input (slower): the bounds
    are then auto_LiRPA's full CROWN's, with ``compare_crown_with_ibp`` and ``minimum_sparsity=1``,
    to rounding."""
    if conv_mode not in CONV_MODES:
        raise ValueError(f"conv_mode must be one of {CONV_MODES}, got {conv_mode!r}")
    nodes = network_graph(model.features)
    lo, hi = input_box(x, eps)
    ibp = native_intervals(model.features, lo, hi, x, keep_all=True, update_running_stats=False)
    shapes = [x.shape[1:]] + [bound[0].shape[1:] for bound in ibp.layer_bounds]
    affine = {n + 1: scale_shift for n, scale_shift in ibp.channel_affine.items()}
    preact: dict[int, tuple[Tensor, Tensor]] = {}  # filled activation by activation
    r = CrownRelaxation(nodes, shapes, preact, affine, lo, hi)
    walk = ReferenceWalk(nodes, lo, hi, affine) if intermediate == "crown" else None
    for n, node in enumerate(nodes):
        if n == 0:
            continue
        if not isinstance(node.layer, RELAXED_ACTIVATIONS):
            if walk is not None:
                walk.step(n)
            continue
        src = node.inputs[0]
        l, u = ibp.layer_bounds[src - 1] if src > 0 else (lo, hi)
        # Before the first activation the network is affine (every node there precedes it) and
        # IBP is exact per neuron.
        if intermediate == "crown" and preact:
            l, u = _crown_preact_bounds(
                r, src, l, u, walk, node.layer, chunk, conv_mode, patch_budget, budget, cheap_pass
            )
        preact[n] = (l, u)
        if walk is not None:
            walk.step(n, (l, u))
    if walk is not None:
        r.output_interval = walk.interval(len(nodes) - 1)
    return r


@torch.no_grad()  # evaluation only (docs/method.md: CROWN is not used in training); keeps memory flat
def _native_crown(
    model: CertifiedNet,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    intermediate: str,
    chunk: int,
    conv_mode: str = "patches",
    patch_budget: int = PATCH_BUDGET,
    budget: int = _CROWN_BUDGET,
    cheap_pass: bool = True,
) -> Tensor:
    """CROWN with CROWN (``intermediate="crown"``) or IBP (``"ibp"``) pre-activation bounds, over
    the network's graph (residual blocks included); ``conv_mode``, ``patch_budget``: as
    :func:`crown_relaxation`."""
    r = crown_relaxation(model, x, eps, intermediate, chunk, conv_mode, patch_budget, budget, cheap_pass)
    w_diff, b_diff = elision_matrix(model.head, y)
    return final_margin_bound(r, w_diff, b_diff)


def final_margin_bound(
    r: CrownRelaxation, w_diff: Tensor, b_diff: Tensor, lower_slopes: dict[int, Tensor] | None = None
) -> Tensor:
    """The margins' lower bounds (B, k) from relaxation ``r``: CROWN's back-substitution of the
    elided head ``(w_diff, b_diff)`` (with ``lower_slopes``: α-CROWN's), and, for full CROWN, the
    larger of that and the elided interval bound of the features' output interval, row by row (both
    sound; auto_LiRPA's CROWN with ``compare_crown_with_ibp`` takes the same maximum)."""
    bound = back_substitute(
        r.nodes, len(r.nodes) - 1, r.shapes, r.preact, r.affine, w_diff, b_diff, r.lo, r.hi, lower_slopes
    )
    if r.output_interval is None:
        return bound
    low, up = (t.flatten(1) for t in r.output_interval)
    return torch.maximum(bound, elided_interval_margin(w_diff, b_diff, low, up))


@plain_lirpa_warnings
def _auto_lirpa_margin(model: CertifiedNet, x: Tensor, y: Tensor, eps: float | Tensor, method: str) -> Tensor:
    BoundedModule, BoundedTensor, PerturbationLpNorm = import_auto_lirpa(model)
    refuse_unsound_lirpa_crown(model, method)
    lo, hi = input_box(x, eps)
    eps_val = float(eps) if not isinstance(eps, Tensor) or eps.ndim == 0 else eps.view(-1, 1, 1, 1)
    ptb = PerturbationLpNorm(norm=float("inf"), eps=eps_val, x_L=lo, x_U=hi)
    c = margin_spec(y, model.num_classes, x)
    # auto_LiRPA's default "patches" mode for convolutions fails on some graphs (max-pooling after
    # a residual sum, seen at commit 9d100ec07086); the dense "matrix" mode is the fallback.
    # Some auto_LiRPA operators (max-pooling) build tensors in the default dtype: under float64
    # bounds (certify) the default follows x for the call, and is restored after it.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(x.dtype)
    failures: list[str] = []
    try:
        for conv_mode in ("patches", "matrix"):
            # A copy: tracing runs forward passes, which would move a train-mode BatchNorm's running
            # statistics; the whole batch as the dummy so that train-mode BatchNorm1d sees > 1 value.
            net = copy.deepcopy(model)
            # Full CROWN as the native engine computes it: compare_crown_with_ibp intersects every
            # CROWN bound with IBP from the bounds below (never looser than IBP); minimum_sparsity
            # 1 keeps the reference on every neuron stable under it, where auto_LiRPA would
            # otherwise back-substitute all neurons of a layer over 90 % unstable (tightening the
            # stable ones, which moves later reference intervals)
            full = method == "CROWN"
            opts = {
                "conv_mode": conv_mode,
                "compare_crown_with_ibp": full,
                **({"minimum_sparsity": 1.0} if full else {}),
            }
            bounded = BoundedModule(net, x, device=x.device, verbose=False, bound_opts=opts)
            bounded.train(model.training)
            bounded(x)  # a forward pass on x sets the batch statistics a train-mode BatchNorm bounds with
            try:
                lb, _ = bounded.compute_bounds(
                    x=(BoundedTensor(x, ptb),), C=c, method=method, bound_upper=False
                )
                break
            except RuntimeError as exc:
                failures.append(f"{conv_mode} mode: {str(exc).splitlines()[0][:200]}")
                if conv_mode == "matrix":
                    # measured at 9d100ec: a 32×32 PreActResNet18 fails in patches mode (a shape error
                    # inside auto_LiRPA) and its dense matrices ran out of memory; say so in one line
                    raise UnsupportedLayerError(
                        f"auto_LiRPA could not compute {method} bounds for this network "
                        f"({'; '.join(failures)}); "
                        "use the native backend (backend='native', --crown-backend native) or CROWN-IBP "
                        "(intermediate='ibp', --crown-intermediate ibp)"
                    ) from exc
                logging.getLogger(__name__).info("auto_LiRPA %s, patches mode: %s; matrix mode", method, exc)
    finally:
        torch.set_default_dtype(default_dtype)
    return lb


# Whole: most of its length is the docstring of the public entry point (every option documented); the
# body only refuses bad input, picks the backend and splits the batch to the budget.
def crown_margin_lower_bound(
    model: CertifiedNet,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    intermediate: str = "auto",
    backend: str = "auto",
    max_crown_elements: int = 2**23,
    chunk: int = 512,
    conv_mode: str = "patches",
    patch_budget: int = PATCH_BUDGET,
    budget: int = _CROWN_BUDGET,
    cheap_pass: bool = True,
) -> Tensor:
    """CROWN lower bounds (B, k) on z_j = f_y − f_j over the ball (entry y is 0).

    Args:
        intermediate: how the pre-activation bounds used by the ReLU and tanh relaxations are obtained
            (:func:`resolve_crown_intermediate` says which one ``"auto"`` picks for a model).
            ``"crown"``: by back-substitution for every neuron unstable under its reference
            interval (IBP from the bounds below, through residual joins), intersected with that
            interval so never looser than IBP (CROWN, Zhang et al. 2018; the margins are likewise
            the larger of CROWN's and the interval bound): costly on CIFAR-size networks (memory
            stays bounded: neurons and examples are processed in chunks). ``"ibp"``: from IBP
            (CROWN-IBP, Zhang et al. 2020). ``"auto"``: ``"crown"`` when every back-substitution
            holds at most ``max_crown_elements`` coefficients per example, else ``"ibp"``.
        backend: ``"native"`` (this module: ReLU and tanh networks of ``nn.Sequential`` and
            :class:`Residual` blocks, whose join sums the two branches' back-substituted
            coefficients), ``"auto_lirpa"`` (auto_LiRPA's ``compute_bounds(method="CROWN" or
            "CROWN-IBP")`` with the elision matrix as C), or ``"auto"``: native when it supports
            every layer (every built-in model, residual ones included), auto_LiRPA otherwise
            (networks made with ``CertifiedNet.wrap`` of other layers).
        chunk: the most neurons bounded per dense back-substitution batch (memory knob).
        conv_mode: ``"patches"`` (default): the native CROWN bounds the neurons of convolutional
            feature maps in patches form (each neuron's coefficients on its receptive field
            alone; :mod:`ccdist_plugin.bounds.patches`), where every layer below is a
            convolution (zero padding), BatchNorm/Normalize, activation or pass-through in a
            chain; other maps (below a residual join, say) and ``"dense"`` back-substitute dense
            coefficient tensors. The bounds are the same.
        patch_budget: the most elements of one patches coefficient tensor (default
            :data:`~ccdist_plugin.bounds.patches.PATCH_BUDGET` = 2**24, 128 MiB in float64; a
            back-substitution holds a few of that size). Too small for one neuron:
            :class:`~ccdist_plugin.bounds.patches.PatchBudgetError` naming it.
        budget: the most elements of one dense coefficient tensor of the native backend (default
            2**26, 0.5 GB in float64); batches and neurons are split to fit.
            :class:`CrownBudgetError` when even one neuron (or the margins) of one example does not fit.
        cheap_pass: full CROWN first bounds an unstable neuron by a pass down to the second ReLU
            below (with interval bounds there); a neuron it proves stable keeps those bounds and
            skips the full pass (faster). Sound either way; ``False``
            gives auto_LiRPA's full CROWN bounds to rounding (those of ``backend="auto_lirpa"``,
            which runs it with ``compare_crown_with_ibp`` and ``minimum_sparsity=1``), where the
            cheap pass's bounds on a neuron can make later reference intervals differ (tested:
            equal on the untrained CNN-7s of docs/RESULTS.md, not on every small random CNN).

    The lower relaxation of an unstable ReLU is the adaptive one of CROWN (slope 1 when
    u > −l, else 0); the upper one is the chord. A tanh is relaxed as auto_LiRPA's CROWN does
    (:func:`ccdist_plugin.bounds.relaxations.tanh_relaxation`; its tangent points solved for, not
    read off a grid, so its bounds can be slightly tighter). The native backend is for evaluation and runs
    without autograd (the result carries no gradient). A point's native bounds do not depend on the
    other points of its batch (auto_LiRPA's do: it bounds the union of a batch's unstable neurons
    for every point). The model is not modified.
    """
    model = check_model(model)
    check_inputs(model, x)
    check_labels(x, y, model.num_classes)
    if backend not in ("auto", "native", "auto_lirpa"):
        raise ValueError(f"backend must be 'auto', 'native' or 'auto_lirpa', got {backend!r}")
    if conv_mode not in CONV_MODES:
        raise ValueError(f"conv_mode must be one of {CONV_MODES}, got {conv_mode!r}")
    refuse_uncertifiable(model.features)
    if backend == "auto":
        backend = "native" if native_unsupported_layer(model.features) is None else "auto_lirpa"
    if backend == "auto_lirpa":
        if intermediate not in CROWN_INTERMEDIATE:
            raise ValueError(f"intermediate must be one of {CROWN_INTERMEDIATE}, got {intermediate!r}")
        # auto_LiRPA bounds any graph: "auto" means its full CROWN
        method = "CROWN-IBP" if intermediate == "ibp" else "CROWN"
        return _auto_lirpa_margin(model, x, y, eps, method)
    kind = resolve_crown_intermediate(model, intermediate, max_crown_elements)
    # Back-substitution holds (examples × rows × layer size) coefficients: split the batch so
    # that one such tensor stays under ``budget`` elements. Train-mode BatchNorm normalizes
    # with the batch's statistics, so a batch in train mode is never split.
    largest = max(math.prod(s) for s in _node_shapes(model.features, x))
    _check_budget(budget, max(2 if kind == "crown" else 0, model.num_classes), largest)
    if not model.training and x.shape[0] > 1:
        rows = max(2 * chunk if kind == "crown" else 0, model.num_classes)
        per_batch = max(1, budget // (rows * largest))
        if x.shape[0] > per_batch:
            eps_t = torch.as_tensor(eps)
            parts = []
            for sl in batch_slices(x.shape[0], per_batch):
                e = eps_t[sl] if eps_t.ndim == 1 else eps
                parts.append(
                    _native_crown(
                        model, x[sl], y[sl], e, kind, chunk, conv_mode, patch_budget, budget, cheap_pass
                    )
                )
            return torch.cat(parts)
    return _native_crown(model, x, y, eps, kind, chunk, conv_mode, patch_budget, budget, cheap_pass)

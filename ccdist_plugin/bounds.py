"""Sound bounds on a network's outputs over the ℓ∞ ball ∩ [0, 1]: IBP, last-layer elision, CROWN.

Everything here is a pure function of a module and tensors, batch-first, in pixel space.

- :func:`input_box` — the threat model's box.
- :func:`interval_bounds` / :func:`propagate_intervals` — interval bound propagation (IBP,
  Gowal et al. 2018; appendix A of the paper) in centre/radius form: an affine layer maps
  (c, r) to (W c + b, |W| r); a monotone activation maps [l, u] to [σ(l), σ(u)]. BatchNorm is an
  affine per-channel map with the statistics the forward pass uses (train mode: the reference
  batch; eval mode: the running statistics), its scale's sign handled by |scale|.
- :func:`feature_bounds`, :func:`elided_margin_lower_bound`, :func:`margin_lower_bound` —
  bounds on the features h(x′) and on the logit differences z = f_y − f_j, with the difference
  folded into the head (equation 10 of the paper).
- :func:`crown_margin_lower_bound` — CROWN back-substitution (Zhang et al. 2018) for evaluation,
  optionally through auto_LiRPA (``backend="auto_lirpa"``) as the reference implementation.
- :func:`certify` — float-safe certified decisions (float64).

An unsupported layer raises :class:`UnsupportedLayerError`: a silent wrong bound is never returned.

Residual networks are bounded natively: the engines walk ``nn.Sequential`` and :class:`Residual`
blocks as a graph; at a residual join IBP adds the branches' intervals (centre + centre,
radius + radius) and CROWN's back-substitution sends the coefficients down both branches and adds
them where the branches meet. Any other module (e.g. a network with its own ``forward``, wrapped
with ``CertifiedNet.wrap``) is bounded through auto_LiRPA (``ccdist_plugin.lirpa``), with the same
BatchNorm semantics; a layer neither engine bounds raises :class:`UnsupportedLayerError`.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccdist_plugin.batching import batch_slices
from ccdist_plugin.models import CertifiedNet, Normalize, Residual
from ccdist_plugin.validate import check_box, check_inputs, check_labels, check_model, check_pixel_range
from ccdist_plugin.validate import eps_tensor as _eps_tensor

__all__ = [
    "UnsupportedLayerError",
    "AutoLirpaMissingError",
    "input_box",
    "IntervalPropagation",
    "propagate_intervals",
    "interval_bounds",
    "feature_bounds",
    "elision_matrix",
    "elided_margin_lower_bound",
    "margin_lower_bound",
    "crown_margin_lower_bound",
    "CROWN_INTERMEDIATE",
    "resolve_crown_intermediate",
    "check_supported_layer",
    "CERT_TOL",
    "CertifyResult",
    "certify",
    "flat_layers",
    "GraphNode",
    "network_graph",
    "back_substitute",
    "native_unsupported_layer",
    "check_boundable",
    "with_batch_statistics",
    "training_restorer",
]

_MONOTONE = (nn.ReLU, nn.Tanh)
#: elements of one CROWN coefficient tensor (about 0.5 GB in float64); batches are split to fit
_CROWN_BUDGET = 2**26
_PASSTHROUGH = (nn.Identity, nn.Dropout)
#: leaf layers the native engine bounds (Conv2d of every padding mode, Dropout in eval mode only)
_NATIVE_IBP = (
    nn.Linear,
    nn.Conv2d,
    nn.modules.batchnorm._BatchNorm,
    Normalize,
    *_MONOTONE,
    nn.Flatten,
    nn.AvgPool2d,
    *_PASSTHROUGH,
)


class UnsupportedLayerError(TypeError, ValueError):
    """Raised when a bound is asked for through a layer no engine can bound soundly (the message
    names it). A ``ValueError`` too: it reports a model the user passed in."""


class AutoLirpaMissingError(UnsupportedLayerError, ImportError):
    """A bound needs auto_LiRPA, which is not installed (the message names the layer the native
    engine cannot bound, when there is one, and the install command). An ``ImportError`` too."""


#: the standard layers the engines know, each with the ``forward`` they assume: a subclass that
#: overrides ``forward`` computes something else, and is refused rather than bounded as its parent
_KNOWN_FORWARDS: tuple[tuple[type, tuple], ...] = (
    (nn.Linear, (nn.Linear.forward,)),
    (nn.Conv2d, (nn.Conv2d.forward,)),
    # SyncBatchNorm (distributed training) equals BatchNorm in eval mode; see distributed.py for train mode
    (nn.modules.batchnorm._BatchNorm, (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)),
    (nn.ReLU, (nn.ReLU.forward,)),
    (nn.Tanh, (nn.Tanh.forward,)),
    (nn.Flatten, (nn.Flatten.forward,)),
    (nn.AvgPool2d, (nn.AvgPool2d.forward,)),
    (nn.Identity, (nn.Identity.forward,)),
    (nn.Dropout, (nn.Dropout.forward,)),
)
#: F.pad's mode for each Conv2d padding_mode
_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


@functools.cache  # a property of the class alone; called for every layer of every bound
def _overridden_base(cls: type) -> str | None:
    """The standard layer whose ``forward`` ``cls`` inherits from but overrides, else None."""
    for base, forwards in _KNOWN_FORWARDS:
        if issubclass(cls, base) and cls.forward not in forwards:
            return base.__name__
    return None


def check_supported_layer(layer: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` naming ``layer`` when an engine would misread it.

    What the engines read of each layer is what ``forward`` computes, except in these cases,
    which are refused: a subclass of a standard layer that overrides ``forward``; a forward
    pre-hook (e.g. the old ``torch.nn.utils.weight_norm``, which recomputes the weight there);
    a Flatten over the batch dimension; a Conv2d padding mode unknown to ``F.pad``; an
    eval-mode BatchNorm without running statistics (``track_running_stats=False``: it
    normalizes every batch with that batch's statistics, so its output at one point depends on
    the rest of the batch and no certificate about a point holds).
    """
    base = _overridden_base(type(layer))
    if base is not None:
        raise UnsupportedLayerError(
            f"{type(layer).__name__} overrides {base}.forward; the bounds would describe {base}, not this "
            f"layer: {layer!r}"
        )
    if layer._forward_pre_hooks:
        raise UnsupportedLayerError(
            f"layer {layer!r} has a forward pre-hook (e.g. torch.nn.utils.weight_norm), which can change its "
            "input or weights where the bounds cannot see it; remove the hook (weight_norm: "
            "torch.nn.utils.remove_weight_norm, or the parametrizations API) first"
        )
    if isinstance(layer, nn.Flatten) and layer.start_dim == 0:
        raise UnsupportedLayerError(f"{layer!r} flattens the batch dimension: the bounds are per example")
    if isinstance(layer, nn.Conv2d) and layer.padding_mode not in _PAD_MODES:
        raise UnsupportedLayerError(f"Conv2d padding_mode {layer.padding_mode!r} is not supported: {layer!r}")
    if (
        isinstance(layer, nn.modules.batchnorm._BatchNorm)
        and not layer.training
        and (layer.running_mean is None or layer.running_var is None)
    ):
        raise UnsupportedLayerError(
            f"{layer!r} has no running statistics (track_running_stats=False), so in eval mode it "
            "normalizes each batch with that batch's own statistics: the network's output at a point "
            "depends on the other points of its batch and cannot be certified"
        )


def _conv_pads(layer: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding that ``layer`` applies, for ``F.pad``."""
    if isinstance(layer.padding, str):  # "same" or "valid"
        if layer.padding == "valid":
            return (0, 0, 0, 0)
        total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
        return (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
    ph, pw = layer.padding
    return (pw, pw, ph, ph)


def _monotone(layer: nn.Module, t: Tensor) -> Tensor:
    """The activation, never in place (an ``inplace=True`` ReLU would overwrite stored bounds)."""
    return torch.relu(t) if isinstance(layer, nn.ReLU) else torch.tanh(t)


def training_restorer(module: nn.Module) -> Callable[[], None]:
    """A function that puts every submodule of ``module`` back in the train/eval mode it has now.

    ``module.train(was_training)`` is not that: it sets every submodule to one flag, so a
    BatchNorm frozen in eval mode inside a training network, or the layers shared with
    ``model.without_normalization()`` (a new ``nn.Sequential``, in train mode), would change.
    """
    flags = [(m, m.training) for m in module.modules()]

    def restore() -> None:
        for m, flag in flags:
            m.training = flag

    return restore


# --------------------------------------------------------------------------------------------
# The threat model
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Interval bound propagation
# --------------------------------------------------------------------------------------------


def flat_layers(module: nn.Module) -> list[nn.Module]:
    """The leaf layers of a (possibly nested) ``nn.Sequential`` / :class:`CertifiedNet`, in order (a
    :class:`Residual` block is one entry: the bound engines walk it as a graph)."""
    if isinstance(module, CertifiedNet):
        return flat_layers(module.features) + [module.head]
    if isinstance(module, nn.Sequential):
        out: list[nn.Module] = []
        for child in module:
            out += flat_layers(child)
        return out
    return [module]


class _TrainBatchNorm(torch.autograd.Function):
    """``F.batch_norm`` in train mode that also returns the batch mean and 1/std it normalized with,
    differentiable in all three outputs.

    The interval bounds reuse the reference batch's statistics, and their gradients must reach the
    reference batch (as they do through auto_LiRPA's IBP). One fused ``native_batch_norm`` call
    computes the statistics, the normalized batch and the running-statistics update, where a
    differentiable ``var_mean`` is a slow generic reduction on CPU.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float):
        out, mean, invstd = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return out, mean, invstd

    @staticmethod
    def backward(ctx, grad_out, grad_mean, grad_invstd):
        x, weight, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, mean, invstd, True, ctx.eps, [needs[0], needs[1], needs[2]]
        )
        if needs[0]:
            # mean = Σx/n and invstd = (var + eps)^(-1/2) with var = Σ(x - mean)²/n, so
            # ∂invstd/∂x = -invstd³ (x - mean)/n (the mean's own dependence cancels: Σ(x - mean) = 0):
            # the statistics' gradient is a per-channel affine map of x.
            n = x.numel() // x.shape[1]
            slope = -grad_invstd * invstd.pow(3) / n
            offset = grad_mean / n - slope * mean
            view = (1, -1) + (1,) * (x.ndim - 2)
            grad_x = grad_x.addcmul_(x, slope.view(view)).add_(offset.view(view))
        return grad_x, grad_weight, grad_bias, None, None, None, None


#: set by :mod:`ccdist_plugin.accumulate` while it trains on micro-batches: a train-mode BatchNorm then
#: takes ``(normalized, mean, invstd)`` from ``hook(bn, stats_input, update_running_stats)`` (the
#: whole batch's statistics) instead of computing them from ``stats_input``
BATCH_STATISTICS_HOOK: Callable[[nn.Module, Tensor, bool], tuple[Tensor, Tensor, Tensor]] | None = None


def _bn_momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """The running-average factor ``bn.forward`` would use now, counting this batch (as it does)."""
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def _bn_scale_shift(
    bn: nn.modules.batchnorm._BatchNorm, stats_input: Tensor | None, update_running_stats: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-channel (scale, shift) of a BatchNorm as the forward pass applies it, and, when it
    normalizes with batch statistics, ``stats_input`` normalized (else None).

    Train mode (or no running statistics): the mean and biased variance of ``stats_input``
    over all but the channel dimension, differentiably, exactly as ``F.batch_norm`` normalizes;
    with ``update_running_stats`` the running statistics move as ``bn(stats_input)`` moves them.
    Eval mode: the running statistics.
    """
    normalized = None
    if bn.training or bn.running_mean is None:
        if stats_input is None:
            raise ValueError("BatchNorm in train mode needs a reference batch for its statistics")
        if BATCH_STATISTICS_HOOK is not None:  # gradient accumulation (ccdist_plugin.accumulate)
            normalized, mean, invstd = BATCH_STATISTICS_HOOK(bn, stats_input, update_running_stats)
        else:
            track = update_running_stats and bn.track_running_stats and bn.running_mean is not None
            normalized, mean, invstd = _TrainBatchNorm.apply(
                stats_input,
                bn.weight,
                bn.bias,
                bn.running_mean if track else None,
                bn.running_var if track else None,
                _bn_momentum(bn) if track else 0.0,
                bn.eps,
            )
        scale = invstd
    else:
        mean = bn.running_mean
        scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift, normalized


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
    x = F.pad(x, _conv_pads(layer), mode=_PAD_MODES[layer.padding_mode])
    return F.conv2d(x, w, b, layer.stride, 0, layer.dilation, layer.groups)


@dataclass(frozen=True)
class GraphNode:
    """One step of a network's computation graph: ``layer`` applied to node ``inputs[0]``, or (``layer``
    None, two inputs) the sum of two nodes, a :class:`Residual`'s join. Node 0 is the input."""

    layer: nn.Module | None
    inputs: tuple[int, ...]


def network_graph(module: nn.Module) -> list[GraphNode]:
    """The computation graph of a network built of ``nn.Sequential``, :class:`Residual` and leaf
    layers, in topological order (every node after its inputs); any other module is one leaf node."""
    nodes = [GraphNode(None, ())]

    def walk(m: nn.Module, src: int) -> int:
        if isinstance(m, CertifiedNet):
            return walk(m.head, walk(m.features, src))
        if isinstance(m, nn.Sequential):
            for child in m:
                src = walk(child, src)
            return src
        if isinstance(m, Residual):
            branch, shortcut = walk(m.branch, src), walk(m.shortcut, src)
            nodes.append(GraphNode(None, (branch, shortcut)))
            return len(nodes) - 1
        nodes.append(GraphNode(m, (src,)))
        return len(nodes) - 1

    walk(module, 0)
    return nodes


def _native_ibp_supports(layer: nn.Module) -> bool:
    try:
        check_supported_layer(layer)
    except UnsupportedLayerError:
        return False
    if isinstance(layer, nn.Dropout):
        return not layer.training
    return isinstance(layer, _NATIVE_IBP)


def _refuse_uncertifiable(module: nn.Module) -> None:
    """Layers no engine may bound, refused before auto_LiRPA is tried: a forward pre-hook (it can
    change inputs or weights where a traced graph cannot see it), a flatten over the batch or an
    eval-mode BatchNorm without running statistics (the output at a point depends on the rest of
    the batch), a dropout in train mode (random)."""
    for layer in module.modules():
        if (
            layer._forward_pre_hooks
            or (isinstance(layer, nn.Flatten) and layer.start_dim == 0)
            or (
                isinstance(layer, nn.modules.batchnorm._BatchNorm)
                and not layer.training
                and (layer.running_mean is None or layer.running_var is None)
            )
        ):
            check_supported_layer(layer)
        if isinstance(layer, nn.modules.dropout._DropoutNd) and layer.training:
            raise UnsupportedLayerError(
                f"{layer!r} in train mode is random: no bound holds; call eval() first"
            )


def native_unsupported_layer(module: nn.Module) -> nn.Module | None:
    """The first layer of ``module`` the native engine cannot bound (None when it bounds them all)."""
    for node in network_graph(module)[1:]:
        if node.layer is not None and not _native_ibp_supports(node.layer):
            return node.layer
    return None


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
        scale, shift, normalized = _bn_scale_shift(layer, stats_input, update_running_stats)
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
    if isinstance(layer, _MONOTONE):
        lb, ub = centre - radius, centre + radius
        result.preact_bounds.append((lb, ub))
        if value is not None:
            value = _monotone(layer, value)
        lb, ub = _monotone(layer, lb), _monotone(layer, ub)
        # Midpoint and half-width in two passes (lerp is one fused op).
        centre = torch.lerp(lb, ub, 0.5)
        return centre, ub - centre, value
    if isinstance(layer, (nn.Flatten, nn.AvgPool2d)):
        # Flatten moves entries; average pooling is a non-negative linear map: the centre maps
        # through it, so does the radius.
        return layer(centre), layer(radius), None if value is None else layer(value)
    if isinstance(layer, _PASSTHROUGH) and _native_ibp_supports(layer):
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


def _native_intervals(
    module: nn.Module,
    lower: Tensor,
    upper: Tensor,
    reference: Tensor | None,
    keep_all: bool,
    update_running_stats: bool,
) -> IntervalPropagation:
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
            with the same train-mode BatchNorm semantics: ``ccdist_plugin.lirpa``), or ``"auto"``:
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
        _refuse_uncertifiable(module)
        if keep_all:
            raise ValueError("keep_all needs the native engine, and this network has layers it cannot bound")
        from ccdist_plugin.lirpa import LirpaUnsupportedError, lirpa_intervals

        try:
            lo, hi, value, preact = lirpa_intervals(module, lower, upper, reference, update_running_stats)
        except LirpaUnsupportedError as exc:
            raise _neither(module, exc) from exc
        return IntervalPropagation(lo, hi, value, preact)
    return _native_intervals(module, lower, upper, reference, keep_all, update_running_stats)


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
    from ccdist_plugin.lirpa import LirpaUnsupportedError, check_lirpa_boundable

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
    w_diff, b_diff = elision_matrix(head, y)
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


# --------------------------------------------------------------------------------------------
# CROWN
# --------------------------------------------------------------------------------------------


def _node_shapes(features: nn.Module, x: Tensor) -> list[torch.Size]:
    """Output shape (without batch) of every node of ``network_graph(features)`` (node 0: the input).

    From an interval pass on the first example, which changes nothing in the model (a forward
    pass would move a train-mode BatchNorm's running statistics, and BatchNorm1d in train mode
    refuses a batch of one).
    """
    first = x[:1]
    ibp = _native_intervals(features, first, first, None, keep_all=True, update_running_stats=False)
    return [first.shape[1:]] + [lb.shape[1:] for lb, _ in ibp.layer_bounds]


def _conv_transpose(layer: nn.Conv2d, a: Tensor, in_shape: torch.Size) -> Tensor:
    """The adjoint of ``layer``'s linear part applied to coefficients ``a`` (N, C_out, H', W'):
    the transposed convolution onto the padded input, then the adjoint of the padding."""
    left, right, top, bottom = _conv_pads(layer)
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
        out = F.pad(probe, (left, right, top, bottom), mode=_PAD_MODES[layer.padding_mode])
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
) -> tuple[Tensor, Tensor]:
    """Back-substitute ``a · layer(z) + bias`` to a lower bound ``a′ · z + bias′`` (ReLU relaxed)."""
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
    if isinstance(layer, nn.ReLU):
        l, u = preact
        l, u = l.unsqueeze(1), u.unsqueeze(1)
        active, inactive = l >= 0, u <= 0
        unstable = ~(active | inactive)
        denom = torch.where(unstable, u - l, torch.ones_like(u))
        chord = torch.where(unstable, u / denom, torch.zeros_like(u))
        up_slope = torch.where(active, torch.ones_like(u), chord)
        up_icpt = torch.where(unstable, -u * l / denom, torch.zeros_like(u))
        low_slope = torch.where(active | (unstable & (u > -l)), torch.ones_like(u), torch.zeros_like(u))
        # the slope by the coefficient's sign, the intercepts by one batched product: few
        # coefficient-sized temporaries (this is most of the cost of a CROWN-IBP training step)
        bias = bias + torch.bmm(a.clamp(max=0).flatten(2), up_icpt.flatten(1).unsqueeze(-1)).squeeze(-1)
        return a * torch.where(a >= 0, low_slope, up_slope), bias
    if isinstance(layer, nn.Flatten):
        return a.reshape(b, m, *in_shape), bias
    if isinstance(layer, nn.AvgPool2d):
        return _linear_adjoint(layer, a, in_shape), bias
    if isinstance(layer, _PASSTHROUGH) and _native_ibp_supports(layer):
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
) -> Tensor:
    """Lower bound of ``a · node_start(x′) + bias`` over x′ ∈ [lo, hi] by back-substitution.

    ``a`` is (B, m, *shape of node ``start``) and ``bias`` (B, m); ``preact[n]`` are the bounds of
    the input of activation node n and ``affine[n]`` the (scale, shift) of BatchNorm/Normalize node
    n. Nodes are visited in reverse topological order; at a residual join the coefficients go to
    both branches and add up where the branches meet again. Returns (B, m).

    Differentiable (no ``no_grad`` inside): evaluation CROWN (:func:`crown_margin_lower_bound`) and
    CROWN-IBP training (``ccdist_plugin.crown_ibp``) both use it.
    """
    coeffs = {start: a}
    for n in range(start, 0, -1):
        if n not in coeffs:
            continue
        a, node = coeffs.pop(n), nodes[n]
        if node.layer is None:
            targets = [(i, a) for i in node.inputs]
        else:
            a, bias = _backward_layer(
                node.layer, a, bias, shapes[node.inputs[0]], preact.get(n), affine.get(n)
            )
            targets = [(node.inputs[0], a)]
        for i, part in targets:
            coeffs[i] = coeffs[i] + part if i in coeffs else part
    a_flat = coeffs.pop(0).flatten(2)
    centre = ((hi + lo) / 2).flatten(1).unsqueeze(-1)
    radius = ((hi - lo) / 2).flatten(1).unsqueeze(-1)
    return (torch.bmm(a_flat, centre) - torch.bmm(a_flat.abs(), radius)).squeeze(-1) + bias


#: how CROWN obtains the pre-activation bounds of its ReLU relaxations
CROWN_INTERMEDIATE = ("crown", "ibp", "auto")


def _crown_costs(model: CertifiedNet) -> list[int]:
    """Per ReLU after the first (the first's bounds are exact from IBP): the coefficients one
    example's back-substitution holds, 2 × its neurons × the largest layer below it."""
    x = torch.full(
        (1, *model.input_shape), 0.5, dtype=model.head.weight.dtype, device=model.head.weight.device
    )
    nodes = network_graph(model.features)
    shapes = _node_shapes(model.features, x)
    # a ReLU node's input is node inputs[0]; every node it depends on has a smaller index
    sources = [node.inputs[0] for node in nodes if isinstance(node.layer, nn.ReLU)]
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
    layer is above it: full CROWN there costs minutes per point on a CPU). Report the result
    under its own name: a CROWN-IBP certificate is not a CROWN one.
    """
    if intermediate not in CROWN_INTERMEDIATE:
        raise ValueError(f"intermediate must be one of {CROWN_INTERMEDIATE}, got {intermediate!r}")
    if intermediate != "auto":
        return intermediate
    model = _as_certified_net(model)
    if native_unsupported_layer(model.features) is not None:
        return "crown"  # only auto_LiRPA bounds this network: its full CROWN
    return "crown" if all(c <= max_crown_elements for c in _crown_costs(model)) else "ibp"


@torch.no_grad()  # evaluation only (docs/method.md: CROWN is not used in training); keeps memory flat
def _native_crown(
    model: CertifiedNet, x: Tensor, y: Tensor, eps: float | Tensor, intermediate: str, chunk: int
) -> Tensor:
    """CROWN with CROWN (``intermediate="crown"``) or IBP (``"ibp"``) pre-activation bounds, over
    the network's graph (residual blocks included)."""
    nodes = network_graph(model.features)
    lo, hi = input_box(x, eps)
    ibp = _native_intervals(model.features, lo, hi, x, keep_all=True, update_running_stats=False)
    shapes = [x.shape[1:]] + [bound[0].shape[1:] for bound in ibp.layer_bounds]
    affine = {n + 1: scale_shift for n, scale_shift in ibp.channel_affine.items()}
    preact: dict[int, tuple[Tensor, Tensor]] = {}
    bsz = x.shape[0]
    for n, node in enumerate(nodes):
        if isinstance(node.layer, nn.Tanh):
            raise UnsupportedLayerError(
                "native CROWN supports ReLU networks; use backend='auto_lirpa' for tanh"
            )
        if not isinstance(node.layer, nn.ReLU):
            continue
        src = node.inputs[0]
        l, u = ibp.layer_bounds[src - 1] if src > 0 else (lo, hi)
        # Before the first activation the network is affine (every node there precedes it) and
        # IBP is exact per neuron.
        if intermediate == "crown" and preact:
            # Only neurons unstable under IBP (l < 0 < u in some example) need tighter bounds: a
            # stable neuron's relaxation is exact, so its bounds change nothing downstream.
            unstable = ((l < 0) & (u > 0)).flatten(1).any(0).nonzero().flatten()
            largest = max(math.prod(shape) for shape in shapes[: src + 1])
            # neurons per back-substitution: one coefficient tensor (bsz, 2·rows, largest) in budget
            rows_per_pass = max(1, min(chunk, _CROWN_BUDGET // (2 * bsz * largest)))
            l_flat, u_flat = l.flatten(1).clone(), u.flatten(1).clone()
            for s in range(0, unstable.numel(), rows_per_pass):
                idx = unstable[s : s + rows_per_pass]
                rows = x.new_zeros(idx.numel(), l[0].numel())
                rows[torch.arange(idx.numel(), device=x.device), idx] = 1.0
                rows = rows.reshape(-1, *l.shape[1:])
                spec = torch.cat([rows, -rows]).unsqueeze(0).expand(bsz, -1, *l.shape[1:])
                bound = back_substitute(
                    nodes, src, shapes, preact, affine, spec, x.new_zeros(bsz, spec.shape[1]), lo, hi
                )
                half = idx.numel()
                l_flat[:, idx] = torch.maximum(l_flat[:, idx], bound[:, :half])
                u_flat[:, idx] = torch.minimum(u_flat[:, idx], -bound[:, half:])
            l, u = l_flat.view_as(l), u_flat.view_as(u)
        preact[n] = (l, u)
    w_diff, b_diff = elision_matrix(model.head, y)
    return back_substitute(nodes, len(nodes) - 1, shapes, preact, affine, w_diff, b_diff, lo, hi)


def _auto_lirpa_margin(model: CertifiedNet, x: Tensor, y: Tensor, eps: float | Tensor, method: str) -> Tensor:
    from ccdist_plugin.lirpa import import_auto_lirpa, margin_spec, refuse_unsound_lirpa_crown

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
            opts = {"conv_mode": conv_mode}
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


def crown_margin_lower_bound(
    model: CertifiedNet,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    intermediate: str = "auto",
    backend: str = "auto",
    max_crown_elements: int = 2**23,
    chunk: int = 512,
) -> Tensor:
    """CROWN lower bounds (B, k) on z_j = f_y − f_j over the ball (entry y is 0).

    Args:
        intermediate: how the pre-activation bounds used by the ReLU relaxations are obtained
            (:func:`resolve_crown_intermediate` says which one ``"auto"`` picks for a model).
            ``"crown"``: by back-substitution for every layer, intersected with IBP so never
            looser (CROWN, Zhang et al. 2018): costly on CIFAR-size networks (memory stays
            bounded: neurons and examples are processed in chunks). ``"ibp"``: from IBP
            (CROWN-IBP, Zhang et al. 2020). ``"auto"``: ``"crown"`` when every back-substitution
            holds at most ``max_crown_elements`` coefficients per example, else ``"ibp"``.
        backend: ``"native"`` (this module: ReLU networks of ``nn.Sequential`` and
            :class:`Residual` blocks, whose join sums the two branches' back-substituted
            coefficients), ``"auto_lirpa"`` (auto_LiRPA's ``compute_bounds(method="CROWN" or
            "CROWN-IBP")`` with the elision matrix as C), or ``"auto"``: native when it supports
            every layer (every built-in model, residual ones included), auto_LiRPA otherwise
            (networks made with ``CertifiedNet.wrap`` of other layers).
        chunk: the most neurons bounded per back-substitution batch (memory knob).

    The lower relaxation of an unstable ReLU is the adaptive one of CROWN (slope 1 when
    u > −l, else 0); the upper one is the chord. The native backend is for evaluation and runs
    without autograd (the result carries no gradient). The model is not modified.
    """
    model = _as_certified_net(model)
    _check_input(model, x)
    _check_labels(model, x, y)
    if backend not in ("auto", "native", "auto_lirpa"):
        raise ValueError(f"backend must be 'auto', 'native' or 'auto_lirpa', got {backend!r}")
    _refuse_uncertifiable(model.features)
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
    # that one such tensor stays under _CROWN_BUDGET elements. Train-mode BatchNorm normalizes
    # with the batch's statistics, so a batch in train mode is never split.
    if not model.training and x.shape[0] > 1:
        largest = max(math.prod(s) for s in _node_shapes(model.features, x))
        rows = max(2 * chunk if kind == "crown" else 0, model.num_classes)
        per_batch = max(1, _CROWN_BUDGET // (rows * largest))
        if x.shape[0] > per_batch:
            eps_t = torch.as_tensor(eps)
            parts = []
            for sl in batch_slices(x.shape[0], per_batch):
                e = eps_t[sl] if eps_t.ndim == 1 else eps
                parts.append(_native_crown(model, x[sl], y[sl], e, kind, chunk))
            return torch.cat(parts)
    return _native_crown(model, x, y, eps, kind, chunk)


# --------------------------------------------------------------------------------------------
# Certified decisions
# --------------------------------------------------------------------------------------------


@dataclass
class CertifyResult:
    """Outcome of :func:`certify` for a batch.

    Attributes:
        margin_lb: (B, k) float64 lower bounds of z_j = f_y − f_j (entry y is +inf here, so that
            ``margin_lb > tol`` reads as "difference j is proved").
        certified: (B,) bool: every j ≠ y proved and the clean prediction is y.
        correct: (B,) bool: the clean prediction is y.
    """

    margin_lb: Tensor
    certified: Tensor
    correct: Tensor

    def proved(self, tol: float = 0.0) -> Tensor:
        """(B, k) bool: which logit differences are proved positive."""
        return self.margin_lb > tol


#: A logit difference counts as proved when its float64 lower bound exceeds this: far above the
#: float64 rounding of these sums, so rounding cannot turn an uncertified point into a certified
#: one. The one tolerance of every certificate (bounds, evaluation, export).
CERT_TOL = 1e-6


@torch.no_grad()
def certify(
    model: CertifiedNet,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    method: str = "ibp",
    tol: float = CERT_TOL,
    batch_size: int = 256,
    **crown_kwargs,
) -> CertifyResult:
    """Certified decisions for the deployed (eval-mode) network, float-safe.

    The bounds are computed in float64 on a float64 copy of the network (the original is not
    touched), so that rounding cannot turn an uncertified point into a certified one; a logit
    difference counts as proved only when its float64 lower bound exceeds ``tol`` (default
    :data:`CERT_TOL`). This certifies the network in exact arithmetic, as α,β-CROWN does.

    Args:
        method: ``"ibp"`` or ``"crown"`` (extra keyword arguments go to
            :func:`crown_margin_lower_bound`).
    """
    model = _as_certified_net(model)
    _check_input(model, x)
    _check_labels(model, x, y)
    if method not in ("ibp", "crown"):
        raise ValueError(f"method must be 'ibp' or 'crown', got {method!r}")
    net = copy.deepcopy(model).double().eval()
    x64, eps64 = x.double(), eps.double() if isinstance(eps, Tensor) else float(eps)
    parts, correct = [], []
    for sl in batch_slices(x.shape[0], batch_size):
        e = eps64[sl] if isinstance(eps64, Tensor) and eps64.ndim == 1 else eps64
        if method == "ibp":
            lb = margin_lower_bound(net, x64[sl], y[sl], e)
        else:
            lb = crown_margin_lower_bound(net, x64[sl], y[sl], e, **crown_kwargs).double()
        parts.append(lb)
        correct.append(net(x64[sl]).argmax(1) == y[sl])
    margin = torch.cat(parts) if parts else x64.new_zeros(0, model.num_classes)
    margin = margin.scatter(1, y.view(-1, 1), float("inf"))
    correct_t = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    certified = (margin > tol).all(1) & correct_t
    return CertifyResult(margin_lb=margin, certified=certified, correct=correct_t)

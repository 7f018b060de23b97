"""The layer rules both bound engines share: which layers they bound, how a network decomposes into
a graph of layers, and BatchNorm's per-channel scale and shift.

- :class:`UnsupportedLayerError` (and :class:`AutoLirpaMissingError`): a layer no engine can bound
  soundly is refused by name; a silent wrong bound is never returned.
- :func:`check_supported_layer`, :func:`native_ibp_supports`, :func:`native_unsupported_layer`,
  :func:`refuse_uncertifiable`: what the native engine bounds, and what no engine may bound.
- :func:`flat_layers`, :class:`GraphNode`, :func:`network_graph`: the graph the engines walk
  (``nn.Sequential`` and :class:`~ccdist_plugin.models.Residual` blocks of leaf layers).
- :func:`bn_scale_shift`, :func:`bn_momentum`, :data:`BATCH_STATISTICS_HOOK`: BatchNorm as the
  forward pass applies it (train mode: the reference batch's statistics; eval mode: the running
  ones), shared by IBP, CROWN and the auto_LiRPA backend.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ccdist_plugin.models import CertifiedNet, Normalize, Residual

__all__ = [
    "UnsupportedLayerError",
    "AutoLirpaMissingError",
    "MONOTONE",
    "apply_monotone",
    "PASSTHROUGH",
    "PAD_MODES",
    "check_supported_layer",
    "conv_pads",
    "training_restorer",
    "flat_layers",
    "BATCH_STATISTICS_HOOK",
    "bn_momentum",
    "bn_scale_shift",
    "GraphNode",
    "network_graph",
    "native_ibp_supports",
    "refuse_uncertifiable",
    "native_unsupported_layer",
]

#: the monotone activations: an interval maps to the interval of its ends
MONOTONE = (nn.ReLU, nn.Tanh)


def apply_monotone(layer: nn.Module, t: Tensor) -> Tensor:
    """A :data:`MONOTONE` activation applied to ``t``, never in place (an ``inplace=True`` ReLU
    called on stored bounds would overwrite them)."""
    return torch.relu(t) if isinstance(layer, nn.ReLU) else torch.tanh(t)


#: layers that pass their input on unchanged (Dropout in eval mode only)
PASSTHROUGH = (nn.Identity, nn.Dropout)
#: leaf layers the native engine bounds (Conv2d of every padding mode, Dropout in eval mode only)
_NATIVE_IBP = (
    nn.Linear,
    nn.Conv2d,
    nn.modules.batchnorm._BatchNorm,
    Normalize,
    *MONOTONE,
    nn.Flatten,
    nn.AvgPool2d,
    *PASSTHROUGH,
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
PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


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
    if isinstance(layer, nn.Conv2d) and layer.padding_mode not in PAD_MODES:
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


def conv_pads(layer: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding that ``layer`` applies, for ``F.pad``."""
    if isinstance(layer.padding, str):  # "same" or "valid"
        if layer.padding == "valid":
            return (0, 0, 0, 0)
        total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
        return (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
    ph, pw = layer.padding
    return (pw, pw, ph, ph)


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


def bn_momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """The running-average factor ``bn.forward`` would use now, counting this batch (as it does)."""
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def bn_scale_shift(
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
                bn_momentum(bn) if track else 0.0,
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


def native_ibp_supports(layer: nn.Module) -> bool:
    """True when the native engine bounds the leaf ``layer`` as its ``forward`` computes it."""
    try:
        check_supported_layer(layer)
    except UnsupportedLayerError:
        return False
    if isinstance(layer, nn.Dropout):
        return not layer.training
    return isinstance(layer, _NATIVE_IBP)


def refuse_uncertifiable(module: nn.Module) -> None:
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
        if node.layer is not None and not native_ibp_supports(node.layer):
            return node.layer
    return None

"""Differentiable CROWN-IBP margin bounds for training (Zhang et al. 2020), natively.

CROWN-IBP bounds the logit differences z_j = f_y − f_j by one CROWN back-substitution from the
output, whose ReLU relaxations use the *IBP* pre-activation bounds of the training pass: the
bounds :func:`ccdist_plugin.bounds.propagate_intervals` already computed (with the reference
batch's statistics for a train-mode BatchNorm, docs/method.md "BatchNorm during training"), so
no second propagation and the same BatchNorm affine maps as the IBP bounds. Unlike
:func:`ccdist_plugin.bounds.crown_margin_lower_bound` (evaluation, no autograd), everything here
keeps the graph so that the bound can be trained.

- :func:`crown_ibp_from_propagation` — the bound from a recorded IBP pass (what the loss uses).
- :func:`crown_ibp_margin_bounds` — a convenience that runs that pass itself and returns the IBP
  and CROWN-IBP bounds (for tests and comparisons).

The lower relaxation of an unstable ReLU is CROWN's adaptive one (slope 1 when u > −l, else 0),
the upper one is the chord, as in auto_LiRPA's default CROWN-IBP. Supported layers: Normalize,
Linear, Conv2d, BatchNorm1d/2d, ReLU, Flatten, AvgPool2d, Identity and Dropout in eval mode;
anything else raises :class:`ccdist_plugin.bounds.UnsupportedLayerError` (a residual or custom
model can instead be trained with the IBP-based losses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccdist_plugin.bounds import (
    IntervalPropagation,
    UnsupportedLayerError,
    elided_margin_lower_bound,
    elision_matrix,
    flat_layers,
    input_box,
    propagate_intervals,
)
from ccdist_plugin.models import CertifiedNet, Normalize

__all__ = ["crown_ibp_from_propagation", "crown_ibp_margin_bounds", "check_crown_ibp_layers"]


def check_crown_ibp_layers(layers: list[nn.Module]) -> None:
    """Raise :class:`UnsupportedLayerError` naming the first layer the native back-substitution
    cannot take (before any work is done)."""
    ok = (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm, Normalize, nn.ReLU, nn.Flatten, nn.AvgPool2d)
    for layer in layers:
        if isinstance(layer, ok) or isinstance(layer, nn.Identity):
            continue
        if isinstance(layer, nn.Dropout) and not layer.training:
            continue
        raise UnsupportedLayerError(
            f"CROWN-IBP (native) cannot bound a {type(layer).__name__} layer: supported are Linear, Conv2d, "
            "BatchNorm, ReLU, Normalize, Flatten, AvgPool2d, Identity and eval-mode Dropout (train other "
            "networks with an IBP-based loss, e.g. cc_ibp or cc_dist)"
        )


def _conv_transpose(layer: nn.Conv2d, a: Tensor, in_shape: torch.Size) -> Tensor:
    """Wᵀ a for a (N, C_out, H', W') coefficient batch, to the layer's input shape (N, *in_shape)."""
    sizes = []
    for dim in range(2):
        out = (
            (a.shape[-2 + dim] - 1) * layer.stride[dim]
            - 2 * layer.padding[dim]
            + layer.dilation[dim] * (layer.kernel_size[dim] - 1)
            + 1
        )
        sizes.append(in_shape[-2 + dim] - out)
    return F.conv_transpose2d(
        a, layer.weight, None, layer.stride, layer.padding, tuple(sizes), layer.groups, layer.dilation
    )


def _pool_transpose(layer: nn.AvgPool2d, a: Tensor, in_shape: torch.Size) -> Tensor:
    """Transpose of the (linear, parameter-free) pooling: the vector-Jacobian product at 0."""
    zeros = a.new_zeros(a.shape[0], *in_shape)
    _, vjp = torch.func.vjp(layer, zeros)
    return vjp(a)[0]


def crown_ibp_from_propagation(
    layers: list[nn.Module],
    head: nn.Linear,
    y: Tensor,
    lower: Tensor,
    upper: Tensor,
    prop: IntervalPropagation,
) -> Tensor:
    """CROWN-IBP lower bounds (B, k) on z_j = f_y − f_j over the box [lower, upper].

    Args:
        layers: the feature layers (``flat_layers(model.features)``).
        head: the affine head, folded with the logit-difference operator (row y is 0).
        lower, upper: the input box the IBP pass was run over.
        prop: that pass, run with ``keep_all=True`` (its per-layer bounds give the ReLU
            relaxations and the layer shapes, its ``channel_affine`` the BatchNorm maps).

    Differentiable in the parameters (and, through the recorded bounds, in everything the IBP
    pass depends on).
    """
    check_crown_ibp_layers(layers)
    if len(prop.layer_bounds) != len(layers):
        raise ValueError(
            f"the IBP record has {len(prop.layer_bounds)} layers but the network {len(layers)}: "
            "run propagate_intervals with keep_all=True over the same layers"
        )
    shapes = [lower.shape[1:]] + [lb.shape[1:] for lb, _ in prop.layer_bounds[:-1]]
    a, bias = elision_matrix(head, y)  # (B, k, w), (B, k)
    batch, rows = a.shape[:2]
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        if isinstance(layer, nn.Linear):
            if layer.bias is not None:
                bias = bias + a @ layer.bias
            a = a @ layer.weight
        elif isinstance(layer, nn.Conv2d):
            if layer.bias is not None:
                bias = bias + torch.einsum("bmchw,c->bm", a, layer.bias)
            flat = _conv_transpose(layer, a.reshape(batch * rows, *a.shape[2:]), shapes[i])
            a = flat.reshape(batch, rows, *shapes[i])
        elif isinstance(layer, (nn.modules.batchnorm._BatchNorm, Normalize)):
            scale, shift = prop.channel_affine[i]
            view = (1, 1, -1) + (1,) * (a.ndim - 3)
            per_channel = a.flatten(3).sum(-1) if a.ndim > 3 else a  # (B, k, C): sum the positions first
            bias = bias + per_channel @ shift.reshape(-1)
            a = a * scale.reshape(view)
        elif isinstance(layer, nn.ReLU):
            l, u = prop.layer_bounds[i - 1] if i > 0 else (lower, upper)
            l, u = l.unsqueeze(1), u.unsqueeze(1)
            unstable = (l < 0) & (u > 0)
            # Chord u(x − l)/(u − l) above, adaptive slope below; stable neurons are exact.
            denom = torch.where(unstable, u - l, torch.ones_like(u))
            up_slope = torch.where(unstable, u / denom, (l >= 0).to(u.dtype))
            up_icpt = torch.where(unstable, -u * l / denom, torch.zeros_like(u))
            low_slope = torch.where(unstable, (u > -l).to(u.dtype), (l >= 0).to(u.dtype))
            # the slope by the coefficient's sign, the intercepts by one batched product: few
            # coefficient-sized temporaries (this loop dominates the cost of a CROWN-IBP step)
            a_neg = a.clamp(max=0)
            bias = bias + torch.bmm(a_neg.flatten(2), up_icpt.flatten(1).unsqueeze(-1)).squeeze(-1)
            a = a * torch.where(a >= 0, low_slope, up_slope)
        elif isinstance(layer, nn.Flatten):
            a = a.reshape(batch, rows, *shapes[i])
        elif isinstance(layer, nn.AvgPool2d):
            flat = _pool_transpose(layer, a.reshape(batch * rows, *a.shape[2:]), shapes[i])
            a = flat.reshape(batch, rows, *shapes[i])
        # Identity / eval-mode Dropout: nothing to do
    a_flat = a.flatten(2)
    centre = ((upper + lower) / 2).flatten(1).unsqueeze(-1)
    radius = ((upper - lower) / 2).flatten(1).unsqueeze(-1)
    return (torch.bmm(a_flat, centre) - torch.bmm(a_flat.abs(), radius)).squeeze(-1) + bias


def crown_ibp_margin_bounds(
    model: CertifiedNet,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    reference: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(IBP, CROWN-IBP) lower bounds, each (B, k), on z_j = f_y − f_j over the ε-ball ∩ [0, 1].

    One IBP pass with the reference batch (default ``x``) giving a train-mode BatchNorm its
    statistics, nothing in the model modified; differentiable. Used by the tests and for
    comparisons with auto_LiRPA's ``method="CROWN-IBP"``.
    """
    if not isinstance(model, CertifiedNet):
        raise ValueError(f"expected a CertifiedNet, got {type(model).__name__}")
    layers = flat_layers(model.features)
    check_crown_ibp_layers(layers)
    lo, hi = input_box(x, eps)
    prop = propagate_intervals(
        model.features, lo, hi, reference=x if reference is None else reference, keep_all=True
    )
    ibp = elided_margin_lower_bound(model.head, prop.lower, prop.upper, y)
    return ibp, crown_ibp_from_propagation(layers, model.head, y, lo, hi, prop)

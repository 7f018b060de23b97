"""Differentiable CROWN-IBP margin bounds for training (Zhang et al. 2020), natively.

CROWN-IBP bounds the logit differences z_j = f_y − f_j by one CROWN back-substitution from the
output, whose ReLU relaxations use the *IBP* pre-activation bounds of the training pass: the
bounds :func:`ccdist_plugin.bounds.propagate_intervals` already computed (with the reference
batch's statistics for a train-mode BatchNorm, docs/method.md "BatchNorm during training"), so
no second propagation and the same BatchNorm affine maps as the IBP bounds. The back-substitution
is the evaluation's own (:func:`ccdist_plugin.bounds.back_substitute`, the same graph walk as
:func:`ccdist_plugin.bounds.crown_margin_lower_bound` with ``intermediate="ibp"``), run here with
autograd so that the bound can be trained.

- :func:`crown_ibp_from_propagation` — the bound from a recorded IBP pass (what the loss uses).
- :func:`crown_ibp_margin_bounds` — a convenience that runs that pass itself and returns the IBP
  and CROWN-IBP bounds (for tests and comparisons).

The lower relaxation of an unstable ReLU is CROWN's adaptive one (slope 1 when u > −l, else 0),
the upper one is the chord, as in auto_LiRPA's default CROWN-IBP. Supported: ReLU networks built
of ``nn.Sequential`` and :class:`ccdist_plugin.models.Residual` blocks (PreActResNet18 included)
over the native engine's layers (Normalize, Linear, Conv2d, BatchNorm1d/2d, ReLU, Flatten,
AvgPool2d, Identity, eval-mode Dropout). For anything else (tanh, a custom module, a wrapped
network that only auto_LiRPA bounds) :func:`check_crown_ibp_layers` raises
:class:`ccdist_plugin.bounds.UnsupportedLayerError` naming the layer; the ``crown_ibp`` loss then
trains through auto_LiRPA's CROWN-IBP (:func:`ccdist_plugin.bounds.lirpa.lirpa_margin_bounds`) where
auto_LiRPA is installed.
"""

from __future__ import annotations

from torch import Tensor, nn

from ccdist_plugin.bounds.crown import back_substitute
from ccdist_plugin.bounds.ibp import (
    IntervalPropagation,
    elided_margin_lower_bound,
    elision_matrix,
    input_box,
    propagate_intervals,
)
from ccdist_plugin.bounds.layers import (
    UnsupportedLayerError,
    check_supported_layer,
    native_unsupported_layer,
    network_graph,
)
from ccdist_plugin.bounds.lirpa import INSTALL_COMMAND
from ccdist_plugin.models import CertifiedNet

__all__ = [
    "crown_ibp_from_propagation",
    "crown_ibp_margin_bounds",
    "check_crown_ibp_layers",
    "crown_ibp_unsupported_layer",
]

_SUPPORTED = (
    "Linear, Conv2d, BatchNorm, ReLU, Normalize, Flatten, AvgPool2d, Identity and eval-mode Dropout, "
    "in nn.Sequential and Residual blocks"
)


def crown_ibp_unsupported_layer(features: nn.Module) -> nn.Module | None:
    """The first layer of ``features`` the native back-substitution cannot take (None: it takes all)."""
    layer = native_unsupported_layer(features)
    if layer is None:
        layer = next((n.layer for n in network_graph(features) if isinstance(n.layer, nn.Tanh)), None)
    return layer


def check_crown_ibp_layers(features: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` naming the first layer of ``features`` the native
    back-substitution cannot take (before any work is done)."""
    layer = crown_ibp_unsupported_layer(features)
    if layer is None:
        return
    try:
        check_supported_layer(layer)  # its specific reason, when it has one
    except UnsupportedLayerError as exc:
        reason = f": {exc}"
    else:
        reason = ""
    raise UnsupportedLayerError(
        f"CROWN-IBP (native) cannot bound a {type(layer).__name__} layer{reason}; supported are {_SUPPORTED} "
        "(the crown_ibp loss trains other networks through auto_LiRPA's CROWN-IBP where auto_LiRPA is "
        f"installed: {INSTALL_COMMAND}; or use an IBP-based loss, e.g. cc_ibp or cc_dist)"
    )


def crown_ibp_from_propagation(
    features: nn.Module,
    head: nn.Linear,
    y: Tensor,
    lower: Tensor,
    upper: Tensor,
    prop: IntervalPropagation,
) -> Tensor:
    """CROWN-IBP lower bounds (B, k) on z_j = f_y − f_j over the box [lower, upper].

    Args:
        features: the feature extractor (``model.features``).
        head: the affine head, folded with the logit-difference operator (row y is 0).
        lower, upper: the input box the IBP pass was run over.
        prop: that pass over ``features``, run with ``keep_all=True`` (its per-node bounds give
            the ReLU relaxations and the node shapes, its ``channel_affine`` the BatchNorm maps).

    Differentiable in the parameters (and, through the recorded bounds, in everything the IBP
    pass depends on).
    """
    check_crown_ibp_layers(features)
    nodes = network_graph(features)
    if len(prop.layer_bounds) != len(nodes) - 1:
        raise ValueError(
            f"the IBP record has {len(prop.layer_bounds)} nodes but the network {len(nodes) - 1}: "
            "run propagate_intervals with keep_all=True over the same features"
        )
    bounds = [(lower, upper), *prop.layer_bounds]  # bounds[n]: the output of node n (0: the input)
    shapes = [lb.shape[1:] for lb, _ in bounds]
    preact = {n: bounds[node.inputs[0]] for n, node in enumerate(nodes) if isinstance(node.layer, nn.ReLU)}
    affine = {n + 1: scale_shift for n, scale_shift in prop.channel_affine.items()}
    a, bias = elision_matrix(head, y)  # (B, k, w), (B, k)
    return back_substitute(nodes, len(nodes) - 1, shapes, preact, affine, a, bias, lower, upper)


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
    check_crown_ibp_layers(model.features)
    lo, hi = input_box(x, eps)
    prop = propagate_intervals(
        model.features, lo, hi, reference=x if reference is None else reference, keep_all=True
    )
    ibp = elided_margin_lower_bound(model.head, prop.lower, prop.upper, y)
    return ibp, crown_ibp_from_propagation(model.features, model.head, y, lo, hi, prop)

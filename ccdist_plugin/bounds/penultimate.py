"""The earlier feature space of appendix E.9: the activations before the penultimate affine layer.

The paper distils, by default, onto the features h (the activations before the last affine layer,
the head). Appendix E.9 distils instead onto the input of the *penultimate* affine layer, the last
``nn.Linear``/``nn.Conv2d`` of ``model.features`` (for CNN-7: the flattened output of the fifth
convolution block, before ``Linear → width``). Its IBP bounds come from the training pass itself:
:func:`propagate_split` runs :func:`ccdist_plugin.bounds.propagate_intervals` over the layers before
that point and then over the rest, starting from the first part's box and reference activations,
so every layer is propagated once and the intermediate box is the same one IBP uses downstream.
"""

from __future__ import annotations

from torch import Tensor, nn

from ccdist_plugin.bounds.ibp import IntervalPropagation, propagate_intervals
from ccdist_plugin.bounds.layers import flat_layers
from ccdist_plugin.models import CertifiedNet

__all__ = ["DISTILL_LAYERS", "penultimate_index", "latent_features", "propagate_split", "check_distill_layer"]

#: accepted values of the ``distill_layer`` option of the distillation losses
DISTILL_LAYERS = ("features", "penultimate")

_AFFINE = (nn.Linear, nn.Conv2d)


def check_distill_layer(distill_layer: str) -> str:
    if distill_layer not in DISTILL_LAYERS:
        raise ValueError(f"distill_layer must be one of {DISTILL_LAYERS}, got {distill_layer!r}")
    return distill_layer


def penultimate_index(model: CertifiedNet) -> int:
    """Index, in ``flat_layers(model.features)``, of the penultimate affine layer (the last
    Linear/Conv2d before the head); its input is the earlier feature space.

    Raises ``ValueError`` when the features hold no affine layer, or when a layer after the last one
    is a container hiding further affine layers (a residual block, say): the penultimate affine
    layer must then be named differently, and we do not guess.
    """
    if not isinstance(model, CertifiedNet):
        raise ValueError(f"expected a CertifiedNet, got {type(model).__name__}")
    layers = flat_layers(model.features)
    index, hidden_in = None, None
    for i, layer in enumerate(layers):
        if isinstance(layer, _AFFINE):
            index, hidden_in = i, None
        elif any(isinstance(m, _AFFINE) for m in layer.modules()):
            hidden_in = type(layer).__name__  # affine layers inside a block come after the last plain one
    if index is None or hidden_in is not None:
        where = f" (the last affine layer lies inside a {hidden_in})" if hidden_in else ""
        raise ValueError(
            "distill_layer='penultimate' needs a plain Linear/Conv2d as the last affine layer of the "
            f"features{where}"
        )
    return index


def latent_features(model: CertifiedNet, x: Tensor) -> tuple[Tensor, Tensor]:
    """(activations before the penultimate affine layer, features) of ``model`` on ``x``, one forward pass."""
    layers = flat_layers(model.features)
    k = penultimate_index(model)
    v = x
    for layer in layers[:k]:
        v = layer(v)
    latent = v
    for layer in layers[k:]:
        v = layer(v)
    return latent, v


def propagate_split(
    model: CertifiedNet,
    lower: Tensor,
    upper: Tensor,
    reference: Tensor,
    keep_all: bool = False,
    update_running_stats: bool = False,
    check: bool = True,
) -> tuple[IntervalPropagation, IntervalPropagation]:
    """IBP over ``model.features`` in two consecutive parts, split at the penultimate affine layer.

    Returns ``(latent, features)``: ``latent`` holds the bounds and reference activations of the
    earlier feature space, ``features`` those of the features, with the pre-activation bounds (and,
    with ``keep_all``, the per-layer bounds and BatchNorm maps, indexed as in the whole network) of
    both parts, as one :func:`propagate_intervals` over the whole features would return them.
    ``check`` validates the input box (the second part's box is the first part's output).
    """
    layers = flat_layers(model.features)
    k = penultimate_index(model)
    first = propagate_intervals(
        nn.Sequential(*layers[:k]),
        lower,
        upper,
        reference=reference,
        keep_all=keep_all,
        update_running_stats=update_running_stats,
        check=check,
    )
    second = propagate_intervals(
        nn.Sequential(*layers[k:]),
        first.lower,
        first.upper,
        reference=first.value,
        keep_all=keep_all,
        update_running_stats=update_running_stats,
        check=False,
    )
    whole = IntervalPropagation(
        second.lower,
        second.upper,
        value=second.value,
        preact_bounds=first.preact_bounds + second.preact_bounds,
        layer_bounds=first.layer_bounds + second.layer_bounds,
        channel_affine={**first.channel_affine, **{i + k: v for i, v in second.channel_affine.items()}},
    )
    return first, whole

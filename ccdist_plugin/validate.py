"""The one set of input checks behind every public entry point (losses, ``Trainer.fit``, ``evaluate``,
the bounds): the model, input shapes, labels, ε and the pixel range, each with one error message.

The checks that read tensor values back to the host (label range, pixel range, a tensor ε's sign)
cost a device synchronization; the entry points that run once per call (``evaluate``, ``certify``,
``Trainer.fit`` on its validation set) use them, while the per-step path of training uses only the
shape checks and :func:`eps_tensor` with a Python-number ε, which never synchronizes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ccdist_plugin.models import CertifiedNet

__all__ = [
    "PIXEL_TOL",
    "check_model",
    "check_inputs",
    "check_labels",
    "check_pixel_range",
    "check_box",
    "eps_tensor",
    "check_batch",
]

#: slack of the pixel-range check: inputs a rounding step outside [0, 1] are accepted
PIXEL_TOL = 1e-6


def check_model(model: nn.Module, what: str = "model") -> CertifiedNet:
    """``model`` itself when it is a :class:`CertifiedNet` (features + affine head), else ``ValueError``."""
    if not isinstance(model, CertifiedNet):
        raise ValueError(
            f"{what} must be a CertifiedNet (features + affine head), got {type(model).__name__}; "
            "build models with ccdist_plugin.models"
        )
    return model


def check_inputs(model: CertifiedNet, x: Tensor) -> None:
    """``x`` is a floating-point (B, *model.input_shape) batch. No device synchronization."""
    if not isinstance(x, Tensor) or not torch.is_floating_point(x):
        got = getattr(x, "dtype", type(x).__name__)
        raise ValueError(f"inputs must be a floating-point tensor, got {got}")
    if x.ndim != 1 + len(model.input_shape) or tuple(x.shape[1:]) != tuple(model.input_shape):
        raise ValueError(
            f"input of shape {tuple(x.shape)} does not match the model's input shape (B, {model.input_shape})"
        )


def check_labels(x: Tensor, y: Tensor, num_classes: int | None = None) -> None:
    """``y`` is a (B,) label vector for the batch ``x``; with ``num_classes``, also that every label
    lies in [0, num_classes) (one device synchronization)."""
    if not isinstance(y, Tensor) or y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"labels of shape {tuple(getattr(y, 'shape', ()))} do not match a batch of {x.shape[0]} inputs"
        )
    if num_classes is not None and y.numel():
        low, high = (int(v) for v in torch.stack([y.min(), y.max()]).tolist())
        if low < 0 or high >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}); got [{low}, {high}]")


def check_pixel_range(x: Tensor) -> None:
    """Every input lies in the pixel box [0, 1] (up to :data:`PIXEL_TOL`); one device synchronization."""
    if not x.numel():
        return
    low, high = torch.stack([x.min(), x.max()]).tolist()
    if not (math.isfinite(low) and math.isfinite(high)):  # min/max propagate NaN; NaN passes < and >
        raise ValueError("inputs hold NaN or infinite values (pixel space [0, 1] expected)")
    if low < -PIXEL_TOL or high > 1 + PIXEL_TOL:
        raise ValueError(
            f"inputs must lie in pixel space [0, 1] (got values in [{low:.3g}, {high:.3g}]); "
            "normalization belongs inside the model (Normalize)"
        )


def check_box(lower: Tensor, upper: Tensor) -> None:
    """``lower`` and ``upper`` have one shape and ``lower <= upper`` everywhere (one synchronization)."""
    if lower.shape != upper.shape:
        raise ValueError(f"lower {tuple(lower.shape)} and upper {tuple(upper.shape)} differ in shape")
    if bool((lower > upper).any()):
        raise ValueError("lower > upper somewhere: not a valid box")


def eps_tensor(eps: float | Tensor, x: Tensor) -> Tensor:
    """ε as a tensor broadcastable against ``x`` (a scalar, or one value per example), checked finite
    and >= 0. A Python-number ε is checked on the host; a tensor ε costs one device synchronization."""
    if not isinstance(eps, Tensor):
        value = float(eps)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"eps must be finite and >= 0, got {eps}")
        return torch.as_tensor(value, dtype=x.dtype, device=x.device)
    eps_t = eps.to(dtype=x.dtype, device=x.device)
    if eps_t.ndim == 1:
        if eps_t.shape[0] != x.shape[0]:
            raise ValueError(f"eps has {eps_t.shape[0]} entries but the batch has {x.shape[0]} examples")
        eps_t = eps_t.view(-1, *([1] * (x.ndim - 1)))
    elif eps_t.ndim != 0:
        raise ValueError(f"eps must be a scalar or a (B,) tensor, got shape {tuple(eps_t.shape)}")
    if bool((eps_t < 0).any()) or not bool(torch.isfinite(eps_t).all()):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps_t


def check_batch(
    model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor | None = None, values: bool = True
) -> CertifiedNet:
    """All of the above for one call of a public entry point; returns the model as a CertifiedNet.

    Args:
        values: also read the values back (label range, pixel range): one device synchronization.
            Per-step callers (a loss inside the training loop) pass False and keep the shape checks.
    """
    net = check_model(model)
    check_inputs(net, x)
    check_labels(x, y, net.num_classes if values else None)
    if values:
        check_pixel_range(x)
    if eps is not None:
        eps_tensor(eps, x)
    return net

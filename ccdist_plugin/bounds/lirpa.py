"""Interval bounds through auto_LiRPA, for networks the native engine cannot bound.

:func:`lirpa_intervals` is the ``backend="auto_lirpa"`` of ``ccdist_plugin.bounds.propagate_intervals``:
auto_LiRPA's IBP (``compute_bounds(method="IBP")``) with the native engine's BatchNorm semantics
(docs/method.md, "BatchNorm during training"):

- the reference batch (the adversarial batch in training) is the point auto_LiRPA's forward pass
  runs, so a train-mode BatchNorm bounds the whole box with that batch's statistics, differentiably;
- an eval-mode BatchNorm uses the module's running statistics as they are now (auto_LiRPA copies
  buffers when it traces a network, so they are copied in again before every call);
- with ``update_running_stats`` the running statistics move as ``module(reference)`` moves them.

Parameters are shared with the traced copy (auto_LiRPA's graph holds the module's own
``nn.Parameter`` objects), so the bounds' gradients reach the model.

auto_LiRPA: https://github.com/Verified-Intelligence/auto_LiRPA (the plugin is tested at commit
9d100ec07086; PyPI's 0.3 does not work with torch 2.x); ``ccdist install-verifier`` installs it.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from ccdist_plugin.bounds.layers import (
    AutoLirpaMissingError,
    UnsupportedLayerError,
    bn_momentum,
    native_unsupported_layer,
)
from ccdist_plugin.install import INSTALL_COMMAND

__all__ = [
    "lirpa_intervals",
    "lirpa_margin_bounds",
    "refuse_unsound_lirpa_crown",
    "lirpa_bounded_module",
    "check_lirpa_boundable",
    "import_auto_lirpa",
    "auto_lirpa_missing",
    "INSTALL_COMMAND",
    "LirpaUnsupportedError",
]

logger = logging.getLogger(__name__)


class LirpaUnsupportedError(TypeError):
    """auto_LiRPA cannot trace or bound the network."""


@dataclass
class _Traced:
    bounded: nn.Module
    params: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    shape: tuple[int, ...]
    #: buffers auto_LiRPA baked into its graph as constants (not refreshed): their values at tracing
    frozen: dict[str, Tensor]


# Tracing a network costs as much as many training steps, so the traced graph is kept per module
# (weakly: it goes with the module) and rebuilt when the module's parameters, dtype, device or input
# shape change. It is a cache only: buffers are copied in before every use.
_TRACED: weakref.WeakKeyDictionary[nn.Module, _Traced] = weakref.WeakKeyDictionary()


#: terminal colour codes (ESC [ ... m), which auto_LiRPA writes into some of its warnings
_COLOUR_CODE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: auto_LiRPA warnings already re-issued (each is shown once per process, as auto_LiRPA intends)
_REISSUED: set[tuple[type, str, str, int]] = set()
_F = TypeVar("_F", bound=Callable)


def _reissue(caught: list[warnings.WarningMessage]) -> None:
    """Issue recorded warnings again, under the process's own filters, without colour codes; an
    auto_LiRPA warning only the first time."""
    for w in caught:
        text = _COLOUR_CODE.sub("", str(w.message))
        key = (w.category, text, w.filename, w.lineno)
        if "auto_LiRPA" in w.filename:
            if key in _REISSUED:
                continue
            _REISSUED.add(key)
        warnings.warn_explicit(text, w.category, w.filename, w.lineno)


def plain_lirpa_warnings(func: _F) -> _F:
    """Decorator for the functions that call auto_LiRPA: its warnings come out as plain text (no raw
    colour codes in logs, files and notebooks) and once each."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                return func(*args, **kwargs)
        finally:
            _reissue(caught)

    return wrapper  # type: ignore[return-value]


def _first_import_keeping_logging_and_warnings() -> None:
    """Import auto_LiRPA once without the global settings its import makes: it calls
    ``logging.basicConfig`` (a root handler writing INFO to stdout, which would take over the
    format of the program's own logs) and ``warnings.simplefilter("once")`` (which would show every
    DeprecationWarning of the process). Both are put back; the import's warnings are re-issued
    under the process's filters."""
    if "auto_LiRPA" in sys.modules:
        return
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:  # restores the filters on exit
            warnings.simplefilter("always")
            import auto_LiRPA  # noqa: F401
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        _reissue(caught)


def import_auto_lirpa(network: nn.Module | None = None):
    """auto_LiRPA's ``BoundedModule``, ``BoundedTensor`` and ``PerturbationLpNorm``.

    Raises:
        AutoLirpaMissingError: auto_LiRPA is not installed. The message names the install command
            and, for a ``network`` the native engine cannot bound, its first such layer. It is an
            ``UnsupportedLayerError`` (no engine here bounds that layer) and an ``ImportError``.
    """
    try:
        _first_import_keeping_logging_and_warnings()
        from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
    except ImportError as exc:
        raise auto_lirpa_missing(network) from exc
    return BoundedModule, BoundedTensor, PerturbationLpNorm


def auto_lirpa_missing(network: nn.Module | None = None) -> AutoLirpaMissingError:
    """The :class:`~ccdist_plugin.bounds.AutoLirpaMissingError` for bounding ``network`` without
    auto_LiRPA, naming the first layer the native engine cannot bound (when there is one)."""
    layer = None if network is None else native_unsupported_layer(network)
    if layer is not None:
        # a user's module with its own forward prints over many lines: its class names it
        name = repr(layer)
        if "\n" in name:
            name = f"{type(layer).__name__} (a module with its own forward)"
        what = (
            f"no engine here can bound layer {name}: the native engine does not support it, and "
            "auto_LiRPA, which may, is not installed"
        )
    elif network is not None:
        what = f"bounding {type(network).__name__} through auto_LiRPA needs it, and it is not installed"
    else:
        what = "this bound needs auto_LiRPA, which is not installed"
    return AutoLirpaMissingError(
        f"{what}; install it and alpha,beta-CROWN at the tested commits with: {INSTALL_COMMAND}"
    )


@plain_lirpa_warnings
def lirpa_bounded_module(module: nn.Module, example: Tensor) -> nn.Module:
    """auto_LiRPA's ``BoundedModule`` of ``module`` (cached), with the module's current buffers.

    Raises:
        LirpaUnsupportedError: auto_LiRPA cannot trace or bound a layer (its message names it).
    """
    bounded_module_cls, _, _ = import_auto_lirpa(module)
    params = tuple(id(p) for p in module.parameters())
    first = next(iter(module.parameters()), example)
    shape = tuple(example.shape[1:])
    buffers = dict(module.named_buffers())
    cached = _TRACED.get(module)
    if not (
        cached is not None
        and cached.params == params
        and cached.dtype == first.dtype
        and cached.device == first.device
        and cached.shape == shape
        and all(torch.equal(buffers[name], value) for name, value in cached.frozen.items())
    ):
        # Trace in eval mode on two examples: tracing runs forward passes, which must not move
        # a train-mode BatchNorm's running statistics.
        was_training = module.training
        module.eval()
        try:
            bounded = bounded_module_cls(
                module,
                example[:2].detach(),
                device=example.device,
                verbose=False,
                # auto_LiRPA otherwise sets requires_grad of the (shared) parameters to its train/eval
                # mode on every forward pass, which would freeze a model after an eval-mode bound
                bound_opts={"param": {"auto_requires_grad": False}},
            )
        except Exception as exc:
            raise LirpaUnsupportedError(f"auto_LiRPA cannot trace {type(module).__name__}: {exc}") from exc
        finally:
            module.train(was_training)
        refreshed = {
            getattr(node, "ori_name", None)
            for node in bounded.nodes()
            if type(node).__name__ == "BoundBuffers"
        }
        frozen = {
            name: value.detach().clone()
            for name, value in buffers.items()
            if name not in refreshed and not name.endswith("num_batches_tracked")
        }
        cached = _Traced(bounded, params, first.dtype, first.device, shape, frozen)
        _TRACED[module] = cached
    bounded = cached.bounded
    with torch.no_grad():
        for node in bounded.nodes():
            name = getattr(node, "ori_name", None)
            if type(node).__name__ == "BoundBuffers" and name in buffers:
                node.buffer.copy_(buffers[name])
    bounded.train(module.training)
    return bounded


def _update_running_stats(module: nn.Module, bounded: nn.Module) -> None:
    """Move each train-mode BatchNorm's running statistics as ``bn(batch)`` would, from the batch
    statistics auto_LiRPA's forward pass just computed (its own buffers are copies)."""
    modules = dict(module.named_modules())
    with torch.no_grad():
        for node in bounded.nodes():
            if type(node).__name__ != "BoundBatchNormalization":
                continue
            name = getattr(node.inputs[3], "ori_name", "")
            bn = modules.get(name.rsplit(".", 1)[0])
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.training:
                continue
            if not bn.track_running_stats or bn.running_mean is None:
                continue
            value = node.inputs[0].forward_value
            n = value.numel() // value.shape[1]
            momentum = bn_momentum(bn)
            mean, var = node.current_mean.detach(), node.current_var.detach()
            bn.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_(var * n / max(n - 1, 1), alpha=momentum)


@plain_lirpa_warnings
def lirpa_intervals(
    module: nn.Module,
    lower: Tensor,
    upper: Tensor,
    reference: Tensor | None = None,
    update_running_stats: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, list[tuple[Tensor, Tensor]]]:
    """auto_LiRPA IBP bounds on ``module``'s output over the box [lower, upper].

    Returns:
        ``(lower, upper, value, preact_bounds)``: the output bounds, ``module(reference)`` (None
        without a reference) and the (lower, upper) bounds of the input of every ReLU/Tanh, in
        graph order. Without a reference, a train-mode BatchNorm uses the statistics of the box
        centre, as in the native engine.
    """
    _, bounded_tensor_cls, ptb_cls = import_auto_lirpa(module)
    point = reference if reference is not None else (upper + lower) / 2
    if point.shape != lower.shape:
        # auto_LiRPA bounds the box at the forward point's batch: one reference row per box row
        raise ValueError(
            f"the reference batch {tuple(point.shape)} must match the box {tuple(lower.shape)} for auto_LiRPA"
        )
    bounded = lirpa_bounded_module(module, lower)
    ptb = ptb_cls(norm=float("inf"), x_L=lower, x_U=upper)
    value = bounded(bounded_tensor_cls(point, ptb))  # sets the batch statistics of train-mode BatchNorm
    lb, ub = bounded.compute_bounds(method="IBP")
    if update_running_stats and module.training:
        _update_running_stats(module, bounded)
    preact = [
        (node.inputs[0].lower, node.inputs[0].upper)
        for node in bounded.nodes()
        if type(node).__name__ in ("BoundRelu", "BoundTanh")
    ]
    return lb, ub, (value if reference is not None else None), preact


def refuse_unsound_lirpa_crown(model: nn.Module, method: str) -> None:
    """Raise ``UnsupportedLayerError`` where auto_LiRPA's linear bounds are known to be unsound.

    Measured with auto_LiRPA 9d100ec: its CROWN bound through a dilated convolution lies above
    margins found by sampling (tests/test_layer_audit.py); the native engine bounds those soundly.
    """
    dilated = [m for m in model.modules() if isinstance(m, nn.Conv2d) and tuple(m.dilation) != (1, 1)]
    if dilated and method != "IBP":
        raise UnsupportedLayerError(
            f"auto_LiRPA's {method} is unsound through dilated convolutions ({dilated[0]!r}); "
            "use backend='native'"
        )


def margin_spec(y: Tensor, num_classes: int, like: Tensor) -> Tensor:
    """auto_LiRPA's specification matrix C (B, k, k) of the logit differences: row j is e_y − e_j."""
    eye = torch.eye(num_classes, dtype=like.dtype, device=like.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


@plain_lirpa_warnings
def lirpa_margin_bounds(
    model: nn.Module, lower: Tensor, upper: Tensor, y: Tensor, reference: Tensor, method: str = "CROWN-IBP"
) -> Tensor:
    """auto_LiRPA lower bounds (B, k) on z_j = f_y − f_j over the box [lower, upper], differentiable in
    ``model``'s parameters (entry y is 0): what the ``crown_ibp`` loss trains a network with when the
    native back-substitution cannot take it.

    ``model`` is the whole network (features and head); ``reference`` (one row per box row) is the
    point auto_LiRPA's forward pass runs, so a train-mode BatchNorm bounds the box with that batch's
    statistics, as in :func:`lirpa_intervals`. Running statistics are not moved (auto_LiRPA works
    on copies of the buffers; the training pass moved them already).
    """
    refuse_unsound_lirpa_crown(model, method)
    _, bounded_tensor_cls, ptb_cls = import_auto_lirpa(model)
    if reference.shape != lower.shape:
        raise ValueError(
            f"the reference batch {tuple(reference.shape)} must match the box {tuple(lower.shape)} "
            "for auto_LiRPA"
        )
    bounded = lirpa_bounded_module(model, lower)
    bounded(bounded_tensor_cls(reference, ptb_cls(norm=float("inf"), x_L=lower, x_U=upper)))
    c = margin_spec(y, model.num_classes, lower)
    lb, _ = bounded.compute_bounds(C=c, method=method, bound_upper=False)
    return lb


@plain_lirpa_warnings
def check_lirpa_boundable(module: nn.Module, example: Tensor) -> None:
    """Raise :class:`LirpaUnsupportedError` when auto_LiRPA cannot compute IBP bounds for ``module``."""
    bounded = lirpa_bounded_module(module, example)
    was_training = bounded.training
    bounded.eval()
    try:
        _, bounded_tensor_cls, ptb_cls = import_auto_lirpa()
        x = example[:2].detach()
        ptb = ptb_cls(norm=float("inf"), x_L=x, x_U=x)
        with torch.no_grad():
            bounded(bounded_tensor_cls(x, ptb))
            bounded.compute_bounds(method="IBP")
    except Exception as exc:
        raise LirpaUnsupportedError(f"auto_LiRPA cannot bound {type(module).__name__}: {exc}") from exc
    finally:
        bounded.train(was_training)

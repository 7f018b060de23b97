"""The bounded graph must be the network: checks that bounds describe the function the network computes.

Bounds are computed on a graph, not by running ``forward``: the native engine walks the network's
``nn.Sequential`` / :class:`~ccdist_plugin.models.Residual` structure, auto_LiRPA traces
``forward`` once on an example and bounds the operations that trace recorded. Python control flow
that depends on the input is fixed by that trace: a branch on a batch statistic
(``relu(b(v)) if v.mean() > t else relu(a(v))``) keeps the branch the example took, a branch on the
batch size (``h * 3 if h.shape[0] > 2 else h``) keeps the example's batch size, a Python loop over
the batch keeps its number of iterations. Bounds of that graph are not bounds of the network:
sampled margins fall below the "certified" lower bounds.

Two checks refuse such networks, one for each place a certificate can come from:

- :func:`check_wrapped_network` (run by :meth:`CertifiedNet.wrap`, which this module registers it
  with: models sit below the bound engine and import nothing from it): an engine must bound the
  features (:func:`~ccdist_plugin.bounds.ibp.check_boundable`), and, by
  :func:`check_forward_is_bounded_graph`, tracing ``features`` must not raise a ``TracerWarning``
  (the tracer's own notice that a tensor became a Python value, so the trace may hold for its
  example only), and on probe batches of several sizes (1, 2, 3, 5) spread over the box [0, 1]
  (its corners, constant levels, uniform points) the forward's features must equal the bounded
  graph's (its interval bounds at ε = 0).
- :func:`check_graph_at_points` and :func:`check_margins_at_points` (run by
  :func:`ccdist_plugin.bounds.certify`, so by the pre-filter of ``ccdist eval`` and of the
  α,β-CROWN export), after the same trace check: on the very points being certified, the same
  comparison before any bound, and after the bounds: no lower bound of a logit difference may
  exceed that difference at the point itself. A failure is a soundness alarm: nothing is certified.

Both raise :class:`BoundedGraphMismatch`, one error that names the problem.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import Tensor, nn

from ccdist_plugin.bounds.ibp import check_boundable, propagate_intervals
from ccdist_plugin.bounds.layers import (
    UnsupportedLayerError,
    native_ibp_supports,
    refuse_uncertifiable,
    training_restorer,
)
from ccdist_plugin.models import CertifiedNet, Normalize, Residual, register_wrap_check

__all__ = [
    "BoundedGraphMismatch",
    "check_forward_is_bounded_graph",
    "check_wrapped_network",
    "check_graph_at_points",
    "check_margins_at_points",
    "check_traces_cleanly",
    "check_trace_for_certification",
    "graph_mismatch",
    "graph_is_forward_by_construction",
    "probe_batches",
]

logger = logging.getLogger(__name__)

#: What to do about it, said once in every refusal.
ADVICE = (
    "the bounds are computed on a traced graph, which keeps the one path its example took, so they would "
    "not bound this network. Write features without Python control flow on tensor values or on the batch "
    "size (no `if` on a tensor, no loop over the batch): torch.where for a per-element choice, "
    "batched operations instead of per-sample loops"
)


class BoundedGraphMismatch(ValueError):
    """The graph the bounds describe is not the network's ``forward`` (data-dependent control flow,
    or a forward that differs from the layers it is made of)."""


#: the containers the native engine walks, with the forward it assumes of them
_CONTAINER_FORWARDS = {nn.Sequential: nn.Sequential.forward, Residual: Residual.forward}
#: the leaf layers the native engine bounds, exactly these classes (a subclass may compute otherwise)
_NATIVE_LEAVES = (
    nn.Linear,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.SyncBatchNorm,
    Normalize,
    nn.ReLU,
    nn.Tanh,
    nn.Flatten,
    nn.AvgPool2d,
    nn.Identity,
    nn.Dropout,
)
#: what calling a module runs, as torch defines it (a class may replace it)
_MODULE_CALL = (nn.Module.__call__, nn.Module._call_impl)
#: attributes that, set on an instance, replace what calling the module runs
_CALL_ATTRIBUTES = ("forward", "_call_impl", "_wrapped_call_impl")


def graph_is_forward_by_construction(features: nn.Module) -> bool:
    """True when the native engine's graph of ``features`` is its forward by construction, so the
    checks here have nothing to find: every module is an ``nn.Sequential`` or
    :class:`~ccdist_plugin.models.Residual` of exactly that class (the containers the engine walks)
    or a leaf layer the engine bounds with the ``forward`` it assumes (``check_supported_layer``),
    no instance replaces what a call runs, and no forward hook (of a module or global) is set.
    Every built-in architecture is such a network; a network with its own ``forward`` is not.
    """
    module_hooks = torch.nn.modules.module
    if getattr(module_hooks, "_global_forward_hooks", None) or getattr(
        module_hooks, "_global_forward_pre_hooks", None
    ):
        return False
    for m in features.modules():
        cls = type(m)
        if m._forward_hooks or m._forward_pre_hooks or any(a in vars(m) for a in _CALL_ATTRIBUTES):
            return False
        if (cls.__call__, cls._call_impl) != _MODULE_CALL:
            return False
        if cls in _CONTAINER_FORWARDS:
            if cls.forward is not _CONTAINER_FORWARDS[cls]:
                return False
        elif cls not in _NATIVE_LEAVES or not native_ibp_supports(m):
            return False
    return True


def _tolerance(reference: Tensor) -> float:
    """How far the bounded graph at ε = 0 may lie from the forward pass: rounding only. The same
    operations in another order (BatchNorm folded into one affine map, centre/radius form) differ
    by a few units in the last place of the largest value, far below any real difference."""
    scale = float(reference.detach().abs().max()) if reference.numel() else 0.0
    return 1e3 * torch.finfo(reference.dtype).eps * (1.0 + scale)


def _difference(a: Tensor, b: Tensor) -> Tensor:
    """|a − b|, 0 where both are the same value (the same infinity, or both NaN: a network with
    non-finite outputs is not certified anyway, and is not a graph mismatch)."""
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    return torch.where(same, torch.zeros_like(a), (a - b).abs())


def graph_mismatch(model: CertifiedNet, x: Tensor, features: Tensor | None = None) -> str | None:
    """How the forward's features on the batch ``x`` differ from the bounded graph's, or None.

    The bounded graph's output is its interval bounds on the box [x, x] (ε = 0), computed by the
    engine that bounds ``model`` (native or auto_LiRPA); both bounds must equal ``model.features(x)``
    (``features`` when already computed) up to rounding. A graph that fails on this batch (e.g. one
    traced at another batch size) is a mismatch too. Runs in the model's current mode; nothing in
    the model is modified.
    """
    with torch.no_grad():
        h = model.features(x) if features is None else features
        try:
            graph = propagate_intervals(model.features, x, x)
        except UnsupportedLayerError:
            raise  # no engine bounds it: that error names the layer
        except Exception as exc:  # the graph fails where the forward ran
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return (
                f"on a batch of {x.shape[0]} the forward runs but the bounded graph fails "
                f"({type(exc).__name__}: {first[:300]})"
            )
    if graph.lower.shape != h.shape:
        return (
            f"on a batch of {x.shape[0]} the forward gives features of shape {tuple(h.shape)}, "
            f"the bounded graph {tuple(graph.lower.shape)}"
        )
    finite = h[torch.isfinite(h)]
    tol = _tolerance(finite)
    diff = torch.maximum(_difference(graph.lower, h), _difference(graph.upper, h))
    worst = float(diff.max()) if diff.numel() else 0.0
    if not worst <= tol:  # NaN where only one side is NaN counts as a mismatch
        rows = int((~(diff <= tol)).flatten(1).any(1).sum())
        return (
            f"on a batch of {x.shape[0]} the forward's features differ from the bounded graph's by up to "
            f"{worst:.3g} (in {rows} of {x.shape[0]} rows; rounding allows {tol:.1g})"
        )
    return None


def check_traces_cleanly(features: nn.Module, example: Tensor) -> None:
    """Trace ``features`` on ``example`` in eval mode; a ``TracerWarning`` is refused.

    The tracer warns when a tensor becomes a Python value (a branch on a tensor, a loop bound, a
    number taken out of a tensor): the trace then holds for the example only. Other errors of the
    tracer itself are left to the bound engines (the native engine does not trace; auto_LiRPA
    reports what it cannot trace). Nothing to do for a network whose graph is its forward by
    construction (:func:`graph_is_forward_by_construction`). The module's train/eval flags are
    restored.

    Raises:
        UnsupportedLayerError: a layer no engine may bound in eval mode (e.g. a BatchNorm without
            running statistics), named.
        BoundedGraphMismatch: naming the warning and the line of ``features`` that caused it.
    """
    if graph_is_forward_by_construction(features):
        return
    restore = training_restorer(features)
    features.eval()  # a train-mode trace would move BatchNorm statistics (and BatchNorm warns then)
    recorded: list[warnings.WarningMessage] = []
    try:
        # a layer no engine bounds in eval mode gets its own error first (a BatchNorm without
        # running statistics also warns when traced: it normalizes with the batch's statistics)
        refuse_uncertifiable(features)
        try:
            with warnings.catch_warnings(record=True) as recorded:
                warnings.simplefilter("always")
                with torch.no_grad():
                    torch.jit.trace(features, example.detach(), check_trace=False, strict=False)
        except Exception as exc:
            logger.debug("tracing %s failed (left to the bound engines): %s", type(features).__name__, exc)
    finally:
        restore()
    tracer = [w for w in recorded if issubclass(w.category, torch.jit.TracerWarning)]
    for w in recorded:  # pass on what the user's code warned besides (torch.jit's deprecation notes are ours)
        if w in tracer or (issubclass(w.category, DeprecationWarning) and "torch.jit" in str(w.message)):
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if tracer:
        w = tracer[0]
        message = str(w.message).split(". ")[0]
        raise BoundedGraphMismatch(
            f"features have data-dependent control flow: tracing them warns at {w.filename}:{w.lineno} "
            f"({message}; {len(tracer)} such warning(s)): {ADVICE}"
        )


def probe_batches(input_shape: tuple[int, ...], like: Tensor, seed: int = 0) -> list[Tensor]:
    """Inputs in [0, 1] that exercise what a trace can fix: batch sizes 1, 2, 3 and 5; the box's
    corners (all 0, all 1, random 0/1 pixels), constant levels between them (so that a batch
    statistic sweeps its range) and uniform points."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, *input_shape, generator=g)

    def full(level: float, n: int = 1) -> Tensor:
        return torch.full((n, *input_shape), level)

    levels = torch.linspace(0, 1, 5).view(5, *([1] * len(input_shape))).expand(5, *input_shape)
    batches = [
        full(0.0),
        full(1.0),
        rand(1),
        rand(2),
        torch.cat([full(0.0), full(1.0)]),
        full(0.25, 2),
        full(0.75, 2),
        (rand(3) < 0.5).float(),
        rand(3) * torch.rand(3, *([1] * len(input_shape)), generator=g),
        levels.clone(),
        rand(5),
    ]
    return [b.to(device=like.device, dtype=like.dtype) for b in batches]


def check_forward_is_bounded_graph(model: CertifiedNet, seed: int = 0) -> None:
    """Refuse a network whose bounded graph is not its forward (what :meth:`CertifiedNet.wrap` runs).

    Traces ``model.features`` (:func:`check_traces_cleanly`), then compares the forward with the
    bounded graph (:func:`graph_mismatch`) on :func:`probe_batches`, in eval mode; nothing to do
    when :func:`graph_is_forward_by_construction`. The model's train/eval flags are restored and
    nothing else in it changes.

    Raises:
        BoundedGraphMismatch: the first problem found, named.
    """
    if graph_is_forward_by_construction(model.features):
        return
    first = next(iter(model.parameters()), None)
    like = torch.zeros(()) if first is None else first.detach()
    probes = probe_batches(model.input_shape, like, seed)
    check_traces_cleanly(model.features, probes[3])
    restore = training_restorer(model)
    model.eval()
    try:
        for x in probes:
            with warnings.catch_warnings():
                # auto_LiRPA takes the (1, C, 1, 1) normalization buffers for batched operands on a
                # batch of one and says so; the comparison itself shows whether its graph is right
                warnings.filterwarnings("ignore", message="Constant operand of node")
                problem = graph_mismatch(model, x)
            if problem is not None:
                raise BoundedGraphMismatch(
                    f"features are not the graph the bounds describe: {problem}; {ADVICE}"
                )
    finally:
        restore()


def _alarm(problem: str) -> BoundedGraphMismatch:
    return BoundedGraphMismatch(
        f"soundness alarm, nothing certified: the network's outputs are not its bounded graph's: {problem}; "
        f"{ADVICE}"
    )


def check_trace_for_certification(features: nn.Module, example: Tensor) -> None:
    """:func:`check_traces_cleanly` as a soundness check of certification.

    Raises:
        BoundedGraphMismatch: a soundness alarm naming the warning; nothing may be certified.
    """
    try:
        check_traces_cleanly(features, example)
    except BoundedGraphMismatch as exc:
        raise BoundedGraphMismatch(f"soundness alarm, nothing certified: {exc}") from None


def check_graph_at_points(model: CertifiedNet, x: Tensor, features: Tensor) -> None:
    """The first soundness check of certification, before any bound: on the points ``x`` being
    certified, the bounded graph at ε = 0 gives the forward's ``features`` (:func:`graph_mismatch`);
    nothing to compare when :func:`graph_is_forward_by_construction` (every built-in architecture),
    so certifying those costs nothing more.

    Raises:
        BoundedGraphMismatch: a soundness alarm naming what differs; nothing may be certified.
    """
    if graph_is_forward_by_construction(model.features):
        return
    problem = graph_mismatch(model, x, features)
    if problem is not None:
        raise _alarm(problem)


def check_margins_at_points(logits: Tensor, y: Tensor, margin_lb: Tensor) -> None:
    """The second soundness check of certification: no lower bound (B, k) of z_j = f_y − f_j over
    a ball exceeds z_j at the ball's centre, computed from the forward's ``logits`` (entry y is
    ignored).

    Raises:
        BoundedGraphMismatch: a soundness alarm naming the points; nothing may be certified.
    """
    z = (logits.gather(1, y.view(-1, 1)) - logits).to(margin_lb.dtype)
    others = torch.ones_like(margin_lb, dtype=torch.bool).scatter(1, y.view(-1, 1), False)
    excess = torch.where(others, margin_lb - z, torch.zeros_like(z))
    tol = _tolerance(z[torch.isfinite(z)])
    # NaN is no excess: a NaN bound proves nothing, and a NaN output is never a correct prediction
    above = excess > tol
    if bool(above.any()):
        worst = float(excess[above].max())
        rows = torch.nonzero(above.any(1)).flatten().tolist()
        raise _alarm(
            f"the lower bounds of the logit differences exceed the network's own differences at points "
            f"{rows[:10]}{' ...' if len(rows) > 10 else ''} of the batch, by up to {worst:.3g}"
        )


def check_wrapped_network(net: CertifiedNet, example: Tensor) -> None:
    """What ``CertifiedNet.wrap(check_bounds=True)`` runs on the network it built: an engine must bound
    ``net.features`` (:func:`~ccdist_plugin.bounds.ibp.check_boundable`) and its bounded graph must be
    its forward (:func:`check_forward_is_bounded_graph`). ``example`` is an input batch of the right shape.

    Raises:
        UnsupportedLayerError: no engine can bound a layer (named).
        BoundedGraphMismatch: the first problem found, named, after ``CertifiedNet.wrap:``.
    """
    try:
        # the trace first: a data-dependent forward is refused before auto_LiRPA traces it
        check_traces_cleanly(net.features, example)
        check_boundable(net)
        check_forward_is_bounded_graph(net)
    except BoundedGraphMismatch as exc:
        raise BoundedGraphMismatch(f"CertifiedNet.wrap: {exc}") from None


# CertifiedNet.wrap runs these checks: importing the bound engine (which ``import ccdist_plugin`` does)
# hands them to it.
register_wrap_check(check_wrapped_network)

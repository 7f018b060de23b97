"""Gradient accumulation (``optim.accumulate: k``): one optimizer step from k micro-batches.

A batch of B examples is split into k consecutive micro-batches (sizes differ by at most one; a
batch smaller than k gives B micro-batches of one). Each micro-batch's objective is weighted by its
share n_m/B of the batch and backpropagated on its own, so only one micro-batch's autograd graph
lives at a time; the gradients add up in ``.grad`` and the optimizer steps once. For an objective
that is a mean of per-example terms (every loss's cross-entropies and distillation terms, the ℓ1
penalty, which is counted once in all), the accumulated gradient is the whole batch's.

BatchNorm in train mode couples the examples of a batch through its statistics, and the Shi
regularizer through its means over the batch (:meth:`BatchStatistics.batch_mean`; Exp-IBP's product
of batch losses is still taken per micro-batch). With k > 1 and a network that has a BatchNorm (or
the Shi regularizer on), the step runs in phases (docs/training.md, "Gradient accumulation"):

1. the attack, micro-batch by micro-batch (the network is in eval mode there: running statistics,
   no coupling; its random starts come from the CPU generator: the numbers the whole batch would draw);
2. the whole objective on the whole batch without autograd (no graph is kept), recording, in
   order, every train-mode BatchNorm call (its batch mean and 1/std) and every batch mean, and the
   running statistics moved once, exactly as the one-batch step moves them. The logged terms are
   this pass's;
3. each micro-batch's objective with every train-mode BatchNorm normalizing with the recorded
   whole-batch statistics (:class:`BatchStatistics` in replay), then its backward.

The forward values (losses, bounds, adversarial outputs, running statistics) are therefore those
of the one-batch step. For the gradient there are two modes (``optim.batchnorm_gradient``):

- ``exact``: in phase 3 the statistics are leaves of the graph, shared by all micro-batches, so the
  backward passes leave in ``.grad`` the gradient that does not go through the statistics and, on
  the leaves, the objective's gradient with respect to every recorded statistic. What goes through
  the statistics is then pulled back into the examples by adjoint passes (:meth:`BatchStatistics.
  adjoint_surrogate`): a statistic is a sum over the whole batch, mean = Σx/n and
  1/std = (Σ(x − mean)²/n + eps)^(−1/2), so its gradient reaches every example's input x of that
  BatchNorm call as g_mean/n − g_invstd·invstd³·(x − mean)/n, and each micro-batch's share is its
  own examples' part of the sum. Backpropagating that share through the micro-batch's replayed
  graph adds to ``.grad`` and, since x itself depends on the statistics of earlier BatchNorm calls,
  to their leaves: another adjoint pass takes those, and so on until no statistic receives a
  gradient (one pass per BatchNorm layer in depth at most). The result is the whole batch's
  gradient, up to rounding (tested against the one-batch step for k = 2 and 4).
- ``micro_batch``: one pass; a micro-batch's backward differentiates the statistics as if they were
  its own micro-batch's (at the whole batch's values): the gradient reaching a BatchNorm's input is
  (γ/σ)·(g − mean_m(g) − (x − μ_m)·mean_m(g·(x − μ))/σ²), with means over the micro-batch m where
  the one-batch step takes them over the batch. Cheaper, and an approximation that improves as
  micro-batches grow (a micro-batch of one example gets no gradient through a BatchNorm1d).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ccdist_plugin.bounds import layers as bound_layers

__all__ = [
    "BATCHNORM_GRADIENTS",
    "micro_batches",
    "train_mode_batchnorms",
    "BatchStatistics",
    "check_accumulation",
    "EnoughCaptured",
]

#: the ways gradient accumulation differentiates through BatchNorm statistics (module docstring)
BATCHNORM_GRADIENTS = ("exact", "micro_batch")


def micro_batches(batch_size: int, k: int) -> list[slice]:
    """k consecutive slices covering ``range(batch_size)``, sizes differing by at most one (the first
    ones larger); ``min(k, batch_size)`` slices, so a batch smaller than k gives slices of one."""
    if k < 1:
        raise ValueError(f"accumulate must be >= 1, got {k}")
    k = max(1, min(k, batch_size))
    base, extra = divmod(batch_size, k)
    out, start = [], 0
    for i in range(k):
        stop = start + base + (1 if i < extra else 0)
        out.append(slice(start, stop))
        start = stop
    return out


def train_mode_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that normalize with batch statistics in its current mode."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
    ]


def check_accumulation(model: nn.Module, loss: object) -> None:
    """``ValueError`` when a step of ``model`` with ``loss`` cannot be accumulated with whole-batch
    BatchNorm statistics (only asked when the network has a BatchNorm).

    The loss must be a :class:`~ccdist_plugin.losses.RobustLoss` (its attack is run apart from its
    objective), the network's features must be bounded by the native IBP engine (auto_LiRPA's
    BatchNorm cannot be given statistics), and SyncBatchNorm is refused (its statistics span ranks).
    """
    from ccdist_plugin.bounds import native_unsupported_layer
    from ccdist_plugin.losses import RobustLoss

    if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        raise ValueError("optim.accumulate > 1 does not support SyncBatchNorm; use accumulate: 1")
    if not isinstance(loss, RobustLoss):
        raise ValueError(
            f"optim.accumulate > 1 with a BatchNorm network needs a ccdist_plugin loss (RobustLoss), got "
            f"{type(loss).__name__}"
        )
    from ccdist_plugin.losses import CrownIBPLoss

    layer = native_unsupported_layer(getattr(model, "features", model))
    if layer is not None or (isinstance(loss, CrownIBPLoss) and not loss.keeps_ibp_record(model)):
        raise ValueError(
            "optim.accumulate > 1 with a BatchNorm network needs layers the native engines bound (this "
            "network goes through auto_LiRPA, whose BatchNorm cannot be given statistics); use accumulate: 1"
        )


class EnoughCaptured(Exception):
    """Ends an adjoint replay early: every input it needs has been captured (internal signal)."""


@dataclass
class _Record:
    bn: nn.Module | None  # None: a mean over the batch (batch_mean), not a BatchNorm call
    mean: Tensor
    invstd: Tensor | None
    count: int  # elements per channel of the whole batch (batch_mean: elements in all)
    # exact mode: the statistics as leaves of every micro-batch's graph (their .grad: the objective's
    # gradient with respect to them), and the micro-batch's input of this call in an adjoint pass
    mean_leaf: Tensor | None = None
    invstd_leaf: Tensor | None = None
    captured: Tensor | None = None


@dataclass
class BatchStatistics:
    """Records every train-mode BatchNorm call of a whole-batch pass, then replays those statistics
    in the passes of its micro-batches (see the module docstring).

    Use :meth:`recording` around the whole-batch pass (no autograd needed) and :meth:`replaying`
    around each micro-batch's pass. ``gradient``:
    ``"exact"`` (the statistics are leaves; finish with :meth:`statistics_gradients` and
    :meth:`adjoint_surrogate`) or ``"micro_batch"`` (see the module docstring).
    """

    records: list[_Record] = field(default_factory=list)
    gradient: str = "exact"
    _index: int = 0
    _capture: bool = False
    _mode: str | None = None  # "recording", "replaying" or None
    _stop_after: int | None = None  # adjoint replay: the last record it needs

    def __post_init__(self) -> None:
        if self.gradient not in BATCHNORM_GRADIENTS:
            raise ValueError(f"gradient must be one of {BATCHNORM_GRADIENTS}, got {self.gradient!r}")

    # -------------------------------------------------------------------- the two modes
    @contextlib.contextmanager
    def recording(self, model: nn.Module) -> Iterator[BatchStatistics]:
        self.records.clear()
        self._mode = "recording"
        try:
            with _hooked(model, self._record):
                yield self
        finally:
            self._mode = None

    @contextlib.contextmanager
    def replaying(
        self, model: nn.Module, capture: bool = False, stop_after: int | None = None
    ) -> Iterator[BatchStatistics]:
        """Replay the recorded statistics in one micro-batch's pass; ``capture`` (exact mode): keep
        each call's input for :meth:`adjoint_surrogate`; ``stop_after``: end the pass, by raising
        :class:`EnoughCaptured` (the caller catches it), once that record has been replayed (an
        adjoint pass needs nothing the pass computes later)."""
        self._index, self._capture = 0, capture
        self._stop_after = stop_after
        if self.gradient == "exact":
            for rec in self.records:
                rec.captured = None
                if rec.mean_leaf is None:
                    rec.mean_leaf = rec.mean.clone().requires_grad_(True)
                    if rec.invstd is not None:
                        rec.invstd_leaf = rec.invstd.clone().requires_grad_(True)
        self._mode = "replaying"
        try:
            with _hooked(model, self._replay):
                yield self
        finally:
            self._mode = None
        if self._index != len(self.records):
            raise RuntimeError(
                f"a micro-batch pass made {self._index} BatchNorm calls, the whole-batch pass "
                f"{len(self.records)}: the step's passes differ between them"
            )

    # -------------------------------------------------------------------- means over the batch
    def batch_mean(self, t: Tensor) -> Tensor:
        """The mean of all entries of ``t`` (whose first dimension is the batch) over the whole
        batch: in the whole-batch pass ``t.mean()``, recorded; in a micro-batch's replay that value,
        differentiated as the BatchNorm statistics are (a leaf in exact mode, the micro-batch's own
        mean in micro_batch mode). Outside both, ``t.mean()``. For batch-level terms of an objective
        (the Shi regularizer's ratios of means), which a micro-batch alone cannot compute."""
        if self._mode == "recording":
            value = t.mean()
            self.records.append(_Record(None, value.detach(), None, t.numel()))
            return value
        if self._mode != "replaying":
            return t.mean()
        rec = self._next_record(None)
        if self.gradient == "exact":
            if self._capture:
                rec.captured = t
                self._stop_if_done()
            return rec.mean_leaf
        own = t.mean()
        return rec.mean + (own - own.detach())

    def _next_record(self, bn: nn.Module | None) -> _Record:
        if self._index >= len(self.records) or self.records[self._index].bn is not bn:
            raise RuntimeError(
                "a micro-batch pass called its BatchNorm layers (or batch means) in another order than "
                "the whole-batch pass: the step's passes differ between them"
            )
        self._index += 1
        return self.records[self._index - 1]

    def _stop_if_done(self) -> None:
        if self._stop_after is not None and self._index > self._stop_after:
            raise EnoughCaptured  # this call was the last one the adjoint pass needs

    # -------------------------------------------------------------------- the hooks
    def _record(self, bn, x: Tensor, update_running_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
        track = update_running_stats and bn.track_running_stats and bn.running_mean is not None
        # the very call of the one-batch step (same kernel, same running-statistics update)
        out, mean, invstd = torch.native_batch_norm(
            x,
            bn.weight,
            bn.bias,
            bn.running_mean if track else None,
            bn.running_var if track else None,
            True,
            bound_layers.bn_momentum(bn) if track else 0.0,
            bn.eps,
        )
        self.records.append(_Record(bn, mean.detach(), invstd.detach(), x.numel() // x.shape[1]))
        return out, mean, invstd

    def _replay(self, bn, x: Tensor, update_running_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
        rec = self._next_record(bn)
        view = (1, -1) + (1,) * (x.ndim - 2)
        if self.gradient == "exact":
            # the statistics are leaves: what flows through them is pulled back by the adjoint passes
            mean, invstd = rec.mean_leaf, rec.invstd_leaf
            if self._capture:
                rec.captured = x
                self._stop_if_done()
        else:
            dims = [0, *range(2, x.ndim)]
            # value: the whole batch's statistic; gradient: as if the micro-batch's own statistic
            # (see the module docstring), linearized at the whole batch's value
            own_mean = x.mean(dims)
            mean = rec.mean + (own_mean - own_mean.detach())
            own_var = (x - own_mean.view(view)).square().mean(dims)
            invstd = rec.invstd + (-0.5 * rec.invstd.pow(3)) * (own_var - own_var.detach())
        out = (x - mean.view(view)) * invstd.view(view)
        if bn.weight is not None:
            out = out * bn.weight.view(view)
        if bn.bias is not None:
            out = out + bn.bias.view(view)
        return out, mean, invstd

    # -------------------------------------------------------------------- exact mode's adjoint
    def statistics_gradients(self) -> list[tuple[Tensor, Tensor] | None]:
        """Per record, the gradient its statistics' leaves received since the last call (None where
        none or zero), clearing them: what the next adjoint pass pulls back into the examples."""
        out: list[tuple[Tensor, Tensor] | None] = []
        for rec in self.records:
            grads = [leaf.grad for leaf in (rec.mean_leaf, rec.invstd_leaf) if leaf is not None]
            if grads and any(g is not None and bool(g.any()) for g in grads):
                g_mean, g_invstd = (
                    None
                    if leaf is None
                    else torch.zeros_like(leaf)
                    if leaf.grad is None
                    else leaf.grad.clone()
                    for leaf in (rec.mean_leaf, rec.invstd_leaf)
                )
                out.append((g_mean, g_invstd))
            else:
                out.append(None)
            for leaf in (rec.mean_leaf, rec.invstd_leaf):
                if leaf is not None:
                    leaf.grad = None
        return out

    def adjoint_surrogate(self, pending: list[tuple[Tensor, Tensor] | None]) -> Tensor | None:
        """A scalar whose gradient, after a replay with ``capture=True``, is this micro-batch's share
        of ``pending`` (the statistics' gradients) pulled back into its examples' BatchNorm inputs:
        for mean = Σx/n and invstd = (Σ(x − mean)²/n + eps)^(−1/2) over the whole batch,
        ∂/∂x = g_mean/n − g_invstd·invstd³·(x − mean)/n (the term through the mean inside the
        variance vanishes: Σ(x − mean) = 0 over the batch). None when nothing here needs it."""
        total = None
        for rec, grads in zip(self.records, pending, strict=True):
            if grads is None or rec.captured is None or not rec.captured.requires_grad:
                continue
            x, (g_mean, g_invstd) = rec.captured, grads
            if rec.bn is None:  # a batch mean: Σ t / n over the whole batch, this micro-batch's part
                total = (g_mean * x.sum()) / rec.count + (0 if total is None else total)
                continue
            dims = [0, *range(2, x.ndim)]
            view = (1, -1) + (1,) * (x.ndim - 2)
            centred = x - rec.mean.view(view)
            term = (g_mean * x.sum(dims)).sum() - 0.5 * (
                g_invstd * rec.invstd.pow(3) * centred.square().sum(dims)
            ).sum()
            total = term / rec.count if total is None else total + term / rec.count
        for rec in self.records:
            rec.captured = None
        return total


@contextlib.contextmanager
def _hooked(model: nn.Module, hook) -> Iterator[None]:
    """Route every train-mode BatchNorm of ``model`` through ``hook``: its forward (plain passes) and
    the IBP engine's (``ccdist_plugin.bounds.layers.BATCH_STATISTICS_HOOK``)."""
    if bound_layers.BATCH_STATISTICS_HOOK is not None:
        raise RuntimeError("batch statistics are already being recorded or replayed")
    patched = []
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.forward = functools.partial(_forward, bn, bn.forward, hook)
            patched.append(bn)
    bound_layers.BATCH_STATISTICS_HOOK = hook
    try:
        yield
    finally:
        bound_layers.BATCH_STATISTICS_HOOK = None
        for bn in patched:
            del bn.forward


def _forward(bn, original, hook, x: Tensor) -> Tensor:
    if not (bn.training or bn.running_mean is None):
        return original(x)  # eval mode (the attack): running statistics, nothing to share
    return hook(bn, x, bn.training)[0]

"""One training step (docs/method.md "Student training"): :func:`training_step` sets the learning rate,
computes the objective (:func:`step_objective`: the warm-up's clean cross-entropy, else the loss plus,
during the ramp, the Shi regularizer; plus ℓ1), refuses a non-finite loss (:class:`NonFiniteLossError`)
and updates the network. :class:`~ccdist_plugin.trainer.Trainer` calls it once per batch."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ccdist_plugin import distributed
from ccdist_plugin.config import TrainConfig
from ccdist_plugin.losses import LossStats, RobustLoss
from ccdist_plugin.regularizers import (
    ibp_preactivation_bounds,
    l1_penalty,
    normalized_input_box,
    shi_regularizer,
)

__all__ = ["NonFiniteLossError", "training_step", "step_objective", "REG_EPS_FLOOR"]

#: ε used for the Shi regularizer's bounds on batches where the schedule gives ε_t = 0 (docs/method.md)
REG_EPS_FLOOR = 1e-6


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the epoch and batch.

    Attributes:
        terms: the step's logged terms (host floats), when known.
    """

    def __init__(self, message: str, terms: dict[str, float] | None = None) -> None:
        super().__init__(message)
        self.terms = terms or {}


def training_step(
    model: nn.Module,
    loss: Any,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_t: float,
    lr: float,
    phase: str,
    config: TrainConfig,
) -> tuple[dict[str, float], torch.Tensor | None]:
    """What one training step does (docs/method.md "Student training"):

    1. the learning rate ``lr`` into every parameter group, ``model`` in train mode;
    2. the objective (:func:`step_objective`): clean cross-entropy in the warm-up phase, else
       ``loss(model, x, y, eps_t)`` plus, during the ramp, the Shi regularizer weighted
       λ(1 − ε_t/ε); plus the ℓ1 penalty;
    3. the logged terms reach the host in one copy (one device sync per step, not one per term);
       a non-finite loss on any rank raises :class:`NonFiniteLossError` before any update;
    4. backward, the gradient averaged over the torchrun ranks (weighted by their examples),
       norm clipping, the optimizer step.

    Returns:
        ``(terms, logits)``: the logged terms as floats, and the clean logits in the warm-up
        (for the training accuracy; None otherwise).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    if config.optim.accumulate > 1:
        terms, logits = _accumulated_gradients(model, loss, optimizer, x, y, eps_t, phase, config)
    else:
        total, term_tensors, logits = step_objective(model, loss, x, y, eps_t, phase, config)
        terms = _host_terms(term_tensors)
        _refuse_non_finite(terms, total.device)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
    distributed.average_gradients(list(model.parameters()), x.shape[0])
    if config.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
    optimizer.step()
    return terms, logits


def _accumulated_gradients(
    model: nn.Module,
    loss: Any,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_t: float,
    phase: str,
    config: TrainConfig,
) -> tuple[dict[str, float], torch.Tensor | None]:
    """The gradient of one step accumulated over ``config.optim.accumulate`` micro-batches, left in
    ``.grad`` (:mod:`ccdist_plugin.accumulate`: each micro-batch's objective weighted by its share of
    the batch; a network with BatchNorm normalizes with the whole batch's statistics)."""
    from ccdist_plugin.accumulate import (
        BatchStatistics,
        check_accumulation,
        micro_batches,
        train_mode_batchnorms,
    )

    batch = x.shape[0]
    parts = micro_batches(batch, config.optim.accumulate)
    stats = x_adv = None
    optimizer.zero_grad(set_to_none=True)
    has_batchnorm = bool(train_mode_batchnorms(model))
    # the Shi regularizer's ratios of batch means are the whole batch's too, where the attack can run
    # apart from the objective (a RobustLoss); a user's callable loss gets them per micro-batch
    shi = phase == "ramp" and config.optim.shi_lambda > 0 and isinstance(loss, RobustLoss)
    if has_batchnorm or shi:
        if phase != "warmup":
            if has_batchnorm:
                check_accumulation(model, loss)
            x_adv = torch.cat([loss.adversarial_batch(model, x[p], y[p], eps_t) for p in parts])
        stats = BatchStatistics(gradient=config.optim.batchnorm_gradient)
        with torch.no_grad(), stats.recording(model):  # whole-batch values; no graph kept
            _, term_tensors, logits = step_objective(
                model, loss, x, y, eps_t, phase, config, x_adv, stats.batch_mean
            )
        terms = _host_terms(term_tensors)
        _refuse_non_finite(terms, x.device)
    sums: dict[str, torch.Tensor] = {}
    logit_parts = []
    for part in parts:
        size = part.stop - part.start
        adv = None if x_adv is None else x_adv[part]
        with stats.replaying(model) if stats is not None else contextlib.nullcontext():
            total, part_terms, part_logits = step_objective(
                model,
                loss,
                x[part],
                y[part],
                eps_t,
                phase,
                config,
                adv,
                None if stats is None else stats.batch_mean,
            )
        (total * (size / batch)).backward()
        if stats is None:
            for key, value in part_terms.items():
                sums[key] = sums.get(key, 0.0) + value * (size / batch)
            if part_logits is not None:
                logit_parts.append(part_logits.detach())
    if stats is None:
        terms = _host_terms(sums)
        logits = torch.cat(logit_parts) if logit_parts else None
        _refuse_non_finite(terms, x.device, optimizer)
    elif stats.gradient == "exact":
        _statistics_adjoint(model, loss, stats, parts, x, y, x_adv, eps_t, phase, config)
    return terms, logits


def _statistics_adjoint(
    model: nn.Module,
    loss: Any,
    stats: Any,
    parts: list[slice],
    x: torch.Tensor,
    y: torch.Tensor,
    x_adv: torch.Tensor | None,
    eps_t: float,
    phase: str,
    config: TrainConfig,
) -> None:
    """Exact BatchNorm gradient under accumulation (:mod:`ccdist_plugin.accumulate`, ``exact``): pull
    the gradient the whole-batch statistics received back into every micro-batch's examples, pass
    after pass, until no statistic receives any (each pass reaches BatchNorm calls strictly earlier
    than the last, so at most one pass per call)."""
    from ccdist_plugin.accumulate import EnoughCaptured

    pending = stats.statistics_gradients()
    for _ in range(len(stats.records)):
        if all(g is None for g in pending):
            return
        # the replay stops once the last BatchNorm call (or batch mean) with a gradient is captured
        last = max(i for i, g in enumerate(pending) if g is not None)
        for part in parts:
            adv = None if x_adv is None else x_adv[part]
            with contextlib.suppress(EnoughCaptured):
                with stats.replaying(model, capture=True, stop_after=last):
                    step_objective(model, loss, x[part], y[part], eps_t, phase, config, adv, stats.batch_mean)
            surrogate = stats.adjoint_surrogate(pending)
            if surrogate is not None:
                surrogate.backward()
        pending = stats.statistics_gradients()
    if any(g is not None for g in pending):  # a statistic depending on itself: not a feed-forward pass
        raise RuntimeError("BatchNorm statistics' gradients did not settle within one pass per call")


def _host_terms(term_tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """The logged terms as host floats, in one copy (one device sync, not one per term)."""
    return dict(zip(term_tensors, torch.stack(list(term_tensors.values())).tolist(), strict=True))


def _refuse_non_finite(
    terms: dict[str, float], device: torch.device, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Raise :class:`NonFiniteLossError` when the loss is not finite on any rank (the same decision on
    every rank); ``optimizer``: its gradients, already accumulated, are cleared first."""
    if not distributed.all_finite(math.isfinite(terms["loss"]), device):
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"non-finite training loss ({terms['loss']})", terms)


def step_objective(
    model: nn.Module,
    loss: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_t: float,
    phase: str,
    config: TrainConfig,
    x_adv: torch.Tensor | None = None,
    batch_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """The scalar a step minimizes, its detached terms and the warm-up's clean logits (see
    :func:`training_step`); ``x_adv``: a precomputed adversarial batch for the loss, ``batch_mean``:
    the means over the batch of batch-level terms (gradient accumulation runs the attack apart and
    gives the whole batch's means: :mod:`ccdist_plugin.accumulate`)."""
    terms: dict[str, torch.Tensor] = {}  # detached scalars, copied to the host together
    logits = None
    if phase == "warmup":
        logits = model(x)
        total = F.cross_entropy(logits, y)
        terms["clean_ce"] = total.detach()
    else:
        out = loss(model, x, y, eps_t) if x_adv is None else loss(model, x, y, eps_t, x_adv=x_adv)
        total = out.loss
        for key, value in (out.terms or {}).items():
            terms[key] = torch.as_tensor(value, device=total.device).detach().float().mean()
        if phase == "ramp" and config.optim.shi_lambda > 0:
            stats = getattr(out, "stats", None)
            stats = stats if isinstance(stats, LossStats) else LossStats()  # a user's loss may have none
            if stats.preact_bounds and eps_t > 0:
                bounds, box = stats.preact_bounds, _normalized_box(model, stats, x, eps_t)
            else:
                bounds, box = ibp_preactivation_bounds(model, x, max(eps_t, REG_EPS_FLOOR))
            reg = shi_regularizer(bounds, box[0], box[1], config.optim.shi_tau, batch_mean or torch.mean)
            weight = config.optim.shi_lambda * (1.0 - eps_t / config.eps)
            total = total + weight * reg.total
            terms["shi_tightness"] = reg.tightness.detach().float()
            terms["shi_relu"] = reg.relu_balance.detach().float()
    if config.optim.l1 > 0:
        l1 = l1_penalty(model)
        total = total + config.optim.l1 * l1
        terms["l1_norm"] = l1.detach().float()
    terms["loss"] = total.detach().float()
    return total, terms, logits


def _normalized_box(
    model: nn.Module, stats: LossStats, x: torch.Tensor, eps_t: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized input box the loss's bounds were computed over (SABR's small box, say); by
    default the ε_t-ball ∩ [0, 1]."""
    if stats.input_lb is None or stats.input_ub is None:
        return normalized_input_box(model, x, eps_t)
    lo, hi = stats.input_lb, stats.input_ub
    norm = getattr(model, "normalize", None)
    return (norm(lo), norm(hi)) if norm is not None else (lo, hi)

"""The shared per-batch computation: :func:`loss_inputs` runs the attack, then one pass that carries
the adversarial batch and the IBP box through the network, then the teacher; losses combine its
:class:`LossInputs`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ccdist_plugin.attacks import PGD
from ccdist_plugin.bounds import (
    IntervalPropagation,
    elided_margin_lower_bound,
    input_box,
    propagate_intervals,
)
from ccdist_plugin.bounds.penultimate import latent_features, propagate_split
from ccdist_plugin.losses.terms import logit_differences
from ccdist_plugin.models import CertifiedNet
from ccdist_plugin.validate import check_batch


@dataclass
class LossInputs:
    """Everything a loss combines, computed once per batch by :func:`loss_inputs`.

    Shapes: x, x_adv (B, C, H, W); z_* (B, k); h_* (B, w). Bound fields are None when the loss
    needs no bounds; teacher fields are None without a teacher.
    """

    x: Tensor
    y: Tensor
    x_adv: Tensor
    logits_adv: Tensor
    z_adv: Tensor
    h_adv: Tensor
    h_lb: Tensor | None = None
    h_ub: Tensor | None = None
    z_lb: Tensor | None = None
    preact_bounds: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    input_lb: Tensor | None = None
    input_ub: Tensor | None = None
    h_t: Tensor | None = None
    logits_t: Tensor | None = None
    # the IBP pass itself (per-layer bounds, BatchNorm maps), when asked for with keep_all (CROWN-IBP)
    ibp_record: IntervalPropagation | None = None
    # the earlier feature space of appendix E.9 (input of the penultimate affine layer, flattened),
    # when asked for with latent=True: student on x_adv, its IBP bounds, teacher on x
    latent_adv: Tensor | None = None
    latent_lb: Tensor | None = None
    latent_ub: Tensor | None = None
    latent_t: Tensor | None = None
    # the network and the radius the inputs were computed for (losses that bound further or
    # follow an ε-dependent schedule: CROWN-IBP, IBP-R)
    model: CertifiedNet | None = None
    eps: float | Tensor | None = None


@dataclass
class LossStats:
    """Tensors of a loss evaluation that other components reuse instead of recomputing them.

    Attributes:
        preact_bounds: IBP (lower, upper) bounds before every ReLU, for the Shi regularizer (empty when
            the loss computed no bounds).
        input_lb, input_ub: the pixel-space box those bounds were computed over (the ε-ball ∩ [0, 1],
            or SABR's small box; None without bounds).
        logits_adv: (B, k) detached logits on the adversarial batch (None when not computed).
    """

    preact_bounds: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    input_lb: Tensor | None = None
    input_ub: Tensor | None = None
    logits_adv: Tensor | None = None


@dataclass
class LossOutput:
    """A scalar ``loss`` to backpropagate, its named ``terms`` (detached, for logging) and
    ``stats`` (:class:`LossStats`: tensors other components reuse)."""

    loss: Tensor
    terms: dict[str, Tensor]
    stats: LossStats = field(default_factory=LossStats)


# about 80 lines by its docstring and the record's fields: one pass in order (attack, bounds, teacher)
def loss_inputs(
    model: CertifiedNet,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    attack: PGD | None,
    need_bounds: bool,
    teacher: CertifiedNet | None = None,
    box: tuple[Tensor, Tensor] | None = None,
    x_adv: Tensor | None = None,
    keep_all: bool = False,
    latent: bool = False,
) -> LossInputs:
    """Attack, then one pass for the adversarial output and the IBP bounds, then the teacher.

    Args:
        attack: the PGD run in eval mode (None: no attack, x_adv = x).
        need_bounds: compute IBP feature and margin bounds over the ball (or over ``box``).
        box: bounds over this (lower, upper) box instead of the ε-ball (SABR's small box); it must
            satisfy lower <= upper (not re-checked: that would cost a device sync per training step).
        x_adv: a precomputed adversarial batch (skips the attack).
        keep_all: keep the IBP pass's per-layer bounds and BatchNorm maps in ``ibp_record``.
        latent: also return the earlier feature space of appendix E.9 (``latent_*``): the input of
            the penultimate affine layer, with bounds from the same pass split at that layer
            (:func:`ccdist_plugin.bounds.penultimate.propagate_split`; no layer is propagated twice).
    """
    check_batch(model, x, y, eps, values=False)  # per training step: shapes only, no device sync
    if x_adv is None:
        x_adv = attack(model, x, y, eps) if attack is not None else x
    record = part = None
    if need_bounds:
        lo, hi = box if box is not None else input_box(x, eps)
        if latent:
            part, prop = propagate_split(
                model, lo, hi, reference=x_adv, keep_all=keep_all, update_running_stats=True, check=False
            )
        else:
            prop = propagate_intervals(
                model.features,
                lo,
                hi,
                reference=x_adv,
                keep_all=keep_all,
                update_running_stats=True,
                check=False,
            )
        h_adv, h_lb, h_ub, preact = prop.value, prop.lower, prop.upper, prop.preact_bounds
        z_lb = elided_margin_lower_bound(model.head, h_lb, h_ub, y)
        record = prop if keep_all else None
    else:
        lo = hi = h_lb = h_ub = z_lb = None
        preact = []
        if latent:
            latent_value, h_adv = latent_features(model, x_adv)
            part = IntervalPropagation(latent_value, latent_value, value=latent_value)
        else:
            h_adv = model.features(x_adv)
    logits_adv = model.head(h_adv)
    h_t, logits_t, latent_t = _teacher_pass(teacher, x, latent) if teacher is not None else (None, None, None)
    return LossInputs(
        x=x,
        y=y,
        x_adv=x_adv,
        logits_adv=logits_adv,
        z_adv=logit_differences(logits_adv, y),
        h_adv=h_adv,
        h_lb=h_lb,
        h_ub=h_ub,
        z_lb=z_lb,
        preact_bounds=preact,
        input_lb=lo,
        input_ub=hi,
        h_t=h_t,
        logits_t=logits_t,
        ibp_record=record,
        latent_adv=part.value.flatten(1) if part is not None else None,
        latent_lb=part.lower.flatten(1) if part is not None and need_bounds else None,
        latent_ub=part.upper.flatten(1) if part is not None and need_bounds else None,
        latent_t=latent_t.flatten(1) if latent_t is not None else None,
        model=model,
        eps=eps,
    )


def _teacher_pass(teacher: CertifiedNet, x: Tensor, latent: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The teacher's features, logits and (``latent``) earlier features on the clean batch, without
    gradients."""
    with torch.no_grad():
        if latent:
            latent_t, h_t = latent_features(teacher, x)
        else:
            latent_t, h_t = None, teacher.features(x)
        return h_t, teacher.head(h_t), latent_t

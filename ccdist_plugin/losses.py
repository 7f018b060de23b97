"""Certified-training losses as drop-in objects: ``loss(model, x, y, eps) -> LossOutput``.

Every loss is a few lines on shared primitives: :func:`loss_inputs` runs, once per batch, the
attack (network in eval mode), then one pass that carries the adversarial batch through the
network in train mode *and* the IBP box through the same layers with the adversarial batch's
BatchNorm statistics (docs/method.md, "BatchNorm during training"), and the teacher's clean features
without autograd. A loss then combines the resulting tensors:

=====================  ======================================================================
``CCIBPLoss``          CE(−z_cc(α), y), z_cc(α) = (1−α) z(x_adv) + α z_lb (De Palma et al. 2024b)
``IBPLoss``            CC-IBP at α = 1 (Gowal et al. 2018)
``AdversarialLoss``    CC-IBP at α = 0: PGD adversarial training (Madry et al. 2018), teachers
``MTLIBPLoss``         α L_IBP + (1−α) L_adv
``ExpIBPLoss``         L_IBP^α · L_adv^(1−α)
``SABRLoss``           IBP over a box of radius λε around the projected x_adv (Müller et al. 2023)
``CCDistLoss``         CC-IBP(α) + β R(α), β = 5/w (equation 9 of the paper)
``CCDist0Loss``        CC-IBP(α) + β R(0) (appendix E.2)
``CCDist1Loss``        CC-IBP(α) + β R(1) (appendix E.2)
``LogitDistLoss``      CC-IBP(α) + T²β KL_T(−z_cc, −z_t), T = 20, β = 10⁴/w (equation 14)
``CrossEntropyLoss``   clean cross-entropy (warm-up)
``CrownIBPLoss``       CE on b·z_CROWN-IBP + (1−b)·z_lb, b: 1 → 0 over the ε ramp (Zhang et al. 2020)
``IBPRLoss``           CE(f(x_adv)) on the λε-ball + ρ·Planet areas over IBP bounds (De Palma et al. 2022)
``IBPRDistLoss``       IBP-R + β R(0) (appendix E.3)
=====================  ======================================================================

MTL-IBP and SABR accept a teacher too: they then add β R(1) (appendix E.3, MTL-IBP-Dist and
SABR-Dist; for SABR the bounds are the small box's); so does CROWN-IBP. With
``distill_layer="penultimate"`` R is taken on the input of the penultimate affine layer instead of
the features (appendix E.9; :mod:`ccdist_plugin.latent`).

Adding a loss: subclass :class:`RobustLoss` and write ``objective(inp) -> (loss, terms)``; see
``docs/losses.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccdist_plugin.attacks import PGD
from ccdist_plugin.bounds import (
    IntervalPropagation,
    _eps_tensor,
    elided_margin_lower_bound,
    flat_layers,
    input_box,
    propagate_intervals,
)
from ccdist_plugin.latent import check_distill_layer, latent_features, propagate_split
from ccdist_plugin.models import CertifiedNet, check_compatible

__all__ = [
    "LossInputs",
    "LossOutput",
    "loss_inputs",
    "margin_ce",
    "cc_combination",
    "distillation_term",
    "RobustLoss",
    "CrossEntropyLoss",
    "CCIBPLoss",
    "IBPLoss",
    "AdversarialLoss",
    "MTLIBPLoss",
    "ExpIBPLoss",
    "SABRLoss",
    "CCDistLoss",
    "CCDist0Loss",
    "CCDist1Loss",
    "LogitDistLoss",
    "CrownIBPLoss",
    "IBPRLoss",
    "IBPRDistLoss",
    "ramp_progress",
    "make_loss",
    "list_losses",
]


# --------------------------------------------------------------------------------------------
# Pure functions of tensors
# --------------------------------------------------------------------------------------------


def margin_ce(z: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of the logit vector −z (entry y of z is 0): CE(−z, y), averaged over the batch."""
    return F.cross_entropy(-z, y)


def cc_combination(adv: Tensor, bound: Tensor, alpha: float) -> Tensor:
    """(1 − α)·adv + α·bound: the convex combinations of CC-IBP (z) and of equation 8 (h)."""
    return (1 - alpha) * adv + alpha * bound


def distillation_term(lo: Tensor, hi: Tensor, teacher_features: Tensor) -> Tensor:
    """R = Σ_i max{(lo_i − h_t,i)², (hi_i − h_t,i)²}, averaged over the batch (Proposition 3.2).

    Args:
        lo, hi: (B, w) lower/upper student features (the CC combinations lo(α), hi(α)).
        teacher_features: (B, w) teacher features h_t(x) on the clean inputs (no gradient).
    """
    if lo.shape != teacher_features.shape or hi.shape != lo.shape:
        raise ValueError(
            f"feature shapes differ: lo {tuple(lo.shape)}, hi {tuple(hi.shape)}, teacher "
            f"{tuple(teacher_features.shape)}"
        )
    per_feature = torch.maximum((lo - teacher_features) ** 2, (hi - teacher_features) ** 2)
    return per_feature.sum(1).mean()


def logit_differences(logits: Tensor, y: Tensor) -> Tensor:
    """z = f_y·1 − f, shape (B, k), entry y is 0."""
    return logits.gather(1, y.view(-1, 1)) - logits


# --------------------------------------------------------------------------------------------
# The shared per-batch computation
# --------------------------------------------------------------------------------------------


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
class LossOutput:
    """A scalar ``loss`` to backpropagate, its named ``terms`` (detached, for logging) and
    ``stats`` (tensors other components reuse: ``preact_bounds`` for the Shi regularizer,
    ``input_lb``/``input_ub``, ``logits_adv``)."""

    loss: Tensor
    terms: dict[str, Tensor]
    stats: dict


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
        box: bounds over this (lower, upper) box instead of the ε-ball (SABR's small box).
        x_adv: a precomputed adversarial batch (skips the attack).
        keep_all: keep the IBP pass's per-layer bounds and BatchNorm maps in ``ibp_record``.
        latent: also return the earlier feature space of appendix E.9 (``latent_*``): the input of
            the penultimate affine layer, with bounds from the same pass split at that layer
            (:func:`ccdist_plugin.latent.propagate_split`; no layer is propagated twice).
    """
    if not isinstance(model, CertifiedNet):
        raise ValueError(f"expected a CertifiedNet, got {type(model).__name__}")
    if x.ndim != 1 + len(model.input_shape) or tuple(x.shape[1:]) != model.input_shape:
        raise ValueError(
            f"input of shape {tuple(x.shape)} does not match the model's (B, {model.input_shape})"
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels of shape {tuple(y.shape)} do not match a batch of {x.shape[0]} inputs")
    if x_adv is None:
        x_adv = attack(model, x, y, eps) if attack is not None else x
    record = part = None
    if need_bounds:
        lo, hi = box if box is not None else input_box(x, eps)
        if latent:
            part, prop = propagate_split(
                model, lo, hi, reference=x_adv, keep_all=keep_all, update_running_stats=True
            )
        else:
            prop = propagate_intervals(
                model.features, lo, hi, reference=x_adv, keep_all=keep_all, update_running_stats=True
            )
        h_adv, h_lb, h_ub, preact = prop.value, prop.lower, prop.upper, prop.preact_bounds
        z_lb = elided_margin_lower_bound(model.head, h_lb, h_ub, y)
        record = prop if keep_all else None
    else:
        _eps_tensor(eps, x)  # validates eps
        lo = hi = h_lb = h_ub = z_lb = None
        preact = []
        if latent:
            latent_value, h_adv = latent_features(model, x_adv)
            part = IntervalPropagation(latent_value, latent_value, value=latent_value)
        else:
            h_adv = model.features(x_adv)
    logits_adv = model.head(h_adv)
    h_t = logits_t = latent_t = None
    if teacher is not None:
        with torch.no_grad():
            if latent:
                latent_t, h_t = latent_features(teacher, x)
            else:
                h_t = teacher.features(x)
            logits_t = teacher.head(h_t)
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


# --------------------------------------------------------------------------------------------
# Loss objects
# --------------------------------------------------------------------------------------------


def _prepare_teacher(teacher: nn.Module | None) -> CertifiedNet | None:
    """Put the teacher in eval mode and freeze it: its features are read, never trained."""
    if teacher is None:
        return None
    if not isinstance(teacher, CertifiedNet):
        raise ValueError(f"teacher must be a CertifiedNet, got {type(teacher).__name__}")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class RobustLoss:
    """Base class: computes :class:`LossInputs` once, lets the subclass combine them, and adds
    the distillation term β·R(distill_alpha) when a teacher is given.

    Subclasses set ``needs_bounds``/``needs_attack`` and implement :meth:`objective`.
    """

    needs_bounds: bool = True
    needs_attack: bool = True
    #: α of the distillation term R(α) when a teacher is given; None means "the loss's α".
    distill_alpha: float | None = 1.0
    #: default β as a multiple of 1/w.
    beta_per_width: float = 5.0
    #: default β as a multiple of 1/w when distilling on the earlier feature space (appendix E.9:
    #: 2/w, w the width of the penultimate affine layer's input).
    latent_beta_per_width: float = 2.0
    #: keep the IBP pass's per-layer record in ``LossInputs.ibp_record`` (CROWN-IBP needs it).
    keeps_ibp_record: bool = False

    def __init__(
        self,
        attack: PGD | None = None,
        teacher: nn.Module | None = None,
        beta: float | None = None,
        distill_layer: str = "features",
    ) -> None:
        self.attack = attack if attack is not None else PGD(steps=1, step_size=10.0)
        self.teacher = _prepare_teacher(teacher)
        if beta is not None and beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = beta
        self.distill_layer = check_distill_layer(distill_layer)

    @property
    def needs_teacher(self) -> bool:
        return self.teacher is not None

    def objective(self, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def distillation(self, inp: LossInputs) -> Tensor:
        """β-free distillation term; default: R(α′) on the features (Proposition 3.2)."""
        a = self.alpha if self.distill_alpha is None else self.distill_alpha
        if self.distill_layer == "penultimate":
            h_adv, h_lb, h_ub, h_t = inp.latent_adv, inp.latent_lb, inp.latent_ub, inp.latent_t
        else:
            h_adv, h_lb, h_ub, h_t = inp.h_adv, inp.h_lb, inp.h_ub, inp.h_t
        if h_lb is None:  # a loss without bounds distils the adversarial features only, R(0)
            h_lb = h_ub = h_adv
        lo = cc_combination(h_adv, h_lb, a)
        hi = cc_combination(h_adv, h_ub, a)
        return distillation_term(lo, hi, h_t)

    def resolved_beta(self, model: CertifiedNet, inp: LossInputs | None = None) -> float:
        """β as given, else ``beta_per_width``/w (w the feature width), or with
        ``distill_layer="penultimate"`` ``latent_beta_per_width``/w (w that layer's input width)."""
        if self.beta is not None:
            return self.beta
        if self.distill_layer == "penultimate":
            if inp is None or inp.latent_adv is None:
                raise ValueError("the default β of distill_layer='penultimate' needs that layer's width")
            return self.latent_beta_per_width / inp.latent_adv.shape[1]
        return self.beta_per_width / model.feature_dim

    def box(self, inp_x: Tensor, x_adv: Tensor, eps: float | Tensor) -> tuple[Tensor, Tensor] | None:
        return None

    def __call__(self, model: CertifiedNet, x: Tensor, y: Tensor, eps: float | Tensor) -> LossOutput:
        if self.teacher is not None:
            check_compatible(self.teacher, model)
        latent = self.teacher is not None and self.distill_layer == "penultimate"
        attack = self.attack if self.needs_attack else None
        x_adv = attack(model, x, y, eps) if attack is not None else x
        inp = loss_inputs(
            model,
            x,
            y,
            eps,
            attack,
            self.needs_bounds,
            self.teacher,
            box=self.box(x, x_adv, eps),
            x_adv=x_adv,
            keep_all=self.keeps_ibp_record,
            latent=latent,
        )
        if latent and inp.latent_adv.shape[1] != inp.latent_t.shape[1]:
            raise ValueError(
                "teacher and student are incompatible for distill_layer='penultimate': the input of the "
                f"penultimate affine layer has width {inp.latent_t.shape[1]} in the teacher and "
                f"{inp.latent_adv.shape[1]} in the student"
            )
        loss, terms = self.objective(inp)
        if self.teacher is not None:
            r = self.distillation(inp)
            terms["distill"] = r
            loss = loss + self.resolved_beta(model, inp) * r
        terms = {k: v.detach() for k, v in terms.items()}
        terms["loss"] = loss.detach()
        stats = {
            "preact_bounds": inp.preact_bounds,
            "input_lb": inp.input_lb,
            "input_ub": inp.input_ub,
            "logits_adv": inp.logits_adv.detach(),
        }
        return LossOutput(loss=loss, terms=terms, stats=stats)

    def __repr__(self) -> str:
        fields = {k: v for k, v in vars(self).items() if k != "teacher"}
        fields["teacher"] = None if self.teacher is None else "CertifiedNet"
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return float(alpha)


class CrossEntropyLoss(RobustLoss):
    """Clean cross-entropy (the warm-up epoch). ``eps`` is ignored."""

    needs_bounds = False
    needs_attack = False

    def __init__(self) -> None:
        super().__init__()

    def objective(self, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        ce = F.cross_entropy(inp.logits_adv, inp.y)
        return ce, {"ce": ce}


class CCIBPLoss(RobustLoss):
    """CC-IBP: CE(−[(1−α) z(x_adv) + α z_lb], y) (De Palma et al. 2024b; section 3.1)."""

    distill_alpha = None

    def __init__(
        self,
        alpha: float,
        attack: PGD | None = None,
        teacher=None,
        beta=None,
        distill_layer: str = "features",
    ) -> None:
        super().__init__(attack, teacher, beta, distill_layer)
        self.alpha = _check_alpha(alpha)

    def objective(self, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        loss = margin_ce(cc_combination(inp.z_adv, inp.z_lb, self.alpha), inp.y)
        return loss, {"cc_ibp": loss}


class IBPLoss(CCIBPLoss):
    """IBP training (Gowal et al. 2018): CC-IBP with α = 1; no attack is run."""

    needs_attack = False

    def __init__(self) -> None:
        super().__init__(alpha=1.0)


class AdversarialLoss(CCIBPLoss):
    """PGD adversarial training: CC-IBP with α = 0; no bounds are computed. Used for teachers."""

    needs_bounds = False

    def __init__(self, attack: PGD | None = None) -> None:
        super().__init__(alpha=0.0, attack=attack if attack is not None else PGD(steps=10, step_size=0.25))

    def objective(self, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        loss = margin_ce(inp.z_adv, inp.y)
        return loss, {"adv": loss}


class MTLIBPLoss(RobustLoss):
    """MTL-IBP: α·CE(−z_lb) + (1−α)·CE(−z(x_adv)); with a teacher, + β R(1) (MTL-IBP-Dist)."""

    def __init__(
        self,
        alpha: float,
        attack: PGD | None = None,
        teacher=None,
        beta=None,
        distill_layer: str = "features",
    ) -> None:
        super().__init__(attack, teacher, beta, distill_layer)
        self.alpha = _check_alpha(alpha)

    def objective(self, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        l_ibp, l_adv = margin_ce(inp.z_lb, inp.y), margin_ce(inp.z_adv, inp.y)
        return self.alpha * l_ibp + (1 - self.alpha) * l_adv, {"ibp": l_ibp, "adv": l_adv}


class ExpIBPLoss(MTLIBPLoss):
    """Exp-IBP: L_IBP^α · L_adv^(1−α)."""

    def objective(self, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        l_ibp, l_adv = margin_ce(inp.z_lb, inp.y), margin_ce(inp.z_adv, inp.y)
        return l_ibp**self.alpha * l_adv ** (1 - self.alpha), {"ibp": l_ibp, "adv": l_adv}


class SABRLoss(RobustLoss):
    """SABR (Müller et al. 2023): IBP over the box of radius λε centred at
    clamp(x_adv, x − ε + λε, x + ε − λε), intersected with [0, 1]; with a teacher, + β R(1) on
    the small box's feature bounds (SABR-Dist, appendix E.3)."""

    def __init__(
        self, lam: float, attack: PGD | None = None, teacher=None, beta=None, distill_layer: str = "features"
    ) -> None:
        super().__init__(attack, teacher, beta, distill_layer)
        if not 0.0 < lam <= 1.0:
            raise ValueError(f"lam must lie in (0, 1], got {lam}")
        self.lam = float(lam)

    def box(self, x: Tensor, x_adv: Tensor, eps: float | Tensor) -> tuple[Tensor, Tensor]:
        eps_t = _eps_tensor(eps, x)
        small = self.lam * eps_t
        centre = torch.minimum(torch.maximum(x_adv, x - eps_t + small), x + eps_t - small)
        return (centre - small).clamp(0, 1), (centre + small).clamp(0, 1)

    def objective(self, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        loss = margin_ce(inp.z_lb, inp.y)
        return loss, {"sabr": loss}


class CCDistLoss(CCIBPLoss):
    """CC-Dist (equation 9): CC-IBP(α) + β·R(α) with the same α; β defaults to 5/w.

    Args:
        teacher: a PGD-trained :class:`CertifiedNet` of the student's feature width (frozen,
            eval mode; its clean features h_t(x) are the distillation target).
        alpha: the convex-combination coefficient of CC-IBP and of R.
        beta: distillation weight (default 5/w, w the feature width).
        attack: the training attack (default: one step of 10ε from a uniform start).
        distill_layer: ``"features"`` (the paper's default) or ``"penultimate"``: R(α) on the input
            of the penultimate affine layer, β then 2/w with w that input's width (appendix E.9).
    """

    def __init__(
        self,
        teacher: nn.Module,
        alpha: float,
        beta: float | None = None,
        attack: PGD | None = None,
        distill_layer: str = "features",
    ):
        if teacher is None:
            raise ValueError(f"{type(self).__name__} needs a teacher")
        super().__init__(alpha, attack, teacher, beta, distill_layer)


class CCDist0Loss(CCDistLoss):
    """CC-IBP(α) + β·R(0): distils the adversarial features only (appendix E.2)."""

    distill_alpha = 0.0


class CCDist1Loss(CCDistLoss):
    """CC-IBP(α) + β·R(1): distils the IBP feature bounds only (appendix E.2)."""

    distill_alpha = 1.0


class LogitDistLoss(CCDistLoss):
    """CC-IBP(α) + T²β·KL(softmax(−z_t/T) ‖ softmax(−z_cc/T)) (equation 14; T = 20, β = 10⁴/w).

    The teacher's logit differences z_t are taken on the clean input. Softmax is invariant to
    the shift between logits and −z, so this is Hinton et al.'s distillation on logits.
    """

    beta_per_width = 1e4

    def __init__(
        self, teacher, alpha: float, beta: float | None = None, attack=None, temperature: float = 20.0
    ):
        super().__init__(teacher, alpha, beta, attack)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def distillation(self, inp: LossInputs) -> Tensor:
        t = self.temperature
        z_cc = cc_combination(inp.z_adv, inp.z_lb, self.alpha)
        z_t = logit_differences(inp.logits_t, inp.y)
        kl = F.kl_div(
            F.log_softmax(-z_cc / t, 1), F.log_softmax(-z_t / t, 1), reduction="batchmean", log_target=True
        )
        return t * t * kl


# --------------------------------------------------------------------------------------------
# CROWN-IBP and IBP-R (issue 16): schedules on the ε ramp
# --------------------------------------------------------------------------------------------


def ramp_progress(eps: float | Tensor, eps_target: float | None) -> float:
    """How far the ε ramp is, ε/ε_target clipped to [0, 1] (1 without a target). A per-example ε
    counts by its mean (the schedules below weigh whole batches)."""
    if eps_target is None:
        return 1.0
    if eps_target <= 0:
        raise ValueError(f"eps_target must be > 0, got {eps_target}")
    value = float(eps.float().mean()) if isinstance(eps, Tensor) else float(eps)
    return min(max(value / eps_target, 0.0), 1.0)


def _linear(start: float, end: float, progress: float) -> float:
    return start + (end - start) * progress


def _clean_logits(model: CertifiedNet, x: Tensor) -> Tensor:
    """The network's logits on ``x`` in its current mode, differentiable, without moving a train-mode
    BatchNorm's running statistics (the training pass already moved them once this step): the
    forward pass runs on copies of the buffers."""
    state: dict[str, Tensor] = dict(model.named_parameters())
    state.update({name: buf.clone() for name, buf in model.named_buffers()})
    return torch.func.functional_call(model, state, (x,))


class CrownIBPLoss(RobustLoss):
    """CROWN-IBP training (Zhang et al. 2020, "Towards stable and efficient training of verifiably
    robust neural networks", ICLR): CE(−z, y) on the mixed margin lower bound

        z = b·z_CROWN-IBP + (1 − b)·z_IBP,   loss = κ·CE(f(x), y) + (1 − κ)·CE(−z, y),

    where z_CROWN-IBP is one CROWN back-substitution from the output with the IBP pre-activation
    bounds of the same pass (:mod:`ccdist_plugin.crown_ibp`, native, differentiable; train-mode
    BatchNorm uses the clean batch's statistics for both bounds) and z_IBP the IBP bound with
    last-layer elision. Both weights move linearly with the ε ramp, s = ε_t/ε_target:
    b = crown_start → crown_end (1 → 0: CROWN-IBP bounds early, pure IBP at the target ε, as in
    auto_LiRPA's training examples, which weigh the CROWN-IBP bound by (ε_max − ε_t)/ε_max) and
    κ = kappa_start → kappa_end (0 → 0 by default, as in those examples; the paper also reports
    κ = 1 → 0). While b = 0 the back-substitution is skipped. No attack is run. With a teacher,
    β·R(1) on the IBP feature bounds is added (as for MTL-IBP-Dist, appendix E.3).

    Args:
        eps_target: the target ε of the ramp (the trainer passes the config's ``eps``).
        crown_start, crown_end, kappa_start, kappa_end: the schedules above, each in [0, 1].
        teacher, beta, distill_layer: distillation (see :class:`CCDistLoss`).
    """

    name: ClassVar[str] = "crown_ibp"
    label: ClassVar[str] = "CROWN-IBP"
    teacher_use: ClassVar[str] = "optional"
    config_keys: ClassVar[tuple[str, ...]] = ("beta", "distill_layer")
    option_keys: ClassVar[tuple[str, ...]] = ("crown_start", "crown_end", "kappa_start", "kappa_end")
    #: takes ``eps_target``, the training run's ε (the trainer passes it)
    ramp_target: ClassVar[bool] = True

    needs_attack = False
    keeps_ibp_record = True
    distill_alpha = 1.0

    def __init__(
        self,
        eps_target: float,
        crown_start: float = 1.0,
        crown_end: float = 0.0,
        kappa_start: float = 0.0,
        kappa_end: float = 0.0,
        teacher: nn.Module | None = None,
        beta: float | None = None,
        distill_layer: str = "features",
    ) -> None:
        super().__init__(None, teacher, beta, distill_layer)
        ramp_progress(0.0, eps_target)  # validates
        self.eps_target = float(eps_target)
        for key, value in (
            ("crown_start", crown_start),
            ("crown_end", crown_end),
            ("kappa_start", kappa_start),
            ("kappa_end", kappa_end),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key} must lie in [0, 1], got {value}")
        self.crown_start, self.crown_end = float(crown_start), float(crown_end)
        self.kappa_start, self.kappa_end = float(kappa_start), float(kappa_end)

    def weights(self, eps: float | Tensor) -> tuple[float, float]:
        """(b, κ) at radius ``eps``."""
        s = ramp_progress(eps, self.eps_target)
        return _linear(self.crown_start, self.crown_end, s), _linear(self.kappa_start, self.kappa_end, s)

    def objective(self, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        from ccdist_plugin.crown_ibp import crown_ibp_from_propagation

        b, kappa = self.weights(inp.eps)
        z = inp.z_lb
        terms: dict[str, Tensor] = {"ibp": margin_ce(inp.z_lb, inp.y)}
        if b > 1e-5:  # no back-substitution once the schedule has reached pure IBP
            model = inp.model
            z_crown = crown_ibp_from_propagation(
                flat_layers(model.features), model.head, inp.y, inp.input_lb, inp.input_ub, inp.ibp_record
            )
            z = b * z_crown + (1 - b) * inp.z_lb
            terms["crown_ibp"] = margin_ce(z_crown, inp.y)
        robust = margin_ce(z, inp.y)
        terms["robust"] = robust
        if kappa > 0:
            clean = F.cross_entropy(inp.logits_adv, inp.y)  # no attack: logits_adv are the clean logits
            terms["clean"] = clean
            return kappa * clean + (1 - kappa) * robust, terms
        return robust, terms


class IBPRLoss(RobustLoss):
    """IBP-R (De Palma et al. 2022, "IBP regularization for verified adversarial robustness via
    branch-and-bound", ICML 2022 Workshop on Formal Verification of Machine Learning,
    arXiv:2206.14772; the authors' code: github.com/alessandrodepalma/ibpr):

        loss = (1 − κ)·CE(f(x), y) + κ·[CE(f(x_adv), y) + ρ·(1/L) Σ_l Σ_i [−l_i]₊ [u_i]₊],

    an attack on the enlarged ball of radius λε (``attack.eps_factor`` = λ) plus a penalty on the
    area of the triangle (Planet) relaxation of every unstable ReLU, with the IBP bounds (l, u)
    computed over that same enlarged ball ∩ [0, 1]; averaged over the L bounded layers (every
    activation's input and, as in the authors' code, the logits) and over the batch. κ ramps 0 → 1
    with ε (s = ε_t/ε_target, the authors ramp both together linearly); the clean term runs the
    network on x without moving the BatchNorm running statistics.

    Settings and their source: the formulation (enlarged-ball attack, Planet-area regularizer over
    IBP bounds, the natural-loss mix) is the paper's; the per-layer averaging, the inclusion of the
    logit bounds and the optional masking of points the clean network misclassifies
    (``mask_incorrect``, the code's ``--relu_stable_ub_mask``) follow the authors' code; the
    defaults are their CIFAR-10 2/255 command (``--start_eps_factor 2.1 --train_att_n_steps 8
    --train_att_step_size 0.25 --relu_stable 1e-4``; 8/255: λ = 1.7, ρ = 5e-3 with the mask).

    With a teacher, β·R(0) is added (IBP-R-Dist, appendix E.3 of the CC-Dist paper; β = 5/w).

    Args:
        eps_target: the target ε of the ramp (None: κ = 1 throughout).
        attack: the attack on the enlarged ball (default 8 steps of 0.25·2.1ε on 2.1ε).
        reg_weight: ρ.
        mask_incorrect: regularize only points the clean network classifies correctly.
    """

    name: ClassVar[str] = "ibp_r"
    label: ClassVar[str] = "IBP-R"
    teacher_use: ClassVar[str] = "optional"
    config_keys: ClassVar[tuple[str, ...]] = ("attack", "beta", "distill_layer")
    option_keys: ClassVar[tuple[str, ...]] = ("reg_weight", "mask_incorrect")
    ramp_target: ClassVar[bool] = True

    distill_alpha = 0.0

    def __init__(
        self,
        eps_target: float | None = None,
        attack: PGD | None = None,
        reg_weight: float = 1e-4,
        mask_incorrect: bool = False,
        teacher: nn.Module | None = None,
        beta: float | None = None,
        distill_layer: str = "features",
    ) -> None:
        if attack is None:
            attack = PGD(steps=8, step_size=0.25, eps_factor=2.1)
        super().__init__(attack, teacher, beta, distill_layer)
        ramp_progress(0.0, eps_target)  # validates
        if reg_weight < 0:
            raise ValueError(f"reg_weight must be >= 0, got {reg_weight}")
        self.eps_target = None if eps_target is None else float(eps_target)
        self.reg_weight = float(reg_weight)
        self.mask_incorrect = bool(mask_incorrect)

    def box(self, x: Tensor, x_adv: Tensor, eps: float | Tensor) -> tuple[Tensor, Tensor]:
        # the regularizer's IBP bounds are over the attack's enlarged ball, as the authors compute them
        radius = _eps_tensor(eps, x) * self.attack.eps_factor
        return (x - radius).clamp(0.0, 1.0), (x + radius).clamp(0.0, 1.0)

    def objective(self, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        kappa = ramp_progress(inp.eps, self.eps_target)
        model = inp.model
        centre, radius = (inp.h_ub + inp.h_lb) / 2, (inp.h_ub - inp.h_lb) / 2
        logit_centre = model.head(centre)
        logit_radius = F.linear(radius, model.head.weight.abs())
        bounded = list(inp.preact_bounds) + [(logit_centre - logit_radius, logit_centre + logit_radius)]
        areas = torch.stack([(F.relu(-lo) * F.relu(hi)).flatten(1).sum(1) for lo, hi in bounded])
        per_example = areas.mean(0)
        clean_logits = None
        if kappa < 1:
            clean_logits = _clean_logits(model, inp.x)
        if self.mask_incorrect:
            with torch.no_grad():
                logits = clean_logits if clean_logits is not None else _clean_logits(model, inp.x)
                correct = (logits.argmax(1) == inp.y).to(per_example.dtype)
            per_example = per_example * correct
        area = per_example.mean()
        adv = F.cross_entropy(inp.logits_adv, inp.y)
        terms = {"adv": adv, "relu_area": area}
        loss = kappa * (adv + self.reg_weight * area)
        if clean_logits is not None:
            clean = F.cross_entropy(clean_logits, inp.y)
            terms["clean"] = clean
            loss = loss + (1 - kappa) * clean
        return loss, terms


class IBPRDistLoss(IBPRLoss):
    """IBP-R-Dist (appendix E.3): IBP-R + β·R(0), the distance between the student's features on
    the (enlarged-ball) adversarial input and the teacher's clean features; β = 5/w."""

    name: ClassVar[str] = "ibp_r_dist"
    label: ClassVar[str] = "IBP-R-Dist"
    teacher_use: ClassVar[str] = "required"

    def __init__(
        self,
        teacher: nn.Module,
        eps_target: float | None = None,
        attack: PGD | None = None,
        reg_weight: float = 1e-4,
        mask_incorrect: bool = False,
        beta: float | None = None,
        distill_layer: str = "features",
    ) -> None:
        if teacher is None:
            raise ValueError(f"{type(self).__name__} needs a teacher")
        super().__init__(eps_target, attack, reg_weight, mask_incorrect, teacher, beta, distill_layer)


_LOSSES: dict[str, type[RobustLoss]] = {
    "ce": CrossEntropyLoss,
    "ibp": IBPLoss,
    "pgd_at": AdversarialLoss,
    "cc_ibp": CCIBPLoss,
    "mtl_ibp": MTLIBPLoss,
    "exp_ibp": ExpIBPLoss,
    "sabr": SABRLoss,
    "cc_dist": CCDistLoss,
    "cc_dist0": CCDist0Loss,
    "cc_dist1": CCDist1Loss,
    "logit_dist": LogitDistLoss,
    # issue 16
    "crown_ibp": CrownIBPLoss,
    "ibp_r": IBPRLoss,
    "ibp_r_dist": IBPRDistLoss,
}


def list_losses() -> list[str]:
    """Names accepted by :func:`make_loss`."""
    return sorted(_LOSSES)


def make_loss(name: str, **kwargs) -> RobustLoss:
    """Build a loss by name with its constructor's keyword arguments, e.g.
    ``make_loss("cc_dist", teacher=t, alpha=0.01)``. An argument the loss does not take is a
    ``ValueError`` naming it and the accepted ones."""
    import inspect

    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(list_losses())}")
    cls = _LOSSES[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"loss {name!r} takes {accepted}, not {unknown}")
    return cls(**kwargs)

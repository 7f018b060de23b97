"""Losses that follow a schedule on the ε ramp: CROWN-IBP (Zhang et al. 2020), IBP-R and IBP-R-Dist
(De Palma et al. 2022)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccdist_plugin.attacks import PGD
from ccdist_plugin.losses.base import RobustLoss
from ccdist_plugin.losses.inputs import LossInputs, LossOutput
from ccdist_plugin.losses.terms import margin_ce, ramp_progress
from ccdist_plugin.models import CertifiedNet
from ccdist_plugin.validate import eps_tensor


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
    bounds of the same pass (:mod:`ccdist_plugin.bounds.crown_ibp`, native, differentiable; train-mode
    BatchNorm uses the clean batch's statistics for both bounds; for a network that back-substitution
    cannot take, e.g. tanh or a wrapped model, auto_LiRPA's CROWN-IBP with the same BatchNorm
    semantics, :func:`ccdist_plugin.bounds.lirpa.lirpa_margin_bounds`) and z_IBP the IBP bound with
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
    distill_alpha = 1.0

    def __init__(
        self,
        eps_target: float | None = None,
        crown_start: float = 1.0,
        crown_end: float = 0.0,
        kappa_start: float = 0.0,
        kappa_end: float = 0.0,
        teacher: nn.Module | None = None,
        beta: float | None = None,
        distill_layer: str = "features",
    ) -> None:
        super().__init__(None, teacher, beta, distill_layer)
        if eps_target is None:
            raise ValueError("crown_ibp needs eps_target, the target ε of the ramp (the trainer passes eps)")
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

    def keeps_ibp_record(self, model: CertifiedNet) -> bool:
        """The native back-substitution needs the record; a network it cannot take goes to auto_LiRPA."""
        from ccdist_plugin.bounds.crown_ibp import crown_ibp_unsupported_layer

        return crown_ibp_unsupported_layer(model.features) is None

    def __call__(
        self, model: CertifiedNet, x: Tensor, y: Tensor, eps: float | Tensor, x_adv: Tensor | None = None
    ) -> LossOutput:
        from ccdist_plugin.bounds.crown_ibp import check_crown_ibp_layers
        from ccdist_plugin.bounds.lirpa import import_auto_lirpa, lirpa_bounded_module

        # a layer the native back-substitution cannot take goes to auto_LiRPA; without auto_LiRPA,
        # one error naming the layer, before any work
        if isinstance(model, CertifiedNet) and not self.keeps_ibp_record(model):
            try:
                import_auto_lirpa()
            except ImportError:
                check_crown_ibp_layers(model.features)
            # Trace (or fetch the cached trace) before this step's passes: auto_LiRPA's tracing bumps
            # the parameters' version counters (seen at 9d100ec), which would invalidate the autograd
            # graph of a pass run before it.
            lirpa_bounded_module(model, x)
        return super().__call__(model, x, y, eps, x_adv)

    def weights(self, eps: float | Tensor) -> tuple[float, float]:
        """(b, κ) at radius ``eps``."""
        s = ramp_progress(eps, self.eps_target)
        return _linear(self.crown_start, self.crown_end, s), _linear(self.kappa_start, self.kappa_end, s)

    def objective(self, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        from ccdist_plugin.bounds.crown_ibp import crown_ibp_from_propagation
        from ccdist_plugin.bounds.lirpa import lirpa_margin_bounds

        b, kappa = self.weights(inp.eps)
        z = inp.z_lb
        terms: dict[str, Tensor] = {"ibp": margin_ce(inp.z_lb, inp.y)}
        if b > 1e-5:  # no back-substitution once the schedule has reached pure IBP
            model = inp.model
            if inp.ibp_record is not None:  # kept exactly when the native back-substitution applies
                z_crown = crown_ibp_from_propagation(
                    model.features, model.head, inp.y, inp.input_lb, inp.input_ub, inp.ibp_record
                )
            else:  # tanh, or layers only auto_LiRPA reads: its CROWN-IBP (a second pass, its own IBP)
                z_crown = lirpa_margin_bounds(model, inp.input_lb, inp.input_ub, inp.y, inp.x_adv)
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

    Settings and their source: the paper (abstract and method) gives the scheme, an attack on an
    enlarged domain plus an inexpensive IBP-based regularizer of the gap between the verification
    problem and its relaxation; the exact terms follow the authors' training code: the Planet-area
    form [−l]₊[u]₊ over the IBP bounds of the enlarged ball, averaged over the bounded layers (every
    activation's input and the logits) and the batch, the κ mix with the clean loss, and the optional
    masking of points the clean network misclassifies (``mask_incorrect``, ``--relu_stable_ub_mask``).
    The defaults are the authors' CIFAR-10 2/255 command (``--start_eps_factor 2.1
    --train_att_n_steps 8 --train_att_step_size 0.25 --relu_stable 1e-4``; for 8/255 they use
    λ = 1.7, ρ = 5e-3 with the mask). Their schedules are linear in the epoch; here κ follows the
    run's ε schedule.

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
        radius = eps_tensor(eps, x) * self.attack.eps_factor
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

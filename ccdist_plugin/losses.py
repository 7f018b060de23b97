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
=====================  ======================================================================

MTL-IBP and SABR accept a teacher too: they then add β R(1) (appendix E.3, MTL-IBP-Dist and
SABR-Dist; for SABR the bounds are the small box's).

Every loss class describes itself (:class:`RobustLoss` class attributes ``name``, ``label``,
``teacher_use``, ``config_keys``, ``option_keys``) and is registered in one table: the trainer builds
it from a :class:`~ccdist_plugin.config.LossConfig` with :meth:`RobustLoss.from_config`, reports take
its ``label``. Adding a loss: subclass :class:`RobustLoss`, set those attributes, write
``objective(inp) -> (loss, terms)`` and decorate it with :func:`register_loss`; see ``docs/losses.md``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccdist_plugin.attacks import PGD
from ccdist_plugin.bounds import elided_margin_lower_bound, input_box, propagate_intervals
from ccdist_plugin.models import CertifiedNet, check_compatible
from ccdist_plugin.validate import check_batch, check_model, eps_tensor

if TYPE_CHECKING:
    from ccdist_plugin.config import LossConfig

__all__ = [
    "LossInputs",
    "LossStats",
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
    "make_loss",
    "list_losses",
    "loss_class",
    "register_loss",
    "freeze_teacher",
    "TEACHER_USES",
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
) -> LossInputs:
    """Attack, then one pass for the adversarial output and the IBP bounds, then the teacher.

    Args:
        attack: the PGD run in eval mode (None: no attack, x_adv = x).
        need_bounds: compute IBP feature and margin bounds over the ball (or over ``box``).
        box: bounds over this (lower, upper) box instead of the ε-ball (SABR's small box); it must
            satisfy lower <= upper (not re-checked: that would cost a device sync per training step).
        x_adv: a precomputed adversarial batch (skips the attack).
    """
    check_batch(model, x, y, eps, values=False)  # per training step: shapes only, no device sync
    if x_adv is None:
        x_adv = attack(model, x, y, eps) if attack is not None else x
    if need_bounds:
        lo, hi = box if box is not None else input_box(x, eps)
        prop = propagate_intervals(
            model.features, lo, hi, reference=x_adv, update_running_stats=True, check=False
        )
        h_adv, h_lb, h_ub, preact = prop.value, prop.lower, prop.upper, prop.preact_bounds
        z_lb = elided_margin_lower_bound(model.head, h_lb, h_ub, y)
    else:
        lo = hi = h_lb = h_ub = z_lb = None
        preact = []
        h_adv = model.features(x_adv)
    logits_adv = model.head(h_adv)
    h_t = logits_t = None
    if teacher is not None:
        with torch.no_grad():
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
    )


# --------------------------------------------------------------------------------------------
# Loss objects
# --------------------------------------------------------------------------------------------


#: how a loss uses a teacher: never, when given (adds β·R), or always (distillation losses)
TEACHER_USES = ("none", "optional", "required")
#: the LossConfig fields a loss may take (``config_keys``); ``options`` holds the rest (``option_keys``)
LOSS_CONFIG_FIELDS = ("alpha", "beta", "attack")
_UNSET = object()


def freeze_teacher(teacher: nn.Module) -> CertifiedNet:
    """The teacher in eval mode with gradients off: its features are read, never trained."""
    teacher = check_model(teacher, "teacher")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class RobustLoss:
    """Base class: computes :class:`LossInputs` once, lets the subclass combine them, and adds
    the distillation term β·R(distill_alpha) when a teacher is given.

    Subclasses set ``needs_bounds``/``needs_attack``, implement :meth:`objective` and describe
    themselves with the class attributes below; their constructor takes exactly the keyword
    arguments :meth:`arguments` lists (a test checks this for every registered loss).
    """

    #: registry key (``loss.method``), e.g. ``"cc_dist"``
    name: ClassVar[str] = ""
    #: label in reports and tables, e.g. ``"CC-Dist"``
    label: ClassVar[str] = ""
    #: ``"none"``, ``"optional"`` (a teacher adds β·R) or ``"required"`` (:data:`TEACHER_USES`)
    teacher_use: ClassVar[str] = "optional"
    #: the :class:`~ccdist_plugin.config.LossConfig` fields the loss takes (of :data:`LOSS_CONFIG_FIELDS`)
    config_keys: ClassVar[tuple[str, ...]] = ("beta", "attack")
    #: the keys of ``loss.options`` it takes (further constructor arguments), and those it needs
    option_keys: ClassVar[tuple[str, ...]] = ()
    required_options: ClassVar[tuple[str, ...]] = ()
    #: LossConfig values the loss implies without taking them (``ibp`` is CC-IBP at α = 1): a config
    #: may state them
    fixed_config: ClassVar[dict[str, Any]] = {}

    needs_bounds: bool = True
    needs_attack: bool = True
    #: α of the distillation term R(α) when a teacher is given; None means "the loss's α".
    distill_alpha: float | None = 1.0
    #: default β as a multiple of 1/w.
    beta_per_width: float = 5.0

    def __init__(
        self, attack: PGD | None = None, teacher: nn.Module | None = None, beta: float | None = None
    ) -> None:
        self.attack = attack if attack is not None else PGD(steps=1, step_size=10.0)
        self.teacher = None if teacher is None else freeze_teacher(teacher)  # frozen here, once
        if beta is not None and beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = beta
        self._checked_student: weakref.ref | None = None  # the student the teacher was checked against

    # ------------------------------------------------------------------ self-description
    @classmethod
    def arguments(cls) -> tuple[str, ...]:
        """The constructor's keyword arguments: ``config_keys``, ``option_keys`` and ``teacher``
        unless ``teacher_use`` is ``"none"``."""
        teacher = () if cls.teacher_use == "none" else ("teacher",)
        return (*cls.config_keys, *cls.option_keys, *teacher)

    @classmethod
    def config_arguments(cls, config: LossConfig, with_teacher: bool = False) -> dict[str, Any]:
        """Constructor arguments from a :class:`~ccdist_plugin.config.LossConfig` (teacher excluded).

        A field in ``config_keys`` is passed (β only when set); a field the loss does not take must
        hold LossConfig's default (or the value the loss fixes, ``fixed_config``), else it is a
        ``ValueError`` naming it. Values are compared, not whether they were written: a run's saved
        config.yaml holds every field and must build the same loss as the command that wrote it, so
        a value set to its default is accepted. β set without a teacher weighs nothing: an error too.
        """
        from ccdist_plugin.config import LossConfig

        default = LossConfig()
        kwargs: dict[str, Any] = {}
        for key in LOSS_CONFIG_FIELDS:
            value = getattr(config, key)
            if key in cls.config_keys:
                if key == "beta" and value is not None and not with_teacher:
                    raise ValueError(
                        f"loss.beta={value} weighs the distillation term, but loss {cls.name!r} has no "
                        "teacher; give a teacher or unset loss.beta"
                    )
                if key == "attack":
                    value = value.build()
                if value is not None:
                    kwargs[key] = value
            elif value != getattr(default, key) and cls.fixed_config.get(key, _UNSET) != value:
                shown = value if key != "attack" else "{...}"
                raise ValueError(
                    f"loss.{key}={shown} is not used by loss {cls.name!r} (it takes "
                    f"{', '.join('loss.' + k for k in cls.config_keys) or 'none of alpha, beta, attack'}); "
                    f"remove it or set it back to its default ({getattr(default, key)})"
                )
        unknown = sorted(set(config.options) - set(cls.option_keys))
        if unknown:
            accepted = ", ".join(cls.option_keys) or "none"
            raise ValueError(
                f"loss.options {unknown} are not taken by loss {cls.name!r} (its options: {accepted})"
            )
        missing = [k for k in cls.required_options if k not in config.options]
        if missing:
            raise ValueError(
                f"loss {cls.name!r} needs {', '.join(missing)}: set it with loss.options "
                f"(e.g. --set loss.options.{missing[0]}=...)"
            )
        kwargs.update(config.options)
        return kwargs

    @classmethod
    def from_config(cls, config: LossConfig, teacher: nn.Module | None = None) -> RobustLoss:
        """The loss a :class:`~ccdist_plugin.config.LossConfig` describes (see :meth:`config_arguments`),
        distilling from ``teacher`` when given. A teacher the loss cannot use, or a missing one it
        needs, is a ``ValueError``."""
        if teacher is None and cls.teacher_use == "required":
            raise ValueError(
                f"loss.method {cls.name!r} distils from a teacher: pass teacher= to Trainer, --teacher CKPT "
                "to `ccdist train`, or set teacher.checkpoint"
            )
        if teacher is not None and cls.teacher_use == "none":
            raise ValueError(
                f"loss.method {cls.name!r} takes no teacher; drop the teacher (or teacher.checkpoint) "
                "or pick a loss that distils"
            )
        kwargs = cls.config_arguments(config, with_teacher=teacher is not None)
        if teacher is not None:
            kwargs["teacher"] = teacher
        return cls(**kwargs)

    @property
    def needs_teacher(self) -> bool:
        return self.teacher is not None

    def check_student(self, model: nn.Module) -> None:
        """``ValueError`` unless the teacher can distil onto ``model`` (``check_compatible``). Checked
        once per student: later calls with the same network return at once (no per-batch cost)."""
        if self.teacher is None:
            return
        if self._checked_student is not None and self._checked_student() is model:
            return
        check_compatible(self.teacher, model)
        self._checked_student = weakref.ref(model)

    def objective(self, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def distillation(self, inp: LossInputs) -> Tensor:
        """β-free distillation term; default: R(α′) on the features (Proposition 3.2)."""
        a = self.alpha if self.distill_alpha is None else self.distill_alpha
        lo = cc_combination(inp.h_adv, inp.h_lb, a)
        hi = cc_combination(inp.h_adv, inp.h_ub, a)
        return distillation_term(lo, hi, inp.h_t)

    def resolved_beta(self, model: CertifiedNet) -> float:
        return self.beta if self.beta is not None else self.beta_per_width / model.feature_dim

    def box(self, inp_x: Tensor, x_adv: Tensor, eps: float | Tensor) -> tuple[Tensor, Tensor] | None:
        return None

    def __call__(self, model: CertifiedNet, x: Tensor, y: Tensor, eps: float | Tensor) -> LossOutput:
        check_batch(model, x, y, eps, values=False)  # shapes and ε: no device sync per step
        self.check_student(model)
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
        )
        loss, terms = self.objective(inp)
        if self.teacher is not None:
            r = self.distillation(inp)
            terms["distill"] = r
            loss = loss + self.resolved_beta(model) * r
        terms = {k: v.detach() for k, v in terms.items()}
        terms["loss"] = loss.detach()
        stats = LossStats(inp.preact_bounds, inp.input_lb, inp.input_ub, inp.logits_adv.detach())
        return LossOutput(loss=loss, terms=terms, stats=stats)

    def __repr__(self) -> str:
        fields = {k: v for k, v in vars(self).items() if k not in ("teacher", "_checked_student")}
        fields["teacher"] = None if self.teacher is None else "CertifiedNet"
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return float(alpha)


class CrossEntropyLoss(RobustLoss):
    """Clean cross-entropy (the warm-up epoch). ``eps`` is ignored."""

    name = "ce"
    label = "standard"
    teacher_use = "none"
    config_keys = ()

    needs_bounds = False
    needs_attack = False

    def __init__(self) -> None:
        super().__init__()

    def objective(self, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        ce = F.cross_entropy(inp.logits_adv, inp.y)
        return ce, {"ce": ce}


class CCIBPLoss(RobustLoss):
    """CC-IBP: CE(−[(1−α) z(x_adv) + α z_lb], y) (De Palma et al. 2024b; section 3.1)."""

    name = "cc_ibp"
    label = "CC-IBP"
    teacher_use = "optional"
    config_keys = ("alpha", "beta", "attack")

    distill_alpha = None

    def __init__(self, alpha: float, attack: PGD | None = None, teacher=None, beta=None) -> None:
        super().__init__(attack, teacher, beta)
        self.alpha = _check_alpha(alpha)

    def objective(self, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        loss = margin_ce(cc_combination(inp.z_adv, inp.z_lb, self.alpha), inp.y)
        return loss, {"cc_ibp": loss}


class IBPLoss(CCIBPLoss):
    """IBP training (Gowal et al. 2018): CC-IBP with α = 1; no attack is run."""

    name = "ibp"
    label = "IBP"
    teacher_use = "none"
    config_keys = ()
    fixed_config = {"alpha": 1.0}

    needs_attack = False

    def __init__(self) -> None:
        super().__init__(alpha=1.0)


class AdversarialLoss(CCIBPLoss):
    """PGD adversarial training: CC-IBP with α = 0; no bounds are computed. Used for teachers."""

    name = "pgd_at"
    label = "PGD teacher"
    teacher_use = "none"
    config_keys = ("attack",)
    fixed_config = {"alpha": 0.0}

    needs_bounds = False

    def __init__(self, attack: PGD | None = None) -> None:
        super().__init__(alpha=0.0, attack=attack if attack is not None else PGD(steps=10, step_size=0.25))

    def objective(self, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        loss = margin_ce(inp.z_adv, inp.y)
        return loss, {"adv": loss}


class MTLIBPLoss(RobustLoss):
    """MTL-IBP: α·CE(−z_lb) + (1−α)·CE(−z(x_adv)); with a teacher, + β R(1) (MTL-IBP-Dist)."""

    name = "mtl_ibp"
    label = "MTL-IBP"
    teacher_use = "optional"
    config_keys = ("alpha", "beta", "attack")

    def __init__(self, alpha: float, attack: PGD | None = None, teacher=None, beta=None) -> None:
        super().__init__(attack, teacher, beta)
        self.alpha = _check_alpha(alpha)

    def objective(self, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        l_ibp, l_adv = margin_ce(inp.z_lb, inp.y), margin_ce(inp.z_adv, inp.y)
        return self.alpha * l_ibp + (1 - self.alpha) * l_adv, {"ibp": l_ibp, "adv": l_adv}


class ExpIBPLoss(MTLIBPLoss):
    """Exp-IBP: L_IBP^α · L_adv^(1−α)."""

    name = "exp_ibp"
    label = "Exp-IBP"

    def objective(self, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        l_ibp, l_adv = margin_ce(inp.z_lb, inp.y), margin_ce(inp.z_adv, inp.y)
        return l_ibp**self.alpha * l_adv ** (1 - self.alpha), {"ibp": l_ibp, "adv": l_adv}


class SABRLoss(RobustLoss):
    """SABR (Müller et al. 2023): IBP over the box of radius λε centred at
    clamp(x_adv, x − ε + λε, x + ε − λε), intersected with [0, 1]; with a teacher, + β R(1) on
    the small box's feature bounds (SABR-Dist, appendix E.3)."""

    name = "sabr"
    label = "SABR"
    teacher_use = "optional"
    config_keys = ("beta", "attack")
    option_keys = ("lam",)
    required_options = ("lam",)

    def __init__(self, lam: float, attack: PGD | None = None, teacher=None, beta=None) -> None:
        super().__init__(attack, teacher, beta)
        if not 0.0 < lam <= 1.0:
            raise ValueError(f"lam must lie in (0, 1], got {lam}")
        self.lam = float(lam)

    def box(self, x: Tensor, x_adv: Tensor, eps: float | Tensor) -> tuple[Tensor, Tensor]:
        eps_t = eps_tensor(eps, x)
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
    """

    name = "cc_dist"
    label = "CC-Dist"
    teacher_use = "required"
    config_keys = ("alpha", "beta", "attack")

    def __init__(
        self, teacher: nn.Module, alpha: float, beta: float | None = None, attack: PGD | None = None
    ):
        if teacher is None:
            raise ValueError(f"{type(self).__name__} needs a teacher")
        super().__init__(alpha, attack, teacher, beta)


class CCDist0Loss(CCDistLoss):
    """CC-IBP(α) + β·R(0): distils the adversarial features only (appendix E.2)."""

    name = "cc_dist0"
    label = "CC-Dist0"

    distill_alpha = 0.0


class CCDist1Loss(CCDistLoss):
    """CC-IBP(α) + β·R(1): distils the IBP feature bounds only (appendix E.2)."""

    name = "cc_dist1"
    label = "CC-Dist1"

    distill_alpha = 1.0


class LogitDistLoss(CCDistLoss):
    """CC-IBP(α) + T²β·KL(softmax(−z_t/T) ‖ softmax(−z_cc/T)) (equation 14; T = 20, β = 10⁴/w).

    The teacher's logit differences z_t are taken on the clean input. Softmax is invariant to
    the shift between logits and −z, so this is Hinton et al.'s distillation on logits.
    """

    name = "logit_dist"
    label = "Logit-Dist"
    option_keys = ("temperature",)

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


#: the one registry of losses: ``loss.method`` name -> class (:func:`register_loss` adds to it)
_LOSSES: dict[str, type[RobustLoss]] = {}


def register_loss(cls: type[RobustLoss]) -> type[RobustLoss]:
    """Add a :class:`RobustLoss` subclass to the registry under ``cls.name`` (usable as a decorator);
    its self-description is checked here, so a malformed loss fails at import, not in a run."""
    if not (isinstance(cls, type) and issubclass(cls, RobustLoss)) or not cls.name or not cls.label:
        raise ValueError(f"{cls!r} must be a RobustLoss subclass with a name and a label")
    if cls.name in _LOSSES and _LOSSES[cls.name] is not cls:
        raise ValueError(f"loss name {cls.name!r} is already registered by {_LOSSES[cls.name].__name__}")
    if cls.teacher_use not in TEACHER_USES:
        raise ValueError(f"{cls.__name__}.teacher_use must be one of {TEACHER_USES}, got {cls.teacher_use!r}")
    bad = [k for k in cls.config_keys if k not in LOSS_CONFIG_FIELDS]
    if bad:
        raise ValueError(f"{cls.__name__}.config_keys {bad} are not LossConfig fields {LOSS_CONFIG_FIELDS}")
    _LOSSES[cls.name] = cls
    return cls


for _cls in (
    CrossEntropyLoss,
    IBPLoss,
    AdversarialLoss,
    CCIBPLoss,
    MTLIBPLoss,
    ExpIBPLoss,
    SABRLoss,
    CCDistLoss,
    CCDist0Loss,
    CCDist1Loss,
    LogitDistLoss,
):
    register_loss(_cls)


def list_losses() -> list[str]:
    """Names accepted by :func:`make_loss`."""
    return sorted(_LOSSES)


def loss_class(name: str) -> type[RobustLoss]:
    """The registered loss class called ``name`` (its ``label``, ``teacher_use``...); an unknown name
    is a ``ValueError`` suggesting the nearest one."""
    import difflib

    if name not in _LOSSES:
        close = difflib.get_close_matches(name, list(_LOSSES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown loss {name!r}{hint} (available: {', '.join(list_losses())})")
    return _LOSSES[name]


def make_loss(name: str, **kwargs) -> RobustLoss:
    """Build a loss by name with its constructor's keyword arguments, e.g.
    ``make_loss("cc_dist", teacher=t, alpha=0.01)``. An argument the loss does not take
    (:meth:`RobustLoss.arguments`) is a ``ValueError`` naming it and the accepted ones."""
    cls = loss_class(name)
    accepted = cls.arguments()
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"loss {name!r} takes {list(accepted)}, not {unknown}")
    missing = [k for k in cls.required_options if k not in kwargs]
    if missing:
        raise ValueError(f"loss {name!r} needs {', '.join(missing)}")
    return cls(**kwargs)

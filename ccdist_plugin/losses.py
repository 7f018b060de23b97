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
from ccdist_plugin.bounds import (
    IntervalPropagation,
    elided_margin_lower_bound,
    input_box,
    propagate_intervals,
)
from ccdist_plugin.latent import check_distill_layer, latent_features, propagate_split
from ccdist_plugin.models import CertifiedNet, check_compatible
from ccdist_plugin.validate import check_batch, check_labels, check_model, eps_tensor

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
    "CrownIBPLoss",
    "IBPRLoss",
    "IBPRDistLoss",
    "ramp_progress",
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
            (:func:`ccdist_plugin.latent.propagate_split`; no layer is propagated twice).
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


#: how a loss uses a teacher: never, when given (adds β·R), or always (distillation losses)
TEACHER_USES = ("none", "optional", "required")
#: the LossConfig fields a loss may take (``config_keys``); ``options`` holds the rest (``option_keys``)
LOSS_CONFIG_FIELDS = ("alpha", "beta", "attack", "distill_layer")
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
    #: the loss follows a schedule on the ε ramp and takes the run's target ε as ``eps_target``
    #: (CROWN-IBP, IBP-R); :meth:`from_config` passes it
    ramp_target: ClassVar[bool] = False

    needs_bounds: bool = True
    needs_attack: bool = True
    #: α of the distillation term R(α) when a teacher is given; None means "the loss's α".
    distill_alpha: float | None = 1.0
    #: default β as a multiple of 1/w.
    beta_per_width: float = 5.0
    #: default β as a multiple of 1/w when distilling on the earlier feature space (appendix E.9:
    #: 2/w, w the width of the penultimate affine layer's input).
    latent_beta_per_width: float = 2.0

    def __init__(
        self,
        attack: PGD | None = None,
        teacher: nn.Module | None = None,
        beta: float | None = None,
        distill_layer: str = "features",
    ) -> None:
        self.attack = attack if attack is not None else PGD(steps=1, step_size=10.0)
        self.teacher = None if teacher is None else freeze_teacher(teacher)  # frozen here, once
        if beta is not None and beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = beta
        self.distill_layer = check_distill_layer(distill_layer)
        self._checked_student: weakref.ref | None = None  # the student the teacher was checked against

    # ------------------------------------------------------------------ self-description
    @classmethod
    def arguments(cls) -> tuple[str, ...]:
        """The constructor's keyword arguments: ``config_keys``, ``option_keys``, ``teacher``
        unless ``teacher_use`` is ``"none"``, and ``eps_target`` with ``ramp_target``."""
        teacher = () if cls.teacher_use == "none" else ("teacher",)
        target = ("eps_target",) if cls.ramp_target else ()
        return (*cls.config_keys, *cls.option_keys, *teacher, *target)

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
                takes = ", ".join("loss." + k for k in cls.config_keys) or "none of " + ", ".join(
                    LOSS_CONFIG_FIELDS
                )
                raise ValueError(
                    f"loss.{key}={shown} is not used by loss {cls.name!r} (it takes {takes}); "
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
        kwargs.update(cls.option_values(config.options))
        return kwargs

    @classmethod
    def option_values(cls, options: dict[str, Any], where: str = "loss.options") -> dict[str, Any]:
        """``options`` (of ``option_keys``) read as the types the constructor's annotations give,
        as the config reads its own fields: a float option takes ``0.5``, ``1`` or ``"2/255"`` and
        must be finite, a bool option only true/false. Anything else is a ``ValueError`` naming the
        option, e.g. ``loss.options.lam expects a number``; the constructor then checks the range."""
        import math
        import typing

        from ccdist_plugin.config import convert_value

        try:
            hints = typing.get_type_hints(cls.__init__)
        except (NameError, TypeError):  # a subclass annotating with names only a type checker sees
            plain = {"float": float, "int": int, "bool": bool, "str": str}
            hints = {k: plain.get(v, v) for k, v in cls.__init__.__annotations__.items()}
        values: dict[str, Any] = {}
        for key, value in options.items():
            name = f"{where}.{key}"
            if key in hints:
                try:
                    value = convert_value(value, hints[key], name)
                except TypeError:  # a type the config reader does not know: the constructor checks it
                    pass
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"config key {name!r} must be finite, got {value}")
            values[key] = value
        return values

    @classmethod
    def from_config(
        cls, config: LossConfig, teacher: nn.Module | None = None, eps_target: float | None = None
    ) -> RobustLoss:
        """The loss a :class:`~ccdist_plugin.config.LossConfig` describes (see :meth:`config_arguments`),
        distilling from ``teacher`` when given. A teacher the loss cannot use, or a missing one it
        needs, is a ``ValueError``. ``eps_target`` (the run's ε) reaches losses with ``ramp_target``."""
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
        if cls.ramp_target and eps_target is not None:
            kwargs["eps_target"] = eps_target
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

    def keeps_ibp_record(self, model: CertifiedNet) -> bool:
        """Whether the IBP pass keeps its per-layer record in ``LossInputs.ibp_record`` for ``model``
        (CROWN-IBP's native back-substitution needs it)."""
        return False

    def __call__(self, model: CertifiedNet, x: Tensor, y: Tensor, eps: float | Tensor) -> LossOutput:
        """The loss on the batch ``(x, y)`` at radius ``eps``. Shapes and ε are checked, and labels
        held on the CPU must lie in [0, num_classes) (a ``ValueError`` naming them, as ``certify``
        says); on an accelerator that range is left to the caller (``Trainer.fit`` checks its
        data), since reading it back would cost a device synchronization every step."""
        net = check_batch(model, x, y, eps, values=False)  # shapes and ε: no device sync per step
        if y.device.type == "cpu":  # labels on the host: their range costs no device synchronization
            check_labels(x, y, net.num_classes)
        self.check_student(model)
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
            keep_all=self.keeps_ibp_record(model),
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


class _AlphaLoss(RobustLoss):
    """A loss with a mixing coefficient α ∈ [0, 1] (CC-IBP, MTL-IBP and their descendants)."""

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


class CCIBPLoss(_AlphaLoss):
    """CC-IBP: CE(−[(1−α) z(x_adv) + α z_lb], y) (De Palma et al. 2024b; section 3.1)."""

    name = "cc_ibp"
    label = "CC-IBP"
    teacher_use = "optional"
    config_keys = ("alpha", "beta", "attack", "distill_layer")

    distill_alpha = None

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


class MTLIBPLoss(_AlphaLoss):
    """MTL-IBP: α·CE(−z_lb) + (1−α)·CE(−z(x_adv)); with a teacher, + β R(1) (MTL-IBP-Dist)."""

    name = "mtl_ibp"
    label = "MTL-IBP"
    teacher_use = "optional"
    config_keys = ("alpha", "beta", "attack", "distill_layer")

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
    config_keys = ("beta", "attack", "distill_layer")
    option_keys = ("lam",)
    required_options = ("lam",)

    def __init__(
        self, lam: float, attack: PGD | None = None, teacher=None, beta=None, distill_layer: str = "features"
    ) -> None:
        super().__init__(attack, teacher, beta, distill_layer)
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
        distill_layer: ``"features"`` (the paper's default) or ``"penultimate"``: R(α) on the input
            of the penultimate affine layer, β then 2/w with w that input's width (appendix E.9).
    """

    name = "cc_dist"
    label = "CC-Dist"
    teacher_use = "required"
    config_keys = ("alpha", "beta", "attack", "distill_layer")

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
    config_keys = ("alpha", "beta", "attack")  # distils logits: no distill_layer
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
    BatchNorm uses the clean batch's statistics for both bounds; for a network that back-substitution
    cannot take, e.g. tanh or a wrapped model, auto_LiRPA's CROWN-IBP with the same BatchNorm
    semantics, :func:`ccdist_plugin.lirpa.lirpa_margin_bounds`) and z_IBP the IBP bound with
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
        from ccdist_plugin.crown_ibp import crown_ibp_unsupported_layer

        return crown_ibp_unsupported_layer(model.features) is None

    def __call__(self, model: CertifiedNet, x: Tensor, y: Tensor, eps: float | Tensor) -> LossOutput:
        from ccdist_plugin.crown_ibp import check_crown_ibp_layers
        from ccdist_plugin.lirpa import import_auto_lirpa, lirpa_bounded_module

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
        return super().__call__(model, x, y, eps)

    def weights(self, eps: float | Tensor) -> tuple[float, float]:
        """(b, κ) at radius ``eps``."""
        s = ramp_progress(eps, self.eps_target)
        return _linear(self.crown_start, self.crown_end, s), _linear(self.kappa_start, self.kappa_end, s)

    def objective(self, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        from ccdist_plugin.crown_ibp import crown_ibp_from_propagation
        from ccdist_plugin.lirpa import lirpa_margin_bounds

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
    CrownIBPLoss,
    IBPRLoss,
    IBPRDistLoss,
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
    options = cls.option_values({k: v for k, v in kwargs.items() if k in cls.option_keys})
    return cls(**{**kwargs, **options})

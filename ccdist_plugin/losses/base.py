"""The base class of every loss, :class:`RobustLoss`: it computes :class:`LossInputs` once per batch,
lets the subclass combine them (:meth:`RobustLoss.objective`), adds the distillation term β·R when a
teacher is given, and builds itself from a :class:`~ccdist_plugin.config.LossConfig`."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from ccdist_plugin.attacks import PGD
from ccdist_plugin.bounds.penultimate import check_distill_layer
from ccdist_plugin.models import CertifiedNet, check_compatible
from ccdist_plugin.validate import check_batch, check_labels, check_model

if TYPE_CHECKING:
    from ccdist_plugin.config import LossConfig
from ccdist_plugin.losses.inputs import LossInputs, LossOutput, LossStats, loss_inputs
from ccdist_plugin.losses.terms import cc_combination, distillation_term

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

    def adversarial_batch(self, model: CertifiedNet, x: Tensor, y: Tensor, eps: float | Tensor) -> Tensor:
        """The batch the loss's train-mode pass runs on: the attack's output (x without an attack)."""
        return self.attack(model, x, y, eps) if self.needs_attack else x

    def __call__(
        self, model: CertifiedNet, x: Tensor, y: Tensor, eps: float | Tensor, x_adv: Tensor | None = None
    ) -> LossOutput:
        """The loss on the batch ``(x, y)`` at radius ``eps``; ``x_adv``: the attack's output computed
        beforehand (gradient accumulation attacks micro-batch by micro-batch; see
        :meth:`adversarial_batch`). Shapes and ε are checked, and labels held on the CPU must lie in
        [0, num_classes) (a ``ValueError`` naming them, as ``certify`` says); on an accelerator that
        range is left to the caller (``Trainer.fit`` checks its data), since reading it back would
        cost a device synchronization every step."""
        net = check_batch(model, x, y, eps, values=False)  # shapes and ε: no device sync per step
        if y.device.type == "cpu":  # labels on the host: their range costs no device synchronization
            check_labels(x, y, net.num_classes)
        self.check_student(model)
        latent = self.teacher is not None and self.distill_layer == "penultimate"
        attack = self.attack if self.needs_attack else None
        if x_adv is None:
            x_adv = self.adversarial_batch(model, x, y, eps)
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

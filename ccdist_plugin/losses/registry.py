"""The one registry of losses (``loss.method`` name → class): every loss is registered here, in one
place, and built by name with :func:`make_loss`."""

from __future__ import annotations

from ccdist_plugin.losses.base import LOSS_CONFIG_FIELDS, TEACHER_USES, RobustLoss
from ccdist_plugin.losses.distillation import CCDist0Loss, CCDist1Loss, CCDistLoss, LogitDistLoss
from ccdist_plugin.losses.expressive import (
    AdversarialLoss,
    CCIBPLoss,
    CrossEntropyLoss,
    ExpIBPLoss,
    IBPLoss,
    MTLIBPLoss,
    SABRLoss,
)
from ccdist_plugin.losses.scheduled import CrownIBPLoss, IBPRDistLoss, IBPRLoss

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

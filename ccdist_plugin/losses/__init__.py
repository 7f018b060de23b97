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
the features (appendix E.9; :mod:`ccdist_plugin.bounds.penultimate`).

Every loss class describes itself (:class:`RobustLoss` class attributes ``name``, ``label``,
``teacher_use``, ``config_keys``, ``option_keys``) and is registered in one table: the trainer builds
it from a :class:`~ccdist_plugin.config.LossConfig` with :meth:`RobustLoss.from_config`, reports take
its ``label``. Adding a loss: subclass :class:`RobustLoss`, set those attributes, write
``objective(inp) -> (loss, terms)`` and decorate it with :func:`register_loss`; see ``docs/losses.md``.


Where things are: ``terms`` (pure functions: CE on margins, convex combinations, R), ``inputs`` (the
per-batch attack + bound pass), ``base`` (:class:`RobustLoss`), ``expressive`` (CC-IBP, IBP, PGD,
MTL-IBP, Exp-IBP, SABR), ``distillation`` (CC-Dist and its variants), ``scheduled`` (CROWN-IBP, IBP-R),
``registry`` (name → class, :func:`make_loss`).
"""

from ccdist_plugin.losses.base import TEACHER_USES, RobustLoss, freeze_teacher
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
from ccdist_plugin.losses.inputs import LossInputs, LossOutput, LossStats, loss_inputs
from ccdist_plugin.losses.registry import list_losses, loss_class, make_loss, register_loss
from ccdist_plugin.losses.scheduled import CrownIBPLoss, IBPRDistLoss, IBPRLoss
from ccdist_plugin.losses.terms import cc_combination, distillation_term, margin_ce, ramp_progress

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

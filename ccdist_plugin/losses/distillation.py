"""CC-Dist (equation 9 of the paper) and its variants: CC-Dist₀, CC-Dist₁ (appendix E.2) and logit
distillation (equation 14)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ccdist_plugin.attacks import PGD
from ccdist_plugin.losses.expressive import (
    CCIBPLoss,
)
from ccdist_plugin.losses.inputs import LossInputs
from ccdist_plugin.losses.terms import cc_combination, logit_differences


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

"""The losses CC-Dist builds on: cross-entropy, CC-IBP and its end points IBP (α = 1) and PGD
adversarial training (α = 0), MTL-IBP, Exp-IBP (De Palma et al. 2024) and SABR (Müller et al. 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ccdist_plugin.attacks import PGD
from ccdist_plugin.losses.base import RobustLoss
from ccdist_plugin.losses.inputs import LossInputs
from ccdist_plugin.losses.terms import cc_combination, margin_ce
from ccdist_plugin.validate import eps_tensor


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
    """SABR (Müller et al. 2023): IBP over a box of radius λε around the adversarial example; with a
    teacher, + β R(1) on the small box's feature bounds (SABR-Dist, appendix E.3).

    The box is computed as the authors of the CC-Dist paper's training code compute it
    (expressive-losses, ``utils.py``, ``compute_sabr_perturbation``, commit 3df64fa997e2): with
    [l, u] = [x − ε, x + ε] ∩ [0, 1] the clipped ball, the centre is x_adv clamped into
    [l + λε, u − λε] (torch.clamp: where that interval is empty, λ > 1/2 near 0 or 1, the centre is
    u − λε), and the box [centre − λε, centre + λε] ∩ [0, 1]. The box thus keeps its full width
    2λε wherever the clipped ball is that wide (see :meth:`box`).
    """

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
        """SABR's small box (pixel space): the centre is clamped inside the ball already clipped to
        [0, 1], so near 0 or 1 the box keeps its radius λε instead of being cut by the clip."""
        eps_t = eps_tensor(eps, x)
        small = self.lam * eps_t
        lower, upper = (x - eps_t).clamp(0, 1), (x + eps_t).clamp(0, 1)
        # torch.clamp's order (max with the lower limit, then min with the upper), as the authors' code
        centre = torch.minimum(torch.maximum(x_adv, lower + small), upper - small)
        return (centre - small).clamp(0, 1), (centre + small).clamp(0, 1)

    def objective(self, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        loss = margin_ce(inp.z_lb, inp.y)
        return loss, {"sabr": loss}

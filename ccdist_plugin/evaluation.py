"""The paper's evaluation metrics for a trained :class:`~ccdist_plugin.models.CertifiedNet`.

All figures are fractions in [0, 1] over the same ``N`` test points, at an ℓ∞ radius ``eps`` in
pixel units (inputs in [0, 1]):

- **standard**: clean accuracy of the eval-mode network;
- **PGD**: accuracy under PGD-40 by default (:data:`PGD_STEPS` steps of :data:`PGD_STEP_REL`·ε,
  i.e. 2.5ε/40, from a uniform random start in the ball ∩ [0, 1], ``restarts`` starts, cross-entropy
  objective; a point counts as robust when it is clean-correct and no start misclassifies it);
- **AutoAttack**: accuracy under AutoAttack (Croce & Hein 2020, ``version="standard"``, ℓ∞) when an
  implementation is importable (:func:`find_autoattack`); otherwise the figure is ``None`` and the
  reason is recorded: an AutoAttack figure is never reported unless it was computed;
- **IBP / CROWN**: certified accuracy from :func:`ccdist_plugin.bounds.certify` (float64, a logit
  difference counts as proved only above ``tol``), i.e. sound certificates;
- **IBP loss**: the mean cross-entropy of −z̲ where z̲ are the IBP (+ elision) lower bounds of the
  logit differences (equation 4 of the paper; entry y is 0), float64;
- **BaB**: branch-and-bound certified accuracy: our IBP/CROWN and PGD pre-checks, then α,β-CROWN on
  the remaining points (:func:`ccdist_plugin.export.export_instances` +
  :func:`ccdist_plugin.verify.run_verification`), only when asked for (it is slow) and only counted
  when α,β-CROWN actually ran.

A certified point that an attack broke is a soundness failure: it is logged as an error and
recorded in :attr:`EvalResult.soundness_alarms` (the certified figure is then not trustworthy).
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ccdist_plugin.attacks import pgd_attack
from ccdist_plugin.batching import batch_slices
from ccdist_plugin.bounds import certify, input_box
from ccdist_plugin.models import CertifiedNet
from ccdist_plugin.validate import check_batch

__all__ = [
    "PGD_STEPS",
    "PGD_STEP_REL",
    "CERT_TOL",
    "AUTOATTACK_MODULES",
    "EvalSettings",
    "EvalResult",
    "find_autoattack",
    "autoattack_adversarial",
    "evaluate",
    "ibp_loss_from_margins",
    "predicted_class",
]

logger = logging.getLogger(__name__)

#: PGD-40 of the paper's evaluation: 40 steps of 2.5ε/40 (the step of Madry et al.'s CIFAR setup
#: scaled so that 40 steps can travel 2.5 ball radii), random start.
PGD_STEPS = 40
PGD_STEP_REL = 2.5 / 40
#: a logit difference counts as proved when its float64 lower bound exceeds this (as in export)
CERT_TOL = 1e-6
#: AutoAttack implementations tried in order: the reference package of Croce & Hein (module
#: ``autoattack``, installed from its repository), its PyPI repackaging ``pyautoattack`` (same code,
#: no dependencies), and ``torchattacks.AutoAttack`` (install with ``pip install --no-deps
#: torchattacks``: its declared torchvision dependency would replace our torch).
AUTOATTACK_MODULES = ("autoattack", "pyautoattack", "torchattacks")


@dataclass
class EvalSettings:
    """What to compute and how (recorded verbatim in ``eval.json``).

    Attributes:
        eps: ℓ∞ radius in pixel units.
        batch_size: examples per batch for every metric.
        attack: ``"pgd40"`` (PGD only), ``"autoattack"`` (PGD and AutoAttack) or ``"none"``.
        pgd_steps, pgd_step_rel, pgd_restarts: PGD steps, step as a multiple of ε, restarts.
        autoattack_version: AutoAttack's ``version`` (``"standard"``).
        methods: certification methods, a subset of ``("ibp", "crown")``.
        crown_intermediate: intermediate bounds of CROWN (``"crown"`` or ``"ibp"``).
        tol: certification tolerance (see :data:`CERT_TOL`).
        seed: seed of the attacks' random starts.
        bab: run branch-and-bound (α,β-CROWN) on the first ``bab_count`` points.
        bab_count, bab_timeout_s, bab_template: α,β-CROWN points, seconds per point, config template.
        bab_overrides: dotted α,β-CROWN keys for the generated ``abcrown.yaml``.
    """

    eps: float
    batch_size: int = 256
    attack: str = "pgd40"
    pgd_steps: int = PGD_STEPS
    pgd_step_rel: float = PGD_STEP_REL
    pgd_restarts: int = 1
    autoattack_version: str = "standard"
    methods: tuple[str, ...] = ("ibp", "crown")
    crown_intermediate: str = "crown"
    tol: float = CERT_TOL
    seed: int = 0
    bab: bool = False
    bab_count: int = 100
    bab_timeout_s: float = 600.0
    bab_template: str = "digits"
    bab_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be finite and >= 0 (pixel units), got {self.eps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.attack not in ("pgd40", "autoattack", "none"):
            raise ValueError(f"attack must be 'pgd40', 'autoattack' or 'none', got {self.attack!r}")
        if self.pgd_steps < 0 or self.pgd_restarts < 1 or self.pgd_step_rel <= 0:
            raise ValueError(
                f"PGD needs steps >= 0, restarts >= 1 and a positive step, got {self.pgd_steps}, "
                f"{self.pgd_restarts}, {self.pgd_step_rel}"
            )
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in ("ibp", "crown")]
        if bad:
            raise ValueError(f"unknown certification methods {bad}; expected 'ibp' and/or 'crown'")
        if self.crown_intermediate not in ("crown", "ibp"):
            raise ValueError(f"crown_intermediate must be 'crown' or 'ibp', got {self.crown_intermediate!r}")
        if self.bab_count < 1 or self.bab_timeout_s <= 0:
            raise ValueError(
                f"bab_count must be >= 1 and bab_timeout_s > 0, got {self.bab_count}, {self.bab_timeout_s}"
            )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["methods"] = list(self.methods)
        out["pgd_step_size"] = self.pgd_step_rel * self.eps
        return out


@dataclass
class EvalResult:
    """Figures of one evaluation (fractions in [0, 1]; ``None``: not computed).

    Attributes:
        count: number of test points N.
        metrics: ``standard_acc``, ``pgd_acc``, ``autoattack_acc``, ``ibp_cert_acc``,
            ``crown_cert_acc``, ``bab_cert_acc``, ``ibp_loss``.
        timings_s: wall-clock seconds per metric (``standard``, ``pgd``, ``autoattack``, ``ibp``,
            ``crown``, ``bab``, ``total``).
        per_example: (N,) bool lists ``correct``, ``pgd_robust``, ``aa_robust``, ``ibp_certified``,
            ``crown_certified`` (only those computed).
        autoattack: which implementation ran (``{"run": bool, "module", "version", "reason"}``).
        bab: branch-and-bound details (counts, α,β-CROWN config, per-instance times) or None.
        soundness_alarms: certified points broken by an attack (must stay empty).
    """

    count: int
    eps: float
    settings: EvalSettings
    metrics: dict[str, float | None] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    per_example: dict[str, list[bool]] = field(default_factory=dict)
    autoattack: dict[str, Any] = field(default_factory=dict)
    bab: dict[str, Any] | None = None
    soundness_alarms: list[str] = field(default_factory=list)

    @property
    def best_certified_acc(self) -> float | None:
        """The largest sound certified accuracy computed (IBP, CROWN, BaB)."""
        vals = [self.metrics.get(k) for k in ("ibp_cert_acc", "crown_cert_acc", "bab_cert_acc")]
        vals = [v for v in vals if v is not None]
        return max(vals) if vals else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "eps": self.eps,
            "settings": self.settings.to_dict(),
            "metrics": dict(self.metrics),
            "timings_s": dict(self.timings_s),
            "per_example": {k: [bool(b) for b in v] for k, v in self.per_example.items()},
            "autoattack": dict(self.autoattack),
            "bab": self.bab,
            "soundness_alarms": list(self.soundness_alarms),
        }


# --------------------------------------------------------------------------------------------
# AutoAttack
# --------------------------------------------------------------------------------------------


def find_autoattack(preferred: Sequence[str] = AUTOATTACK_MODULES) -> tuple[str, str] | None:
    """``(module name, version)`` of the first importable AutoAttack implementation, else None."""
    for name in preferred:
        try:
            module = importlib.import_module(name)
        except Exception as err:  # ImportError, or a broken dependency inside the package
            logger.debug("AutoAttack implementation %s not importable: %s", name, err)
            continue
        if getattr(module, "AutoAttack", None) is None:
            continue
        return name, str(getattr(module, "__version__", "unknown"))
    return None


def autoattack_adversarial(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    module_name: str,
    version: str = "standard",
    seed: int = 0,
    batch_size: int = 256,
) -> Tensor:
    """Adversarial inputs from AutoAttack (ℓ∞, ``version``) through the named implementation.

    The result is projected onto the ball ∩ [0, 1] (a safeguard: the implementations already
    clip), so an AutoAttack "success" is always a valid counterexample.

    Args:
        model: pixel-space network (eval mode is set by the caller).
        x: (B, C, H, W) in [0, 1]; y: (B,) labels.
        module_name: one of :data:`AUTOATTACK_MODULES`.
    """
    module = importlib.import_module(module_name)
    device = x.device
    with torch.no_grad():
        num_classes = int(model(x[:1]).shape[1])
    # the targeted attacks of the standard version use 9 target classes; fewer exist below 10 classes
    targets = min(9, num_classes - 1)
    if module_name == "torchattacks":
        attack = module.AutoAttack(
            model, norm="Linf", eps=eps, version=version, n_classes=num_classes, seed=seed
        )
        x_adv = torch.cat([attack(x[sl], y[sl]) for sl in batch_slices(len(x), batch_size)])
    elif module_name == "pyautoattack":
        attack = module.AutoAttack(model, norm="Linf", eps=eps, version=version, seed=seed, device=device)
        _limit_targets(attack, targets)
        x_adv = attack.run_standard_evaluation(x, y, batch_size=batch_size)
    else:  # the reference package
        attack = module.AutoAttack(model, norm="Linf", eps=eps, version=version, seed=seed, device=device)
        attack.verbose = False
        _limit_targets(attack, targets)
        x_adv = attack.run_standard_evaluation(x, y, bs=batch_size)
    if isinstance(x_adv, tuple):
        x_adv = x_adv[0]
    lo, hi = input_box(x, eps)
    return torch.minimum(torch.maximum(x_adv.detach().to(x.dtype), lo), hi)


def _limit_targets(attack: Any, targets: int) -> None:
    for name in ("apgd_targeted", "fab"):
        sub = getattr(attack, name, None)
        if sub is not None and getattr(sub, "n_target_classes", 0) > targets:
            sub.n_target_classes = targets


# --------------------------------------------------------------------------------------------
# The metrics
# --------------------------------------------------------------------------------------------


def ibp_loss_from_margins(margin_lb: Tensor, y: Tensor) -> Tensor:
    """Per-example CE(−z̲, y), with z̲ the (B, k) lower bounds of f_y − f_j (entry y set to 0)."""
    z = margin_lb.scatter(1, y.view(-1, 1), 0.0)
    return F.cross_entropy(-z, y, reduction="none")


def predicted_class(logits: Tensor) -> Tensor:
    """The argmax class per row, or -1 (never a label) where any logit is NaN or inf: a
    non-finite output is never a correct prediction (argmax would pick a NaN's index)."""
    return logits.argmax(1).masked_fill(~torch.isfinite(logits).all(1), -1)


def _mean(flags: Tensor) -> float:
    return float(flags.double().mean()) if flags.numel() else float("nan")


def evaluate(
    model: CertifiedNet,
    x: Tensor,
    y: Tensor,
    settings: EvalSettings,
    progress: bool = True,
    bab_dir: str | Path | None = None,
    checkpoint_path: str | Path | None = None,
    dataset_name: str | None = None,
    abcrown_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Every metric of the module docstring on the points ``x`` (N, C, H, W) in [0, 1], ``y`` (N,).

    Args:
        model: the network (put in eval mode; its training flag is restored afterwards).
        settings: an :class:`EvalSettings`.
        progress: show tqdm progress bars.
        bab_dir: export directory for α,β-CROWN (required when ``settings.bab``).
        checkpoint_path, dataset_name: provenance recorded in the export manifest.
        abcrown_dir: α,β-CROWN's ``complete_verifier`` (default ``$ABCROWN_DIR``).
        log: where one-line progress messages go (default: the module logger).
    """
    check_batch(model, x, y)  # model, shapes, label range, pixel range (ccdist_plugin.validate)
    if x.shape[0] == 0:
        raise ValueError("no test points to evaluate")
    say = log or logger.info
    s = settings
    eps = float(s.eps)
    n = x.shape[0]
    result = EvalResult(count=n, eps=eps, settings=s)
    batches = batch_slices(n, s.batch_size)
    was_training = model.training
    model.eval()
    start_all = time.perf_counter()
    gen = torch.Generator().manual_seed(s.seed)

    def bar(desc: str):
        return tqdm(batches, desc=desc, disable=not progress, leave=False, unit="batch")

    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            correct = torch.cat([predicted_class(model(x[sl])) == y[sl] for sl in bar("standard")])
        result.timings_s["standard"] = time.perf_counter() - t0
        result.per_example["correct"] = correct.tolist()
        result.metrics["standard_acc"] = _mean(correct)

        broken = torch.zeros(n, dtype=torch.bool)  # some attack found a counterexample

        def attacked(desc: str, timing: str, attack) -> torch.Tensor:
            """Robust accuracy mask under ``attack(slice) -> x_adv``, batch by batch; the points it breaks
            are recorded in ``broken`` for the soundness cross-check."""
            t0 = time.perf_counter()
            robust = []
            for sl in bar(desc):
                x_adv = attack(sl)
                model.eval()
                with torch.no_grad():
                    robust.append(predicted_class(model(x_adv)) == y[sl])
            mask = torch.cat(robust) & correct
            broken.logical_or_(correct & ~mask)
            result.timings_s[timing] = time.perf_counter() - t0
            return mask

        if s.attack != "none":
            pgd_robust = attacked(
                f"PGD-{s.pgd_steps}",
                "pgd",
                lambda sl: pgd_attack(
                    model,
                    x[sl],
                    y[sl],
                    eps,
                    steps=s.pgd_steps,
                    step_size=s.pgd_step_rel * eps,
                    random_start=True,
                    restarts=s.pgd_restarts,
                    generator=gen,
                ),
            )
            result.per_example["pgd_robust"] = pgd_robust.tolist()
            result.metrics["pgd_acc"] = _mean(pgd_robust)
        else:
            result.metrics["pgd_acc"] = None

        result.metrics["autoattack_acc"] = None
        if s.attack == "autoattack":
            found = find_autoattack()
            if found is None:
                reason = f"no AutoAttack implementation importable (tried {', '.join(AUTOATTACK_MODULES)})"
                logger.warning("AutoAttack not run: %s", reason)
                result.autoattack = {"run": False, "reason": reason}
            else:
                name, version = found
                say(f"AutoAttack ({name} {version}, version={s.autoattack_version}) ...")
                aa_robust = attacked(
                    f"AutoAttack ({name})",
                    "autoattack",
                    lambda sl: autoattack_adversarial(
                        model, x[sl], y[sl], eps, name, s.autoattack_version, s.seed, s.batch_size
                    ),
                )
                result.per_example["aa_robust"] = aa_robust.tolist()
                result.metrics["autoattack_acc"] = _mean(aa_robust)
                result.autoattack = {
                    "run": True,
                    "module": name,
                    "module_version": version,
                    "version": s.autoattack_version,
                    "norm": "Linf",
                }
        else:
            result.autoattack = {"run": False, "reason": f"not requested (--attack {s.attack})"}

        for method in ("ibp", "crown"):
            key = f"{method}_cert_acc"
            if method not in s.methods:
                result.metrics[key] = None
                continue
            t0 = time.perf_counter()
            kwargs = {"intermediate": s.crown_intermediate} if method == "crown" else {}
            certified, losses = [], []
            for sl in bar(f"{method.upper()} bounds"):
                res = certify(
                    model, x[sl], y[sl], eps, method=method, tol=s.tol, batch_size=s.batch_size, **kwargs
                )
                certified.append(res.certified.cpu())
                if method == "ibp":
                    losses.append(ibp_loss_from_margins(res.margin_lb.cpu(), y[sl].cpu()))
            cert = torch.cat(certified)
            result.timings_s[method] = time.perf_counter() - t0
            result.per_example[f"{method}_certified"] = cert.tolist()
            result.metrics[key] = _mean(cert)
            if method == "ibp":
                result.metrics["ibp_loss"] = float(torch.cat(losses).mean())
            bad = torch.nonzero(cert & broken).flatten().tolist()
            if bad:
                msg = f"{method.upper()} certified test points {bad} that an attack broke"
                logger.error("SOUNDNESS ALARM: %s", msg)
                result.soundness_alarms.append(msg)
        result.metrics.setdefault("ibp_loss", None)

        result.metrics["bab_cert_acc"] = None
        if s.bab:
            if bab_dir is None:
                raise ValueError("settings.bab needs bab_dir (the α,β-CROWN export directory)")
            t0 = time.perf_counter()
            result.bab = _run_bab(
                model, x, y, s, Path(bab_dir), checkpoint_path, dataset_name, abcrown_dir, say
            )
            result.timings_s["bab"] = time.perf_counter() - t0
            result.metrics["bab_cert_acc"] = result.bab.get("certified_accuracy")
            # the other figures on the same (first bab_count) points, for a like-for-like comparison
            m = result.bab["count"]
            result.bab["same_points"] = {
                key: _mean(torch.tensor(flags[:m])) for key, flags in result.per_example.items()
            }
            result.soundness_alarms += result.bab.get("soundness_alarms", [])
    finally:
        model.train(was_training)
    result.timings_s["total"] = time.perf_counter() - start_all
    return result


def _run_bab(
    model: CertifiedNet,
    x: Tensor,
    y: Tensor,
    s: EvalSettings,
    out: Path,
    checkpoint_path: str | Path | None,
    dataset_name: str | None,
    abcrown_dir: str | Path | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Export the first ``s.bab_count`` points and run α,β-CROWN on them (the verify command's API)."""
    from ccdist_plugin.export import export_instances
    from ccdist_plugin.verify import run_verification

    count = min(s.bab_count, x.shape[0])
    say(f"branch and bound: exporting {count} points to {out} ...")
    exported = export_instances(
        model,
        (x[:count], y[:count]),
        out,
        s.eps,
        count=count,
        timeout_s=s.bab_timeout_s,
        template=s.bab_template,
        methods=s.methods or ("ibp",),
        attack_steps=s.pgd_steps,
        attack_restarts=s.pgd_restarts,
        dataset_name=dataset_name,
        checkpoint_path=checkpoint_path,
        config_overrides=dict(s.bab_overrides),
        seed=s.seed,
    )
    say(f"branch and bound: {exported.num_instances} instances for alpha,beta-CROWN ({exported.counts})")
    ver = run_verification(out, abcrown_dir=abcrown_dir, timeout_s=s.bab_timeout_s)
    info: dict[str, Any] = {
        "count": count,
        "export_dir": str(out),
        "template": s.bab_template,
        "timeout_s": s.bab_timeout_s,
        "overrides": dict(s.bab_overrides),
        "abcrown_ran": bool(ver.abcrown_ran),
        "counts": dict(ver.counts),
        "time_per_instance_s": dict(ver.time_per_instance_s),
        "soundness_alarms": list(ver.soundness_alarms),
        "message": ver.message,
    }
    needed = exported.num_instances > 0
    if ver.abcrown_ran or not needed:
        # with no instance to verify, the pre-checks alone decided every point
        info["certified_accuracy"] = float(ver.certified_accuracy)
        info["certified"] = int(ver.certified)
    else:
        info["certified_accuracy"] = None
        info["reason"] = "alpha,beta-CROWN not found (set ABCROWN_DIR): branch and bound not run"
        logger.warning(
            "BaB not run: %s", ver.message.splitlines()[0] if ver.message else "α,β-CROWN not found"
        )
    try:
        info["abcrown_config"] = exported.config_path.read_text()
    except OSError:
        pass
    return info

"""The paper's evaluation metrics for a trained :class:`~ccdist_plugin.models.CertifiedNet`.

All figures are fractions in [0, 1] over the same ``N`` test points, at an ℓ∞ radius ``eps`` in
pixel units (inputs in [0, 1]):

- **standard**: clean accuracy of the eval-mode network;
- **PGD**: accuracy under :data:`~ccdist_plugin.attacks.EVAL_PGD` (PGD-40, 40 steps of 0.035·ε from
  a uniform random start in the ball ∩ [0, 1], one start, cross-entropy objective: the evaluation
  attack of De Palma et al.'s published commands) unless the settings say otherwise; a point counts
  as robust when it is clean-correct and the attack's point is classified correctly;
- **AutoAttack**: accuracy under AutoAttack (Croce & Hein 2020, ``version="standard"``, ℓ∞) when an
  implementation is importable (:func:`find_autoattack`); otherwise the figure is ``None`` and the
  reason is recorded: an AutoAttack figure is never reported unless it was computed;
- **IBP / CROWN / CROWN-IBP**: certified accuracy from :func:`ccdist_plugin.bounds.certify` (float64,
  a logit difference counts as proved only above ``tol``), i.e. sound certificates. CROWN with
  CROWN intermediate bounds is reported as ``crown_cert_acc``; with IBP intermediate bounds it is
  CROWN-IBP, reported as ``crown_ibp_cert_acc``; ``crown_intermediate="auto"`` picks per model
  (:func:`ccdist_plugin.bounds.resolve_crown_intermediate`) and the record says which ran;
- **IBP loss**: the mean cross-entropy of −z̲ where z̲ are the IBP (+ elision) lower bounds of the
  logit differences (equation 4 of the paper; entry y is 0), float64;
- **BaB**: branch-and-bound certified accuracy: our IBP/CROWN and PGD pre-checks, then α,β-CROWN on
  the remaining points (:func:`ccdist_plugin.verification.export_instances` +
  :func:`ccdist_plugin.verification.run_verification`), only when asked for (it is slow) and only
  counted when α,β-CROWN actually ran.

The IBP → CROWN → PGD cascade is :func:`~ccdist_plugin.verification.cascade.prefilter`
(:mod:`ccdist_plugin.verification.cascade`, re-exported here), shared with the α,β-CROWN export. A certified
point that an attack broke is a soundness failure: it is logged as an error and recorded in
:attr:`EvalResult.soundness_alarms` (the certified figure is then not trustworthy).
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

from ccdist_plugin.attacks import EVAL_PGD, EVAL_PGD_SOURCE, PGD, describe_pgd
from ccdist_plugin.batching import batch_slices
from ccdist_plugin.bounds import CERT_TOL, input_box, training_restorer
from ccdist_plugin.bounds.alpha_crown import AlphaCrownSettings
from ccdist_plugin.models import CertifiedNet
from ccdist_plugin.validate import check_batch
from ccdist_plugin.verification import export_instances, run_verification
from ccdist_plugin.verification.cascade import (
    STATUSES,
    Bar,
    PrefilterResult,
    predicted_class,
    prefilter,
    stage_bars,
)

__all__ = [
    "PGD_STEPS",
    "PGD_STEP_REL",
    "CERT_TOL",
    "AUTOATTACK_MODULES",
    "STATUSES",
    "EvalSettings",
    "EvalResult",
    "PrefilterResult",
    "prefilter",
    "crown_metric_name",
    "find_autoattack",
    "autoattack_adversarial",
    "evaluate",
    "ibp_loss_from_margins",
    "predicted_class",
]

logger = logging.getLogger(__name__)

#: the evaluation attack's steps and step (a multiple of ε): :data:`ccdist_plugin.attacks.EVAL_PGD`
PGD_STEPS = EVAL_PGD.steps
PGD_STEP_REL = EVAL_PGD.step_size
#: AutoAttack implementations tried in order: the reference package of Croce & Hein (module
#: ``autoattack``, installed from its repository), its PyPI repackaging ``pyautoattack`` (same code,
#: no dependencies), and ``torchattacks.AutoAttack`` (install with ``pip install --no-deps
#: torchattacks``: its declared torchvision dependency would replace our torch).
AUTOATTACK_MODULES = ("autoattack", "pyautoattack", "torchattacks")


def crown_metric_name(intermediate: str) -> str:
    """The metric key of CROWN with ``intermediate`` (resolved) pre-activation bounds."""
    return {"crown": "crown_cert_acc", "ibp": "crown_ibp_cert_acc"}[intermediate]


@dataclass
class EvalSettings:
    """What to compute and how (recorded verbatim in ``eval.json``).

    Attributes:
        eps: ℓ∞ radius in pixel units.
        batch_size: examples per batch for every metric.
        attack: ``"pgd40"`` (PGD only), ``"autoattack"`` (PGD and AutoAttack) or ``"none"``.
        pgd_steps, pgd_step_rel, pgd_restarts: PGD steps, step as a multiple of ε, starts
            (default: :data:`ccdist_plugin.attacks.EVAL_PGD`).
        autoattack_version: AutoAttack's ``version`` (``"standard"``).
        methods: certification methods, a subset of ``("ibp", "crown")``.
        crown_intermediate: intermediate bounds of CROWN: ``"crown"`` (full CROWN), ``"ibp"``
            (CROWN-IBP) or ``"auto"`` (full CROWN where affordable, else CROWN-IBP; recorded).
        crown_backend: ``"auto"`` (native when it supports every layer, else auto_LiRPA: networks
            made with ``CertifiedNet.wrap``), ``"native"`` or ``"auto_lirpa"`` (auto_LiRPA's CROWN;
            needs auto_LiRPA installed).
        alpha_crown: α-CROWN (:mod:`ccdist_plugin.bounds.alpha_crown`) after IBP and CROWN on the
            points they leave uncertified (native ReLU networks): ``alpha_crown_cert_acc``. True:
            the default :class:`~ccdist_plugin.bounds.alpha_crown.AlphaCrownSettings` (the final
            slopes over full CROWN's bounds); settings choose the layers, steps and budget.
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
    pgd_restarts: int = EVAL_PGD.restarts
    autoattack_version: str = "standard"
    methods: tuple[str, ...] = ("ibp", "crown")
    crown_intermediate: str = "auto"
    crown_backend: str = "auto"
    alpha_crown: bool | AlphaCrownSettings = False
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
        if self.crown_intermediate not in ("crown", "ibp", "auto"):
            raise ValueError(
                f"crown_intermediate must be 'crown', 'ibp' or 'auto', got {self.crown_intermediate!r}"
            )
        if self.crown_backend not in ("auto", "native", "auto_lirpa"):
            raise ValueError(
                f"crown_backend must be 'auto', 'native' or 'auto_lirpa', got {self.crown_backend!r}"
            )
        if self.bab_count < 1 or self.bab_timeout_s <= 0:
            raise ValueError(
                f"bab_count must be >= 1 and bab_timeout_s > 0, got {self.bab_count}, {self.bab_timeout_s}"
            )

    @property
    def pgd(self) -> PGD | None:
        """The PGD attack these settings run (None with ``attack="none"``)."""
        if self.attack == "none":
            return None
        return PGD(
            steps=self.pgd_steps, step_size=self.pgd_step_rel, restarts=self.pgd_restarts, objective="ce"
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
            ``crown_cert_acc`` (CROWN), ``crown_ibp_cert_acc`` (CROWN-IBP), ``alpha_crown_cert_acc``
            (certified by IBP, CROWN or α-CROWN; only with ``alpha_crown``), ``bab_cert_acc``,
            ``ibp_loss``.
        timings_s: wall-clock seconds per metric (``standard``, ``pgd``, ``autoattack``, ``ibp``,
            ``crown``, ``bab``, ``total``).
        per_example: (N,) bool lists ``correct``, ``pgd_robust``, ``aa_robust``, ``ibp_certified``,
            ``crown_certified`` or ``crown_ibp_certified`` (only those computed).
        crown_intermediate: the intermediate bounds CROWN used (``"crown"`` or ``"ibp"``; None
            when CROWN did not run).
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
    crown_intermediate: str | None = None
    autoattack: dict[str, Any] = field(default_factory=dict)
    bab: dict[str, Any] | None = None
    soundness_alarms: list[str] = field(default_factory=list)

    @property
    def best_certified_acc(self) -> float | None:
        """The largest sound certified accuracy computed (IBP, CROWN, CROWN-IBP, BaB)."""
        keys = (
            "ibp_cert_acc",
            "crown_cert_acc",
            "crown_ibp_cert_acc",
            "alpha_crown_cert_acc",
            "bab_cert_acc",
        )
        vals = [v for v in (self.metrics.get(k) for k in keys) if v is not None]
        return max(vals) if vals else None

    def to_dict(self) -> dict[str, Any]:
        settings = self.settings.to_dict()
        # what ran, in words, beside the numbers that describe it
        pgd = self.settings.pgd
        settings["attack_description"] = describe_pgd(pgd) if pgd is not None else "none"
        settings["attack_source"] = (
            EVAL_PGD_SOURCE if pgd == EVAL_PGD else "custom (not the evaluation attack)"
        )
        settings["crown_intermediate_used"] = self.crown_intermediate
        return {
            "count": self.count,
            "eps": self.eps,
            "settings": settings,
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
# The metrics: one function each, writing into the result
# --------------------------------------------------------------------------------------------


def ibp_loss_from_margins(margin_lb: Tensor, y: Tensor) -> Tensor:
    """Per-example CE(−z̲, y), with z̲ the (B, k) lower bounds of f_y − f_j (entry y set to 0)."""
    z = margin_lb.scatter(1, y.view(-1, 1), 0.0)
    return F.cross_entropy(-z, y, reduction="none")


def _mean(flags: Tensor) -> float:
    return float(flags.double().mean()) if flags.numel() else float("nan")


def _alarm(result: EvalResult, certified: Tensor, broken: Tensor, certificate: str, attack: str) -> None:
    bad = torch.nonzero(certified & broken).flatten().tolist()
    if bad:
        msg = f"{certificate} certified test points {bad} that {attack} broke"
        logger.error("SOUNDNESS ALARM: %s", msg)
        result.soundness_alarms.append(msg)


def _record_standard(result: EvalResult, pre: PrefilterResult) -> None:
    result.per_example["correct"] = pre.correct.tolist()
    result.metrics["standard_acc"] = _mean(pre.correct)
    result.timings_s["standard"] = pre.timings_s["standard"]


def _record_pgd(result: EvalResult, pre: PrefilterResult) -> None:
    if result.settings.pgd is None:
        result.metrics["pgd_acc"] = None
        return
    robust = pre.correct & ~pre.broken
    result.per_example["pgd_robust"] = robust.tolist()
    result.metrics["pgd_acc"] = _mean(robust)
    result.timings_s["pgd"] = pre.timings_s["pgd"]


def _record_certified(result: EvalResult, pre: PrefilterResult, y: Tensor) -> None:
    """IBP-, CROWN- or CROWN-IBP-certified accuracy (each under its own name) and the IBP loss."""
    result.crown_intermediate = pre.crown_intermediate
    for key in ("ibp_cert_acc", "crown_cert_acc", "crown_ibp_cert_acc", "ibp_loss"):
        result.metrics[key] = None
    for method, cert in pre.certified.items():
        name = {"ibp": "ibp_cert_acc", "alpha_crown": "alpha_crown_cert_acc"}.get(
            method
        ) or crown_metric_name(pre.crown_intermediate)
        result.metrics[name] = _mean(cert)
        result.per_example[name.replace("_cert_acc", "_certified")] = cert.tolist()
        if method in pre.timings_s:  # not when a soundness alarm stopped certification before it
            result.timings_s[method] = pre.timings_s[method]
        label = {
            "ibp_cert_acc": "IBP",
            "crown_cert_acc": "CROWN",
            "crown_ibp_cert_acc": "CROWN-IBP",
            "alpha_crown_cert_acc": "α-CROWN",
        }[name]
        _alarm(result, cert, pre.broken, label, "PGD")
    if pre.soundness_alarm is not None:
        result.soundness_alarms.append(pre.soundness_alarm)  # every certified figure is 0
    elif "ibp" in pre.margin_lb:
        result.metrics["ibp_loss"] = float(ibp_loss_from_margins(pre.margin_lb["ibp"], y.cpu()).mean())


def _record_autoattack(
    result: EvalResult,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    pre: PrefilterResult,
    say: Callable[[str], None],
    bar: Bar,
) -> None:
    s = result.settings
    result.metrics["autoattack_acc"] = None
    if s.attack != "autoattack":
        result.autoattack = {"run": False, "reason": f"not requested (--attack {s.attack})"}
        return
    found = find_autoattack()
    if found is None:
        reason = f"no AutoAttack implementation importable (tried {', '.join(AUTOATTACK_MODULES)})"
        logger.warning("AutoAttack not run: %s", reason)
        result.autoattack = {"run": False, "reason": reason}
        return
    name, version = found
    say(f"AutoAttack ({name} {version}, version={s.autoattack_version}) ...")
    t0 = time.perf_counter()
    robust = []
    restore_modes = training_restorer(model)
    try:
        for sl in bar(batch_slices(x.shape[0], s.batch_size), f"AutoAttack ({name})"):
            x_adv = autoattack_adversarial(
                model, x[sl], y[sl], s.eps, name, s.autoattack_version, s.seed, s.batch_size
            )
            model.eval()
            with torch.no_grad():
                robust.append((predicted_class(model(x_adv)) == y[sl]).cpu())
    finally:
        restore_modes()
    aa_robust = torch.cat(robust) & pre.correct
    result.timings_s["autoattack"] = time.perf_counter() - t0
    result.per_example["aa_robust"] = aa_robust.tolist()
    result.metrics["autoattack_acc"] = _mean(aa_robust)
    result.autoattack = {
        "run": True,
        "module": name,
        "module_version": version,
        "version": s.autoattack_version,
        "norm": "Linf",
    }
    for method, cert in pre.certified.items():
        _alarm(result, cert, pre.correct & ~aa_robust, method.upper(), "AutoAttack")


def _record_bab(
    result: EvalResult,
    pre: PrefilterResult,
    model: CertifiedNet,
    x: Tensor,
    y: Tensor,
    bab_dir: str | Path | None,
    checkpoint_path: str | Path | None,
    dataset_name: str | None,
    abcrown_dir: str | Path | None,
    say: Callable[[str], None],
) -> None:
    s = result.settings
    result.metrics["bab_cert_acc"] = None
    if not s.bab:
        return
    if bab_dir is None:
        raise ValueError("settings.bab needs bab_dir (the α,β-CROWN export directory)")
    if pre.soundness_alarm is not None:
        # the exported graph would not be the network either: nothing to verify
        result.bab = {
            "count": min(s.bab_count, x.shape[0]),
            "certified_accuracy": None,
            "reason": "not run: soundness alarm (the network's outputs are not its bounded graph's)",
        }
        return
    t0 = time.perf_counter()
    result.bab = _run_bab(model, x, y, s, Path(bab_dir), checkpoint_path, dataset_name, abcrown_dir, say)
    result.timings_s["bab"] = time.perf_counter() - t0
    result.metrics["bab_cert_acc"] = result.bab.get("certified_accuracy")
    # the other figures on the same (first bab_count) points, for a like-for-like comparison
    m = result.bab["count"]
    result.bab["same_points"] = {
        key: _mean(torch.tensor(flags[:m])) for key, flags in result.per_example.items()
    }
    result.soundness_alarms += result.bab.get("soundness_alarms", [])


def _check_eval_inputs(model: CertifiedNet, x: Tensor, y: Tensor) -> None:
    check_batch(model, x, y)  # model, shapes, label range, pixel range (ccdist_plugin.validate)
    if x.shape[0] == 0:
        raise ValueError("no test points to evaluate")


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
        model: the network (evaluated in eval mode; every layer's train/eval flag is restored).
        settings: an :class:`EvalSettings`.
        progress: progress bars on a terminal, one log line per metric elsewhere.
        bab_dir: export directory for α,β-CROWN (required when ``settings.bab``).
        checkpoint_path, dataset_name: provenance recorded in the export manifest.
        abcrown_dir: α,β-CROWN's ``complete_verifier`` (default ``$ABCROWN_DIR``, else the folder
            ``ccdist install-verifier`` recorded).
        log: where one-line progress messages go (default: the module logger).
    """
    _check_eval_inputs(model, x, y)
    s = settings
    say = log or logger.info
    result = EvalResult(count=x.shape[0], eps=float(s.eps), settings=s)
    start = time.perf_counter()
    pre = prefilter(
        model,
        x,
        y,
        float(s.eps),
        methods=s.methods,
        attack=s.pgd,
        crown_intermediate=s.crown_intermediate,
        crown_backend=s.crown_backend,
        alpha_crown=s.alpha_crown,
        tol=s.tol,
        batch_size=s.batch_size,
        generator=torch.Generator().manual_seed(s.seed),
        progress=progress,
        log=say,
    )
    _record_standard(result, pre)
    _record_pgd(result, pre)
    _record_autoattack(result, model, x, y, pre, say, stage_bars(progress, say))
    _record_certified(result, pre, y)
    _record_bab(result, pre, model, x, y, bab_dir, checkpoint_path, dataset_name, abcrown_dir, say)
    result.timings_s["total"] = time.perf_counter() - start
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
        alpha_crown=s.alpha_crown,
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
        info["reason"] = (
            "alpha,beta-CROWN not found (install it with ccdist install-verifier, or set ABCROWN_DIR): "
            "branch and bound not run"
        )
        logger.warning(
            "BaB not run: %s", ver.message.splitlines()[0] if ver.message else "α,β-CROWN not found"
        )
    try:
        info["abcrown_config"] = exported.config_path.read_text()
    except OSError:
        pass
    return info

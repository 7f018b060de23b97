"""The pre-filter: the one IBP → CROWN → PGD cascade that ``ccdist eval`` and the α,β-CROWN export
share (:func:`prefilter`).

Every stage runs on every point: the clean prediction, our IBP and CROWN bounds
(:func:`ccdist_plugin.bounds.certify`, float64), then the attack. Each point gets one of
:data:`STATUSES`; :mod:`ccdist_plugin.evaluation` turns them into metrics and
:mod:`ccdist_plugin.verification.export` into the points sent to branch and bound. A point our
bounds certify that the attack breaks is an ``alarm`` (a soundness failure), never certified.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccdist_plugin.attacks import EVAL_PGD, PGD, describe_pgd
from ccdist_plugin.batching import batch_slices
from ccdist_plugin.bounds import CERT_TOL, certify, input_box, resolve_crown_intermediate, training_restorer
from ccdist_plugin.bounds.alpha_crown import AlphaCrownSettings, alpha_crown_settings
from ccdist_plugin.bounds.graphcheck import BoundedGraphMismatch
from ccdist_plugin.models import CertifiedNet
from ccdist_plugin.progress import progress_bar

__all__ = ["STATUSES", "PrefilterResult", "prefilter", "predicted_class", "Bar", "stage_bars"]

logger = logging.getLogger(__name__)

#: per-point outcomes of :func:`prefilter`, in the order they are decided
STATUSES = (
    "misclassified",
    "alarm",
    "certified_ibp",
    "certified_crown",
    "certified_alpha_crown",
    "attacked",
    "undecided",
)


@dataclass
class PrefilterResult:
    """Per-point outcome of the IBP → CROWN → attack cascade (all tensors on the CPU, length N).

    Attributes:
        status: one of :data:`STATUSES` per point: ``misclassified`` (clean prediction wrong);
            ``alarm`` (certified by our bounds and broken by the attack, or any correct point when
            the bounded graph is not the network, see ``soundness_alarm``: never counted certified);
            ``certified_ibp`` (IBP proves every difference); ``certified_crown`` (every difference
            proved by CROWN or IBP, not all by IBP); ``certified_alpha_crown`` (with
            ``alpha_crown``: every difference proved once α-CROWN's bounds are added, not before);
            ``attacked`` (the attack found a counterexample); ``undecided`` (for branch and bound).
        prediction: the clean predicted class.
        correct: clean prediction is the label.
        margin_lb: method → (N, k) float64 lower bounds of z_j = f_y − f_j (entry y is +inf). Under
            ``"alpha_crown"``: α-CROWN's on the points it ran on (correct, not certified by IBP or
            CROWN), elsewhere the elementwise best of the earlier methods' (all sound bounds).
        proved: (N, k) which differences some method proved (entry y False).
        certified: method → (N,) every difference proved by that method alone, and correct.
        broken: the attack's point is in the ball ∩ [0, 1] and misclassified (always False without
            an attack).
        adv_margin: (N,) float64 smallest margin min_j z_j at the attack's point (NaN without).
        crown_intermediate: the intermediate bounds CROWN used (``"crown"``/``"ibp"``), or None.
        timings_s: seconds per stage (``standard``, ``ibp``, ``crown``, ``alpha_crown``, ``pgd``).
        soundness_alarm: None, or why no point is certified: certification found that the network's
            outputs are not those of the graph its bounds describe
            (:class:`BoundedGraphMismatch`, the bound engine's graph check); every margin bound is then
            −inf, nothing is proved and every correct point is an ``alarm``.
    """

    status: list[str]
    prediction: Tensor
    correct: Tensor
    margin_lb: dict[str, Tensor]
    proved: Tensor
    certified: dict[str, Tensor]
    broken: Tensor
    adv_margin: Tensor
    crown_intermediate: str | None
    timings_s: dict[str, float]
    soundness_alarm: str | None = None

    def counts(self) -> dict[str, int]:
        return {s: self.status.count(s) for s in STATUSES}


def predicted_class(logits: Tensor) -> Tensor:
    """The argmax class per row, or -1 (never a label) where any logit is NaN or inf: a
    non-finite output is never a correct prediction (argmax would pick a NaN's index)."""
    return logits.argmax(1).masked_fill(~torch.isfinite(logits).all(1), -1)


#: ``bar(batches, desc)``: iterate the batches, drawing a bar on a terminal or logging one line.
Bar = Callable[[list[slice], str], Iterable[slice]]


def stage_bars(progress: bool, log: Callable[[str], None] | None) -> Bar:
    """Progress bars on a terminal when ``progress``; elsewhere one line per stage to ``log``."""
    return lambda batches, desc: progress_bar(batches, desc=desc, enabled=progress, done=log or logger.info)


@torch.no_grad()
def _clean_predictions(model: nn.Module, x: Tensor, batches: list[slice], bar: Bar) -> Tensor:
    return torch.cat([predicted_class(model(x[sl])).cpu() for sl in bar(batches, "standard")])


def _certify_all(
    model: CertifiedNet,
    x: Tensor,
    y: Tensor,
    eps: float,
    method: str,
    tol: float,
    batches: list[slice],
    bar: Bar,
    crown_intermediate: str,
    crown_backend: str,
) -> Tensor:
    """(N, k) float64 margin lower bounds of ``method`` (entry y is +inf), batch by batch."""
    kwargs = {"intermediate": crown_intermediate, "backend": crown_backend} if method == "crown" else {}
    name = {"ibp": "IBP", "crown": "CROWN" if crown_intermediate == "crown" else "CROWN-IBP"}[method]
    parts = [
        certify(
            model, x[sl], y[sl], eps, method=method, tol=tol, batch_size=sl.stop - sl.start, **kwargs
        ).margin_lb.cpu()
        for sl in bar(batches, f"{name} bounds")
    ]
    return torch.cat(parts)


def _attack_all(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    attack: PGD,
    batches: list[slice],
    bar: Bar,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """(N,) the attack broke the point (its output lies in the ball ∩ [0, 1] and is misclassified),
    and (N,) float64 smallest margin min_j z_j at the attack's point."""
    broken, adv_margin = [], []
    for sl in bar(batches, describe_pgd(attack).split(" ")[0]):
        xb, yb = x[sl], y[sl]
        x_adv = attack(model, xb, yb, eps, generator=generator).detach()
        lo, hi = input_box(xb, eps)
        # a safeguard: a counterexample outside the ball would not refute anything
        in_ball = ((x_adv >= lo - 1e-6) & (x_adv <= hi + 1e-6)).flatten(1).all(1)
        if not bool(in_ball.all()):
            logger.warning("the attack returned %d points outside the ball; ignored", int((~in_ball).sum()))
        with torch.no_grad():
            logits = model(x_adv)
        z = (logits.gather(1, yb.view(-1, 1)) - logits).double().scatter(1, yb.view(-1, 1), float("inf"))
        broken.append(((predicted_class(logits) != yb) & in_ball).cpu())
        adv_margin.append(z.amin(1).cpu())
    return torch.cat(broken), torch.cat(adv_margin)


def _timed(timings: dict[str, float], key: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    timings[key] = time.perf_counter() - t0
    return out


# over 80 lines only by its signature and docstring (one entry per argument); the body is the stages in order
def prefilter(
    model: CertifiedNet,
    x: Tensor,
    y: Tensor,
    eps: float,
    methods: Sequence[str] = ("ibp", "crown"),
    attack: PGD | None = EVAL_PGD,
    crown_intermediate: str = "auto",
    crown_backend: str = "auto",
    tol: float = CERT_TOL,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    alpha_crown: bool | AlphaCrownSettings = False,
) -> PrefilterResult:
    """The IBP → CROWN → attack cascade on every point: what ``evaluate`` reports and what the
    α,β-CROWN export decides before branch and bound, by one rule.

    Every stage runs on every point (each is also a metric of its own). A point certified by our
    bounds (every difference proved by IBP or CROWN, float64, above ``tol``) that the attack
    breaks is an ``alarm``: logged as an error and never counted as certified. Certification
    checks that the network's outputs on the points are its bounded graph's
    (:func:`ccdist_plugin.bounds.certify`); when they are not, that is a soundness alarm
    (:attr:`PrefilterResult.soundness_alarm`) and no point is certified.

    Args:
        model: the network; bounds and attack use it in eval mode, and its train/eval flags are
            restored afterwards.
        x, y: (N, C, H, W) points in [0, 1] and (N,) labels.
        methods: our bounds, a subset of ``("ibp", "crown")``.
        attack: the PGD attack (default :data:`ccdist_plugin.attacks.EVAL_PGD`; None: no attack).
        crown_intermediate: ``"crown"``, ``"ibp"`` (CROWN-IBP) or ``"auto"`` (see
            :func:`ccdist_plugin.bounds.resolve_crown_intermediate`).
        crown_backend: ``"auto"``, ``"native"`` or ``"auto_lirpa"``.
        generator: random starts of the attack.
        progress: progress bars on a terminal, one line per stage to ``log`` elsewhere.
        log: where those lines go (default: the module logger).
        alpha_crown: after IBP and CROWN, α-CROWN (:mod:`ccdist_plugin.bounds.alpha_crown`, float64
            decisions as every bound's) on the correct points they left uncertified, from full
            CROWN's bounds whatever ``crown_intermediate`` is; the native CROWN's networks only
            (ReLU, ``Sequential`` and ``Residual``). True: the default
            :class:`~ccdist_plugin.bounds.alpha_crown.AlphaCrownSettings` (the final slopes only);
            settings choose the layers, steps, learning rate and memory budget.
    """
    alpha = alpha_crown_settings(alpha_crown)
    bad = [m for m in methods if m not in ("ibp", "crown")]
    if bad:
        raise ValueError(f"unknown bound methods {bad}; expected 'ibp' and/or 'crown'")
    batches = batch_slices(x.shape[0], batch_size)
    bar = stage_bars(progress, log)
    timings: dict[str, float] = {}
    restore_modes = training_restorer(model)
    model.eval()
    try:
        pred = _timed(timings, "standard", lambda: _clean_predictions(model, x, batches, bar))
        resolved = resolve_crown_intermediate(model, crown_intermediate) if "crown" in methods else None
        margin_lb, graph_alarm = _bound_margins(
            model, x, y, eps, methods, tol, batches, bar, resolved or "ibp", crown_backend, timings
        )
        if alpha is not None and graph_alarm is None:
            margin_lb["alpha_crown"], graph_alarm = _timed(
                timings,
                "alpha_crown",
                lambda: _alpha_crown_margins(model, x, y, eps, tol, pred, margin_lb, batch_size, bar, alpha),
            )
        broken, adv_margin = _attack_points(model, x, y, eps, attack, batches, bar, generator, timings)
    finally:
        restore_modes()
    correct = pred == y.cpu()
    proved, certified, status = _decisions(
        margin_lb, y.cpu(), correct, tol, model.num_classes, broken, graph_alarm is not None
    )
    alarms = [i for i, s in enumerate(status) if s == "alarm"]
    if alarms and graph_alarm is None:
        logger.error(
            "SOUNDNESS ALARM: points %s are certified by our bounds and broken by the attack", alarms
        )
    return PrefilterResult(
        status=status,
        prediction=pred,
        correct=correct,
        margin_lb=margin_lb,
        proved=proved,
        certified=certified,
        broken=broken,
        adv_margin=adv_margin,
        crown_intermediate=resolved,
        timings_s=timings,
        soundness_alarm=graph_alarm,
    )


def _bound_margins(
    model: CertifiedNet,
    x: Tensor,
    y: Tensor,
    eps: float,
    methods: Sequence[str],
    tol: float,
    batches: list[slice],
    bar: Bar,
    crown_intermediate: str,
    crown_backend: str,
    timings: dict[str, float],
) -> tuple[dict[str, Tensor], str | None]:
    """method → (N, k) margin lower bounds of our bounds, IBP first; and the soundness alarm (None, or
    why the network's outputs are not its bounded graph's: then every bound is −inf)."""
    margin_lb: dict[str, Tensor] = {}
    for m in ("ibp", "crown"):
        if m not in methods:
            continue
        try:
            margin_lb[m] = _timed(
                timings,
                m,
                lambda m=m: _certify_all(
                    model, x, y, eps, m, tol, batches, bar, crown_intermediate, crown_backend
                ),
            )
        except BoundedGraphMismatch as exc:
            logger.error("SOUNDNESS ALARM: %s", exc)
            # nothing is proved: every difference's bound is -inf (entry y +inf, as certify has it)
            unproved = torch.full((x.shape[0], model.num_classes), float("-inf"), dtype=torch.float64)
            unproved.scatter_(1, y.cpu().view(-1, 1), float("inf"))
            return {m: unproved.clone() for m in ("ibp", "crown") if m in methods}, str(exc)
    return margin_lb, None


def _alpha_crown_margins(
    model: CertifiedNet,
    x: Tensor,
    y: Tensor,
    eps: float,
    tol: float,
    pred: Tensor,
    margin_lb: dict[str, Tensor],
    batch_size: int,
    bar: Bar,
    settings: AlphaCrownSettings,
) -> tuple[Tensor, str | None]:
    """(N, k) α-CROWN's margin lower bounds on the correctly predicted points (``pred``) that
    ``margin_lb``'s methods left uncertified, elsewhere the elementwise best of ``margin_lb``'s
    (entry y +inf); and the soundness alarm (None, or why nothing is proved)."""
    n, k = x.shape[0], model.num_classes
    correct = pred == y.cpu()
    todo = correct & ~_proofs(margin_lb, y.cpu(), correct, tol, k)[2]
    best = torch.full((n, k), float("-inf"), dtype=torch.float64).scatter(
        1, y.cpu().view(-1, 1), float("inf")
    )
    for lb in margin_lb.values():
        best = torch.maximum(best, lb)
    idx = todo.nonzero().flatten()
    try:
        for sl in bar(batch_slices(idx.numel(), batch_size), "alpha-CROWN bounds"):
            rows = idx[sl].to(x.device)
            lb = certify(
                model,
                x[rows],
                y[rows],
                eps,
                method="alpha_crown",
                tol=tol,
                batch_size=batch_size,
                # a point is done once certified: the pre-filter needs the decision, not the tightest bound
                stop_above=tol,
                **settings.bound_kwargs(),
            ).margin_lb.cpu()
            # α-CROWN's bound, or an earlier method's where that is larger: both are sound
            best[idx[sl]] = torch.maximum(best[idx[sl]], lb)
    except BoundedGraphMismatch as exc:
        logger.error("SOUNDNESS ALARM: %s", exc)
        for m in margin_lb:  # nothing is proved by any method (as _bound_margins has it)
            margin_lb[m] = margin_lb[m].clamp(max=float("-inf")).scatter(1, y.cpu().view(-1, 1), float("inf"))
        return best.clamp(max=float("-inf")).scatter(1, y.cpu().view(-1, 1), float("inf")), str(exc)
    return best, None


def _attack_points(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    attack: PGD | None,
    batches: list[slice],
    bar: Bar,
    generator: torch.Generator | None,
    timings: dict[str, float],
) -> tuple[Tensor, Tensor]:
    """:func:`_attack_all`, timed; without an attack nothing is broken and every margin is NaN."""
    if attack is None:
        n = x.shape[0]
        return torch.zeros(n, dtype=torch.bool), torch.full((n,), float("nan"), dtype=torch.float64)
    return _timed(timings, "pgd", lambda: _attack_all(model, x, y, eps, attack, batches, bar, generator))


def _proofs(
    margin_lb: dict[str, Tensor], y: Tensor, correct: Tensor, tol: float, num_classes: int
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """(N, k) the differences some method proved above ``tol``; method → (N,) every difference
    proved by that method alone (and correct); (N,) every difference proved by some method."""
    label_mask = F.one_hot(y, num_classes).bool()
    proved = torch.zeros(y.shape[0], num_classes, dtype=torch.bool)
    certified = {}
    for m, lb in margin_lb.items():
        proved_m = (lb > tol) & ~label_mask
        proved |= proved_m
        certified[m] = (proved_m | label_mask).all(1) & correct
    return proved, certified, (proved | label_mask).all(1) & correct


def _decisions(
    margin_lb: dict[str, Tensor],
    y: Tensor,
    correct: Tensor,
    tol: float,
    num_classes: int,
    broken: Tensor,
    graph_alarm: bool,
) -> tuple[Tensor, dict[str, Tensor], list[str]]:
    """:func:`_proofs` and each point's status (:func:`_statuses`)."""
    proved, certified, any_certified = _proofs(margin_lb, y, correct, tol, num_classes)
    ibp_certified = certified.get("ibp", torch.zeros_like(correct))
    before_alpha = {m: lb for m, lb in margin_lb.items() if m != "alpha_crown"}
    crown_certified = _proofs(before_alpha, y, correct, tol, num_classes)[2]
    status = _statuses(correct, ibp_certified, crown_certified, any_certified, broken, graph_alarm)
    return proved, certified, status


def _statuses(
    correct: Tensor,
    ibp_certified: Tensor,
    crown_certified: Tensor,
    any_certified: Tensor,
    broken: Tensor,
    graph_alarm: bool,
) -> list[str]:
    """Each point's :data:`STATUSES` entry: the first that applies, in that order."""
    status = []
    for i in range(correct.shape[0]):
        if not bool(correct[i]):
            status.append("misclassified")
        elif graph_alarm or (bool(any_certified[i]) and bool(broken[i])):
            status.append("alarm")
        elif bool(ibp_certified[i]):
            status.append("certified_ibp")
        elif bool(crown_certified[i]):
            status.append("certified_crown")
        elif bool(any_certified[i]):
            status.append("certified_alpha_crown")
        elif bool(broken[i]):
            status.append("attacked")
        else:
            status.append("undecided")
    return status

"""Certified decisions, float-safe: :func:`certify` bounds a float64 copy of the network and counts a
logit difference as proved only when its float64 lower bound exceeds :data:`CERT_TOL`.

Before and after the bounds, the soundness checks of :mod:`ccdist_plugin.bounds.graphcheck` make
sure the bounds describe the network: otherwise nothing is certified.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from ccdist_plugin.batching import batch_slices
from ccdist_plugin.bounds.alpha_crown import alpha_crown_margin_lower_bound
from ccdist_plugin.bounds.crown import crown_margin_lower_bound
from ccdist_plugin.bounds.graphcheck import (
    check_graph_at_points,
    check_margins_at_points,
    check_trace_for_certification,
)
from ccdist_plugin.bounds.ibp import margin_lower_bound
from ccdist_plugin.models import CertifiedNet
from ccdist_plugin.validate import check_inputs, check_labels, check_model

__all__ = ["CERT_TOL", "CertifyResult", "certify"]


@dataclass
class CertifyResult:
    """Outcome of :func:`certify` for a batch.

    Attributes:
        margin_lb: (B, k) float64 lower bounds of z_j = f_y − f_j (entry y is +inf here, so that
            ``margin_lb > tol`` reads as "difference j is proved").
        certified: (B,) bool: every j ≠ y proved and the clean prediction is y.
        correct: (B,) bool: the clean prediction is y.
    """

    margin_lb: Tensor
    certified: Tensor
    correct: Tensor

    def proved(self, tol: float = 0.0) -> Tensor:
        """(B, k) bool: which logit differences are proved positive."""
        return self.margin_lb > tol


#: A logit difference counts as proved when its float64 lower bound exceeds this: far above the
#: float64 rounding of these sums, so rounding cannot turn an uncertified point into a certified
#: one. The one tolerance of every certificate (bounds, evaluation, export).
CERT_TOL = 1e-6


@torch.no_grad()
def certify(
    model: CertifiedNet,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    method: str = "ibp",
    tol: float = CERT_TOL,
    batch_size: int = 256,
    **crown_kwargs,
) -> CertifyResult:
    """Certified decisions for the deployed (eval-mode) network, float-safe.

    The bounds are computed in float64 on a float64 copy of the network (the original is not
    touched), so that rounding cannot turn an uncertified point into a certified one; a logit
    difference counts as proved only when its float64 lower bound exceeds ``tol`` (default
    :data:`CERT_TOL`). This certifies the network in exact arithmetic, as α,β-CROWN does.

    The bounds describe a graph of the network (walked natively or traced by auto_LiRPA), so each
    batch is checked to be that graph (``ccdist_plugin.bounds.graphcheck``):
    tracing the features must not warn of data-dependent control flow, the graph at ε = 0 must
    give the forward's features, and no bound may exceed the margin at the point itself.

    Args:
        method: ``"ibp"``, ``"crown"`` or ``"alpha_crown"`` (extra keyword arguments go to
            :func:`crown_margin_lower_bound` or
            :func:`ccdist_plugin.bounds.alpha_crown.alpha_crown_margin_lower_bound`; α-CROWN's
            slopes are optimized on the float64 copy, and its bound recomputed there from them).

    Raises:
        ccdist_plugin.bounds.graphcheck.BoundedGraphMismatch: the soundness alarm when any of those
            fails; nothing is certified.
    """
    model = check_model(model)
    check_inputs(model, x)
    check_labels(x, y, model.num_classes)
    if method not in ("ibp", "crown", "alpha_crown"):
        raise ValueError(f"method must be 'ibp', 'crown' or 'alpha_crown', got {method!r}")
    net = copy.deepcopy(model).double().eval()
    x64, eps64 = x.double(), eps.double() if isinstance(eps, Tensor) else float(eps)
    if x.shape[0]:
        # the bounds describe the traced/walked graph: it must be the network (graphcheck.py)
        check_trace_for_certification(net.features, x64[:2])
    parts, correct = [], []
    for sl in batch_slices(x.shape[0], batch_size):
        e = eps64[sl] if isinstance(eps64, Tensor) and eps64.ndim == 1 else eps64
        features = net.features(x64[sl])
        logits = net.head(features)
        check_graph_at_points(net, x64[sl], features)
        if method == "ibp":
            lb = margin_lower_bound(net, x64[sl], y[sl], e)
        elif method == "crown":
            lb = crown_margin_lower_bound(net, x64[sl], y[sl], e, **crown_kwargs).double()
        else:
            lb = alpha_crown_margin_lower_bound(net, x64[sl], y[sl], e, **crown_kwargs).double()
        check_margins_at_points(logits, y[sl], lb)
        parts.append(lb)
        correct.append(logits.argmax(1) == y[sl])
    margin = torch.cat(parts) if parts else x64.new_zeros(0, model.num_classes)
    margin = margin.scatter(1, y.view(-1, 1), float("inf"))
    correct_t = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    certified = (margin > tol).all(1) & correct_t
    return CertifyResult(margin_lb=margin, certified=certified, correct=correct_t)

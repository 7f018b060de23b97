"""The bound engine: sound bounds on a network's outputs over the ℓ∞ ball ∩ [0, 1].

Everything here is a pure function of a module and tensors, batch-first, in pixel space. Read it
bottom-up; each module imports only those above it in this list:

- :mod:`~ccdist_plugin.bounds.layers` — the layer rules both engines share: which layers are
  bounded, :class:`UnsupportedLayerError`, the graph of ``nn.Sequential`` and
  :class:`~ccdist_plugin.models.Residual` blocks the engines walk, BatchNorm's scale and shift.
- :mod:`~ccdist_plugin.bounds.lirpa` — auto_LiRPA as a backend, for networks the native engine
  cannot walk (same BatchNorm semantics).
- :mod:`~ccdist_plugin.bounds.ibp` — :func:`input_box`, interval bound propagation
  (:func:`interval_bounds`, :func:`propagate_intervals`; Gowal et al. 2018, appendix A of the
  paper) and last-layer elision (:func:`margin_lower_bound`, equation 10);
  :func:`check_boundable`.
- :mod:`~ccdist_plugin.bounds.crown` — CROWN back-substitution (Zhang et al. 2018) for evaluation,
  :func:`crown_margin_lower_bound`, optionally through auto_LiRPA (``backend="auto_lirpa"``).
- :mod:`~ccdist_plugin.bounds.alpha_crown` — α-CROWN: CROWN with the ReLU lower-relaxation slopes
  optimized per point (:func:`alpha_crown_margin_lower_bound`), the pre-filter's optional stage.
- :mod:`~ccdist_plugin.bounds.graphcheck` — the bounded graph must be the network's forward: what
  ``CertifiedNet.wrap`` refuses, and the soundness alarms of certification.
- :mod:`~ccdist_plugin.bounds.certification` — :func:`certify`, float-safe certified decisions
  (float64).
- :mod:`~ccdist_plugin.bounds.crown_ibp` — differentiable CROWN-IBP for training;
  :mod:`~ccdist_plugin.bounds.penultimate` — bounds split at the penultimate affine layer
  (appendix E.9).

An unsupported layer raises :class:`UnsupportedLayerError`: a silent wrong bound is never returned.

Residual networks are bounded natively: at a residual join IBP adds the branches' intervals
(centre + centre, radius + radius) and CROWN's back-substitution sends the coefficients down both
branches and adds them where the branches meet. Any other module (e.g. a network with its own
``forward``, wrapped with ``CertifiedNet.wrap``) is bounded through auto_LiRPA, with the same
BatchNorm semantics; a layer neither engine bounds raises :class:`UnsupportedLayerError`.
"""

from ccdist_plugin.bounds.alpha_crown import AlphaCrownSettings, alpha_crown_margin_lower_bound
from ccdist_plugin.bounds.certification import CERT_TOL, CertifyResult, certify
from ccdist_plugin.bounds.crown import (
    CROWN_INTERMEDIATE,
    back_substitute,
    crown_margin_lower_bound,
    resolve_crown_intermediate,
)
from ccdist_plugin.bounds.ibp import (
    IntervalPropagation,
    check_boundable,
    elided_margin_lower_bound,
    elision_matrix,
    feature_bounds,
    input_box,
    interval_bounds,
    margin_lower_bound,
    propagate_intervals,
    with_batch_statistics,
)
from ccdist_plugin.bounds.layers import (
    AutoLirpaMissingError,
    GraphNode,
    UnsupportedLayerError,
    check_supported_layer,
    flat_layers,
    native_unsupported_layer,
    network_graph,
    training_restorer,
)

__all__ = [
    "UnsupportedLayerError",
    "AutoLirpaMissingError",
    "input_box",
    "IntervalPropagation",
    "propagate_intervals",
    "interval_bounds",
    "feature_bounds",
    "elision_matrix",
    "elided_margin_lower_bound",
    "margin_lower_bound",
    "crown_margin_lower_bound",
    "alpha_crown_margin_lower_bound",
    "AlphaCrownSettings",
    "CROWN_INTERMEDIATE",
    "resolve_crown_intermediate",
    "check_supported_layer",
    "CERT_TOL",
    "CertifyResult",
    "certify",
    "flat_layers",
    "GraphNode",
    "network_graph",
    "back_substitute",
    "native_unsupported_layer",
    "check_boundable",
    "with_batch_statistics",
    "training_restorer",
]

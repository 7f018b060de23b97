"""The old path of the bounds split at the penultimate layer: the same names as
:mod:`ccdist_plugin.bounds.penultimate`.

Kept so that code that imports these names from here goes on working; new code imports them
from :mod:`ccdist_plugin.bounds.penultimate`.
"""

from ccdist_plugin.bounds.penultimate import (
    DISTILL_LAYERS,
    check_distill_layer,
    latent_features,
    penultimate_index,
    propagate_split,
)

__all__ = [
    "DISTILL_LAYERS",
    "check_distill_layer",
    "latent_features",
    "penultimate_index",
    "propagate_split",
]

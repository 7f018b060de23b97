"""The old path of CROWN-IBP for training: the same names as :mod:`ccdist_plugin.bounds.crown_ibp`.

Kept so that code that imports these names from here goes on working; new code imports them
from :mod:`ccdist_plugin.bounds.crown_ibp`.
"""

from ccdist_plugin.bounds.crown_ibp import (
    check_crown_ibp_layers,
    crown_ibp_from_propagation,
    crown_ibp_margin_bounds,
    crown_ibp_unsupported_layer,
)

__all__ = [
    "check_crown_ibp_layers",
    "crown_ibp_from_propagation",
    "crown_ibp_margin_bounds",
    "crown_ibp_unsupported_layer",
]

"""The old path of auto_LiRPA as a bound backend: the same names as :mod:`ccdist_plugin.bounds.lirpa`.

Kept so that code that imports these names from here goes on working; new code imports them
from :mod:`ccdist_plugin.bounds.lirpa`.
"""

from ccdist_plugin.bounds.lirpa import (
    INSTALL_COMMAND,
    LirpaUnsupportedError,
    auto_lirpa_missing,
    check_lirpa_boundable,
    import_auto_lirpa,
    lirpa_bounded_module,
    lirpa_intervals,
    lirpa_margin_bounds,
    refuse_unsound_lirpa_crown,
)

__all__ = [
    "INSTALL_COMMAND",
    "LirpaUnsupportedError",
    "auto_lirpa_missing",
    "check_lirpa_boundable",
    "import_auto_lirpa",
    "lirpa_bounded_module",
    "lirpa_intervals",
    "lirpa_margin_bounds",
    "refuse_unsound_lirpa_crown",
]

"""The old path of the α,β-CROWN export: the same names as :mod:`ccdist_plugin.verification.export`
(the pipeline) and :mod:`ccdist_plugin.verification.writers` (ONNX, VNN-LIB, ``abcrown.yaml``).

Kept so that code that imports these names from here goes on working; new code imports them
from :mod:`ccdist_plugin.verification`.
"""

from ccdist_plugin.verification.export import (
    CERT_TOL,
    ExportResult,
    export_id_of,
    export_instances,
    set_aside_verdicts,
)
from ccdist_plugin.verification.writers import (
    CONFIG_NAME,
    CSV_NAME,
    DATASET_TEMPLATES,
    MANIFEST_NAME,
    ONNX_NAME,
    RESULTS_NAME,
    TEMPLATE_DIR,
    VNNLIB_DIR,
    ExportError,
    copy_templates,
    export_onnx,
    list_templates,
    normalized_box,
    template_path,
    write_abcrown_config,
    write_vnnlib,
)

__all__ = [
    "ExportError",
    "ExportResult",
    "CERT_TOL",
    "normalized_box",
    "export_onnx",
    "write_vnnlib",
    "template_path",
    "list_templates",
    "copy_templates",
    "write_abcrown_config",
    "export_instances",
    "set_aside_verdicts",
    "export_id_of",
    "ONNX_NAME",
    "CSV_NAME",
    "MANIFEST_NAME",
    "CONFIG_NAME",
    "RESULTS_NAME",
    "VNNLIB_DIR",
    "TEMPLATE_DIR",
    "DATASET_TEMPLATES",
]

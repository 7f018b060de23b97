"""The verification pipeline: pre-filter, α,β-CROWN export, runs and their verdicts.

Read bottom-up (each module imports only those above it in this list):

- ``cascade``: the pre-filter, the one IBP → CROWN → PGD cascade that ``ccdist eval`` and the
  export share (:func:`prefilter`, :class:`PrefilterResult`, :data:`STATUSES`);
- ``writers``: the export's files: ONNX model, VNN-LIB properties, ``abcrown.yaml`` from the
  templates;
- ``export``: :func:`export_instances`: pre-filter, files, ``instances.csv`` and the manifest;
- ``records``: one verdict per instance (:class:`InstanceResult`) and the checks that tie it to
  the export (:func:`check_export`);
- ``reports``: :func:`summarize` (counts, certified accuracy, soundness checks),
  :class:`VerificationResult` and its table, :func:`merge_shards`;
- ``processes``: α,β-CROWN in a process of its own, per instance or as a persistent worker
  (``abcrown_worker.py``, a standalone script run by path);
- ``runner``: :func:`run_verification`, the worker pool over an export's instances, and
  :func:`find_abcrown`.

The old paths ``ccdist_plugin.export`` and ``ccdist_plugin.verify`` re-export the same names.
"""

from ccdist_plugin.verification.cascade import STATUSES, PrefilterResult, predicted_class, prefilter
from ccdist_plugin.verification.export import ExportResult, export_id_of, export_instances, set_aside_verdicts
from ccdist_plugin.verification.processes import run_instance
from ccdist_plugin.verification.records import InstanceResult, IntegrityReport, check_export, parse_shard
from ccdist_plugin.verification.reports import INSTALL_HELP, VerificationResult, merge_shards, summarize
from ccdist_plugin.verification.runner import (
    AbcrownNotFoundError,
    VerdictWriteError,
    find_abcrown,
    hard_limit_s,
    run_verification,
)
from ccdist_plugin.verification.writers import (
    DATASET_TEMPLATES,
    TEMPLATE_DIR,
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
    "STATUSES",
    "PrefilterResult",
    "predicted_class",
    "prefilter",
    "ExportResult",
    "export_id_of",
    "export_instances",
    "set_aside_verdicts",
    "InstanceResult",
    "IntegrityReport",
    "check_export",
    "parse_shard",
    "INSTALL_HELP",
    "VerificationResult",
    "merge_shards",
    "summarize",
    "AbcrownNotFoundError",
    "VerdictWriteError",
    "find_abcrown",
    "hard_limit_s",
    "run_verification",
    "run_instance",
    "DATASET_TEMPLATES",
    "TEMPLATE_DIR",
    "ExportError",
    "copy_templates",
    "export_onnx",
    "list_templates",
    "normalized_box",
    "template_path",
    "write_abcrown_config",
    "write_vnnlib",
]

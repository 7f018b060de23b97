"""The old path of the α,β-CROWN runs and their verdicts: the same names as
:mod:`ccdist_plugin.verification.runner` (running α,β-CROWN, the worker pool),
:mod:`ccdist_plugin.verification.records` (verdict records, the integrity check),
:mod:`ccdist_plugin.verification.reports` (summaries) and
:mod:`ccdist_plugin.verification.processes` (one α,β-CROWN process).

Kept so that code that imports these names from here goes on working; new code imports them
from :mod:`ccdist_plugin.verification`.
"""

from ccdist_plugin.verification.processes import WORKER_SCRIPT, WORKER_START_LIMIT_S, run_instance
from ccdist_plugin.verification.records import (
    VERDICTS,
    VERIFY_DIR,
    InstanceResult,
    IntegrityReport,
    check_export,
    parse_shard,
)
from ccdist_plugin.verification.reports import (
    CATEGORIES,
    INSTALL_HELP,
    SUMMARY_NAME,
    TABLE_NAME,
    VerificationResult,
    merge_shards,
    summarize,
)
from ccdist_plugin.verification.runner import (
    MAX_WORKER_CRASHES,
    AbcrownNotFoundError,
    VerdictWriteError,
    find_abcrown,
    hard_limit_s,
    run_verification,
)

__all__ = [
    "INSTALL_HELP",
    "AbcrownNotFoundError",
    "VerdictWriteError",
    "InstanceResult",
    "IntegrityReport",
    "VerificationResult",
    "check_export",
    "find_abcrown",
    "hard_limit_s",
    "parse_shard",
    "run_instance",
    "run_verification",
    "merge_shards",
    "summarize",
    "VERIFY_DIR",
    "SUMMARY_NAME",
    "TABLE_NAME",
    "WORKER_SCRIPT",
    "VERDICTS",
    "CATEGORIES",
    "MAX_WORKER_CRASHES",
    "WORKER_START_LIMIT_S",
]

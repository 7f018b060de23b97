"""The verification package's import paths: the old ``ccdist_plugin.export`` / ``ccdist_plugin.verify``
and ``ccdist_plugin.evaluation``'s pre-filter names are the package's own objects, and the α,β-CROWN
worker script runs by path on the standard library alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import ccdist_plugin.evaluation as evaluation
import ccdist_plugin.export as old_export
import ccdist_plugin.verify as old_verify
from ccdist_plugin import verification
from ccdist_plugin.verification import cascade, processes

MODULES = ("cascade", "writers", "export", "records", "reports", "processes", "runner")


@pytest.mark.parametrize("old", [old_export, old_verify], ids=["export", "verify"])
def test_old_paths_give_the_same_objects(old):
    modules = [sys.modules[f"ccdist_plugin.verification.{m}"] for m in MODULES]
    assert old.__all__, old.__name__
    for name in old.__all__:
        obj = getattr(old, name)
        assert any(getattr(m, name, None) is obj for m in modules), name
        if name in verification.__all__:
            assert obj is getattr(verification, name), name


def test_evaluation_reexports_the_prefilter():
    for name in ("prefilter", "PrefilterResult", "STATUSES", "predicted_class"):
        assert getattr(evaluation, name) is getattr(cascade, name), name
    assert evaluation.prefilter is verification.prefilter


def test_worker_script_runs_without_the_package_and_off_its_own_folder(tmp_path):
    """Run by path without PYTHONPATH, from another folder: it imports nothing of the package. Its
    own folder (module names such as ``export`` and ``reports``) is not on ``sys.path``
    when α,β-CROWN runs, so no dependency of α,β-CROWN can import one of them by mistake."""
    fake = tmp_path / "complete_verifier"
    fake.mkdir()
    seen = tmp_path / "seen.json"
    (fake / "abcrown.py").write_text(
        "import json, sys\n"
        f"json.dump({{'path': sys.path, 'modules': sorted(sys.modules)}}, open({str(seen)!r}, 'w'))\n"
    )
    script = processes.WORKER_SCRIPT
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # (-I would also drop the
    # script's folder from sys.path, the very thing tested here)
    done = subprocess.run(
        [sys.executable, "-s", str(script), str(fake), "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(seen.read_text())
    assert str(script.parent) not in record["path"]
    assert not any(m.startswith("ccdist_plugin") for m in record["modules"])

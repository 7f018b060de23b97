"""Every script in examples/ runs, in its fast mode (CCDIST_EXAMPLES_FAST=1), from a scratch folder."""

from __future__ import annotations

import logging
import runpy
import subprocess
import sys

import pytest
import torch
from conftest import REPO

EXAMPLES = REPO / "examples"
PYTHON_EXAMPLES = sorted(EXAMPLES.glob("*.py"))
SHELL_EXAMPLES = sorted(EXAMPLES.glob("*.sh"))


@pytest.mark.parametrize("script", PYTHON_EXAMPLES, ids=lambda p: p.name)
def test_python_example_runs(script, tmp_path, monkeypatch, capsys, caplog):
    """In this process (torch is imported once for all of them), as ``python examples/<script>``."""
    monkeypatch.setenv("CCDIST_EXAMPLES_FAST", "1")
    monkeypatch.delenv("ABCROWN_DIR", raising=False)  # 03_export_verify: our own pre-filter only
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script)])
    threads = torch.get_num_threads()
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="ccdist_plugin")  # whatever an earlier test (a --quiet CLI) set
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:  # 03_export_verify exits 2 with the install steps when α,β-CROWN is absent
        assert script.name == "03_export_verify.py" and stop.code == 2, stop.code
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr()
    said = printed.out + printed.err + caplog.text
    assert "epoch" in said, "silent while training: " + said[-3000:]  # one line per epoch at least
    assert "\r" not in printed.err  # no progress bars off a terminal


@pytest.mark.parametrize("script", SHELL_EXAMPLES, ids=lambda p: p.name)
def test_shell_example_parses(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

"""Every script in examples/ runs, in its fast mode (CCDIST_EXAMPLES_FAST=1), from a scratch folder."""

from __future__ import annotations

import logging
import runpy
import subprocess
import sys

import pytest
import torch
from conftest import REPO, has_auto_lirpa

from ccdist_plugin.bounds import UnsupportedLayerError
from ccdist_plugin.bounds.lirpa import INSTALL_COMMAND

EXAMPLES = REPO / "examples"
PYTHON_EXAMPLES = sorted(EXAMPLES.glob("*.py"))
SHELL_EXAMPLES = sorted(EXAMPLES.glob("*.sh"))
#: examples whose network only auto_LiRPA bounds (tests/test_without_auto_lirpa.py checks what a user
#: gets without it: an UnsupportedLayerError naming the layer and the install command)
NEEDS_AUTO_LIRPA = {"bring_your_own_model.py"}


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
    except UnsupportedLayerError as err:
        # without auto_LiRPA, what a user of the example gets: the layer and the install command
        assert script.name in NEEDS_AUTO_LIRPA and not has_auto_lirpa(), err
        assert INSTALL_COMMAND in str(err), err
        pytest.skip(
            f"{script.name} needs auto_LiRPA, which is not installed (install it with: {INSTALL_COMMAND})"
        )
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

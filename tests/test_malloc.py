"""The opt-in allocator setting: applied where glibc offers it, harmless elsewhere, off on import."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from ccdist_plugin.cli import main


def _run(code: str) -> str:
    cmd = [sys.executable, "-c", code]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    return res.stdout.strip()


def test_retain_freed_memory_applies_on_glibc_and_tensors_still_work():
    out = _run(
        "import platform, torch\n"
        "from ccdist_plugin.malloc import retain_freed_memory\n"
        "ok = retain_freed_memory()\n"
        "x = torch.ones(64, 64, 32, 32)\n"
        "for _ in range(3):\n"
        "    y = x + x  # above glibc's largest mmap threshold: served from the kept heap now\n"
        "print(ok, platform.libc_ver()[0], float(y.sum()))\n"
    )
    ok, libc, total = out.split()
    assert float(total) == 2 * 64 * 64 * 32 * 32
    if sys.platform.startswith("linux") and libc == "glibc":
        assert ok == "True"


def test_importing_the_package_leaves_the_allocator_alone():
    # M_MMAP_MAX is not readable back, but the module must not be imported by the package itself
    out = _run("import ccdist_plugin, sys; print('ccdist_plugin.malloc' in sys.modules)")
    assert out == "False"


def test_cli_accepts_the_opt_out():
    result = CliRunner().invoke(main, ["--no-malloc-tuning", "presets"])
    assert result.exit_code == 0, result.output
    assert "digits" in result.output

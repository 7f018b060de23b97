"""The import-structure check (.ci/check_imports.py): it finds circles, upward imports and private
names taken across modules in small packages written here, and passes on the package itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ccdist_plugin import models

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "check_imports.py"
LAYERS = [["low"], ["mid", "sub.a"], ["sub.b"], ["sub"], ["high"], [""]]


def run_check(package: Path, layers: list[list[str]] | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, str(SCRIPT), str(package)]
    if layers is not None:
        table = package.parent / "layers.json"
        table.write_text(json.dumps(layers))
        args += ["--layers", str(table)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def write_package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "pkg"
    for name, text in {"__init__.py": "", "sub/__init__.py": "", **files}.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return pkg


CLEAN = {
    "low.py": "X = 1\n",
    "mid.py": "from pkg.low import X\n",
    "sub/a.py": "from .. import low\n",
    "sub/b.py": "from pkg.sub.a import low\n",
    "sub/__init__.py": "from pkg.sub.b import low\n",
    "high.py": "import pkg.sub\nfrom pkg.mid import X\n",
    "__init__.py": "from pkg.high import X\n",
}


def test_clean_package_passes(tmp_path):
    result = run_check(write_package(tmp_path, CLEAN), LAYERS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no import circle" in result.stdout


def test_function_level_circle_is_found(tmp_path):
    files = dict(CLEAN, **{"mid.py": "def f():\n    from pkg.sub import a\n", "sub/a.py": "import pkg.mid\n"})
    result = run_check(write_package(tmp_path, files), LAYERS)
    assert result.returncode == 1
    assert "import circle: pkg.mid <-> pkg.sub.a" in result.stdout


def test_upward_import_is_found(tmp_path):
    files = dict(CLEAN, **{"low.py": "def f():\n    from pkg.high import X\n    return X\n"})
    result = run_check(write_package(tmp_path, files), LAYERS)
    assert result.returncode == 1
    assert "pkg.low (layer 0) imports pkg.high from the higher layer 4" in result.stdout


def test_private_name_across_modules_is_found(tmp_path):
    files = dict(CLEAN, **{"low.py": "_hidden = 1\n", "mid.py": "from .low import _hidden\n"})
    result = run_check(write_package(tmp_path, files), LAYERS)
    assert result.returncode == 1
    assert "private name(s) _hidden imported from pkg.low" in result.stdout


def test_type_checking_import_counts(tmp_path):
    guarded = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import X\n"
    result = run_check(write_package(tmp_path, dict(CLEAN, **{"mid.py": guarded})), LAYERS)
    assert result.returncode == 1
    assert "imports pkg.high from the higher layer" in result.stdout


def test_unplaced_module_is_found(tmp_path):
    result = run_check(write_package(tmp_path, dict(CLEAN, **{"stray.py": ""})), LAYERS)
    assert result.returncode == 1
    assert "pkg.stray: in no layer" in result.stdout


def test_not_a_package_is_a_usage_error(tmp_path):
    result = run_check(tmp_path)
    assert result.returncode == 2
    assert "is not a package" in result.stderr


def test_the_package_itself_holds():
    result = run_check(REPO / "ccdist_plugin")
    assert result.returncode == 0, result.stdout


# models sit below the bound engine and import nothing from it; CertifiedNet.wrap's check is the bound
# engine's, registered when it is imported

WRAP_IN_A_FRESH_PROCESS = """
import torch
from torch import nn
from ccdist_plugin.models import CertifiedNet

class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        v = x.flatten(1)
        return torch.relu(self.a(v)) if v.mean() > 0.5 else torch.relu(self.b(v))

try:
    CertifiedNet.wrap(Branching(), nn.Linear(4, 2), (1, 2, 2))
except ValueError as exc:
    print(type(exc).__name__, exc)
"""


def test_wrap_in_a_fresh_process_runs_the_bound_engines_check():
    """Importing only ``ccdist_plugin.models`` still gets wrap's refusal (the package's import
    registers the check)."""
    result = subprocess.run(
        [sys.executable, "-c", WRAP_IN_A_FRESH_PROCESS], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("BoundedGraphMismatch CertifiedNet.wrap: features have data-dependent")


def test_wrap_without_a_registered_check_refuses_rather_than_skips(monkeypatch):
    monkeypatch.setattr(models, "_wrap_check", None)
    with pytest.raises(RuntimeError, match="no bound engine registered its check"):
        models.CertifiedNet.wrap(nn.Sequential(nn.Flatten(), nn.Linear(4, 4)), nn.Linear(4, 2), (1, 2, 2))
    net = models.CertifiedNet.wrap(
        nn.Sequential(nn.Flatten(), nn.Linear(4, 4)), nn.Linear(4, 2), (1, 2, 2), check_bounds=False
    )
    assert net(torch.zeros(3, 1, 2, 2)).shape == (3, 2)


@pytest.mark.parametrize(
    "old, new",
    [("lirpa", "bounds.lirpa"), ("crown_ibp", "bounds.crown_ibp"), ("latent", "bounds.penultimate")],
)
def test_old_bound_module_paths_give_the_same_objects(old, new):
    """The modules that moved into bounds/ keep their old import paths for users' code."""
    import importlib

    old_module = importlib.import_module(f"ccdist_plugin.{old}")
    new_module = importlib.import_module(f"ccdist_plugin.{new}")
    assert sorted(old_module.__all__) == sorted(new_module.__all__)
    for name in new_module.__all__:
        assert getattr(old_module, name) is getattr(new_module, name), name


def test_sizes_are_limited_unless_a_comment_says_why(tmp_path):
    """A module over 700 lines and a function over 80 lines without a comment above it are refused."""
    long_body = "".join(f"    x{i} = {i}\n" for i in range(85))
    files = dict(
        CLEAN,
        **{
            "low.py": "X = 1\n" + "\n" * 700,
            "mid.py": f"def long():\n{long_body}\n\n# why: one table\ndef explained():\n{long_body}",
        },
    )
    result = run_check(write_package(tmp_path, files), LAYERS)
    assert result.returncode == 1
    assert "pkg/low.py: 701 lines (more than 700)" in result.stdout
    assert "pkg/mid.py:1: long is 86 lines" in result.stdout
    assert "explained" not in result.stdout

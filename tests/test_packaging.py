"""Packaging: the α,β-CROWN templates ship as package data (one source of truth, a checked copy at the
repository's top level), and the package's public namespace is its API.

The wheel itself is built, installed into a fresh virtual environment and run by ``.ci/run``.
"""

from __future__ import annotations

import re

from conftest import REPO

import ccdist_plugin
from ccdist_plugin import export

PACKAGE_TEMPLATES = REPO / "ccdist_plugin" / "abcrown_configs"
TOP_LEVEL_TEMPLATES = REPO / "abcrown_configs"


def test_templates_are_package_data():
    assert export.TEMPLATE_DIR.resolve() == (REPO / "ccdist_plugin" / "abcrown_configs").resolve()
    assert set(export.list_templates()) >= {"digits", "cifar10", "tinyimagenet", "imagenet64", "teacher"}
    pyproject = (REPO / "pyproject.toml").read_text()  # (tomllib is Python >= 3.11)
    package_data = re.search(r"\[tool\.setuptools\.package-data\]\nccdist_plugin = (.*)", pyproject).group(1)
    assert '"abcrown_configs/*.yaml"' in package_data


def test_top_level_templates_are_identical_copies():
    """``abcrown_configs/`` (what users pass to abcrown.py) is a copy of the package data; edit the
    package's files and copy them over."""
    package = {p.name: p.read_bytes() for p in PACKAGE_TEMPLATES.glob("*.yaml")}
    top = {p.name: p.read_bytes() for p in TOP_LEVEL_TEMPLATES.glob("*.yaml")}
    fix = "cp ccdist_plugin/abcrown_configs/*.yaml abcrown_configs/"
    assert sorted(top) == sorted(package), f"template sets differ; run: {fix}"
    differing = [name for name in package if top[name] != package[name]]
    assert not differing, f"{differing} differ from the package's templates; run: {fix}"


def test_dir_lists_the_public_api():
    names = dir(ccdist_plugin)
    for public in ("Trainer", "load_model", "CCDistLoss", "certify", "TrainConfig", "__version__"):
        assert public in names
    for stray in ("importlib", "annotations"):
        assert stray not in names
    assert set(ccdist_plugin.__all__) <= set(names)
    for name in ccdist_plugin.__all__:  # every advertised name resolves (lazy ones included)
        assert getattr(ccdist_plugin, name) is not None


def test_version_matches_pyproject():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^version = "(.*)"', pyproject, re.M).group(1) == ccdist_plugin.__version__

"""Packaging: the α,β-CROWN templates ship as package data (one source of truth, a checked copy at the
repository's top level) and ``ccdist configs`` finds them; the package's public namespace is its API and
every name the docs import exists; every third-party module the code imports is a declared or a
documented optional dependency; the license and the project metadata are there.

The wheel itself is built, installed into a fresh virtual environment and run by ``.ci/run``.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO

import ccdist_plugin
from ccdist_plugin.verification import writers

PACKAGE_TEMPLATES = REPO / "ccdist_plugin" / "abcrown_configs"
TOP_LEVEL_TEMPLATES = REPO / "abcrown_configs"


def test_templates_are_package_data():
    assert writers.TEMPLATE_DIR.resolve() == (REPO / "ccdist_plugin" / "abcrown_configs").resolve()
    assert set(writers.list_templates()) >= {"digits", "cifar10", "tinyimagenet", "imagenet64", "teacher"}
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
    for public in ("Trainer", "build_model", "load_data", "load_model", "CCDistLoss", "certify"):
        assert public in names
    assert "TrainConfig" in names and "__version__" in names
    for stray in ("importlib", "annotations"):
        assert stray not in names
    assert set(ccdist_plugin.__all__) <= set(names)
    for name in ccdist_plugin.__all__:  # every advertised name resolves (lazy ones included)
        assert getattr(ccdist_plugin, name) is not None


def test_version_matches_pyproject():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^version = "(.*)"', pyproject, re.M).group(1) == ccdist_plugin.__version__


# ---- ccdist configs: where an installed package keeps the templates ----------------------------------


def test_configs_prints_the_packaged_folder_and_lists_the_templates():
    from ccdist_plugin.cli import main

    path = CliRunner().invoke(main, ["configs", "--path"])
    assert path.exit_code == 0, path.output
    assert Path(path.output.strip()) == writers.TEMPLATE_DIR
    assert sorted(p.stem for p in Path(path.output.strip()).glob("*.yaml")) == writers.list_templates()
    listing = CliRunner().invoke(main, ["configs"])
    assert listing.exit_code == 0, listing.output
    assert str(writers.TEMPLATE_DIR) in listing.output
    assert all(f"{name}.yaml" in listing.output for name in writers.list_templates())


def test_configs_copy_writes_identical_files_and_never_overwrites(tmp_path):
    from ccdist_plugin.cli import main

    dest = tmp_path / "my" / "configs"
    first = CliRunner().invoke(main, ["configs", "--copy", str(dest)])
    assert first.exit_code == 0, first.output
    for src in PACKAGE_TEMPLATES.glob("*.yaml"):
        assert (dest / src.name).read_bytes() == src.read_bytes()
    again = CliRunner().invoke(main, ["configs", "--copy", str(dest)])  # idempotent
    assert again.exit_code == 0 and again.output.count("unchanged") == len(writers.list_templates())

    edited = dest / "digits.yaml"
    edited.write_text(edited.read_text() + "# my edit\n")
    (dest / "cifar10.yaml").unlink()
    refused = CliRunner().invoke(main, ["configs", "--copy", str(dest)])
    assert refused.exit_code == 2
    assert refused.output.count("\n") == 1 and "digits.yaml" in refused.output  # one line, naming it
    assert edited.read_text().endswith("# my edit\n")  # kept
    assert not (dest / "cifar10.yaml").exists()  # nothing written before the check passed

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for args in (["--copy", str(a_file)], ["--path", "--copy", str(tmp_path / "c")]):
        bad = CliRunner().invoke(main, ["configs", *args])
        assert bad.exit_code == 2 and bad.output.startswith("error: ") and bad.output.count("\n") == 1, args


@pytest.mark.parametrize("template", sorted(PACKAGE_TEMPLATES.glob("*.yaml")), ids=lambda p: p.name)
def test_template_headers_say_where_their_command_runs(template):
    """The header's abcrown.py command takes the repository-relative path of that very file, and says it
    runs from the repository's root (and how an installed package finds the file)."""
    header = "".join(line for line in template.read_text().splitlines(True) if line.startswith("#"))
    assert "from anywhere" not in header
    assert "root of a clone of the repository" in header and "ccdist configs --path" in header
    relative = re.search(r"abcrown\.py --config (\S+)", header).group(1)
    assert (REPO / relative).read_bytes() == template.read_bytes()


# ---- every name the documentation imports exists --------------------------------------------------------

DOCUMENTED = [
    REPO / "README.md",
    *sorted((REPO / "docs").rglob("*.md")),
    *sorted((REPO / "ccdist_plugin").rglob("*.py")),
    *sorted((REPO / "examples").glob("*.py")),
]


def _code_text(path: Path) -> str:
    """The file with doctest prompts removed, so that ``>>> from x import y`` reads as code."""
    return re.sub(r"^(\s*)(>>>|\.\.\.) ?", r"\1", path.read_text(), flags=re.M)


def _imported_names(text: str) -> list[tuple[str, str]]:
    """``(module, name)`` of every ``from ccdist_plugin... import a, b`` (parenthesized lists too)."""
    found = []
    for match in re.finditer(r"from (ccdist_plugin(?:\.\w+)*) import (\([^)]*\)|[^\n]*)", text):
        names = re.sub(r"#[^\n]*", "", match.group(2)).strip("() \n")
        for name in names.split(","):
            name = name.split(" as ")[0].strip()
            if name:
                found.append((match.group(1), name))
    return found


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_name_the_docs_import_or_cite_exists():
    """README, docs/, docstrings and examples: each ``from ccdist_plugin.x import y``, each dotted
    ``ccdist_plugin.x.y`` and each ``cc.y`` after ``import ccdist_plugin as cc`` resolves."""
    missing = []
    for path in DOCUMENTED:
        text = _code_text(path)
        where = path.relative_to(REPO)
        for module, name in _imported_names(text):
            if not name.isidentifier() or not _resolves(f"{module}.{name}"):
                missing.append(f"{where}: from {module} import {name}")
        for dotted in set(re.findall(r"\bccdist_plugin(?:\.[A-Za-z_]\w*)+", text)):
            if not _resolves(dotted):
                missing.append(f"{where}: {dotted}")
        if re.search(r"import ccdist_plugin as cc\b", text):
            for name in set(re.findall(r"\bcc\.([A-Za-z_]\w*)", text)):
                if not hasattr(ccdist_plugin, name):
                    missing.append(f"{where}: cc.{name}")
    assert not missing, "\n".join(missing)


def test_the_trainer_route_is_in_the_top_level_api():
    """What the Trainer's docs and the quick start import from ``ccdist_plugin.trainer`` (build_model,
    load_data, ...) is also ``ccdist_plugin.<name>``."""
    sources = [REPO / "examples" / "quickstart.py", REPO / "docs" / "training.md", REPO / "README.md"]
    sources.append(REPO / "ccdist_plugin" / "trainer.py")
    text = "\n".join(_code_text(p) for p in sources)
    used = {name for module, name in _imported_names(text) if module == "ccdist_plugin.trainer"}
    assert {"Trainer", "build_model", "load_data"} <= used
    assert used <= set(ccdist_plugin.__all__), used - set(ccdist_plugin.__all__)
    for name in used:
        assert getattr(ccdist_plugin, name) is getattr(importlib.import_module("ccdist_plugin.trainer"), name)


# ---- dependencies: every third-party import is declared, or optional and documented --------------------

#: modules the code imports only where it needs them (inside a function or a try), with the page that
#: says how to install them
OPTIONAL_MODULES = {
    "auto_LiRPA": "docs/verification.md",
    "abcrown": "docs/verification.md",  # α,β-CROWN's complete_verifier, run from ABCROWN_DIR
    "autoattack": "docs/evaluation.md",
    "pyautoattack": "docs/evaluation.md",
    "torchattacks": "docs/evaluation.md",
    "optuna": "docs/tuning.md",  # ccdist tune; the tune extra
}


def _requirements(block: str) -> set[str]:
    """Distribution names (normalized) of a TOML list of requirement strings."""
    requirements = re.findall(r'"([^"]+)"', block)
    return {_normalized(re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0]) for req in requirements}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str]]:
    pyproject = (REPO / "pyproject.toml").read_text()
    core = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M).group(1)
    test = re.search(r"^test = \[(.*?)\]", pyproject, re.M).group(1)
    return _requirements(core), _requirements(test)


def _third_party_imports(root: Path) -> dict[str, list[tuple[str, bool]]]:
    """``{top-level module: [(file, unconditional)]}``: imports outside the standard library and the
    project; unconditional = a statement at a module's top level (not in a function, class or try)."""
    scripts = ("tests", "benchmarks", "examples")  # modules the tests import by path
    local = {"ccdist_plugin", *(p.stem for folder in scripts for p in (REPO / folder).glob("*.py"))}
    local |= {p.parent.name for folder in scripts for p in (REPO / folder).glob("*/__init__.py")}
    found: dict[str, list[tuple[str, bool]]] = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    site = (path.relative_to(REPO).as_posix(), id(node) in top_level)
                    found.setdefault(top, []).append(site)
    return found


@functools.cache
def _module_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions(module: str) -> set[str]:
    """The installed distributions that provide a top-level module (e.g. PIL → pillow)."""
    return {_normalized(d) for d in _module_distributions().get(module, [])}


def test_every_third_party_import_is_a_declared_or_documented_optional_dependency():
    core, test_extra = _declared()
    problems = []
    for root, allowed in ((REPO / "ccdist_plugin", core), (REPO / "tests", core | test_extra)):
        for module, sites in sorted(_third_party_imports(root).items()):
            where = ", ".join(sorted({f for f, _ in sites}))
            if module in OPTIONAL_MODULES:
                unconditional = sorted({f for f, top in sites if top})
                if unconditional:
                    problems.append(f"optional {module} imported at module level in {unconditional}")
                page = (REPO / OPTIONAL_MODULES[module]).read_text()
                if module not in page:
                    problems.append(f"optional {module} is not described in {OPTIONAL_MODULES[module]}")
                continue
            dists = _distributions(module) or {_normalized(module)}
            if not dists & allowed:
                problems.append(f"{module} (from {where}) is provided by {sorted(dists)}, not declared")
    assert not problems, "\n".join(problems)


def test_the_dependency_walk_sees_the_imports_it_must_check():
    """The walk is not vacuous: it finds the modules whose distribution names differ (PIL, sklearn,
    yaml) and the optional verifier, and maps them to their distributions."""
    found = _third_party_imports(REPO / "ccdist_plugin")
    assert {"torch", "numpy", "PIL", "sklearn", "yaml", "auto_LiRPA"} <= set(found)
    assert "pillow" in _distributions("PIL") and "scikit-learn" in _distributions("sklearn")
    core, _ = _declared()
    assert {"torch", "pillow", "scikit-learn", "pyyaml"} <= core


def test_the_readme_lists_the_core_dependencies():
    readme = (REPO / "README.md").read_text()
    listed = re.search(r"# core: ([^\n]*)", readme).group(1)
    assert {_normalized(n.strip()) for n in listed.split(",")} == _declared()[0]


# ---- license and project metadata ----------------------------------------------------------------------


def test_license_file_and_project_metadata():
    license_text = (REPO / "LICENSE").read_text()
    assert license_text.startswith("BSD 3-Clause License")
    assert "the ccdist-plugin authors" in license_text
    assert "Neither the name of the copyright holder" in license_text  # the third clause
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'license = { text = "BSD-3-Clause" }' in pyproject
    assert re.search(r"^authors = \[.*name = ", pyproject, re.M)
    classifiers = re.findall(r'"([^"]+ :: [^"]+)"', pyproject)
    assert "License :: OSI Approved :: BSD License" in classifiers
    assert any(c.startswith("Programming Language :: Python :: 3") for c in classifiers)
    assert "[project.urls]" not in pyproject or re.search(r"\[project\.urls\]\n\w+ = \"https://", pyproject)

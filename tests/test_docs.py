"""The documentation: docs/method.md has the sections the code points at and its preset table is the
preset files; user-facing text names no contributor-only file; docstring examples run (doctests)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from fractions import Fraction

import pytest
from conftest import REPO

import ccdist_plugin
from ccdist_plugin.config import list_presets, load_preset

METHOD = REPO / "docs" / "method.md"
SECTIONS = (
    "Losses",
    "Bounds",
    "BatchNorm during training",
    "Teacher",
    "Student training",
    "Presets",
    "Data",
    "Verification",
    "Evaluation",
)
USER_FACING = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
USER_FACING += sorted((REPO / "ccdist_plugin").rglob("*.py"))
USER_FACING += sorted((REPO / "ccdist_plugin").rglob("*.yaml"))
USER_FACING += sorted(p for p in (REPO / "examples").iterdir() if p.is_file())


def _method_sections() -> list[str]:
    return re.findall(r"^## (.+)$", METHOD.read_text(), re.M)


def test_method_page_has_the_sections_the_code_cites():
    assert _method_sections() == list(SECTIONS)
    cited: dict[str, set[str]] = {}
    for path in USER_FACING:
        # docs/method.md "Teacher", docs/method.md, "Data", docs/method.md ("BatchNorm during training")
        for name in re.findall(r'method\.md[,:]?\s*\(?"([^"]+)"', path.read_text()):
            cited.setdefault(" ".join(name.split()), set()).add(path.relative_to(REPO).as_posix())
    assert cited, "nothing cites docs/method.md any more?"
    unknown = {name: files for name, files in cited.items() if name not in SECTIONS}
    assert not unknown, f"docs/method.md has no such section: {unknown}"


def test_user_facing_text_names_no_contributor_file():
    """SPEC.md and the workspace's shared folder are contributor material (CONTRIBUTING.md); users get
    docs/method.md and public download / git routes."""
    hits = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in USER_FACING
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "SPEC.md" in line or "shared/" in line
    ]
    assert not hits, "\n".join(hits)


# ---- the Presets table against the preset files -------------------------------------------------------


def _table(section: str) -> list[dict[str, str]]:
    text = METHOD.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return [dict(zip(header, row, strict=True)) for row in cells]


def _num(cell: str) -> float:
    return float(Fraction(cell)) if "/" in cell else float(cell)


def _attack(cell: str) -> tuple[int, float, float]:
    match = re.fullmatch(r"(\d+) × ([\d.]+)ε(?:′, ε′ = ([\d.]+)ε)?", cell)
    assert match, f"attack cell {cell!r}"
    return int(match.group(1)), float(match.group(2)), float(match.group(3) or 1.0)


def test_method_presets_table_is_the_preset_files():
    rows = _table("Presets")
    assert {r["preset"].strip("`") for r in rows} == {
        name for name in list_presets() if not name.endswith(("-teacher", "-ccibp"))
    }
    for row in rows:
        name = row["preset"].strip("`")
        cfg = load_preset(name)
        teacher = load_preset(cfg.teacher.preset)
        ccibp = f"{name}-ccibp"
        attack = cfg.loss.attack
        assert row["data"] == cfg.data.name, name
        assert _num(row["ε"]) == pytest.approx(cfg.eps), name
        assert row["model (width)"] == f"{cfg.model.name} ({cfg.model.width})", name
        assert int(row["epochs"]) == cfg.schedule.epochs, name
        assert int(row["ramp-up"]) == cfg.schedule.ramp_up_epochs, name
        assert tuple(int(e) for e in row["lr decays"].split(",")) == tuple(cfg.optim.lr_decay_epochs), name
        assert _num(row["α CC-Dist"]) == cfg.loss.alpha and cfg.loss.method == "cc_dist", name
        if ccibp in list_presets():
            assert _num(row["α CC-IBP"]) == load_preset(ccibp).loss.alpha, name
        else:
            assert row["α CC-IBP"] == "–", name
        assert _num(row["ℓ1"]) == cfg.optim.l1, name
        assert _num(row["Shi λ"]) == cfg.optim.shi_lambda, name
        assert _attack(row["attack in the loss"]) == (attack.steps, attack.step_size, attack.eps_factor), name
        assert int(row["teacher epochs"]) == teacher.schedule.epochs, name
        assert _num(row["teacher ℓ1"]) == teacher.optim.l1, name
        assert teacher.loss.method == "pgd_at" and teacher.optim.lr_schedule == "cyclic", name


def test_method_data_table_is_the_dataset_specs():
    from ccdist_plugin.data import dataset_spec

    names = {
        "CIFAR-10": "cifar10",
        "TinyImageNet": "tinyimagenet",
        "ImageNet64 (downsampled ImageNet)": "imagenet64",
        "CIFAR-10 JPEG subset": "cifar10-jpeg",
    }
    rows = {row["dataset"]: row for row in _table("Data")}
    for label, name in names.items():
        spec = dataset_spec(name)
        cell = rows[label]["mean / std (per channel)"]
        if cell != "as CIFAR-10":
            mean, std = ([float(v) for v in part.strip(" ()").split(",")] for part in cell.split("/"))
            assert (tuple(mean), tuple(std)) == (spec.mean, spec.std), label


# ---- docstring examples ---------------------------------------------------------------------------------


def _modules_with_examples() -> list[str]:
    names = ["ccdist_plugin"] + [
        info.name for info in pkgutil.walk_packages(ccdist_plugin.__path__, "ccdist_plugin.")
    ]
    finder = doctest.DocTestFinder()
    return [
        name
        for name in names
        if any(test.examples for test in finder.find(importlib.import_module(name), name))
    ]


@pytest.mark.parametrize("module_name", _modules_with_examples())
def test_docstring_examples_run(module_name, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)  # examples that write (checkpoints, runs/) write here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module = importlib.import_module(module_name)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    finally:
        torch.set_num_threads(threads)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {module_name} failed"

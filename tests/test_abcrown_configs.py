"""The α,β-CROWN templates in abcrown_configs/: accepted by α,β-CROWN, commented, the paper's setup.

α,β-CROWN validates a config file in ``arguments.ConfigHandler.parse_config``: it builds the
tree of every registered parameter from its defaults and then walks the YAML with
``set_dict_by_hierarchy(..., nonexist_ok=False)``, which raises ``ValueError("Config key ... not
found!")`` for an unknown key. The tests call exactly that, in a subprocess, on the vendored copy
(``$ABCROWN_DIR``, or the contributors' copy beside the repository); they skip without one.
The end-to-end test runs the README's command on a tiny export (marker ``abcrown``).
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "abcrown_configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
STUDENT_CONFIGS = ["cifar10", "tinyimagenet", "imagenet64", "digits"]
PAPER_CONFIGS = ["cifar10", "tinyimagenet", "imagenet64", "teacher"]


def _complete_verifier() -> Path | None:
    candidates = []
    if os.environ.get("ABCROWN_DIR"):
        candidates.append(Path(os.environ["ABCROWN_DIR"]))
    candidates.append(REPO.parent / "shared" / "vendor" / "alpha-beta-CROWN" / "complete_verifier")
    for c in candidates:
        if (c / "arguments.py").is_file():
            return c
    return None


VERIFIER = _complete_verifier()
needs_vendor = pytest.mark.skipif(
    VERIFIER is None,
    reason="no alpha,beta-CROWN sources: not installed (ccdist install-verifier, or set ABCROWN_DIR)",
)

_VALIDATE = """
import sys
from arguments import ConfigHandler
bad = []
for path in sys.argv[1:]:
    try:
        ConfigHandler().parse_config(["--config", path], verbose=False)
        print("OK", path)
    except Exception as err:
        print("REJECTED", path, type(err).__name__, err)
"""


def _validate(paths: list[Path]) -> dict[str, str]:
    """α,β-CROWN's own config parser on each file: {path: "OK" | "REJECTED ..."}."""
    proc = subprocess.run(
        [sys.executable, "-c", _VALIDATE, *[str(p) for p in paths]],
        cwd=VERIFIER,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {}
    for line in proc.stdout.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("OK", "REJECTED"):
            path = rest.split(" ")[0]
            out[path] = status if status == "OK" else line
    return out


def test_all_templates_present():
    names = {p.stem for p in CONFIGS}
    assert {"cifar10", "tinyimagenet", "imagenet64", "teacher", "digits"} <= names


@needs_vendor
def test_configs_accepted_by_abcrown_parser(tmp_path):
    bogus = tmp_path / "bogus.yaml"
    bogus.write_text("solver:\n  alpha-crown:\n    iterations: 5\n")  # misspelt key: must be rejected
    result = _validate([*CONFIGS, bogus])
    assert result[str(bogus)].startswith("REJECTED"), "the validator accepted an unknown key: test is void"
    for path in CONFIGS:
        assert result[str(path)] == "OK", result[str(path)]


@needs_vendor
def test_generated_config_accepted(tmp_path):
    from ccdist_plugin.verification import write_abcrown_config

    paths = []
    for name in ("cifar10", "teacher", "digits"):
        out = tmp_path / name
        out.mkdir()
        paths.append(write_abcrown_config(out, name, 42, (3, 32, 32), {"general.device": "cpu"}))
    result = _validate(paths)
    for p in paths:
        assert result[str(p)] == "OK", result[str(p)]
        cfg = yaml.safe_load(p.read_text())
        assert cfg["general"]["root_path"] == str(p.parent.resolve())
        assert cfg["general"]["device"] == "cpu" and cfg["bab"]["timeout"] == 42


@needs_vendor
def test_keys_in_documented_parameter_list():
    """Every leaf key also appears in α,β-CROWN's generated list of all parameters."""
    documented = yaml.safe_load((VERIFIER / "docs" / "abcrown_all_params.yaml").read_text())

    def walk(d, prefix=()):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(v, (*prefix, k))
            else:
                yield (*prefix, k)

    for path in CONFIGS:
        for keys in walk(yaml.safe_load(path.read_text())):
            node = documented
            for k in keys:
                assert isinstance(node, dict) and k in node, (
                    f"{path.name}: {'.'.join(keys)} not in abcrown's list"
                )
                node = node[k]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_key_commented_with_paper_setting(path):
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue  # comments and section headers
        assert "# Paper:" in line, f"{path.name}:{lineno} has no '# Paper: ...' comment: {line!r}"


@pytest.mark.parametrize("name", PAPER_CONFIGS + ["digits"])
def test_paper_setup(name):
    cfg = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    assert cfg["attack"]["pgd_order"] == "before"
    assert cfg["bab"]["branching"]["input_split"]["enable"] is False
    assert cfg["bab"]["recompute_interm"] is False
    assert cfg["general"]["complete_verifier"] == "bab"
    assert cfg["general"]["csv_name"] == "instances.csv"
    if name in PAPER_CONFIGS:
        assert cfg["bab"]["timeout"] == 600
        assert cfg["general"]["device"] == "cuda"
        assert (cfg["attack"]["pgd_steps"], cfg["attack"]["pgd_restarts"]) == (500, 100)
    else:
        assert cfg["general"]["device"] == "cpu"
    if name == "teacher":
        assert cfg["solver"]["bound_prop_method"] == "crown"
        assert "alpha-crown" not in cfg["solver"]
    else:
        assert cfg["solver"]["bound_prop_method"] == "alpha-crown"
        assert cfg["solver"]["alpha-crown"]["iteration"] == 5
        assert cfg["solver"]["alpha-crown"]["lr_decay"] == 0.98


def _documented_command(name: str) -> list[str]:
    """The run command written in the template's header comment, as argv (before the CPU override)."""
    text = (CONFIG_DIR / f"{name}.yaml").read_text()
    m = re.search(r"#   (python \$ABCROWN_DIR/abcrown\.py --config \S+) \\\n#\s+(.*)\n", text)
    assert m, f"{name}.yaml documents no run command"
    return (m.group(1) + " " + m.group(2)).split()


def _documented_cpu_override(name: str) -> list[str]:
    text = (CONFIG_DIR / f"{name}.yaml").read_text()
    m = re.search(r"#   \.\.\. (--device cpu.*)\n", text)
    return m.group(1).split() if m else []


@pytest.mark.abcrown
@pytest.mark.parametrize("name", ["digits", "cifar10"])
def test_documented_command_runs(tmp_path, name):
    """`python $ABCROWN_DIR/abcrown.py --config abcrown_configs/<name>.yaml --root_path EXPORT_DIR
    --results_file EXPORT_DIR/abcrown_results.pkl` (+ the documented CPU override) verifies an export."""
    abcrown_dir = os.environ.get("ABCROWN_DIR")
    if not abcrown_dir or not (Path(abcrown_dir) / "abcrown.py").is_file():
        pytest.skip("alpha,beta-CROWN is not installed (ccdist install-verifier, or set ABCROWN_DIR)")
    from ccdist_plugin.models import cnn3, mlp
    from ccdist_plugin.verification import export_instances

    torch.manual_seed(0)
    if name == "digits":
        model, eps = mlp(1, 8, 3, width=16, depth=1), 0.01
    else:
        model = cnn3(3, 32, 3, width=16, channels=(4, 8), mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
        eps = 0.001
    model.eval()
    n = 2 if name == "digits" else 1  # the CIFAR template's attack alone takes ~10 s a point on CPU
    x = torch.rand(n, *model.input_shape)
    y = model(x).argmax(1)  # correct by construction
    export_dir = tmp_path / "export"
    export_instances(
        model, (x, y), export_dir, eps, timeout_s=60, template=name, attack_steps=0, verify_all=True
    )
    argv = _documented_command(name) + _documented_cpu_override(name)
    argv = [a.replace("$ABCROWN_DIR", abcrown_dir).replace("EXPORT_DIR", str(export_dir)) for a in argv]
    assert argv[:2] == ["python", f"{abcrown_dir}/abcrown.py"]
    argv[0] = os.environ.get("ABCROWN_PYTHON", sys.executable)
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(export_dir / "abcrown_results.pkl", "rb") as f:
        results = pickle.load(f)
    labels = [r[0] for r in results["results"]]
    assert len(labels) == n
    assert all(label.startswith("safe") for label in labels), labels  # tiny ε: robust

"""The README's Python example runs as written (with an untrained teacher standing in for the checkpoint)."""

from __future__ import annotations

import re

import pytest
import readme_table
import torch
from conftest import REPO


def test_readme_python_example_runs(monkeypatch, capsys):
    text = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "CCDistLoss" in code and "certify" in code
    import ccdist_plugin as cc

    torch.manual_seed(0)
    monkeypatch.setattr(cc, "load_model", lambda path: cc.mlp(1, 8, 10, width=256))
    torch.set_num_threads(1)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert re.fullmatch(r"CROWN-certified accuracy at eps=0\.05: \d{1,3}\.\d%", printed), printed
    assert "tensor(" not in printed  # a figure, not torch's repr


# ---- the demo table and the verification figures quoted in the README ------------------------------

DEMO_OUTPUT = """\
digits (8x8), eps = 0.1 (pixel units, inputs in [0, 1]), 300 held-out test points
model                 standard      PGD-40    IBP-cert  CROWN-cert     train s
PGD teacher              95.0%       75.7%        0.0%       47.7%         7.3
CC-IBP                   92.0%       72.0%       40.7%       57.3%         3.6
CC-Dist                  92.3%       74.7%       42.0%       63.0%         4.3
total wall time 26.9 s
"""


def test_demo_table_parser_and_drift_check():
    rows = readme_table.parse_demo_table(DEMO_OUTPUT)
    assert list(rows) == ["PGD teacher", "CC-IBP", "CC-Dist"]
    assert rows["CC-Dist"] == (92.3, 74.7, 42.0, 63.0)
    assert readme_table.drift(DEMO_OUTPUT, DEMO_OUTPUT) == []
    # one figure off by 0.3 points, or a row missing, is drift; the training time is not
    moved = DEMO_OUTPUT.replace("63.0%", "62.7%").replace("7.3\n", "9.9\n")
    assert readme_table.drift(moved, DEMO_OUTPUT) == ["CC-Dist CROWN-cert: README 63.0%, demo printed 62.7%"]
    without_ccibp = "\n".join(line for line in DEMO_OUTPUT.splitlines() if not line.startswith("CC-IBP"))
    assert readme_table.drift(without_ccibp, DEMO_OUTPUT) == ["CC-IBP: in the README, not printed"]
    with pytest.raises(ValueError, match="no demo table"):
        readme_table.parse_demo_table("nothing here")


def test_readme_states_the_demo_configuration_and_quotes_its_figures():
    """The README's table names its configuration, has the demo's three rows, and the verification
    paragraph quotes the CC-Dist row's IBP/CROWN figures (the BaB figure: docs/verification.md)."""
    readme = (REPO / "README.md").read_text()
    rows = readme_table.parse_demo_table(readme)
    assert list(rows) == ["PGD teacher", "CC-IBP", "CC-Dist"]
    assert "torch 2.13.0" in readme and "one thread" in readme
    ibp, crown = rows["CC-Dist"][2], rows["CC-Dist"][3]
    quoted = re.search(r"IBP ([\d.]+) %, CROWN ([\d.]+) %, α,β-CROWN BaB ([\d.]+) % certified", readme)
    assert quoted, "the README's verification figures sentence changed shape"
    assert (float(quoted.group(1)), float(quoted.group(2))) == (ibp, crown)
    verification = (REPO / "docs" / "verification.md").read_text()
    table = [float(v) for v in re.findall(r"\| \**(\d+\.\d\d) %", verification)]  # its 2-decimal figures
    for figure in quoted.groups():
        assert any(round(v, 1) == float(figure) for v in table), f"{figure} % not in docs/verification.md"


@pytest.mark.slow  # about 30 s on 2 cores; CI runs the same check on the installed wheel's demo (.ci/run)
def test_readme_demo_table_matches_a_fresh_demo(tmp_path):
    from ccdist_plugin.demo import run_demo

    result = run_demo(output_dir=tmp_path / "demo", export=False, verify=False)
    assert readme_table.drift(result.table(), (REPO / "README.md").read_text()) == []

"""The README's Python example runs as written (with an untrained teacher standing in for the checkpoint)."""

from __future__ import annotations

import re

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
    assert printed.startswith("tensor(")

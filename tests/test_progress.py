"""Progress display: bars only on a terminal, one plain line per finished loop elsewhere."""

from __future__ import annotations

import io
import sys

import torch

from ccdist_plugin.evaluation import EvalSettings, evaluate
from ccdist_plugin.models import mlp
from ccdist_plugin.progress import on_terminal, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_no_bar_and_one_line_per_loop(monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert not on_terminal()
    lines: list[str] = []
    assert list(progress_bar(range(3), desc="crown", done=lines.append)) == [0, 1, 2]
    assert len(lines) == 1 and lines[0].startswith("crown: 3 batches in ")
    assert list(progress_bar(range(1), desc="pgd", done=lines.append)) == [0]
    assert lines[1].startswith("pgd: 1 batch in ")
    assert list(progress_bar(range(2), desc="off", enabled=False, done=lines.append)) == [0, 1]
    manual = progress_bar(total=4, desc="epoch 1/2")  # the trainer's use: update / set_postfix / close
    manual.update(2)
    manual.set_postfix(loss=0.5)
    manual.close()
    assert len(lines) == 2 and stderr.getvalue() == ""


def test_on_a_terminal_a_bar_and_no_line(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert on_terminal()
    lines: list[str] = []
    assert list(progress_bar(range(3), desc="crown", done=lines.append)) == [0, 1, 2]
    assert lines == [] and "crown" in terminal.getvalue()
    terminal.truncate(0)
    assert list(progress_bar(range(3), desc="hidden", enabled=False)) == [0, 1, 2]
    assert "hidden" not in terminal.getvalue()


def test_evaluate_logs_one_line_per_metric_off_a_terminal(monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    torch.manual_seed(0)
    model = mlp(1, 8, 10, width=32)
    x, y = torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,))
    lines: list[str] = []
    evaluate(model, x, y, EvalSettings(eps=0.05, pgd_steps=2), progress=True, log=lines.append)
    described = {line.split(":")[0] for line in lines}
    assert "standard" in described and len(described) >= 3, lines  # standard, PGD, IBP, CROWN
    assert "\r" not in stderr.getvalue()
    lines.clear()
    evaluate(model, x, y, EvalSettings(eps=0.05, pgd_steps=2), progress=False, log=lines.append)
    assert lines == []

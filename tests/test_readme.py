"""The README's Python example runs as written (with an untrained teacher standing in for the checkpoint)."""

from __future__ import annotations

import re
from pathlib import Path

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


# ---- the Evaluation section's commands, as written, after the demo ----------------------------------------


def _evaluation_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Evaluation", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("ccdist ")]


def test_readme_evaluation_commands_run_after_the_demo(tmp_path, monkeypatch, digits_data):
    """The demo's layout (runs/demo/<model>/checkpoint.pt, from short runs here), then the section's
    `ccdist eval` lines (on 30 points, no ε curve; --bab only with α,β-CROWN installed), its `ccdist compare`
    line with the shell's glob expansion: one table with a row per evaluated model."""
    import glob
    import shlex

    from click.testing import CliRunner
    from conftest import abcrown_dir, fast_config

    from ccdist_plugin.cli import main
    from ccdist_plugin.trainer import Trainer, build_model, train_teacher

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    short = ["schedule.epochs=1", "schedule.ramp_up_epochs=0", "optim.lr_decay_epochs=[]"]
    teacher_cfg = fast_config(tmp_path, *short, "role=teacher", "loss.method=pgd_at")
    teacher_cfg = teacher_cfg.override(["log.output_dir=runs/demo/teacher"])
    data = digits_data  # 256 training examples
    train_teacher(build_model(teacher_cfg, data.spec), teacher_cfg, data.train)
    for name, method in (("cc_ibp", "cc_ibp"), ("cc_dist", "cc_dist")):
        cfg = fast_config(tmp_path, *short, f"loss.method={method}", f"log.output_dir=runs/demo/{name}")
        teacher = "runs/demo/teacher/checkpoint.pt" if method == "cc_dist" else None
        Trainer(build_model(cfg, data.spec), cfg, teacher=teacher).fit(data.train)

    commands = _evaluation_commands()
    compare = [c for c in commands if c.startswith("ccdist compare")]
    assert len(compare) == 1, commands
    evaluated = set()
    for command in commands[: commands.index(compare[0])]:
        argv = shlex.split(command)[1:]
        assert argv[0] == "eval", command
        if "--bab" in argv and abcrown_dir() is None:
            continue
        bound = ["--bab-timeout", "30"] if "--bab" in argv else []  # a bound on the test's time only
        result = CliRunner().invoke(main, [*argv, "--count", "30", "--curve-eps", "", *bound, "--quiet"])
        assert result.exit_code == 0, f"{command}\n{result.output}"
        evaluated.add(argv[argv.index("--checkpoint") + 1].split("/")[2])
    assert evaluated == {"cc_ibp", "cc_dist"}

    argv = []
    for word in shlex.split(compare[0])[1:]:  # as the shell expands a glob
        argv += sorted(glob.glob(word)) if any(c in word for c in "*?[") else [word]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, f"{compare[0]} -> {argv}\n{result.output}"
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else Path("compare")
    table = (out / "compare.md").read_text()
    assert "CC-IBP" in table and "CC-Dist" in table, table


# ---- the attack the docs describe is the attack the code runs --------------------------------------------


def test_docs_describe_the_evaluation_attack_the_code_runs():
    """Every "N steps of s·ε" in the README and docs is EVAL_PGD's; a step of the old form (2.5ε/40)
    appears only in a paragraph that says its result was made before the attack was fixed."""
    from ccdist_plugin.attacks import EVAL_PGD

    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    stated, stale = [], []
    for page in pages:
        for paragraph in re.split(r"\n\s*\n", page.read_text()):
            stated += re.findall(r"(\d+) steps of ([\d.]+)·ε", paragraph)
            if re.search(r"[\d.]+ε/\d+", paragraph) and "before" not in paragraph:
                stale.append(f"{page.name}: {paragraph.strip()[:200]}")
    assert stated, "no page states the evaluation attack"
    assert all((int(n), float(s)) == (EVAL_PGD.steps, EVAL_PGD.step_size) for n, s in stated), stated
    assert not stale, "\n".join(stale)


def test_evaluation_page_example_is_the_demo_table_row():
    """docs/evaluation.md's `ccdist eval` example on the demo's CC-Dist checkpoint quotes the same
    standard, PGD-40, IBP and CROWN figures as the README's demo table (which CI checks against a fresh
    demo), so the page cannot keep figures the commands no longer print."""
    demo = readme_table.parse_demo_table((REPO / "README.md").read_text())["CC-Dist"]
    page = (REPO / "docs" / "evaluation.md").read_text()
    example = page.split("## Example: the digits demo", 1)[1]
    header = next(line for line in example.splitlines() if line.startswith("| Method |"))
    row = next(line for line in example.splitlines() if line.startswith("| CC-Dist |"))
    names = [c.strip() for c in header.strip("|").split("|")]
    cells = dict(zip(names, [c.strip() for c in row.strip("|").split("|")], strict=True))
    quoted = tuple(round(float(cells[k]), 1) for k in ("Std.", "PGD-40", "IBP", "CROWN"))
    assert quoted == demo, (quoted, demo)


def test_digits_training_commands_set_one_thread():
    """The README's and the scaling page's digits training commands (outside torchrun, which sets one
    thread per process itself) pass --threads 1: torch's default threads are many times slower for these
    small networks on a shared CPU (docs/training.md, --threads)."""
    commands = []
    for page in (REPO / "README.md", REPO / "docs" / "scaling.md"):
        for line in page.read_text().splitlines():
            if "torchrun" in line or line.lstrip().startswith("#"):
                continue
            found = re.findall(r"ccdist train(?:-teacher)? --config digits[^`|#\n]*", line)
            commands += [(page.name, command) for command in found]
    assert len(commands) >= 3, commands
    missing = [c for c in commands if "--threads 1" not in c[1]]
    assert not missing, missing

"""What the commands and examples say (issue 21, "Messages and help"): whole sentences, help for every
option, no raw colour codes, summaries that say when they are partial, times that cover all the work."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, has_auto_lirpa, require_abcrown_dir

from ccdist_plugin.cli import main
from ccdist_plugin.config import list_presets, preset_description

torch.set_num_threads(1)


def _commands(group: click.Group, path: tuple[str, ...] = ("ccdist",)):
    for name, command in group.commands.items():
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


def test_every_command_and_option_has_help():
    missing = []
    for path, command in _commands(main):
        if not (command.help or "").strip():
            missing.append(" ".join(path))
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden and not (param.help or "").strip():
                missing.append(f"{' '.join(path)} {'/'.join(param.opts)}")
    for param in main.params:
        if isinstance(param, click.Option) and not param.hidden and not (param.help or "").strip():
            missing.append(f"ccdist {'/'.join(param.opts)}")
    assert missing == [], f"no help text: {missing}"


def test_presets_show_whole_sentences():
    result = CliRunner().invoke(main, ["presets"])
    assert result.exit_code == 0, result.output
    entries: dict[str, list[str]] = {}
    for line in result.output.splitlines():
        if line.startswith(" "):  # a continuation of the description above
            entries[list(entries)[-1]].append(line.strip())
        else:
            name, _, text = line.partition(" ")
            entries[name] = [text.strip()]
    assert list(entries) == list_presets()
    for name, lines in entries.items():
        description = preset_description(name)
        assert " ".join(lines) == description, name
        assert description.endswith("."), f"{name}: {description!r} stops mid-sentence"
        header = (REPO / "ccdist_plugin" / "presets" / f"{name}.yaml").read_text().splitlines()[0]
        assert description.startswith(header.lstrip("# ").strip()[:40])
    assert max(len(line) for line in result.output.splitlines()) <= 100


def test_verify_log_and_shard_summaries(tmp_path, caplog):
    from test_verify import make_export, make_fake_abcrown

    from ccdist_plugin.verification import merge_shards, run_verification
    from ccdist_plugin.verification.runner import _workers_phrase

    assert _workers_phrase(1, "worker") == "1 worker, α,β-CROWN loaded once per worker"
    assert _workers_phrase(2, "process") == "2 workers, one α,β-CROWN process per instance"
    export, fake = make_export(tmp_path, ["bab"] * 4), make_fake_abcrown(tmp_path, {})
    caplog.set_level(logging.INFO, logger="ccdist_plugin")
    result = run_verification(export, abcrown_dir=fake, python=sys.executable, shard="0/2")
    assert "worker worker" not in caplog.text and "(shard_0_of_2, 1 worker, " in caplog.text
    table = result.table()
    assert result.shard == "0/2" and "**Partial: written by shard 0/2.**" in table
    assert "--merge" in table and "certified accuracy (partial, shard 0/2)" in table
    shard_files = export / "verify" / "summary_shard_0_of_2"
    assert "Partial" in shard_files.with_suffix(".md").read_text()
    assert '"shard": "0/2"' in shard_files.with_suffix(".json").read_text()
    run_verification(export, abcrown_dir=fake, python=sys.executable, shard="1/2")
    merged = merge_shards(export)
    assert merged.shard is None and "Partial" not in merged.table() and merged.certified == 4
    whole = run_verification(export, abcrown_dir=fake, python=sys.executable)  # no shard: not partial
    assert whole.shard is None and "Partial" not in whole.table()


def test_eval_time_includes_the_eps_curve(tmp_path):
    from ccdist_plugin.cli.evaluate import run_eval
    from ccdist_plugin.config import load_preset
    from ccdist_plugin.trainer import Trainer, build_model, load_data

    cfg = load_preset("digits-teacher").override(
        ["model.width=16", "schedule.epochs=1", "loss.attack.steps=1", "log.progress=false"]
        + ["log.plot=false", "log.tensorboard=false", f"log.output_dir={tmp_path / 'run'}"]
    )
    data = load_data(cfg)
    fit = Trainer(build_model(cfg, data.spec), cfg).fit(data.train)
    settings = {"attack": "pgd40", "methods": ("ibp",)}
    plain = run_eval(fit.checkpoint, tmp_path / "plain", settings, count=20, curve=[], progress=False)
    assert "eps_curve" not in plain["timings_s"]
    curve = [0.5, 1, 2]
    record = run_eval(fit.checkpoint, tmp_path / "curve", settings, count=20, curve=curve, progress=False)
    timings = record["timings_s"]
    stages = sum(v for k, v in timings.items() if k not in ("total", "eps_curve"))
    assert timings["eps_curve"] > 0
    assert timings["total"] >= stages + timings["eps_curve"]  # the curve's passes are in the total
    row = (tmp_path / "curve" / "eval.md").read_text().splitlines()[2]
    assert row.rstrip(" |").endswith(f"{timings['total']:.3g}")  # "Eval time" is that total


@pytest.mark.skipif(not has_auto_lirpa(), reason="needs auto_LiRPA (docs/verification.md, 'Install')")
def test_auto_lirpa_output_has_no_colour_codes_and_keeps_logging(tmp_path):
    """A network bounded through auto_LiRPA (its own forward, a normalization in front, which
    auto_LiRPA warns about): its warning comes out once, as plain text; importing it leaves the
    program's logging handlers and warning filters as they were."""
    script = tmp_path / "bound.py"
    script.write_text(
        textwrap.dedent("""
        import logging, sys, warnings
        import torch
        from torch import nn
        from ccdist_plugin.bounds import certify
        from ccdist_plugin.models import CertifiedNet

        class Features(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(64, 16)
            def forward(self, x):
                return torch.relu(self.fc(x.flatten(1)))

        torch.manual_seed(0)
        handlers, filters = list(logging.getLogger().handlers), list(warnings.filters)
        model = CertifiedNet.wrap(Features(), nn.Linear(16, 10), (1, 8, 8), mean=[0.3], std=[0.4]).eval()
        x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
        for _ in range(2):
            certify(model, x, y, 0.01, method="crown")
        assert "auto_LiRPA" in sys.modules
        print("handlers kept", logging.getLogger().handlers == handlers)
        print("filters kept", warnings.filters == filters)
        """)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "default"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "\x1b" not in output, output
    assert "handlers kept True" in output and "filters kept True" in output
    assert output.count("UserWarning: Constant operand of node") <= 1  # once, not once per bound


@pytest.mark.slow
def test_export_verify_example_sends_points_to_abcrown_in_full_mode(tmp_path):
    """examples/03_export_verify.py as a user runs it (full mode): the pre-filter leaves points
    undecided and α,β-CROWN gives its verdicts on them."""
    abcrown = require_abcrown_dir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "ABCROWN_DIR": abcrown}
    env.pop("CCDIST_EXAMPLES_FAST", None)
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "03_export_verify.py")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    sent = int(re.search(r"α,β-CROWN instances: (\d+)", done.stdout).group(1))
    assert sent > 0, done.stdout
    counts = {
        key: int(re.search(rf"\| α,β-CROWN {key}[^|]*\| (\d+) \|", done.stdout).group(1))
        for key in ("safe", "unsafe", "timeout/unknown")
    }
    assert sum(counts.values()) == sent, done.stdout  # every instance got a verdict
    assert "\x1b" not in done.stdout + done.stderr
    assert Path(tmp_path / "runs" / "example03" / "export" / "verification.json").is_file()

"""``benchmarks/verifier_overhead.py`` (issue 23): interleaved rounds are reduced to per-round figures
and medians, budget hits are counted per route, and CPU time includes the children waited for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import verifier_overhead as vo  # noqa: E402


def _round(csv_wall, csv_cpu, csv_verdicts, ours_wall, ours_cpu, ours_verdicts):
    return {
        "csv": {"wall_s": csv_wall, "cpu_s": csv_cpu, "verdicts": csv_verdicts, "load_before": 1.0},
        "ours": {"wall_s": ours_wall, "cpu_s": ours_cpu, "verdicts": ours_verdicts, "load_before": 2.0},
    }


ROUNDS = [
    # a hard point times out in the csv run only: wall time drops, CPU time does not
    _round(40.0, 20.0, ["safe", "timeout", "unsafe", "safe"], 20.0, 22.0, ["safe", "safe", "unsafe", "safe"]),
    _round(
        20.0, 20.0, ["safe", "safe", "unsafe", "safe"], 24.0, 22.0, ["safe", "timeout", "unsafe", "error"]
    ),
    _round(
        30.0, 20.0, ["safe", "timeout", "unsafe", "safe"], 27.0, 24.0, ["safe", "timeout", "unsafe", None]
    ),
]


def test_rounds_become_per_round_ratios_medians_and_budget_hits():
    s = vo.summarize_rounds(ROUNDS, n=4)
    assert s["rounds"] == 3
    assert s["wall_ratio"] == [0.5, 1.2, 0.9] and s["median_wall_ratio"] == 0.9
    assert s["cpu_ratio"] == [1.1, 1.1, 1.2] and s["median_cpu_ratio"] == 1.1
    assert (
        s["csv"]["wall_per_instance_s"] == [10.0, 5.0, 7.5] and s["csv"]["median_wall_per_instance_s"] == 7.5
    )
    assert s["ours"]["median_cpu_per_instance_s"] == 5.5
    assert s["csv"]["budget_hits"] == [1, 0, 1] and s["ours"]["budget_hits"] == [0, 1, 1]
    assert s["csv"]["errors"] == [0, 0, 0] and s["ours"]["errors"] == [0, 1, 1]  # an error / no verdict
    assert s["same_verdicts"] == [3, 2, 3] and s["safe_unsafe_disagreements"] == 0


def test_a_safe_unsafe_disagreement_is_counted_and_reported():
    rounds = [_round(1.0, 1.0, ["safe", "unsafe"], 1.0, 1.0, ["unsafe", "unsafe"])]
    s = vo.summarize_rounds(rounds, n=2)
    assert s["safe_unsafe_disagreements"] == 1 and s["same_verdicts"] == [1]
    row = {"dataset": "digits", "instances": 2, "timeout_s": 10.0, "mode": "worker", "measured": rounds, **s}
    text = vo.markdown([row], "verifier_overhead.py --rounds 1")
    assert "1 safe/unsafe disagreements" in text and "`verifier_overhead.py --rounds 1`" in text


def test_markdown_shows_cpu_beside_wall_and_the_budget_hits():
    s = vo.summarize_rounds(ROUNDS, n=4)
    row = {"dataset": "digits", "instances": 4, "timeout_s": 10.0, "mode": "worker", "measured": ROUNDS, **s}
    text = vo.markdown([row], "cmd")
    csv_line = next(line for line in text.splitlines() if "one α,β-CROWN over the csv" in line)
    assert "7.50 (10.00, 5.00, 7.50)" in csv_line  # wall per instance: median (per round)
    assert "5.00 (5.00, 5.00, 5.00)" in csv_line  # CPU per instance
    assert "| 1, 0, 1 |" in csv_line  # budget hits per round
    ratio_line = next(line for line in text.splitlines() if "ratio ours / csv" in line)
    assert "**0.90** (0.50, 1.20, 0.90)" in ratio_line and "**1.10** (1.10, 1.10, 1.20)" in ratio_line
    assert "1.00, 2.00" in text  # the load average before each run


def test_cpu_seconds_include_a_child_once_it_is_waited_for():
    before = vo._cpu_seconds()
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    assert vo._cpu_seconds() - before >= 0.25  # the child burnt 0.3 s of CPU (clock granularity aside)

"""The load average and the budgets of two benchmarks: ``benchmarks/tanh_crown_cost.py`` stops an
auto_LiRPA call at its time or memory budget and reports it (never drops it), and both it and
``benchmarks/accumulate_memory.py`` record the 1-minute load average before and after each timed run."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import accumulate_memory as am  # noqa: E402
import tanh_crown_cost as tc  # noqa: E402

#: a tiny tanh CNN-7: its child process starts in seconds
TINY = argparse.Namespace(
    channels="2,2,2,2,2",
    width=8,
    points=2,
    eps=2 / 255,
    auto_lirpa_timeout=None,
    auto_lirpa_memory_mib=None,
)


def _args(**changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(TINY), **changes})


def test_a_finished_child_bounds_the_same_problem_as_this_process():
    args = _args(auto_lirpa_timeout=300.0)
    run = tc._in_child(args, "native", 1)
    _, model, x, y = tc._problem(args)
    here = tc._bound(args, model, x, y, "native", 1)
    assert run["finished"] and "stopped_by" not in run
    assert run["cpu_s"] > 0 and run["peak_rss_mib"] > 0
    torch.testing.assert_close(run["lb"], here, rtol=0, atol=0)


def test_a_call_past_its_time_budget_is_reported_with_the_time_spent():
    pytest.importorskip("auto_LiRPA")
    run = tc._in_child(_args(auto_lirpa_timeout=0.3), "auto_LiRPA", 0)
    assert not run["finished"] and run["stopped_by"] == "time"
    assert run["wall_s"] >= 0.3 and run["cpu_s"] >= 0 and run["peak_rss_mib"] > 0
    assert "lb" not in run


def test_a_call_past_its_memory_budget_is_reported():
    # the child's resident memory is above 1 MiB as soon as it is watched
    run = tc._in_child(_args(auto_lirpa_memory_mib=1.0), "native", 0)
    assert not run["finished"] and run["stopped_by"] == "memory"


def _summary(stopped_by: str | None) -> dict:
    finished = stopped_by is None
    point = {
        "wall_s": {"native": 1.5, "auto_LiRPA": 30.0},
        "cpu_s": {"native": 1.25, "auto_LiRPA": 20.0},
        "finished": {"native": True, "auto_LiRPA": finished},
        "stopped_by": {} if finished else {"auto_LiRPA": stopped_by},
        "log": {"auto_LiRPA": ["patches mode failed; matrix mode"]},
        "load_1min_before_after": {"native": [3.25, 3.5], "auto_LiRPA": [3.5, 4.75]},
        "peak_rss_mib": {"auto_LiRPA": 900},
    }
    summary = {
        "command": "python benchmarks/tanh_crown_cost.py --auto-lirpa-timeout 30",
        "channels": [2, 2, 2, 2, 2],
        "width": 8,
        "eps": 2 / 255,
        "backends": ["native", "auto_LiRPA"],
        "auto_lirpa_timeout_s": 30.0,
        "auto_lirpa_memory_cap_mib": 512.0,
        "budget_hits": {"native": 0, "auto_LiRPA": int(not finished)},
        "process_peak_rss_mib": 350,
        "native_alone_in_process": True,
        "max_rel_diff": 1e-7 if finished else None,
        "torch": torch.__version__,
        "per_point": [point],
        "date_utc": "2026-01-01 00:00",
    }
    key = "cpu_ratio_native_over_auto_lirpa" + ("" if finished else "_at_most")
    summary[key] = 1.25 / 20.0
    return summary


def test_tanh_table_gives_the_load_and_the_budget_hits():
    md = tc._markdown(_summary("time"))
    assert md.startswith("<!-- python benchmarks/tanh_crown_cost.py --auto-lirpa-timeout 30 -->")
    assert "| load (1-min, before/after) | 3.2/3.5 | 3.5/4.8 |" in md
    assert "did not finish within 30 s (20.0 s spent)" in md
    assert "at most 0.062×" in md and "patches mode failed; matrix mode" in md
    memory = tc._markdown(_summary("memory"))
    assert "stopped at the 512 MiB memory cap (20.0 s spent)" in memory
    assert "no ratio of times" in memory and "at most" not in memory
    killed = tc._markdown(_summary("signal 9"))
    assert "killed by signal 9" in killed
    done = tc._markdown(_summary(None))
    assert "CPU time native / auto_LiRPA: 0.062×" in done and "Largest relative difference" in done


def test_accumulation_rows_record_the_load_around_each_child(monkeypatch):
    loads = iter([(1.0, 0, 0), (2.5, 0, 0), (3.0, 0, 0), (4.0, 0, 0)])
    monkeypatch.setattr(am.os, "getloadavg", lambda: next(loads))

    def fake_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 0, stdout='{"cpu_s_per_step": 1.0}\n', stderr="")

    monkeypatch.setattr(am.subprocess, "run", fake_run)
    assert am._run_child(["--child", "1"])["load_1min_before_after"] == [1.0, 2.5]
    assert am._run_child(["--child", "1"])["load_1min_before_after"] == [3.0, 4.0]


def _row(cpu: float, load: list[float]) -> dict:
    return {
        "k": 4,
        "mode": "exact",
        "maxrss_before_mib": 500.0,
        "maxrss_mib": 1500.0,
        "steps": 2,
        "wall_s_per_step": 2 * cpu,
        "cpu_s_per_step": cpu,
        "load_1min_before_after": load,
    }


def test_accumulation_table_gives_each_rounds_load():
    memory = am._median_rows([[_row(10.0, [1.0, 2.0])], [_row(12.0, [3.0, 4.5])]])
    assert memory[0]["load_1min_before_after_rounds"] == [[1.0, 2.0], [3.0, 4.5]]
    assert "load_1min_before_after" not in memory[0]
    gradient = {"1/-": {"k": 1, "mode": "-", "relative_l2": 0.0, "loss": 2.0, "loss_k1": 2.0}}
    result = {
        "machine": {"date_utc": "2026-01-01 00:00"},
        "threads": 2,
        "data": "noise",
        "argv": ["--rounds", "2"],
        "rounds": 2,
        "memory": memory,
        "gradient": gradient,
        "gradient_load_1min_before_after": [5.0, 6.0],
    }
    md = am._markdown(result)
    assert md.startswith("<!-- python benchmarks/accumulate_memory.py --rounds 2 ")
    assert "load (1-min, before/after) |" in md
    assert "| 11.00 | 22.00 | 1.0/2.0, 3.0/4.5 |" in md
    assert "1-minute load average 5.0/6.0" in md
    # a result written before the load was recorded still renders, with the column empty
    del result["gradient_load_1min_before_after"]
    for row in result["memory"]:
        del row["load_1min_before_after_rounds"]
    assert "| 11.00 | 22.00 |  |" in am._markdown(result)


def test_tanh_table_of_a_result_written_before_the_load_was_recorded():
    summary = _summary(None)
    for point in summary["per_point"]:
        for key in ("finished", "stopped_by", "log", "load_1min_before_after", "peak_rss_mib"):
            del point[key]
        point["load_average"] = [2.0, 3.0, 4.0]
    for key in ("backends", "auto_lirpa_timeout_s", "auto_lirpa_memory_cap_mib", "native_alone_in_process"):
        del summary[key]
    md = tc._markdown(summary)
    assert "1-minute load average 2.0-2.0" in md and "| load (1-min" not in md
    assert "| CPU seconds (each point) | 1.25 | 20.00 |" in md

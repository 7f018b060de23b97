"""End to end: the project's route (pre-filter, then α,β-CROWN on the rest) against α,β-CROWN alone.

Both routes decide the same test points of one trained network at one ε, with the same α,β-CROWN
settings and the same per-instance budget:

- **ours**: ``ccdist export`` (the pre-filter: clean prediction, IBP, CROWN, ``--alpha-crown``
  when asked, PGD; the proven logit differences dropped from the properties) and then
  ``ccdist verify`` (one persistent α,β-CROWN worker) on the points the pre-filter left undecided.
  Both commands run as child processes and are timed whole: start-up, pre-filter, ONNX export and
  verification.
- **abcrown**: one α,β-CROWN process over an ``instances.csv`` holding every point with its full
  property (α,β-CROWN's own batch mode, as ``benchmarks/verifier_overhead.py`` runs it). Writing
  those files (``ccdist export --verify-all --no-drop-proven``) is set-up, not timed: a user of
  α,β-CROWN alone writes them too.

The points are cut into ``--shards`` consecutive shards, and the routes alternate over them (ours
then abcrown on even shards, abcrown then ours on odd ones), so that a change of load over the run
falls on both. Per route the script reports the wall-clock time and the CPU time (user + system of
this process and its reaped children, ``RUSAGE_CHILDREN``: on a shared machine the figure to
trust), the certified count, how many points hit the budget (α,β-CROWN ``timeout``, a verdict
after the budget, or an ``error``), and where the time went (ours: pre-filter vs verification;
abcrown: its per-instance seconds by what the pre-filter made of the point). Per point the verdicts
are compared: ``safe`` (certified) / ``unsafe`` (refuted: misclassified, broken by an attack, or
falsified by α,β-CROWN) / ``timeout``. A point ``safe`` in one route and ``unsafe`` in the other is a
soundness alarm; a timeout in one route against a verdict in the other is counted apart. The
figures are the ratios ours / abcrown in wall and CPU time (goal ≤ 0.5 with the same verdicts).
Nothing is asserted; results go to ``--out`` (JSON and a Markdown table).

The network: a cnn3 (channels 16, 32, width 128) trained by CC-IBP (α = 0.5) on the CIFAR-10 JPEG
subset at ε = 2/255 for 6 epochs (a few CPU minutes)::

    ccdist train --config cifar10-jpeg-cpu --threads 1 --output-dir runs/e2e-cnn3 \\
        --set loss.method=cc_ibp --set loss.alpha=0.5 --set model.name=cnn3 --set model.width=128 \\
        --set "model.channels=[16, 32]" --set schedule.epochs=6 --set schedule.warmup_epochs=1 \\
        --set schedule.ramp_up_epochs=3 --set "optim.lr_decay_epochs=[5]" --set device=cpu \\
        --set log.tensorboard=false --set log.val_size=200
    python benchmarks/cifar_end_to_end.py --checkpoint runs/e2e-cnn3/checkpoint.pt \\
        --points 200 --shards 4 --timeout 10

α,β-CROWN runs with ``abcrown_configs/cifar10.yaml`` (the paper's settings) and its CPU override
(``--device cpu --batch_size 64 --pgd_restarts 10 --pgd_steps 100``), one thread
(``--threads``). The CIFAR-10 JPEG subset is found as ``ccdist`` finds it (``$CCDIST_DATA`` or
``--data-root``); α,β-CROWN as ``ccdist verify`` finds it (``ccdist install-verifier``,
``$ABCROWN_DIR`` or ``--abcrown``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import verifier_overhead as vo  # noqa: E402

from ccdist_plugin.fileio import file_sha256  # noqa: E402
from ccdist_plugin.verification import find_abcrown  # noqa: E402

ROUTES = ("ours", "abcrown")
#: a point's verdict in either route
SAFE, UNSAFE, TIMEOUT = "safe", "unsafe", "timeout"


def ccdist_command(*args: str) -> list[str]:
    """``ccdist ARGS`` run by this interpreter, importing this tree's package."""
    return [sys.executable, "-m", "ccdist_plugin.cli", *args]


def child_env(threads: int) -> dict[str, str]:
    """The children's environment: this tree's package first on the path, ``threads`` threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    return env


def export_args(checkpoint: Path, out: Path, start: int, count: int, timeout: float, data: dict) -> list[str]:
    """``ccdist export`` arguments shared by both routes: the points, the budget, a CPU verifier."""
    args = ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--start", str(start)]
    args += ["--count", str(count), "--timeout", f"{timeout:g}", "--device", "cpu"]
    if data.get("name"):
        args += ["--data", data["name"]]
    if data.get("root"):
        args += ["--data-root", data["root"]]
    return args


def _run(cmd: list[str], log: Path, env: dict[str, str], ok: tuple[int, ...] = (0,)) -> int:
    """Run ``cmd`` to completion (its output to ``log``); its exit status, refused unless in ``ok``."""
    logging.info("%s", shlex.join(cmd))
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if rc not in ok:
        raise RuntimeError(f"{shlex.join(cmd)} exited with {rc}; see {log}")
    return rc


def prepare_abcrown_alone(shard_dir: Path, base_args: list[str], env: dict[str, str]) -> Path:
    """Set-up of the abcrown route (not timed): every point of the shard with its full property."""
    out = shard_dir / "abcrown"
    args = [*base_args[:4], str(out), *base_args[5:]]  # the same export, into its own folder
    cmd = ccdist_command(*args, "--verify-all", "--no-drop-proven", "--methods", "ibp", "--attack-steps", "0")
    _run(cmd, shard_dir / "abcrown_export.log", env)
    manifest = json.loads((out / "manifest.json").read_text())
    rows = [p["instance"] for p in manifest["points"]]
    if rows != list(range(len(rows))):
        raise RuntimeError(f"{out}: not every point is an instance in order: {rows}")
    return out


def run_abcrown_alone(export_dir: Path, abcrown: Path, extra: list[str]) -> dict[str, Any]:
    """One α,β-CROWN process over the csv of every point: verdicts and seconds per point."""
    n = len(json.loads((export_dir / "manifest.json").read_text())["points"])
    verdicts = vo.run_csv(export_dir, abcrown, extra, n)
    seconds, late = abcrown_alone_details(export_dir)
    return {"verdicts": [v if v is not None else "error" for v in verdicts], "seconds": seconds, "late": late}


def abcrown_alone_details(export_dir: Path) -> tuple[list[float], list[str]]:
    """Per instance of α,β-CROWN's csv run: its seconds, and the verdict it reached after the
    budget (``safe`` / ``unsafe``; ``""`` when none): α,β-CROWN finishes its root bounds however long
    they take and then marks the result "(timed out)", a budget hit for the figures."""
    with open(export_dir / "csv_run_results.pkl", "rb") as f:
        results = pickle.load(f)["results"]
    late = []
    for status, _s in results:
        after = "(timed out)" in status and "unknown" not in status
        late.append(("unsafe" if "unsafe" in status else "safe") if after else "")
    return [float(s) for _status, s in results], late


def alpha_crown_args(alpha_crown: str | bool | None) -> list[str]:
    """The ``ccdist export`` options of the α-CROWN stage: ``alpha_crown`` is None (no stage),
    ``"final"`` or ``"all"`` (``--alpha-crown-layers``); True is an older result's record, from before
    2026-12-06, when ``--alpha-crown`` optimized every layer's slopes."""
    if alpha_crown is None or alpha_crown is False:
        return []
    layers = "all" if alpha_crown is True else alpha_crown
    return ["--alpha-crown", "--alpha-crown-layers", layers]


def run_ours(
    shard_dir: Path, base_args: list[str], abcrown: Path, extra: list[str], alpha_crown: str | None, env: dict
) -> dict[str, Any]:
    """``ccdist export`` then ``ccdist verify`` on the shard; per-point verdicts and where they came from,
    and the wall-clock seconds of each command."""
    out = shard_dir / "ours"
    export = ccdist_command(*base_args, *alpha_crown_args(alpha_crown))
    t0 = time.monotonic()
    _run(export, shard_dir / "ours_export.log", env)
    t1 = time.monotonic()
    verify = ccdist_command("verify", "--export", str(out), "--abcrown", str(abcrown))
    verify += ["--abcrown-args", shlex.join(extra)]
    # 3: a soundness alarm, reported per point below rather than stopping the benchmark
    _run(verify, shard_dir / "ours_verify.log", env, ok=(0, 3))
    t2 = time.monotonic()
    verdicts, stages, late = ours_verdicts(out)
    return {
        "verdicts": verdicts,
        "stages": stages,
        "late": late,
        "export_s": round(t1 - t0, 2),
        "verify_s": round(t2 - t1, 2),
    }


#: a pre-filter outcome (manifest) as a verdict
_OUTCOME_VERDICT = {"misclassified": UNSAFE, "attacked": UNSAFE, "pre-certified": SAFE}
#: a category of ``verification.json`` (α,β-CROWN's verdict on an instance) as a verdict
_CATEGORY_VERDICT = {"safe": SAFE, "unsafe": UNSAFE, "timeout": TIMEOUT, "late": TIMEOUT}


def ours_verdicts(export_dir: Path) -> tuple[list[str], list[str], list[str]]:
    """Per point of an export verified by ``ccdist verify``: its verdict (safe / unsafe / timeout /
    error / alarm), what decided it (the pre-filter's outcome, or ``bab``) and the verdict reached
    after the budget (``""`` when none)."""
    manifest = json.loads((export_dir / "manifest.json").read_text())
    summary = json.loads((export_dir / "verification.json").read_text())
    records = {int(r["instance"]): r for r in summary["instances"]}
    verdicts, stages, late = [], [], []
    for p in manifest["points"]:
        outcome = p["outcome"]
        rec = records.get(int(p["instance"]), {}) if p["instance"] is not None else {}
        if outcome == "bab":
            cat = rec.get("category", "missing")
            verdicts.append(_CATEGORY_VERDICT.get(cat, "alarm" if cat == "alarm" else "error"))
        else:
            verdicts.append(_OUTCOME_VERDICT[outcome])
        stages.append(outcome)
        late.append(rec.get("verdict", "") if rec.get("category") == "late" else "")
    return verdicts, stages, late


def compare_points(
    ours: list[str],
    theirs: list[str],
    ours_late: list[str] | None = None,
    theirs_late: list[str] | None = None,
) -> dict[str, Any]:
    """Per-point agreement of the two routes' verdicts.

    ``alarms``: one route ``safe`` and the other ``unsafe`` (or a route's own alarm, or a verdict
    reached after the budget that contradicts the other route's), a soundness bug;
    ``timeout_vs_verdict``: a budget hit or error in one route and a verdict in the other (near the
    budget, load can decide that), of which ``late_same`` reached the other route's verdict after
    the budget; ``same``: equal verdicts."""
    n = len(ours)
    ours_late, theirs_late = ours_late or [""] * n, theirs_late or [""] * n
    rows = list(zip(ours, theirs, ours_late, theirs_late, strict=True))
    decided = (SAFE, UNSAFE)

    def final(v: str, late: str) -> str:
        return late or v

    return {
        "same": sum(a == b for a, b, _, _ in rows),
        "alarms": [
            i
            for i, (a, b, la, lb) in enumerate(rows)
            if {final(a, la), final(b, lb)} == {SAFE, UNSAFE} or "alarm" in (a, b)
        ],
        "timeout_vs_verdict": sum((a in decided) != (b in decided) for a, b, _, _ in rows),
        "late_same": sum(
            (a in decided) != (b in decided) and final(a, la) == final(b, lb) for a, b, la, lb in rows
        ),
        "both_undecided": sum(a not in decided and b not in decided for a, b, _, _ in rows),
    }


def route_counts(verdicts: list[str]) -> dict[str, int]:
    """Certified (safe), refuted (unsafe) and budget hits (timeout, late or error) of one route."""
    return {
        "certified": sum(v == SAFE for v in verdicts),
        "refuted": sum(v == UNSAFE for v in verdicts),
        "budget_hits": sum(v == TIMEOUT for v in verdicts),
        "errors": sum(v not in (SAFE, UNSAFE, TIMEOUT) for v in verdicts),
    }


def where_time_went(stages: list[str], seconds: list[float], abcrown_verdicts: list[str]) -> dict[str, Any]:
    """α,β-CROWN alone's per-instance seconds summed by what our pre-filter made of each point
    (``misclassified``, ``pre-certified``, ``attacked``, ``bab``) and over its own budget hits."""
    by_stage: dict[str, dict[str, float]] = {}
    for stage, s in zip(stages, seconds, strict=False):
        d = by_stage.setdefault(stage, {"points": 0, "seconds": 0.0})
        d["points"] += 1
        d["seconds"] = round(d["seconds"] + s, 2)
    hits = [s for s, v in zip(seconds, abcrown_verdicts, strict=False) if v == TIMEOUT]
    return {"by_prefilter_outcome": by_stage, "budget_hit_seconds": round(sum(hits), 2)}


def measure(
    checkpoint: Path,
    work: Path,
    points: int,
    shards: int,
    timeout: float,
    abcrown: Path,
    extra: list[str],
    alpha_crown: str | None = None,
    data: dict | None = None,
    start: int = 0,
    threads: int = 1,
) -> dict[str, Any]:
    """Both routes over ``points`` test points from ``start``, cut into ``shards`` shards and
    interleaved (ours first on even shards, abcrown first on odd ones); the summary of
    :func:`summarize`."""
    env = child_env(threads)
    size = -(-points // shards)
    measured = []
    for k in range(shards):
        s0, count = start + k * size, min(size, points - k * size)
        if count <= 0:
            break
        shard_dir = work / f"shard_{k}"
        shard_dir.mkdir(parents=True, exist_ok=True)
        base = export_args(checkpoint, shard_dir / "ours", s0, count, timeout, data or {})
        alone_dir = prepare_abcrown_alone(shard_dir, base, env)
        runs = {
            "ours": lambda b=base, d=shard_dir: run_ours(d, b, abcrown, extra, alpha_crown, env),
            "abcrown": lambda d=alone_dir: run_abcrown_alone(d, abcrown, extra),
        }
        order = ROUTES if k % 2 == 0 else ROUTES[::-1]
        this: dict[str, Any] = {"start": s0, "count": count, "order": list(order)}
        for route in order:
            logging.info("shard %d/%d (points %d-%d): %s", k + 1, shards, s0, s0 + count - 1, route)
            timed = vo._timed(runs[route])
            result = timed.pop("verdicts")  # _timed stores the run's return value there
            this[route] = {**timed, **result}
        measured.append(this)
    return summarize(measured, timeout, alpha_crown, threads)


def summarize(
    measured: list[dict[str, Any]], timeout: float, alpha_crown: str | bool | None, threads: int
) -> dict[str, Any]:
    """Totals per route over the shards, the ratios ours / abcrown, the per-point agreement and
    where the time went."""
    out: dict[str, Any] = {"timeout_s": timeout, "alpha_crown": alpha_crown, "threads": threads}
    verdicts = {r: [v for m in measured for v in m[r]["verdicts"]] for r in ROUTES}
    out["points"] = len(verdicts["ours"])
    for r in ROUTES:
        out[r] = {
            "wall_s": round(sum(m[r]["wall_s"] for m in measured), 2),
            "cpu_s": round(sum(m[r]["cpu_s"] for m in measured), 2),
            **route_counts(verdicts[r]),
            "late_verdicts": sum(bool(v) for m in measured for v in m[r].get("late", [])),
        }
    stages = [s for m in measured for s in m["ours"]["stages"]]
    out["ours"]["prefilter"] = {
        o: stages.count(o) for o in ("misclassified", "pre-certified", "attacked", "bab")
    }
    out["ours"]["export_s"] = round(sum(m["ours"]["export_s"] for m in measured), 2)
    out["ours"]["verify_s"] = round(sum(m["ours"]["verify_s"] for m in measured), 2)
    seconds = [s for m in measured for s in m["abcrown"]["seconds"]]
    out["abcrown"]["time"] = where_time_went(stages, seconds, verdicts["abcrown"])
    for kind in ("wall", "cpu"):
        out[f"{kind}_ratio"] = round(out["ours"][f"{kind}_s"] / max(out["abcrown"][f"{kind}_s"], 1e-9), 3)
        out[f"{kind}_ratio_per_shard"] = [
            round(m["ours"][f"{kind}_s"] / max(m["abcrown"][f"{kind}_s"], 1e-9), 3) for m in measured
        ]
    late = {r: [v for m in measured for v in m[r].get("late", [""] * len(m[r]["verdicts"]))] for r in ROUTES}
    out["agreement"] = compare_points(verdicts["ours"], verdicts["abcrown"], late["ours"], late["abcrown"])
    out["verdicts"] = verdicts
    out["measured"] = measured
    return out


def resummarize(previous: dict[str, Any], work: Path) -> dict[str, Any]:
    """The summary of an earlier run (its JSON) again, with what its work folder adds (the verdicts
    reached after the budget): the timings are the run's, nothing is measured again."""
    measured = previous["measured"]
    for k, m in enumerate(measured):
        shard = work / f"shard_{k}"
        m["abcrown"]["late"] = abcrown_alone_details(shard / "abcrown")[1]
        m["ours"]["late"] = ours_verdicts(shard / "ours")[2]
    return summarize(measured, previous["timeout_s"], previous["alpha_crown"], previous["threads"])


def markdown(s: dict[str, Any], command: str) -> str:
    """The Markdown tables written beside the JSON (every figure from ``s``)."""
    o, a = s["ours"], s["abcrown"]
    pre = o["prefilter"]
    export = shlex.join(["ccdist", "export", *alpha_crown_args(s["alpha_crown"])])
    route_a = f"ours: `{export}` + `ccdist verify`"
    lines = [
        f"`{command}`",
        "",
        "| route | wall s | CPU s | certified | refuted | budget hits (verdict after the budget) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| {route_a} | {o['wall_s']:.1f} | {o['cpu_s']:.1f} | {o['certified']} | {o['refuted']} "
        f"| {o['budget_hits']} ({o['late_verdicts']}) | {o['errors']} |",
        f"| α,β-CROWN alone (one process over the csv) | {a['wall_s']:.1f} | {a['cpu_s']:.1f} "
        f"| {a['certified']} | {a['refuted']} | {a['budget_hits']} ({a['late_verdicts']}) | {a['errors']} |",
        f"| **ratio ours / alone** | **{s['wall_ratio']:.2f}** | **{s['cpu_ratio']:.2f}** | | | | |",
        "",
    ]
    g = s["agreement"]
    by = a["time"]["by_prefilter_outcome"]
    spent = ", ".join(f"{k} {v['points']} points {v['seconds']:.1f} s" for k, v in by.items())
    lines += [
        f"{s['points']} points, {s['timeout_s']:g} s per instance, {s['threads']} thread(s)"
        + (f", checkpoint sha256 {s['checkpoint_sha256'][:12]}. " if s.get("checkpoint_sha256") else ". ")
        + f"Per-shard ratios (interleaved): wall {vo._fmt(s['wall_ratio_per_shard'])}, "
        f"CPU {vo._fmt(s['cpu_ratio_per_shard'])}.",
        f"Per point: {g['same']} of {s['points']} same verdict, {len(g['alarms'])} safe/unsafe "
        f"disagreements (soundness alarms), {g['timeout_vs_verdict']} budget hit or error in one route "
        f"against a verdict in the other (on {g['late_same']} of them the same verdict, reached after the "
        f"budget), {g['both_undecided']} undecided in both.",
        f"Ours: pre-filter decided {pre['misclassified']} misclassified, {pre['pre-certified']} certified, "
        f"{pre['attacked']} broken by PGD; {pre['bab']} sent to α,β-CROWN. Wall time in `ccdist export` "
        f"{o['export_s']:.1f} s, in `ccdist verify` {o['verify_s']:.1f} s.",
        f"α,β-CROWN alone, its per-instance seconds by what the pre-filter made of the point: {spent}; "
        f"on its {a['budget_hits']} budget hits {a['time']['budget_hit_seconds']:.1f} s.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a checkpoint written by ccdist train")
    ap.add_argument("--points", type=int, default=200, help="test points (from --start)")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--shards", type=int, default=4, help="shards the routes alternate over")
    ap.add_argument("--timeout", type=float, default=10.0, help="α,β-CROWN budget per instance (s)")
    ap.add_argument(
        "--alpha-crown",
        nargs="?",
        const="final",
        choices=["final", "all"],
        default=None,
        help="ours: α-CROWN in the pre-filter, the last layer's slopes (final, the default) or every layer's",
    )
    ap.add_argument("--data", default=None, help="dataset name (default: the checkpoint's)")
    ap.add_argument("--data-root", default=None, help="folder holding the data (default: ccdist's search)")
    ap.add_argument(
        "--abcrown", default=None, help="α,β-CROWN's complete_verifier (default: as ccdist verify)"
    )
    ap.add_argument(
        "--abcrown-args", default=shlex.join(vo.CPU_OVERRIDE), help="α,β-CROWN options, both routes"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "cifar_end_to_end.json"))
    ap.add_argument(
        "--resummarize",
        default=None,
        metavar="JSON",
        help="rewrite the summary of an earlier run's JSON from its --work folder (nothing rerun)",
    )
    args = ap.parse_args()
    if args.resummarize:
        previous = json.loads(Path(args.resummarize).read_text())
        kept = {k: previous[k] for k in ("load_average_end", "checkpoint_sha256") if k in previous}
        summary = {**resummarize(previous, Path(args.work)), **kept}
        write_outputs(summary, previous["command"], Path(args.out))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    abcrown = find_abcrown(args.abcrown)
    work = Path(args.work or tempfile.mkdtemp(prefix="cifar_end_to_end_"))
    summary = measure(
        Path(args.checkpoint).resolve(),
        work,
        args.points,
        args.shards,
        args.timeout,
        abcrown,
        shlex.split(args.abcrown_args),
        alpha_crown=args.alpha_crown,
        data={"name": args.data, "root": args.data_root},
        start=args.start,
        threads=args.threads,
    )
    command = recorded_command(sys.argv[1:])
    # which network: two trainings by one command differ, and a path names neither
    summary["checkpoint_sha256"] = file_sha256(args.checkpoint)
    summary["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    write_outputs(summary, command, Path(args.out))


def recorded_command(argv: list[str]) -> str:
    """The command line as the results record it: without ``--work`` (a scratch folder of this
    machine, which changes nothing measured)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--work":
            skip = True
        elif not arg.startswith("--work="):
            kept.append(arg)
    return shlex.join(["python", "benchmarks/cifar_end_to_end.py", *kept])


def write_outputs(summary: dict[str, Any], command: str, out: Path) -> None:
    """``out`` (JSON) and the Markdown table beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, **summary}, indent=1) + "\n")
    text = markdown(summary, command)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

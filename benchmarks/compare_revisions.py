"""Speed before and after a change: ``benchmarks/speed.py`` sections of two git revisions, interleaved.

    python benchmarks/compare_revisions.py BEFORE [AFTER] [--only ibp_engine,steps_cnn3] [--rounds 3]

Each revision is checked out into a temporary git worktree (AFTER defaults to the working tree as it
is). The rounds alternate, BEFORE then AFTER then BEFORE ... (the order flips every round), each one
a fresh ``speed.py --only SECTIONS --repeats R`` process importing its own revision's package, so the
two revisions meet the same phases of a shared machine. speed.py's figures are ratios of two things
timed side by side in one process (e.g. IBP pass / forward pass); this script reports, for every ratio,
its median over the rounds of each revision and the after/before quotient. A layout change that
costs nothing shows quotients near 1; the spread of one revision's rounds is the noise to read them
against. No absolute time is compared across processes.

Output: a markdown table on stdout and, with ``--out``, ``compare_revisions.json`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _ratios(section: dict) -> dict[str, float]:
    return {k: float(v) for k, v in section.get("ratios", {}).items() if isinstance(v, (int, float))}


def run_speed(tree: Path, sections: str, repeats: int, threads: int) -> dict[str, float]:
    """One speed.py process in ``tree``: its ratios, keyed ``section: ratio``."""
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, PYTHONPATH=str(tree))
        cmd = [sys.executable, str(tree / "benchmarks" / "speed.py"), "--only", sections]
        cmd += ["--repeats", str(repeats), "--threads", str(threads), "--out", out]
        subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True, text=True)
        result = json.loads((Path(out) / "speed.json").read_text())
    return {f"{name}: {k}": v for name in sections.split(",") for k, v in _ratios(result[name]).items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="git revision measured first (e.g. a commit before the change)")
    parser.add_argument("after", nargs="?", default=None, help="git revision (default: the working tree)")
    parser.add_argument("--only", default="ibp_engine,steps_cnn3", help="speed.py sections")
    parser.add_argument("--rounds", type=int, default=3, help="processes per revision, alternating")
    parser.add_argument("--repeats", type=int, default=3, help="speed.py --repeats")
    parser.add_argument("--threads", type=int, default=1, help="speed.py --threads")
    parser.add_argument("--out", default=None, help="folder for compare_revisions.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for label, rev in (("before", args.before), ("after", args.after)):
            if rev is None:
                trees[label] = REPO
                continue
            path = Path(tmp) / label
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True
            )
            trees[label] = path
        try:
            rounds: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            for i in range(args.rounds):
                order = ("before", "after") if i % 2 == 0 else ("after", "before")
                for label in order:
                    rounds[label].append(run_speed(trees[label], args.only, args.repeats, args.threads))
                    print(f"round {i + 1}/{args.rounds}: {label} done", file=sys.stderr, flush=True)
        finally:
            for label, rev in (("before", args.before), ("after", args.after)):
                if rev is not None:
                    subprocess.run(
                        ["git", "-C", str(REPO), "worktree", "remove", "--force", str(trees[label])]
                    )
    keys = [k for k in rounds["before"][0] if all(k in r for r in rounds["before"] + rounds["after"])]
    rows = []
    for key in keys:
        before = [r[key] for r in rounds["before"]]
        after = [r[key] for r in rounds["after"]]
        b, a = statistics.median(before), statistics.median(after)
        rows.append(
            {"ratio": key, "before": before, "after": after, "quotient": a / b if b else float("nan")}
        )
    print(f"before: {args.before}; after: {args.after or 'working tree'}; {args.rounds} alternating rounds")
    print("| speed.py ratio | before (median; range) | after (median; range) | after / before |")
    print("|---|---|---|---|")
    for row in rows:
        b, a = row["before"], row["after"]
        print(
            f"| {row['ratio']} | {statistics.median(b):.3f} ({min(b):.3f}-{max(b):.3f}) | "
            f"{statistics.median(a):.3f} ({min(a):.3f}-{max(a):.3f}) | {row['quotient']:.3f} |"
        )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "compare_revisions.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

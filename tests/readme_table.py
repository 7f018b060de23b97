"""The README's demo table against what ``ccdist demo`` prints.

The demo's accuracies are deterministic for a given configuration (it trains and evaluates with one
thread; the README states the torch version), so any difference is drift: rerun the demo and copy its
table into the README. The training times vary with the machine and are not compared.

Used by tests/test_readme.py and by .ci/run, which pipes the demo it runs from the installed wheel:
    python tests/readme_table.py DEMO_OUTPUT.txt README.md
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

#: the accuracy columns of the table, in order (the fifth column, training seconds, is not compared)
COLUMNS = ("standard", "PGD-40", "IBP-cert", "CROWN-cert")

_ROW = re.compile(r"^(?P<model>\S.*?)\s+" + r"\s+".join([r"(\d+\.\d)%"] * len(COLUMNS)) + r"\s+\d+\.\d\s*$")


def parse_demo_table(text: str) -> dict[str, tuple[float, ...]]:
    """Rows of the first demo table in ``text`` (a README or the demo's output): model label ->
    accuracies in %, in :data:`COLUMNS` order. Raises ValueError when there is no table."""
    lines = text.splitlines()
    header = next((i for i, line in enumerate(lines) if line.split()[:5] == ["model", *COLUMNS]), None)
    if header is None:
        raise ValueError("no demo table (a line 'model  standard  PGD-40  IBP-cert  CROWN-cert ...')")
    rows: dict[str, tuple[float, ...]] = {}
    for line in lines[header + 1 :]:
        match = _ROW.match(line)
        if match is None:
            break
        rows[match.group("model")] = tuple(float(v) for v in match.groups()[1:])
    if not rows:
        raise ValueError("the demo table has no rows")
    return rows


def drift(printed: str, readme: str) -> list[str]:
    """Differences between the table the demo printed and the README's, one line each (empty: none)."""
    got, documented = parse_demo_table(printed), parse_demo_table(readme)
    problems = [f"{m}: in the README, not printed" for m in documented if m not in got]
    problems += [f"{m}: printed, not in the README" for m in got if m not in documented]
    for model in documented.keys() & got.keys():
        for column, doc_value, got_value in zip(COLUMNS, documented[model], got[model], strict=True):
            if doc_value != got_value:
                problems.append(f"{model} {column}: README {doc_value}%, demo printed {got_value}%")
    return sorted(problems)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    problems = drift(Path(argv[0]).read_text(), Path(argv[1]).read_text())
    for problem in problems:
        print(f"README demo table drift: {problem}", file=sys.stderr)
    if not problems:
        print("README demo table matches the demo's output")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

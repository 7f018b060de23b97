"""Check the package's import structure: no import circle, no import from a lower layer up to a higher
one, no private name taken from another module; and its sizes: no module over 700 lines, no function
over 80 lines unless a comment right above it says why.

    python .ci/check_imports.py [PACKAGE_DIR] [--layers FILE]

Every import counts, at module level or inside a function (a function-level import is still a
dependency; it only hides the circle until run time). ``if TYPE_CHECKING:`` imports count too: an
annotation that needs a higher layer is a sign the code sits in the wrong place.

The layers, lowest first, are the ``LAYERS`` table below (or a YAML/JSON file of the same shape passed
with ``--layers``, used by the checker's own tests). A module belongs to the most specific entry that
names it or a package above it; a module that no entry names is an error, so that new code is placed on
purpose. A module may import modules of its own layer or of lower ones. Within one layer the import
graph must still be free of circles.

The size limits keep every module readable top-down: a module over ``MAX_MODULE_LINES`` lines is an
error, and so is a function over ``MAX_FUNCTION_LINES`` lines (docstring included) without a ``#``
comment on the line right above its ``def`` or its first decorator saying why it stays whole.

Exit status: 0 when the structure holds, 1 with one line per violation otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass
from pathlib import Path

#: The package's layers, lowest first. Each entry is a list of modules or packages (dotted, relative
#: to the package). Where new code goes: docs/architecture.md.
LAYERS: list[list[str]] = [
    # foundations: no imports from the package
    # (verification.abcrown_worker is a standalone script, run by path: the standard library only)
    [
        "version",
        "fileio",
        "progress",
        "malloc",
        "batching",
        "schedules",
        "data",
        "verification.abcrown_worker",
        "install",
    ],
    ["models"],
    ["validate"],
    # the bound engine, bottom-up: layer rules, the auto_LiRPA backend, IBP, then CROWN and the check
    # that the bounded graph is the forward, then what uses them; the package's __init__ re-exports it
    ["bounds.layers", "bounds.relaxations"],
    ["bounds.lirpa"],
    ["bounds.ibp", "bounds.patches"],
    ["bounds.crown", "bounds.graphcheck"],
    ["bounds.alpha_crown"],
    ["bounds.certification", "bounds.crown_ibp", "bounds.penultimate"],
    ["bounds"],
    ["attacks"],
    ["config", "regularizers"],
    ["losses"],
    # the training loop's parts: checkpoints, the process group (it shards data), gradient accumulation;
    # a run's folder (whose earlier checkpoint it describes), its batches, its per-epoch records, one step
    ["soundness", "checkpoint", "distributed", "accumulate"],
    ["runlock", "train_data", "training_logs", "step"],
    ["trainer"],
    # the verification pipeline, bottom-up: the pre-filter (cascade) and the export's files (writers),
    # the export, verdict records, summaries (reports), α,β-CROWN processes, the runner and its pool
    ["verification.cascade", "verification.writers"],
    ["verification.export"],
    ["verification.records"],
    ["verification.reports", "verification.processes"],
    ["verification.runner"],
    ["verification"],
    # the old paths of the export and the runs: re-exports of verification's names
    ["export", "verify", "lirpa", "crown_ibp", "latent"],
    ["evaluation"],
    ["reports", "demo", "tune"],
    ["cli"],
    # the package facade may re-export anything
    [""],
]


MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted relative to the package ("" = the package's __init__)
    target: str  # imported module, same form
    names: tuple[str, ...]  # names taken with "from target import ..."
    line: int


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(source: str, is_package: bool, level: int, module: str | None) -> str:
    base = source.split(".") if source else []
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(path: Path, root: Path, package: str, modules: set[str]) -> list[Import]:
    """Every import of another module of the package in the file at ``path``."""
    source = module_name(path, root)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []

    def add(target: str, names: tuple[str, ...], line: int) -> None:
        # "from pkg import submodule" names a module, not an attribute
        plain = tuple(n for n in names if f"{target}.{n}".strip(".") not in modules)
        for n in names:
            sub = f"{target}.{n}".strip(".")
            if sub in modules:
                found.append(Import(source, sub, (), line))
        if target in modules and (plain or not names):
            found.append(Import(source, target, plain, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = _resolve(source, is_package, node.level, node.module)
            elif node.module and (node.module == package or node.module.startswith(package + ".")):
                target = node.module[len(package) + 1 :]
            else:
                continue
            add(target, tuple(a.name for a in node.names), node.lineno)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    add(alias.name[len(package) + 1 :], (), node.lineno)
    return [i for i in found if i.target != source]


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    """Index of the most specific layer entry naming ``module`` or a package above it."""
    best: tuple[int, int] | None = None  # (specificity, layer)
    for index, entries in enumerate(layers):
        for entry in entries:
            if entry == "" and module != "":
                continue
            if module == entry or module.startswith(entry + ".") or entry == "":
                depth = len(entry.split(".")) if entry else 0
                if best is None or depth > best[0]:
                    best = (depth, index)
    return None if best is None else best[1]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def size_problems(path: Path, root: Path) -> list[str]:
    """A module over the line limit; functions over theirs without a comment saying why."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    shown = path.relative_to(root.parent)
    problems = []
    if len(lines) > MAX_MODULE_LINES:
        problems.append(f"{shown}: {len(lines)} lines (more than {MAX_MODULE_LINES}): split it by concern")
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        above = {first - 2, node.lineno - 2}  # above the first decorator, or between them and the def
        explained = any(i >= 0 and lines[i].lstrip().startswith("#") for i in above)
        if length > MAX_FUNCTION_LINES and not explained:
            problems.append(
                f"{shown}:{node.lineno}: {node.name} is {length} lines (more than {MAX_FUNCTION_LINES}): "
                "split it into named steps, or say why it stays whole in a comment right above it"
            )
    return problems


def check(root: Path, layers: list[list[str]]) -> list[str]:
    """The violations in the package at ``root``, one line each."""
    package = root.name
    files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    modules = {module_name(p, root) for p in files}
    problems: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    shown = {m: f"{package}.{m}".rstrip(".") for m in modules}
    where = {module_name(p, root): p for p in files}
    for m in sorted(modules):
        if layer_of(m, layers) is None:
            problems.append(f"{shown[m]}: in no layer (add it to the layer table)")
    for path in files:
        for imp in imports_of(path, root, package, modules):
            graph[imp.source].add(imp.target)
            at = f"{where[imp.source].relative_to(root.parent)}:{imp.line}"
            private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
            if private:
                names = ", ".join(private)
                problems.append(f"{at}: private name(s) {names} imported from {shown[imp.target]}")
            src_layer, dst_layer = layer_of(imp.source, layers), layer_of(imp.target, layers)
            if src_layer is not None and dst_layer is not None and dst_layer > src_layer:
                problems.append(
                    f"{at}: {shown[imp.source]} (layer {src_layer}) imports {shown[imp.target]} "
                    f"from the higher layer {dst_layer}"
                )
    for path in files:
        problems += size_problems(path, root)
    for component in circles(graph):
        problems.append("import circle: " + " <-> ".join(shown[m] for m in component))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1] / "ccdist_plugin"
    parser.add_argument("package", nargs="?", default=str(default))
    parser.add_argument("--layers", help="a JSON file with the layer table (default: the one in this script)")
    args = parser.parse_args(argv)
    root = Path(args.package)
    if not (root / "__init__.py").is_file():
        print(f"check_imports: {root} is not a package (no __init__.py)", file=sys.stderr)
        return 2
    layers = LAYERS if args.layers is None else json.loads(Path(args.layers).read_text())
    problems = check(root, layers)
    for line in problems:
        print(line)
    if problems:
        print(f"check_imports: {len(problems)} violation(s) in {root.name}", file=sys.stderr)
        return 1
    print(
        f"check_imports: {root.name}: no import circle, no upward import, no private import, "
        f"no module over {MAX_MODULE_LINES} lines, no unexplained function over {MAX_FUNCTION_LINES}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

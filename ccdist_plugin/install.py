"""Installing the verifier: auto_LiRPA, onnx2pytorch and α,β-CROWN at the commits this package is
tested with (``ccdist install-verifier``), and finding it again afterwards.

What :func:`install_verifier` does, into the Python environment it runs in:

1. takes the three source trees from their public git repositories at the pinned commits
   (:data:`PINNED`; cloned under ``PREFIX/src``), or from a folder holding ``alpha-beta-CROWN/``,
   ``auto_LiRPA/`` and ``onnx2pytorch/`` (``--from DIR``);
2. installs α,β-CROWN's PyPI requirements (:data:`REQUIREMENTS`) under a pip constraint file that
   pins the torch already installed (``PREFIX/constraints.txt``), so torch never changes;
3. installs auto_LiRPA and onnx2pytorch with ``--no-deps`` (their ``setup.py`` files ask for an
   older torch, torchvision and test tools);
4. copies ``complete_verifier`` to ``PREFIX/complete_verifier`` (α,β-CROWN writes files into its
   working folder, so it must be writable);
5. torchvision, which α,β-CROWN and onnx2pytorch import when they start: a real one when it
   imports beside the installed torch (installed under the same constraint when absent), else an
   import-only stand-in inside ``PREFIX/complete_verifier`` (α,β-CROWN's own folder comes first
   on its ``sys.path``, so the stand-in is seen by α,β-CROWN only);
6. checks that ``abcrown.py`` imports, then records where everything went in
   :func:`record_path` (``verifier.json`` under :func:`ccdist_home`).

Every step is skipped when what it would produce is already in place, so running it again is
cheap and changes nothing.

:func:`locate_verifier` is the one lookup every user of α,β-CROWN goes through: ``$ABCROWN_DIR``
when set (it wins), else the recorded install.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Source",
    "PINNED",
    "REQUIREMENTS",
    "INSTALL_COMMAND",
    "INSTALL_HINT",
    "InstallError",
    "InstallReport",
    "VerifierLocation",
    "ccdist_home",
    "default_prefix",
    "record_path",
    "read_record",
    "locate_verifier",
    "install_verifier",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """One source tree: its folder name (in a ``--from`` folder and under ``PREFIX/src``), its git
    repository and the commit it is tested at."""

    name: str
    url: str
    commit: str


#: The repositories and commits this package is tested with. auto_LiRPA's commit is the one
#: α,β-CROWN's commit pins as its submodule; onnx2pytorch is the fork α,β-CROWN needs (PyPI's
#: onnx2pytorch lacks what α,β-CROWN uses).
PINNED: tuple[Source, ...] = (
    Source(
        "alpha-beta-CROWN", "https://github.com/Verified-Intelligence/alpha-beta-CROWN.git", "8250d5fbd530"
    ),
    Source("auto_LiRPA", "https://github.com/Verified-Intelligence/auto_LiRPA.git", "9d100ec07086"),
    Source("onnx2pytorch", "https://github.com/KaidiXu/onnx2pytorch.git", "8447c42c3192"),
)

#: The PyPI packages α,β-CROWN, auto_LiRPA and onnx2pytorch import on the ONNX + VNN-LIB path
#: (torch and torchvision are handled apart; auto_LiRPA's test tools are left out).
REQUIREMENTS: tuple[str, ...] = (
    "numpy>=1.20",
    "packaging>=20.0",
    "pyyaml>=6.0",
    "appdirs>=1.4",
    "tqdm>=4.64",
    "graphviz>=0.20.3",
    "sortedcontainers>=2.4",
    "psutil>=5.9.5",
    "pandas>=2.0",
    "sympy",
    "onnx>=1.15",
    "onnxruntime>=1.15",
    "onnxoptimizer>=0.3",
    "skl2onnx>=1.14",
    # imported unconditionally by α,β-CROWN; its bundled size-limited license is only needed by
    # the MIP/LP modes, which the templates here do not use
    "gurobipy>=10",
    # to build auto_LiRPA and onnx2pytorch without build isolation (no second download of them)
    "setuptools",
    "wheel",
)

INSTALL_COMMAND = "ccdist install-verifier"
INSTALL_HINT = (
    f"install it with `{INSTALL_COMMAND}` (auto_LiRPA, onnx2pytorch and α,β-CROWN at the tested "
    "commits, torch left as it is; docs/verification.md)"
)

_RECORD_NAME = "verifier.json"
_RECORD_FORMAT = 1
#: Marks the stand-in so that a probe can tell it from a real torchvision.
_STANDIN_FLAG = "__ccdist_import_only_standin__"
_STANDIN_MODULES = ("datasets", "transforms", "ops")


class InstallError(RuntimeError):
    """The verifier could not be installed; the message is one line naming the problem."""


@dataclass(frozen=True)
class VerifierLocation:
    """Where α,β-CROWN is expected: ``abcrown_dir`` (None: nothing set or recorded), the
    interpreter to run it with, and where that answer came from."""

    abcrown_dir: Path | None
    python: str
    origin: str

    def abcrown_py(self) -> Path | None:
        """``abcrown.py`` in ``abcrown_dir`` (or its ``complete_verifier``), when there."""
        if self.abcrown_dir is None:
            return None
        for folder in (self.abcrown_dir, self.abcrown_dir / "complete_verifier"):
            if (folder / "abcrown.py").is_file():
                return folder / "abcrown.py"
        return None


@dataclass
class InstallReport:
    """What :func:`install_verifier` did."""

    abcrown_dir: Path
    python: str
    record: Path
    torch: str
    torchvision: str
    #: the lines said, in order
    steps: list[str]


def ccdist_home() -> Path:
    """The per-user folder of this package: ``$CCDIST_HOME``, else ``$XDG_CACHE_HOME/ccdist``,
    else ``~/.cache/ccdist``."""
    if os.environ.get("CCDIST_HOME"):
        return Path(os.environ["CCDIST_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "ccdist"


def default_prefix() -> Path:
    """Where ``ccdist install-verifier`` puts the verifier without ``--prefix``."""
    return ccdist_home() / "verifier"


def record_path() -> Path:
    """The record of the last ``ccdist install-verifier`` (JSON)."""
    return ccdist_home() / _RECORD_NAME


def read_record() -> dict[str, Any] | None:
    """The recorded install, or None when there is none or it cannot be read (logged)."""
    path = record_path()
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning("ignoring the verifier record %s: %s", path, err)
        return None
    if not isinstance(record, dict) or not record.get("abcrown_dir"):
        logger.warning("ignoring the verifier record %s: no abcrown_dir in it", path)
        return None
    return record


def locate_verifier() -> VerifierLocation:
    """Where α,β-CROWN is: ``$ABCROWN_DIR`` when set (it wins), else the folder recorded by
    ``ccdist install-verifier``. The interpreter: ``$ABCROWN_PYTHON``, else the one the recorded
    install went into (when the record is used and that interpreter still exists), else ours.
    Nothing is checked here beyond reading the record; see :meth:`VerifierLocation.abcrown_py`."""
    env_python = os.environ.get("ABCROWN_PYTHON")
    if os.environ.get("ABCROWN_DIR"):
        return VerifierLocation(Path(os.environ["ABCROWN_DIR"]), env_python or sys.executable, "$ABCROWN_DIR")
    record = read_record()
    if record is not None:
        python = record.get("python")
        if not (python and Path(python).exists()):
            python = sys.executable
        return VerifierLocation(
            Path(record["abcrown_dir"]), env_python or python, f"the record {record_path()}"
        )
    return VerifierLocation(None, env_python or sys.executable, "")


# --------------------------------------------------------------------------------------------
# Running git, pip and probes (module functions, so that tests can replace them)
# --------------------------------------------------------------------------------------------


def _run(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", GIT_TERMINAL_PROMPT="0")
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env, check=False
    )


def _last_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (proc.stderr or "").splitlines() + (proc.stdout or "").splitlines()]
    lines = [ln for ln in lines if ln]
    errors = [ln for ln in lines if ln.startswith(("ERROR:", "error:", "fatal:"))]
    return (errors or lines or [f"exit status {proc.returncode}"])[-1]


def _pip(args: Sequence[str], what: str) -> str:
    """``python -m pip ARGS`` into our environment; its stdout, or InstallError naming ``what``."""
    proc = _run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--no-input"])
    if proc.returncode != 0:
        raise InstallError(f"pip failed ({what}): {_last_error_line(proc)}")
    return proc.stdout or ""


def _git(args: Sequence[str], cwd: Path | None = None) -> str:
    proc = _run(["git", *args], cwd=cwd)
    if proc.returncode != 0:
        raise InstallError(f"git {' '.join(args[:1])} failed: {_last_error_line(proc)}")
    return (proc.stdout or "").strip()


def _probe_torchvision(cwd: Path) -> bool:
    """Whether a real torchvision imports in our environment (the stand-in does not count)."""
    code = f"import sys, torchvision; sys.exit(3 if getattr(torchvision, {_STANDIN_FLAG!r}, False) else 0)"
    return _run([sys.executable, "-c", code], cwd=cwd).returncode == 0


def _smoke_import(abcrown_dir: Path) -> None:
    """Import what ``abcrown.py`` imports, as it runs (its folder first on ``sys.path``)."""
    code = (
        "import sys; sys.argv = ['abcrown.py']; sys.path.insert(0, '.')\n"
        "import auto_LiRPA, onnx2pytorch, abcrown\n"
        "from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm\n"
    )
    proc = _run([sys.executable, "-c", code], cwd=abcrown_dir)
    if proc.returncode != 0:
        raise InstallError(f"α,β-CROWN does not import after the install: {_last_error_line(proc)}")


def _installed_matches(dist_name: str, package_dir: Path) -> bool:
    """Whether ``dist_name`` is installed in our environment with exactly the ``.py`` files of
    ``package_dir`` (the source tree's package folder)."""
    importlib.invalidate_caches()
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return False
    sources = sorted(package_dir.rglob("*.py"))
    if not sources:
        return False
    for src in sources:
        installed = Path(str(dist.locate_file(src.relative_to(package_dir.parent).as_posix())))
        try:
            if installed.read_bytes() != src.read_bytes():
                return False
        except OSError:
            return False
    return True


def _distribution_version(name: str) -> str | None:
    importlib.invalidate_caches()
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------

#: Files a source tree must hold, per folder name.
_MARKERS = {
    "alpha-beta-CROWN": ("complete_verifier/abcrown.py",),
    "auto_LiRPA": ("setup.py", "auto_LiRPA/__init__.py"),
    "onnx2pytorch": ("setup.py", "onnx2pytorch/__init__.py"),
}


def _check_tree(root: Path, source: Source, where: str) -> Path:
    tree = root / source.name
    for marker in _MARKERS.get(source.name, ()):
        if not (tree / marker).is_file():
            raise InstallError(f"{where} has no {source.name} source tree: {tree / marker} is missing")
    return tree


def _writable_prefix(prefix: Path) -> Path:
    try:
        prefix.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=prefix, prefix=".write-test-"):
            pass
    except OSError as err:
        raise InstallError(f"prefix {prefix} is not writable: {err.strerror or err}") from None
    return prefix.resolve()


def _fetch(source: Source, src_root: Path, say: Callable[[str], None]) -> Path:
    """A clone of ``source`` at its commit under ``src_root`` (cloned once, checked out as needed)."""
    dest = src_root / source.name
    if (dest / ".git").exists():
        head = _git(["rev-parse", "HEAD"], cwd=dest)
        if head.startswith(source.commit):
            say(f"{source.name}: source at {source.commit} already in {dest}")
            return dest
        try:
            _git(["checkout", "--quiet", "--detach", source.commit], cwd=dest)
        except InstallError:
            _git(["fetch", "--quiet", "origin"], cwd=dest)
            _git(["checkout", "--quiet", "--detach", source.commit], cwd=dest)
    else:
        if dest.exists():
            shutil.rmtree(dest)
        say(f"{source.name}: cloning {source.url}")
        src_root.mkdir(parents=True, exist_ok=True)
        try:
            _git(["clone", "--quiet", "--no-checkout", source.url, str(dest)])
            _git(["checkout", "--quiet", "--detach", source.commit], cwd=dest)
        except InstallError as err:
            raise InstallError(
                f"cannot get {source.name} from {source.url} at {source.commit}: {err}"
            ) from None
    head = _git(["rev-parse", "HEAD"], cwd=dest)
    if not head.startswith(source.commit):
        raise InstallError(f"{source.name}: checked out {head[:12]}, not {source.commit}")
    say(f"{source.name}: source at {source.commit} in {dest}")
    return dest


def _tree_commit(tree: Path) -> str | None:
    """The commit of a ``--from`` tree when it is a git checkout (None: not one)."""
    if not (tree / ".git").exists() or shutil.which("git") is None:
        return None
    proc = _run(["git", "rev-parse", "HEAD"], cwd=tree)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _write_constraints(prefix: Path, torch_version: str, torchvision_version: str | None) -> Path:
    lines = [
        "# Written by ccdist install-verifier: keep the installed torch (and torchvision) as they are.",
        f"torch=={torch_version}",
    ]
    if torchvision_version:
        lines.append(f"torchvision=={torchvision_version}")
    path = prefix / "constraints.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _install_requirements(prefix: Path, constraints: Path, say: Callable[[str], None]) -> None:
    requirements = prefix / "requirements.txt"
    requirements.write_text("\n".join(REQUIREMENTS) + "\n")
    say("PyPI requirements: pip install -c constraints.txt -r requirements.txt ...")
    out = _pip(["install", "-c", str(constraints), "-r", str(requirements)], "PyPI requirements")
    installed = [ln for ln in out.splitlines() if ln.startswith("Successfully installed")]
    say(f"PyPI requirements: {installed[-1] if installed else 'already satisfied'}")


def _install_package(tree: Path, name: str, prefix: Path, say: Callable[[str], None]) -> str:
    if _installed_matches(name, tree / name):
        say(f"{name}: already installed from these sources")
        return "kept"
    # Build from a writable copy: pip builds in the source tree, which may be read-only.
    build = prefix / "build" / name
    if build.exists():
        shutil.rmtree(build)
    shutil.copytree(tree, build, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__"))
    for path in [build, *build.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)
    say(f"{name}: pip install --no-deps ...")
    try:
        _pip(
            ["install", "-q", "--no-deps", "--no-build-isolation", "--force-reinstall", str(build)],
            f"installing {name}",
        )
    finally:
        shutil.rmtree(build, ignore_errors=True)
    say(f"{name}: installed (--no-deps)")
    return "installed"


def _copy_verifier(tree: Path, prefix: Path, say: Callable[[str], None]) -> Path:
    """``complete_verifier`` of the α,β-CROWN tree at ``PREFIX/complete_verifier``."""
    src = tree / "complete_verifier"
    dest = prefix / "complete_verifier"

    def wanted(path: Path) -> bool:
        rel = path.relative_to(src).parts
        # .git, caches, and symlinks that lead nowhere (the auto_LiRPA submodule link of a clone
        # without submodules): auto_LiRPA comes from its own install
        return not ({".git", "__pycache__"} & set(rel)) and path.exists()

    files = [p for p in src.rglob("*") if p.is_file() and wanted(p)]
    if dest.is_dir() and all(
        (dest / p.relative_to(src)).is_file() and (dest / p.relative_to(src)).read_bytes() == p.read_bytes()
        for p in files
    ):
        say(f"α,β-CROWN: complete_verifier already in {dest}")
        return dest
    staging = prefix / "complete_verifier.new"
    if staging.exists():
        shutil.rmtree(staging)
    for p in files:
        target = staging / p.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)
    say(f"α,β-CROWN: complete_verifier copied to {dest}")
    return dest


_STANDIN_INIT = f'''"""Import-only stand-in for torchvision, written by ccdist install-verifier.

α,β-CROWN and onnx2pytorch import torchvision when they start; the ONNX + VNN-LIB path that
ccdist uses never calls it, and no torchvision for this torch could be installed. Anything
used from it raises AttributeError. Installing a real torchvision and running
`ccdist install-verifier` again removes this folder.
"""

__version__ = "0.0.0+import-only"
{_STANDIN_FLAG} = True

from . import datasets, ops, transforms  # noqa: E402,F401
'''

_STANDIN_SUBMODULE = '''"""Part of the import-only torchvision stand-in (see __init__.py)."""


def __getattr__(name):
    # AttributeError, so that hasattr() answers False
    raise AttributeError(
        f"torchvision.{__name__.rsplit('.', 1)[-1]}.{name} is not available: ccdist install-verifier put "
        "an import-only torchvision here, as none could be installed for this torch"
    )
'''


def _standin_files() -> dict[str, str]:
    files = {"__init__.py": _STANDIN_INIT}
    files.update({f"{m}.py": _STANDIN_SUBMODULE for m in _STANDIN_MODULES})
    return files


def _write_standin(abcrown_dir: Path) -> bool:
    """Write the stand-in into ``abcrown_dir/torchvision``; False when it was already there."""
    folder = abcrown_dir / "torchvision"
    files = _standin_files()
    if folder.is_dir() and all(
        (folder / n).is_file() and (folder / n).read_text() == t for n, t in files.items()
    ):
        return False
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return True


def _handle_torchvision(
    prefix: Path,
    abcrown_dir: Path,
    constraints: Path,
    torch_version: str,
    previous: dict[str, Any] | None,
    say: Callable[[str], None],
) -> str:
    """A real torchvision when one imports (installed when absent), else the stand-in."""
    standin = abcrown_dir / "torchvision"
    if not _probe_torchvision(prefix):
        tried = (
            previous is not None
            and previous.get("python") == sys.executable
            and previous.get("torchvision_tried_for_torch") == torch_version
        )
        if _distribution_version("torchvision") is None and not tried:
            say(f"torchvision: trying pip install torchvision for torch {torch_version} ...")
            try:
                _pip(["install", "-q", "-c", str(constraints), "torchvision"], "torchvision")
            except InstallError as err:
                say(f"torchvision: none could be installed ({err})")
            else:
                if not _probe_torchvision(prefix):
                    say("torchvision: the one installed does not import beside this torch; removing it")
                    _pip(["uninstall", "-y", "-q", "torchvision"], "removing torchvision")
    if _probe_torchvision(prefix):
        version = _distribution_version("torchvision") or "unknown"
        if standin.exists():
            shutil.rmtree(standin)
            say("torchvision: removed the import-only stand-in")
        say(f"torchvision {version}: imports, used as it is")
        return version
    if _write_standin(abcrown_dir):
        say(
            f"torchvision: none imports beside torch {torch_version}; "
            f"wrote an import-only stand-in to {standin}"
        )
    else:
        say(f"torchvision: import-only stand-in already in {standin}")
    return "import-only stand-in"


def _write_record(record: dict[str, Any]) -> Path:
    path = record_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        raise InstallError(f"cannot write the record {path}: {err.strerror or err}") from None
    return path


def _given_trees(
    source_dir: Path, sources: Sequence[Source], say: Callable[[str], None]
) -> tuple[dict[str, Path], dict[str, str]]:
    """``--from DIR``: the source tree of each repository in ``source_dir`` and its commit, in words (a
    warning when it is not the tested one)."""
    root = source_dir.expanduser()
    if not root.is_dir():
        raise InstallError(f"--from {root}: no such folder")
    root = root.resolve()
    trees: dict[str, Path] = {}
    commits: dict[str, str] = {}
    for s in sources:
        trees[s.name] = _check_tree(root, s, f"--from {root}")
        found = _tree_commit(trees[s.name])
        if found is not None and not found.startswith(s.commit):
            say(f"{s.name}: WARNING: {trees[s.name]} is at {found[:12]}, tested with {s.commit}")
        commits[s.name] = found[:12] if found else f"{s.commit} (as given; not a git checkout)"
    return trees, commits


# over 80 lines by its docstring and its record: the install's numbered steps in order, each one helper
def install_verifier(
    prefix: str | os.PathLike | None = None,
    source_dir: str | os.PathLike | None = None,
    say: Callable[[str], None] | None = None,
    sources: Sequence[Source] = PINNED,
) -> InstallReport:
    """Install auto_LiRPA, onnx2pytorch and α,β-CROWN into the Python environment this runs in.

    Args:
        prefix: a writable folder for the clones, the build copies and ``complete_verifier``
            (default :func:`default_prefix`).
        source_dir: a folder holding ``alpha-beta-CROWN/``, ``auto_LiRPA/`` and
            ``onnx2pytorch/`` source trees, used instead of the git repositories.
        say: called with one line per thing done (default: logged).
        sources: the repositories and commits (default :data:`PINNED`).

    Raises:
        InstallError: a missing source, a prefix that cannot be written, a failed git or pip
            step, or a verifier that does not import; one line.
    """
    steps: list[str] = []
    tell = say or logger.info

    def say(line: str) -> None:
        steps.append(line)
        tell(line)

    by_name = {s.name: s for s in sources}
    missing = set(_MARKERS) - set(by_name)
    if missing:
        raise InstallError(f"no source given for {', '.join(sorted(missing))}")

    # 1. Sources first: nothing is written when one is missing.
    trees: dict[str, Path] = {}
    commits: dict[str, str] = {}
    if source_dir is not None:
        trees, commits = _given_trees(Path(source_dir), sources, say)
    elif shutil.which("git") is None:
        raise InstallError("git is not on PATH: it is needed to fetch the sources (or use --from DIR)")

    torch_version = _distribution_version("torch")
    if torch_version is None:
        raise InstallError("torch is not installed in this Python: install it first (pip install torch)")

    prefix_path = _writable_prefix(Path(prefix).expanduser() if prefix is not None else default_prefix())
    say(f"python: {sys.executable} (torch {torch_version}, left as it is)")
    say(f"prefix: {prefix_path}")
    if source_dir is None:
        for s in sources:
            trees[s.name] = _check_tree(_fetch(s, prefix_path / "src", say).parent, s, s.url)
            commits[s.name] = s.commit

    previous = read_record()
    # 2. PyPI requirements, torch (and a working torchvision) pinned as they are.
    torchvision_now = _distribution_version("torchvision") if _probe_torchvision(prefix_path) else None
    constraints = _write_constraints(prefix_path, torch_version, torchvision_now)
    _install_requirements(prefix_path, constraints, say)

    # 3. auto_LiRPA and onnx2pytorch, without their declared dependencies.
    for name in ("auto_LiRPA", "onnx2pytorch"):
        _install_package(trees[name], name, prefix_path, say)

    # 4. - 5. α,β-CROWN's working copy, then torchvision.
    abcrown_dir = _copy_verifier(trees["alpha-beta-CROWN"], prefix_path, say)
    torchvision = _handle_torchvision(prefix_path, abcrown_dir, constraints, torch_version, previous, say)

    after = _distribution_version("torch")
    if after != torch_version:  # the constraint forbids it; checked because it must never happen
        raise InstallError(f"torch changed from {torch_version} to {after} during the install")

    # 6. Check, then record.
    _smoke_import(abcrown_dir)
    say("check: abcrown.py, auto_LiRPA and onnx2pytorch import")
    record = {
        "format": _RECORD_FORMAT,
        "abcrown_dir": str(abcrown_dir),
        "python": sys.executable,
        "prefix": str(prefix_path),
        "source": "git" if source_dir is None else str(Path(source_dir).expanduser().resolve()),
        "commits": commits,
        "torch": torch_version,
        "torchvision": torchvision,
        "torchvision_tried_for_torch": torch_version,
    }
    path = _write_record(record)
    say(
        f"recorded in {path}: ccdist verify and ccdist eval --bab use {abcrown_dir} "
        "(ABCROWN_DIR, when set, wins)"
    )
    return InstallReport(
        abcrown_dir=abcrown_dir,
        python=sys.executable,
        record=path,
        torch=torch_version,
        torchvision=torchvision,
        steps=steps,
    )

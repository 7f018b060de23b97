"""``ccdist install-verifier`` (ccdist_plugin.install): sources, pip steps, torchvision, the record,
and how ``find_abcrown`` / ``run_verification`` use it.

The fast tests run the command on tiny fake source trees with pip replaced by a recorder (no
network, nothing installed); git runs for real on local repositories. The slow test installs the
real sources into a fresh virtual environment.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ccdist_plugin import install
from ccdist_plugin.cli import main
from ccdist_plugin.install import PINNED, InstallError, Source, install_verifier, locate_verifier
from ccdist_plugin.verification import AbcrownNotFoundError, find_abcrown

#: An offline copy of the three source trees, laid out as --from expects: $CCDIST_VERIFIER_SOURCES,
#: else the contributors' copy beside the checkout (the slow test skips without one).
BUNDLE = Path(
    os.environ.get("CCDIST_VERIFIER_SOURCES") or Path(__file__).resolve().parents[2] / "shared" / "vendor"
)
TORCH = importlib.metadata.version("torch")


def ccdist(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result) -> str:
    """The one ``error: ...`` line of a failed command (asserting there is exactly one)."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def make_sources(root: Path) -> Path:
    """Tiny stand-ins for the three source trees, laid out as ``--from`` expects."""
    files = {
        "alpha-beta-CROWN/complete_verifier/abcrown.py": "print('abcrown')\n",
        "alpha-beta-CROWN/complete_verifier/arguments.py": "X = 1\n",
        "alpha-beta-CROWN/complete_verifier/exp_configs/a.yaml": "general: {}\n",
        "auto_LiRPA/setup.py": "from setuptools import setup\nsetup(name='auto_LiRPA')\n",
        "auto_LiRPA/auto_LiRPA/__init__.py": "__version__ = '0.0.1'\n",
        "onnx2pytorch/setup.py": "from setuptools import setup\nsetup(name='onnx2pytorch')\n",
        "onnx2pytorch/onnx2pytorch/__init__.py": "__version__ = '0.0.1'\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


class FakeEnv:
    """pip, the import checks and torchvision, replaced: pip calls are recorded; ``installed`` is
    what the fake pip put in; ``torchvision_imports`` says whether a real torchvision imports."""

    def __init__(self, real_run) -> None:
        self.real_run = real_run  # git and everything else run for real
        self.pip_calls: list[list[str]] = []
        self.installed: set[str] = set()
        self.fail: str | None = None  # a pip failure to inject: a word of the failing step's args
        self.torchvision_imports = False
        self.torchvision_installable = False
        self.smoke_imports = 0

    def run(self, cmd, cwd=None):
        cmd = [str(c) for c in cmd]
        if cmd[1:3] == ["-m", "pip"]:
            args = cmd[3:]
            self.pip_calls.append(args)
            if self.fail and any(Path(a).name == self.fail for a in args):
                return subprocess.CompletedProcess(
                    cmd, 1, "", "Collecting x\nERROR: No matching distribution found for gurobipy>=10\n"
                )
            if args[0] == "install" and "--no-deps" in args:
                self.installed.update(Path(a).name for a in args if not a.startswith("-"))
            if args[0] == "install" and "torchvision" in args and self.torchvision_installable:
                self.torchvision_imports = True
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return self.real_run(cmd, cwd)

    def installs_of(self, word: str) -> list[list[str]]:
        """The ``pip install`` calls with an argument named ``word`` (a package or a file name)."""
        return [c for c in self.pip_calls if c[0] == "install" and any(Path(a).name == word for a in c)]


@pytest.fixture
def env(monkeypatch, tmp_path):
    fake = FakeEnv(install._run)
    monkeypatch.setattr(install, "_run", fake.run)
    monkeypatch.setattr(install, "_installed_matches", lambda name, package_dir: name in fake.installed)
    monkeypatch.setattr(install, "_probe_torchvision", lambda cwd: fake.torchvision_imports)
    real_version = install._distribution_version
    monkeypatch.setattr(
        install,
        "_distribution_version",
        lambda name: (
            ("9.9" if fake.torchvision_imports else None) if name == "torchvision" else real_version(name)
        ),
    )

    def smoke(abcrown_dir):
        fake.smoke_imports += 1

    monkeypatch.setattr(install, "_smoke_import", smoke)
    monkeypatch.setenv("CCDIST_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ABCROWN_DIR", raising=False)
    monkeypatch.delenv("ABCROWN_PYTHON", raising=False)
    return fake


# --------------------------------------------------------------------------------------------
# Failures: one line, exit 2, nothing recorded
# --------------------------------------------------------------------------------------------


def test_missing_source_exits_2_with_one_line_and_writes_nothing(env, tmp_path):
    prefix = tmp_path / "prefix"
    line = error_line(ccdist("install-verifier", "--from", tmp_path / "nowhere", "--prefix", prefix))
    assert "nowhere" in line and "no such folder" in line
    sources = make_sources(tmp_path / "src")
    (sources / "onnx2pytorch" / "setup.py").unlink()
    line = error_line(ccdist("install-verifier", "--from", sources, "--prefix", prefix))
    assert "no onnx2pytorch source tree" in line and "setup.py" in line
    assert not prefix.exists() and env.pip_calls == [] and not install.record_path().exists()


def test_git_source_that_cannot_be_fetched_names_the_repository_and_commit(env, tmp_path, monkeypatch):
    """The default route clones the public repositories at the pinned commits; here none is
    reachable (the URL is a folder that does not exist): one line naming the repository."""
    missing = [Source(s.name, str(tmp_path / "no-repo" / s.name), s.commit) for s in PINNED]
    with pytest.raises(InstallError) as err:
        install_verifier(prefix=tmp_path / "prefix", sources=missing)
    text = str(err.value)
    assert "\n" not in text and "alpha-beta-CROWN" in text and PINNED[0].commit in text
    assert str(tmp_path / "no-repo") in text and env.pip_calls == []


def test_default_route_clones_the_pinned_public_repositories(env, tmp_path, monkeypatch):
    """What git is asked for without --from: each public repository, then its tested commit."""
    git_calls = []

    def fake_git(args, cwd=None):
        git_calls.append(list(args))
        raise InstallError("fatal: unable to access: Could not resolve host: github.com")

    monkeypatch.setattr(install, "_git", fake_git)
    line = error_line(ccdist("install-verifier", "--prefix", tmp_path / "prefix"))
    assert "https://github.com/Verified-Intelligence/alpha-beta-CROWN.git" in line and "8250d5fbd530" in line
    assert git_calls[0][:3] == ["clone", "--quiet", "--no-checkout"]
    assert git_calls[0][3] == "https://github.com/Verified-Intelligence/alpha-beta-CROWN.git"
    assert {s.name: (s.url, s.commit) for s in PINNED} == {
        "alpha-beta-CROWN": ("https://github.com/Verified-Intelligence/alpha-beta-CROWN.git", "8250d5fbd530"),
        "auto_LiRPA": ("https://github.com/Verified-Intelligence/auto_LiRPA.git", "9d100ec07086"),
        "onnx2pytorch": ("https://github.com/KaidiXu/onnx2pytorch.git", "8447c42c3192"),
    }


def test_non_writable_prefix_exits_2(env, tmp_path):
    sources = make_sources(tmp_path / "src")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = error_line(ccdist("install-verifier", "--from", sources, "--prefix", blocker / "prefix"))
    assert "not writable" in line and str(blocker / "prefix") in line
    assert env.pip_calls == [] and not install.record_path().exists()


@pytest.mark.parametrize("step", ["requirements.txt", "auto_LiRPA", "onnx2pytorch"])
def test_failed_pip_step_exits_2_naming_pip_and_records_nothing(env, tmp_path, step):
    env.fail = step
    line = error_line(
        ccdist("install-verifier", "--from", make_sources(tmp_path / "src"), "--prefix", tmp_path / "p")
    )
    assert line.startswith("error: pip failed (") and "No matching distribution found for gurobipy" in line
    assert not install.record_path().exists()
    assert locate_verifier().abcrown_dir is None


def test_a_bad_record_is_ignored_with_a_warning(env, tmp_path, caplog):
    install.record_path().parent.mkdir(parents=True)
    install.record_path().write_text("{not json")
    assert locate_verifier().abcrown_dir is None
    assert "ignoring the verifier record" in caplog.text


# --------------------------------------------------------------------------------------------
# What it installs, and how
# --------------------------------------------------------------------------------------------


def test_install_keeps_torch_and_installs_the_git_packages_without_deps(env, tmp_path):
    prefix = tmp_path / "prefix"
    result = ccdist("install-verifier", "--from", make_sources(tmp_path / "src"), "--prefix", prefix)
    assert result.exit_code == 0, result.output
    constraints = (prefix / "constraints.txt").read_text().splitlines()
    assert [ln for ln in constraints if not ln.startswith("#")] == [f"torch=={TORCH}"]
    # the PyPI requirements: under the constraint, and torch is not one of them
    (req_call,) = env.installs_of("requirements.txt")
    assert req_call[req_call.index("-c") + 1] == str(prefix / "constraints.txt")
    requirements = (prefix / "requirements.txt").read_text().split()
    assert requirements == list(install.REQUIREMENTS)
    assert not [r for r in requirements if r.split(">")[0].split("=")[0] in ("torch", "torchvision")]
    # auto_LiRPA and onnx2pytorch: --no-deps, from a writable copy that is removed afterwards
    for name in ("auto_LiRPA", "onnx2pytorch"):
        (call,) = env.installs_of(name)
        assert "--no-deps" in call and str(prefix / "build" / name) in call
    assert not (prefix / "build" / "auto_LiRPA").exists()
    # every pip install is either --no-deps or under the torch constraint
    for call in env.pip_calls:
        if call[0] == "install":
            assert "--no-deps" in call or "-c" in call, call
    # complete_verifier copied; the record points at it
    assert (prefix / "complete_verifier" / "exp_configs" / "a.yaml").is_file()
    record = json.loads(install.record_path().read_text())
    assert record["abcrown_dir"] == str((prefix / "complete_verifier").resolve())
    assert record["python"] == sys.executable and record["torch"] == TORCH
    assert env.smoke_imports == 1
    assert "recorded in" in result.output and "torch" in result.output


def test_torchvision_standin_when_none_imports(env, tmp_path):
    prefix = tmp_path / "prefix"
    sources = make_sources(tmp_path / "src")
    assert ccdist("install-verifier", "--from", sources, "--prefix", prefix).exit_code == 0
    # tried once, under the constraint; the one "installed" does not import, so it is removed
    (tv_call,) = env.installs_of("torchvision")
    assert "-c" in tv_call
    assert ["uninstall", "-y", "-q", "torchvision"] in [c[:4] for c in env.pip_calls]
    standin = prefix / "complete_verifier" / "torchvision"
    assert (standin / "__init__.py").is_file()
    probe = (
        "import torchvision, torchvision.datasets, torchvision.transforms, torchvision.ops\n"
        "assert not hasattr(torchvision.datasets, 'MNIST')\n"
        "try:\n    torchvision.ops.nms\nexcept AttributeError as e:\n    print('AttributeError:', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=prefix / "complete_verifier", capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "import-only" in out.stdout
    assert json.loads(install.record_path().read_text())["torchvision"] == "import-only stand-in"
    # a second run does not try pip again for the same torch
    env.pip_calls.clear()
    assert ccdist("install-verifier", "--from", sources, "--prefix", prefix).exit_code == 0
    assert env.installs_of("torchvision") == [] and (standin / "__init__.py").is_file()
    # once a real torchvision imports, the stand-in goes and torchvision is pinned too
    env.torchvision_imports = True
    result = ccdist("install-verifier", "--from", sources, "--prefix", prefix)
    assert result.exit_code == 0 and not standin.exists()
    assert "torchvision==9.9" in (prefix / "constraints.txt").read_text()


def test_torchvision_installed_when_one_imports(env, tmp_path):
    env.torchvision_installable = True
    prefix = tmp_path / "prefix"
    result = ccdist("install-verifier", "--from", make_sources(tmp_path / "src"), "--prefix", prefix)
    assert result.exit_code == 0, result.output
    assert len(env.installs_of("torchvision")) == 1
    assert not (prefix / "complete_verifier" / "torchvision").exists()
    assert not [c for c in env.pip_calls if c[0] == "uninstall"]
    assert json.loads(install.record_path().read_text())["torchvision"] == "9.9"


def test_running_again_redoes_nothing(env, tmp_path):
    prefix = tmp_path / "prefix"
    sources = make_sources(tmp_path / "src")
    first = ccdist("install-verifier", "--from", sources, "--prefix", prefix)
    assert first.exit_code == 0, first.output
    record = install.record_path().read_text()
    verifier = prefix / "complete_verifier" / "abcrown.py"
    stamp = verifier.stat().st_mtime_ns
    (prefix / "complete_verifier" / "out.txt").write_text("α,β-CROWN's own output")
    env.pip_calls.clear()
    second = ccdist("install-verifier", "--from", sources, "--prefix", prefix)
    assert second.exit_code == 0, second.output
    # only the (no-op) requirements step calls pip; nothing is copied again
    assert [c for c in env.pip_calls if "requirements.txt" not in " ".join(c)] == []
    assert "auto_LiRPA: already installed" in second.output
    assert "complete_verifier already in" in second.output
    assert verifier.stat().st_mtime_ns == stamp and (prefix / "complete_verifier" / "out.txt").exists()
    assert install.record_path().read_text() == record
    # a changed source file is copied again
    (sources / "alpha-beta-CROWN" / "complete_verifier" / "arguments.py").write_text("X = 2\n")
    third = ccdist("install-verifier", "--from", sources, "--prefix", prefix)
    assert "complete_verifier copied" in third.output
    assert (prefix / "complete_verifier" / "arguments.py").read_text() == "X = 2\n"


def _git(*args, cwd):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def test_git_route_on_local_repositories(env, tmp_path):
    """The git route end to end (clone, check out the commit, reuse the clone), with local
    repositories in place of the public ones."""
    trees = make_sources(tmp_path / "trees")
    sources = []
    for s in PINNED:
        repo = trees / s.name
        _git("init", "-q", cwd=repo)
        _git("add", "-A", cwd=repo)
        _git("commit", "-q", "-m", "tested", cwd=repo)
        tested = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout
        (repo / "later.txt").write_text("a later commit, not the tested one")
        _git("add", "-A", cwd=repo)
        _git("commit", "-q", "-m", "later", cwd=repo)
        sources.append(Source(s.name, str(repo), tested.strip()[:12]))
    prefix = tmp_path / "prefix"
    lines: list[str] = []
    report = install_verifier(prefix=prefix, sources=sources, say=lines.append)
    for s in sources:
        clone = prefix / "src" / s.name
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout
        assert head.startswith(s.commit) and not (clone / "later.txt").exists()
    assert report.abcrown_dir == (prefix / "complete_verifier").resolve()
    assert json.loads(install.record_path().read_text())["source"] == "git"
    lines.clear()
    install_verifier(prefix=prefix, sources=sources, say=lines.append)
    assert sum("already in" in ln and "source at" in ln for ln in lines) == 3
    # a commit the repository does not have: one line, exit 2 through the CLI's error type
    bad = [Source(s.name, s.url, "0123456789ab") for s in sources]
    with pytest.raises(InstallError, match="alpha-beta-CROWN"):
        install_verifier(prefix=tmp_path / "other", sources=bad)


# --------------------------------------------------------------------------------------------
# Finding it again
# --------------------------------------------------------------------------------------------


def _installed(env, tmp_path) -> Path:
    prefix = tmp_path / "prefix"
    result = ccdist("install-verifier", "--from", make_sources(tmp_path / "src"), "--prefix", prefix)
    assert result.exit_code == 0, result.output
    return (prefix / "complete_verifier").resolve()


def test_the_record_is_found_with_abcrown_dir_unset(env, tmp_path, monkeypatch):
    installed = _installed(env, tmp_path)
    located = locate_verifier()
    assert located.abcrown_dir == installed and located.python == sys.executable
    assert find_abcrown() == installed
    monkeypatch.setenv("ABCROWN_PYTHON", "/opt/other/python")
    assert locate_verifier().python == "/opt/other/python"


def test_abcrown_dir_wins_when_set(env, tmp_path, monkeypatch):
    installed = _installed(env, tmp_path)
    other = tmp_path / "other" / "complete_verifier"
    other.mkdir(parents=True)
    (other / "abcrown.py").write_text("")
    monkeypatch.setenv("ABCROWN_DIR", str(other))
    assert find_abcrown() == other.resolve() != installed
    # set but wrong: an error naming it, not a silent fall-back to the record
    monkeypatch.setenv("ABCROWN_DIR", str(tmp_path / "wrong"))
    with pytest.raises(AbcrownNotFoundError, match=r"wrong \(from \$ABCROWN_DIR\).*ccdist install-verifier"):
        find_abcrown()


def test_not_installed_says_so_once(env):
    with pytest.raises(AbcrownNotFoundError) as err:
        find_abcrown()
    text = str(err.value)
    assert "ABCROWN_DIR is unset" in text and "None" not in text
    assert text.count("ccdist install-verifier") == 1
    assert "\n" not in text


def test_run_verification_uses_the_recorded_interpreter(env, tmp_path, monkeypatch):
    """The recorded install went into one interpreter; ccdist verify runs α,β-CROWN with it."""
    _installed(env, tmp_path)
    record = json.loads(install.record_path().read_text())
    record["python"] = str(tmp_path / "venv-python")
    (tmp_path / "venv-python").write_text("")
    install.record_path().write_text(json.dumps(record))
    assert locate_verifier().python == str(tmp_path / "venv-python")
    record["python"] = str(tmp_path / "gone")  # an interpreter that no longer exists: ours
    install.record_path().write_text(json.dumps(record))
    assert locate_verifier().python == sys.executable


# --------------------------------------------------------------------------------------------
# The real thing
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not BUNDLE.is_dir(), reason="no offline copy of the sources ($CCDIST_VERIFIER_SOURCES)")
def test_full_install_into_a_fresh_environment(tmp_path):
    """The real sources into a fresh venv (torch & co. from the system site-packages): α,β-CROWN
    imports, the record is found with ABCROWN_DIR unset, a second run reinstalls nothing."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = dict(os.environ, CCDIST_HOME=str(tmp_path / "home"))
    env.pop("ABCROWN_DIR", None)
    env.pop("ABCROWN_PYTHON", None)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    cmd = [str(python), "-m", "ccdist_plugin.cli", "install-verifier", "--from", str(BUNDLE), "--prefix"]
    first = subprocess.run([*cmd, str(tmp_path / "prefix")], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "check: abcrown.py, auto_LiRPA and onnx2pytorch import" in first.stdout
    where = subprocess.run(
        [str(python), "-c", "from ccdist_plugin.verification import find_abcrown; print(find_abcrown())"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert where.stdout.strip() == str((tmp_path / "prefix" / "complete_verifier").resolve()), where.stderr
    torch_after = subprocess.run(
        [str(python), "-c", "import torch; print(torch.__version__)"], env=env, capture_output=True, text=True
    )
    assert torch_after.stdout.strip() == TORCH
    second = subprocess.run([*cmd, str(tmp_path / "prefix")], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stdout + second.stderr
    for name in ("auto_LiRPA", "onnx2pytorch"):
        assert f"{name}: already installed" in second.stdout

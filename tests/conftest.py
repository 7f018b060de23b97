"""Shared fixtures: small networks (random and briefly trained), the digits data and a fast training
config (the trainer's and the losses' tests share them)."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ccdist_plugin.config import TrainConfig
from ccdist_plugin.install import locate_verifier
from ccdist_plugin.models import cnn3, cnn7, mlp
from ccdist_plugin.soundness import briefly_trained  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parents[1]


def _adopt_installed_verifier() -> None:
    """The verifier the user installed (``$ABCROWN_DIR``, else the ``ccdist install-verifier``
    record) becomes ``$ABCROWN_DIR`` for the whole session, and ``$CCDIST_HOME`` a fresh folder: a
    test that unsets ABCROWN_DIR sees no verifier, and no test reads or writes the user's record."""
    located = locate_verifier()
    if not os.environ.get("ABCROWN_DIR") and located.abcrown_dir is not None:
        os.environ["ABCROWN_DIR"] = str(located.abcrown_dir)
        os.environ.setdefault("ABCROWN_PYTHON", located.python)
    home = tempfile.mkdtemp(prefix="ccdist-home-")
    atexit.register(shutil.rmtree, home, True)
    os.environ["CCDIST_HOME"] = home


_adopt_installed_verifier()


def has_auto_lirpa() -> bool:
    return importlib.util.find_spec("auto_LiRPA") is not None


#: why a test that needs auto_LiRPA skips: it is not installed, and how to install it
AUTO_LIRPA_MISSING = "auto_LiRPA is not installed (ccdist install-verifier; docs/verification.md, 'Install')"

requires_auto_lirpa = pytest.mark.skipif(not has_auto_lirpa(), reason=AUTO_LIRPA_MISSING)


def abcrown_dir() -> Path | None:
    d = os.environ.get("ABCROWN_DIR")
    return Path(d) if d and (Path(d) / "abcrown.py").exists() else None


def require_abcrown_dir() -> str:
    """``$ABCROWN_DIR`` of an installed α,β-CROWN, or skip the calling test saying how to install it."""
    d = abcrown_dir()
    if d is None:
        pytest.skip(
            "alpha,beta-CROWN is not installed (ccdist install-verifier, or set ABCROWN_DIR; "
            "docs/verification.md, 'Install')"
        )
    return str(d)


@pytest.fixture(scope="session")
def digits():
    """sklearn's 8×8 digits in pixel space: (x (N,1,8,8) float32 in [0,1], y (N,) int64)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    return x, y


def small_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    """The architectures of the soundness sweep, at sizes that run in seconds on a CPU."""
    torch.manual_seed(seed)
    return {
        "mlp": mlp(1, 8, 10, width=32, depth=2, batch_norm=True, mean=[0.3], std=[0.4]),
        "cnn3": cnn3(1, 8, 10, width=32, channels=(8, 16), mean=[0.3], std=[0.4]),
        "cnn7": cnn7(
            3, 16, 10, width=32, channels=(4, 4, 8, 8, 8), mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3]
        ),
    }


@pytest.fixture(scope="session")
def digits_data():
    """``ccdist_plugin.data``'s digits, cut to 256 training and 64 test examples (``.train``,
    ``.test``, ``.spec``): four batches of 64 per epoch."""
    pytest.importorskip("sklearn")
    from ccdist_plugin.data import load_dataset

    data = load_dataset("digits")
    return SimpleNamespace(
        train=data.train.subset(np.arange(256)), test=data.test.subset(np.arange(64)), spec=data.spec
    )


def tiny_cnn3(spec=None, seed: int = 0, width: int = 16) -> torch.nn.Module:
    """A CNN-3 of feature width ``width`` for 8×8 digits (normalized as ``spec`` says, when given)."""
    torch.manual_seed(seed)
    norm = {} if spec is None else {"mean": list(spec.mean), "std": list(spec.std)}
    return cnn3(1, 8, 10, width=width, channels=(4, 8), **norm)


def fast_config(tmp_path: Path, *overrides: str) -> TrainConfig:
    """A 3-epoch digits run of :func:`tiny_cnn3` (warm-up, ramp, constant ε) writing to
    ``tmp_path/run`` without progress bars, TensorBoard or plots; ``overrides`` as ``--set``."""
    base = [
        "device=cpu",
        "eps=0.05",
        "data.name=digits",
        "model.name=cnn3",
        "model.width=16",
        "model.channels=[4, 8]",
        "schedule.epochs=3",
        "schedule.warmup_epochs=1",
        "schedule.ramp_up_epochs=1",
        "optim.batch_size=64",
        "optim.lr=1e-3",
        "optim.lr_decay_epochs=[2]",
        "optim.l1=1e-5",
        "log.val_size=64",
        "log.progress=false",
        "log.tensorboard=false",
        "log.plot=false",
        f"log.output_dir={tmp_path / 'run'}",
    ]
    return TrainConfig().override(base + list(overrides))

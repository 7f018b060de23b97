"""Shared fixtures: small networks (random and briefly trained) and the digits data."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from ccdist_plugin.models import cnn3, cnn7, mlp
from ccdist_plugin.soundness import briefly_trained  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parents[1]


def has_auto_lirpa() -> bool:
    return importlib.util.find_spec("auto_LiRPA") is not None


requires_auto_lirpa = pytest.mark.skipif(
    not has_auto_lirpa(),
    reason="auto_LiRPA is not installed (from its git repository: docs/verification.md, 'Install')",
)


def abcrown_dir() -> Path | None:
    d = os.environ.get("ABCROWN_DIR")
    return Path(d) if d and (Path(d) / "abcrown.py").exists() else None


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

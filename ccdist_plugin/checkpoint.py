"""Training checkpoints: atomic writes, exact resume, loading a trained model.

A checkpoint (``torch.save`` of a dict) holds everything needed to continue a run bit for bit:
model architecture and state, optimizer state, the position in the ε/lr schedules (epochs done,
global batch step), RNG states (torch CPU and CUDA, numpy, python; the data order is a function of
(seed, epoch)), the resolved config, the dataset fingerprint, and the metrics history.

Writes go to a temporary file in the same directory, are flushed and fsync'ed, and replace the
target with ``os.replace``: an interrupted write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ccdist_plugin.config import TrainConfig, config_diff
from ccdist_plugin.fileio import atomic_write
from ccdist_plugin.models import CertifiedNet, model_from_arch

__all__ = [
    "FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "capture_rng_state",
    "restore_rng_state",
    "check_resumable",
    "RESUME_IGNORED_KEYS",
]

FORMAT = "ccdist-checkpoint-v1"
#: config sections that may differ between an interrupted run and its resumption
RESUME_IGNORED_KEYS = ("name", "device", "log", "teacher.preset")


def capture_rng_state() -> dict[str, Any]:
    """States of the torch (CPU and every CUDA device), numpy and python generators."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint loaded onto a GPU maps it there
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` (plus the format tag) to ``path``.

    The data goes to a temporary file beside ``path`` which then replaces it (``os.replace``); on
    any error the temporary file is removed and an existing checkpoint at ``path`` is untouched.
    """
    payload = {"format": FORMAT, **payload}
    return atomic_write(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``ValueError`` if it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated or foreign file
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a ccdist checkpoint (format tag {FORMAT!r} missing)")
    return payload


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> CertifiedNet:
    """The trained :class:`CertifiedNet` stored in a checkpoint, in eval mode.

    >>> # model = load_model("runs/digits/checkpoint.pt")
    """
    payload = load_checkpoint(path, map_location)
    model = model_from_arch(payload["arch"], init="default")
    model.load_state_dict(payload["model_state"])
    return model.eval()


def check_resumable(payload: dict[str, Any], config: TrainConfig, fingerprint: str | None) -> None:
    """Refuse (``ValueError`` naming the differences) to resume a checkpoint written by a different
    config (apart from :data:`RESUME_IGNORED_KEYS`) or on a different dataset."""
    saved = payload.get("config")
    if saved is None:
        raise ValueError("checkpoint holds no config; it cannot be resumed")
    diff = config_diff(saved, config, ignore=RESUME_IGNORED_KEYS)
    if diff:
        raise ValueError(
            "checkpoint was written by a different config; refusing to resume. Differences "
            "(checkpoint != current): " + "; ".join(diff)
        )
    saved_fp = payload.get("dataset_fingerprint")
    if saved_fp is not None and fingerprint is not None and saved_fp != fingerprint:
        raise ValueError(
            f"checkpoint was trained on a different dataset (fingerprint {saved_fp} != current "
            f"{fingerprint}); "
            "refusing to resume"
        )

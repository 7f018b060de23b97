"""Training checkpoints: atomic writes, exact resume, loading a trained model.

A checkpoint (``torch.save`` of a dict) holds everything needed to continue a run bit for bit:
model architecture and state, optimizer state, the position in the ε/lr schedules (epochs done,
global batch step), RNG states (torch CPU and CUDA, numpy, python; the data order is a function of
(seed, epoch)), the resolved config, the dataset fingerprint, and the metrics history.

Writes go to a temporary file in the same directory, are flushed and fsync'ed, and replace the
target with ``os.replace``: an interrupted write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
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
    "check_finite_state",
    "model_from_payload",
    "state_sha256",
    "RESUME_IGNORED_KEYS",
]

FORMAT = "ccdist-checkpoint-v1"
#: config sections that may differ between an interrupted run and its resumption
RESUME_IGNORED_KEYS = ("name", "device", "log", "teacher.preset")
#: the teacher's file may move: a resumed run compares the teacher's weights (``teacher_sha256``)
TEACHER_PATH_KEY = "teacher.checkpoint"


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

    ``ValueError`` when the checkpoint's weights do not fit its architecture or are not all finite.

    >>> # model = load_model("runs/digits/checkpoint.pt")
    """
    return model_from_payload(load_checkpoint(path, map_location), path)


def model_from_payload(payload: dict[str, Any], path: str | Path = "checkpoint") -> CertifiedNet:
    """The network of a loaded checkpoint (see :func:`load_model`), in eval mode."""
    if not isinstance(payload.get("arch"), dict) or not isinstance(payload.get("model_state"), dict):
        raise ValueError(f"checkpoint {str(path)!r} holds no model (keys 'arch' and 'model_state')")
    try:
        model = model_from_arch(payload["arch"], init="default")
    except (TypeError, KeyError) as err:
        raise ValueError(f"checkpoint {str(path)!r}: unusable architecture record: {err}") from err
    state = payload["model_state"]
    check_finite_state(state, f"checkpoint {str(path)!r}")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"missing {', '.join(missing[:5])}" if missing else ""]
        parts.append(f"unexpected {', '.join(unexpected[:5])}" if unexpected else "")
        raise ValueError(
            f"checkpoint {str(path)!r}: the weights do not match its architecture "
            f"({'; '.join(p for p in parts if p)}); the file is damaged or was edited"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # shapes differ
        first = str(err).strip().splitlines()[-1].strip()
        raise ValueError(
            f"checkpoint {str(path)!r}: the weights do not match its architecture: {first}"
        ) from None
    return model.eval()


def check_finite_state(state: dict[str, Any] | torch.nn.Module, what: str) -> None:
    """``ValueError`` naming the first tensor of a state dict (or module) holding NaN or inf: such a
    network outputs non-finite logits, which no metric or teacher can use."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    for name, tensor in state.items():
        floating = isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
        if floating and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"{what}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf); "
                "the network cannot be used (was it saved after training diverged?)"
            )


def state_sha256(model: torch.nn.Module) -> str:
    """SHA-256 (hex) over a network's state: names, dtypes, shapes and values, independent of the
    memory layout and device. Two networks with the same weights have the same hash."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()


def check_resumable(
    payload: dict[str, Any],
    config: TrainConfig,
    fingerprint: str | None,
    teacher_sha256: str | None = None,
    allow_teacher_change: bool = False,
) -> None:
    """Refuse (``ValueError`` naming the differences) to resume a checkpoint whose weights are not
    all finite, or that was written by a different config (apart from :data:`RESUME_IGNORED_KEYS`),
    on a different dataset, or (unless ``allow_teacher_change``) towards another teacher.

    The teacher is compared by :func:`state_sha256`, not by path: the same teacher moved to another
    file is accepted; another network at the same path is refused.
    """
    saved = payload.get("config")
    if saved is None:
        raise ValueError("checkpoint holds no config; it cannot be resumed")
    if isinstance(payload.get("model_state"), dict):  # a diverged network would only give a NaN loss
        check_finite_state(payload["model_state"], "checkpoint to resume")
    saved_teacher = payload.get("teacher_sha256")
    ignore = RESUME_IGNORED_KEYS
    if saved_teacher is not None or teacher_sha256 is None or allow_teacher_change:
        ignore = (*ignore, TEACHER_PATH_KEY)  # teachers compared by their weights below
    diff = config_diff(saved, config, ignore=ignore)
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
    if saved_teacher is not None and saved_teacher != teacher_sha256 and not allow_teacher_change:
        now = "no teacher" if teacher_sha256 is None else f"a teacher with weights {teacher_sha256[:12]}"
        raise ValueError(
            f"checkpoint was trained towards a teacher with weights {saved_teacher[:12]} (sha256), "
            f"but this run has {now}; the teacher file was replaced or another one was given. "
            "Refusing to resume (pass the original teacher, or --allow-teacher-change to continue "
            "towards the new one)"
        )


def describe_checkpoint(path: Path) -> str:
    """``checkpoint.pt (a finished run, 3/3 epochs)``, ``... (an unfinished run, stopped after 1 of 3
    epochs)``, or that the file is not a readable checkpoint: what an earlier run left, in words."""
    try:
        payload = load_checkpoint(path)
    except ValueError:
        return f"{path.name} (a file that is not a readable checkpoint)"
    done = payload.get("epoch")
    schedule = (payload.get("config") or {}).get("schedule") or {}
    total = schedule.get("epochs") if isinstance(schedule, dict) else None
    if not isinstance(done, int) or not isinstance(total, int):
        return f"{path.name} (a checkpoint)"
    if done >= total:
        return f"{path.name} (a finished run, {done}/{total} epochs)"
    return f"{path.name} (an unfinished run, stopped after {done} of {total} epochs)"

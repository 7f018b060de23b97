"""The files of an α,β-CROWN export: the ONNX model, the VNN-LIB properties and ``abcrown.yaml``.

- :func:`export_onnx`: the network without its normalization, opset 13, batch 1, checked with
  ``onnx.checker`` and against PyTorch with onnxruntime (else :class:`ExportError`);
- :func:`normalized_box` + :func:`write_vnnlib`: one point's threat-model box in the normalized
  space the ONNX model takes (rounded outwards to float32) and its negated robustness property;
- :func:`write_abcrown_config`: an α,β-CROWN template (``abcrown_configs/<name>.yaml``, package
  data) with the export's absolute paths filled in.

The export pipeline that writes them all, with ``instances.csv`` and the manifest, is
:mod:`ccdist_plugin.verification.export`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from ccdist_plugin.bounds import training_restorer
from ccdist_plugin.fileio import atomic_write_text

__all__ = [
    "ExportError",
    "ONNX_NAME",
    "CSV_NAME",
    "MANIFEST_NAME",
    "CONFIG_NAME",
    "RESULTS_NAME",
    "VNNLIB_DIR",
    "TEMPLATE_DIR",
    "DATASET_TEMPLATES",
    "normalized_box",
    "write_vnnlib",
    "export_onnx",
    "list_templates",
    "copy_templates",
    "template_path",
    "write_abcrown_config",
]

#: File names inside an export directory.
ONNX_NAME = "model.onnx"
CSV_NAME = "instances.csv"
MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "abcrown.yaml"
RESULTS_NAME = "abcrown_results.pkl"
VNNLIB_DIR = "vnnlib"

#: Default α,β-CROWN template per dataset (teachers use ``teacher``).
DATASET_TEMPLATES = {
    "cifar10": "cifar10",
    "cifar10-jpeg": "cifar10",
    "tinyimagenet": "tinyimagenet",
    "imagenet64": "imagenet64",
    "digits": "digits",
    "mnist": "digits",
}

#: Where the α,β-CROWN templates live: package data (the repository's top-level ``abcrown_configs/``
#: is a copy of it for users who run abcrown.py by hand; tests/test_packaging.py keeps them identical).
TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "abcrown_configs"


class ExportError(RuntimeError):
    """The exported ONNX model failed its checks (``onnx.checker`` or parity with PyTorch)."""


# --------------------------------------------------------------------------------------------
# Boxes and files
# --------------------------------------------------------------------------------------------


def _float32_outward(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round float64 bounds outwards to float32-representable values (the box only grows)."""
    lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    lo32 = np.where(lo32.astype(np.float64) > lo, np.nextafter(lo32, np.float32(-np.inf)), lo32)
    hi32 = np.where(hi32.astype(np.float64) < hi, np.nextafter(hi32, np.float32(np.inf)), hi32)
    return lo32.astype(np.float64), hi32.astype(np.float64)


def normalized_box(
    x: Tensor, eps: float, mean: Sequence[float], std: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """The threat model's box for one input, in the normalized space the exported ONNX takes.

    Args:
        x: (C, H, W) pixel-space input in [0, 1].
        eps: ℓ∞ radius in pixel units.
        mean, std: per-channel normalization (length C).

    Returns:
        ``(lo, hi)``, float64 arrays of C·H·W entries in C-order:
        ``[(max(x−ε,0)−μ)/σ, (min(x+ε,1)−μ)/σ]`` rounded outwards to float32 (so the float32 box
        α,β-CROWN reads contains the exact one).
    """
    if x.ndim != 3:
        raise ValueError(f"normalized_box: x must be (C, H, W), got shape {tuple(x.shape)}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    xs = x.detach().double().cpu().numpy()
    if xs.min() < -1e-6 or xs.max() > 1 + 1e-6:
        raise ValueError("normalized_box: x must lie in pixel space [0, 1]")
    c = xs.shape[0]
    mu = np.asarray(mean, dtype=np.float64).reshape(-1, 1, 1)
    sd = np.asarray(std, dtype=np.float64).reshape(-1, 1, 1)
    if mu.shape[0] != c or sd.shape[0] != c:
        raise ValueError(f"normalization has {mu.shape[0]}/{sd.shape[0]} channels but x has {c}")
    if (sd <= 0).any():
        raise ValueError("normalized_box: std must be positive")
    lo = (np.clip(xs - eps, 0.0, 1.0) - mu) / sd
    hi = (np.clip(xs + eps, 0.0, 1.0) - mu) / sd
    return _float32_outward(lo.reshape(-1), hi.reshape(-1))


def write_vnnlib(
    path: str | os.PathLike,
    lo: Sequence[float] | np.ndarray | Tensor,
    hi: Sequence[float] | np.ndarray | Tensor,
    y: int,
    num_classes: int,
    drop: Sequence[int] = (),
    comment: str | None = None,
) -> list[int]:
    """Write the negated ℓ∞ robustness property of label ``y`` in VNN-COMP's VNN-LIB syntax.

    The file declares ``X_0 … X_{n−1}`` (inputs, in the order of ``lo``/``hi``) and
    ``Y_0 … Y_{k−1}`` (logits), bounds each input, and asserts
    ``(or (and (>= Y_j Y_y)) …)`` over the targets ``j ≠ y`` not in ``drop``: the network is
    robust iff this is unsatisfiable.

    Args:
        lo, hi: per-input bounds (n entries, C-order of (C, H, W)), ``lo <= hi``.
        y: the true label.
        num_classes: k.
        drop: classes whose difference z_j is already proved positive (left out).

    Returns:
        The targets j kept in the disjunction.
    """
    lo_a = np.asarray(lo.detach().cpu() if isinstance(lo, Tensor) else lo, dtype=np.float64).reshape(-1)
    hi_a = np.asarray(hi.detach().cpu() if isinstance(hi, Tensor) else hi, dtype=np.float64).reshape(-1)
    if lo_a.shape != hi_a.shape or lo_a.size == 0:
        raise ValueError(f"lo and hi must have the same non-zero size, got {lo_a.size} and {hi_a.size}")
    if not (np.isfinite(lo_a).all() and np.isfinite(hi_a).all()):
        raise ValueError("lo and hi must be finite")
    if (lo_a > hi_a).any():
        raise ValueError(f"lo > hi at input {int(np.argmax(lo_a > hi_a))}")
    if num_classes < 2 or not 0 <= int(y) < num_classes:
        raise ValueError(f"label {y} out of range for {num_classes} classes")
    y = int(y)
    dropped = {int(j) for j in drop}
    if y in dropped:
        raise ValueError(f"drop must not contain the label {y}")
    bad = [j for j in dropped if not 0 <= j < num_classes]
    if bad:
        raise ValueError(f"drop has classes out of range: {bad}")
    targets = [j for j in range(num_classes) if j != y and j not in dropped]
    if not targets:
        raise ValueError("every logit difference is dropped: nothing left to verify (the point is certified)")
    lines = []
    if comment:
        lines += [f"; {line}" for line in comment.splitlines()]
    lines += [f"(declare-const X_{i} Real)" for i in range(lo_a.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(num_classes)]
    for i, (a, b) in enumerate(zip(lo_a.tolist(), hi_a.tolist(), strict=True)):
        lines.append(f"(assert (<= X_{i} {b!r}))")
        lines.append(f"(assert (>= X_{i} {a!r}))")
    disjuncts = " ".join(f"(and (>= Y_{j} Y_{y}))" for j in targets)
    lines.append(f"(assert (or {disjuncts}))")
    Path(path).write_text("\n".join(lines) + "\n")
    return targets


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike,
    input_shape: Sequence[int],
    test_inputs: Tensor | None = None,
    atol: float = 1e-5,
) -> float:
    """Export ``module`` (eval mode, batch 1, opset 13, TorchScript exporter) and check it.

    Args:
        module: the network to export, e.g. ``model.without_normalization()``. Its train/eval
            mode is restored afterwards.
        input_shape: (C, H, W) of one input.
        test_inputs: (N, C, H, W) inputs to compare PyTorch and onnxruntime on (default: a few
            standard-normal draws).
        atol: largest allowed max-abs difference of the outputs, per unit of logit scale: the
            check is ``max |torch − ort| <= atol · max(1, max |logit|)``. float32 logits of
            magnitude ~30 already differ by a few ulp (~1e-5) between two correct GEMM
            implementations; a broken export (wrong layer, train-mode BatchNorm) differs by O(1).

    Returns:
        The max-abs difference between PyTorch and onnxruntime outputs.

    Raises:
        ExportError: ``onnx.checker`` rejects the model or the outputs differ by more than allowed.
    """
    import onnx
    import onnxruntime as ort

    shape = (1, *[int(s) for s in input_shape])
    if test_inputs is None:
        gen = torch.Generator().manual_seed(0)
        test_inputs = torch.randn(4, *shape[1:], generator=gen)
    if tuple(test_inputs.shape[1:]) != shape[1:]:
        raise ValueError(f"test_inputs have shape {tuple(test_inputs.shape)}, expected (N, {shape[1:]})")
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    restore_modes = training_restorer(module)  # per layer: the layers may be shared with a train-mode net
    module.eval()
    try:
        dummy = torch.zeros(shape, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (dummy,),
                str(path),
                opset_version=13,
                dynamo=False,
                input_names=["input"],
                output_names=["output"],
                do_constant_folding=True,
            )
        try:
            onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        except Exception as err:  # onnx raises several exception types
            raise ExportError(f"onnx.checker rejected {path}: {err}") from err
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        max_diff, scale = 0.0, 1.0
        with torch.no_grad():
            for xi in test_inputs.float():
                ref = module(xi.unsqueeze(0).to(device)).double().cpu().numpy()
                got = session.run(None, {"input": xi.unsqueeze(0).cpu().numpy()})[0].astype(np.float64)
                if got.shape != ref.shape:
                    raise ExportError(
                        f"onnxruntime output shape {got.shape} differs from PyTorch {ref.shape}"
                    )
                max_diff = max(max_diff, float(np.abs(got - ref).max()))
                scale = max(scale, float(np.abs(ref).max()))
    finally:
        restore_modes()
    if not max_diff <= atol * scale:
        raise ExportError(
            f"ONNX export of {path} differs from PyTorch by {max_diff:.3g} > {atol:g} × {scale:.3g} "
            "(max(1, largest |logit|))"
        )
    return max_diff


# --------------------------------------------------------------------------------------------
# α,β-CROWN configuration
# --------------------------------------------------------------------------------------------


def list_templates() -> list[str]:
    """Names of the α,β-CROWN templates in ``abcrown_configs/``."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml")) if TEMPLATE_DIR.is_dir() else []


def copy_templates(dest: str | os.PathLike) -> dict[str, str]:
    """Copy the packaged α,β-CROWN templates into ``dest`` (created if needed), e.g. to edit them or
    to pass them to abcrown.py by hand.

    Never overwrites: a file of the same name that differs raises ``FileExistsError`` before anything
    is written; one that is already identical is left alone.

    Returns:
        ``{file name: "copied" | "unchanged"}``.
    """
    dest = Path(dest)
    sources = sorted(TEMPLATE_DIR.glob("*.yaml"))
    if not sources:
        raise ExportError(f"no α,β-CROWN templates found in {TEMPLATE_DIR}; is the package installed whole?")
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest} exists and is not a folder")
    status: dict[str, str] = {}
    for src in sources:
        target = dest / src.name
        if not target.exists():
            status[src.name] = "copied"
        elif target.is_file() and target.read_bytes() == src.read_bytes():
            status[src.name] = "unchanged"
        else:
            raise FileExistsError(
                f"{target} exists and differs from the packaged {src.name}; nothing was copied "
                "(move it away, or copy into another folder)"
            )
    dest.mkdir(parents=True, exist_ok=True)
    for src in sources:
        if status[src.name] == "copied":
            atomic_write_text(dest / src.name, src.read_text())
    return status


def template_path(template: str | os.PathLike) -> Path:
    """Resolve a template name (``"digits"``, ``"cifar10"``, …) or a YAML path to a file.

    A bare name is always a packaged template, never a file or folder of the current directory;
    a path must contain a separator or end in ``.yaml`` / ``.yml``.
    """
    p = Path(template)
    text = os.fspath(template)
    if p.suffix in (".yaml", ".yml") or "/" in text or os.sep in text:
        if not p.is_file():
            raise ValueError(f"α,β-CROWN template {p} does not exist")
        return p.resolve()
    candidate = TEMPLATE_DIR / f"{template}.yaml"
    if not candidate.is_file():
        raise ValueError(
            f"unknown α,β-CROWN template {template!r}; known: "
            f"{', '.join(list_templates()) or '(none found)'} in {TEMPLATE_DIR}, "
            "or pass a path to a YAML file"
        )
    return candidate


def _set(d: dict, keys: Sequence[str], value: Any) -> None:
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def write_abcrown_config(
    out_dir: str | os.PathLike,
    template: str | os.PathLike = "digits",
    timeout_s: float | None = None,
    input_shape: Sequence[int] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write ``<out_dir>/abcrown.yaml``: the template with the export's absolute paths filled in.

    Sets ``general.root_path`` (the export dir), ``general.csv_name`` (``instances.csv``),
    ``general.results_file`` (``abcrown_results.pkl`` in the export dir), ``bab.timeout`` and
    ``model.input_shape``. ``overrides`` maps dotted keys to values, e.g.
    ``{"general.device": "cpu", "solver.batch_size": 64}``.
    """
    out = Path(out_dir).resolve()
    src = template_path(template)
    cfg = yaml.safe_load(src.read_text()) or {}
    _set(cfg, ["general", "root_path"], str(out))
    _set(cfg, ["general", "csv_name"], CSV_NAME)
    _set(cfg, ["general", "results_file"], str(out / RESULTS_NAME))
    if timeout_s is not None:
        _set(cfg, ["bab", "timeout"], float(timeout_s))
    if input_shape is not None:
        _set(cfg, ["model", "input_shape"], [-1, *[int(s) for s in input_shape]])
    for key, value in (overrides or {}).items():
        _set(cfg, key.split("."), value)
    header = (
        f"# Generated by ccdist export from {src.name} (see the comments there for the paper's settings).\n"
        f"# Run: python $ABCROWN_DIR/abcrown.py --config {out / CONFIG_NAME}\n"
    )
    path = out / CONFIG_NAME
    path.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    return path

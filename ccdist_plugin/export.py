"""Export a trained network and test points for complete verification with α,β-CROWN.

An export directory holds everything α,β-CROWN needs, in VNN-COMP layout:

- ``model.onnx``: the network *without* its :class:`~ccdist_plugin.models.Normalize` layer (it takes
  normalized input), opset 13, eval mode, batch 1, TorchScript exporter; checked with
  ``onnx.checker`` and against PyTorch with onnxruntime (max-abs difference ≤ 1e-5 per unit of
  logit scale, else :class:`ExportError`).
- ``vnnlib/point_<index>.vnnlib``: one VNN-LIB file per test point sent to branch-and-bound. The
  input box is the pixel ball ∩ [0, 1] mapped through the normalization,
  ``[(max(x−ε,0)−μ)/σ, (min(x+ε,1)−μ)/σ]``, rounded outwards to float32; the output constraint is
  the negated robustness property, a disjunction over ``j ≠ y`` of ``Y_j ≥ Y_y``, without the logit
  differences our own IBP/CROWN bounds already proved (``drop_proven``; appendix D.3 of the paper).
- ``instances.csv``: VNN-COMP rows ``model.onnx,vnnlib/point_<i>.vnnlib,<timeout>`` (no header).
- ``manifest.json``: model and data provenance, ε, normalization, a fresh export id, the sha256 of
  ``model.onnx`` and of every VNN-LIB file, and the pre-filter outcome of every point:
  ``misclassified`` (clean prediction wrong), ``pre-certified`` (every difference proved by
  IBP/CROWN), ``attacked`` (PGD found a counterexample), ``bab`` (sent to α,β-CROWN). A verdict
  counts only when it carries this export id and these hashes (:mod:`ccdist_plugin.verify`).
- ``abcrown.yaml``: the α,β-CROWN template (``abcrown_configs/<name>.yaml``) with absolute paths
  filled in; ``python abcrown.py --config <dir>/abcrown.yaml`` verifies every instance.

Exporting into a folder that holds verdicts of an earlier export moves them to
``verify.stale-<UTC time>/`` first: a re-export always starts a fresh verification.

The cascade follows the paper's verifier (IBP, CROWN, PGD, then branch-and-bound); see
``docs/verification.md``.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from ccdist_plugin.bounds import CERT_TOL, training_restorer
from ccdist_plugin.bounds.graphcheck import BoundedGraphMismatch
from ccdist_plugin.fileio import atomic_write_text, file_sha256
from ccdist_plugin.models import CertifiedNet
from ccdist_plugin.validate import check_batch

if TYPE_CHECKING:  # evaluation imports this module lazily; only the annotation is needed here
    from ccdist_plugin.evaluation import PrefilterResult

__all__ = [
    "ExportError",
    "ExportResult",
    "CERT_TOL",
    "normalized_box",
    "export_onnx",
    "write_vnnlib",
    "template_path",
    "list_templates",
    "copy_templates",
    "write_abcrown_config",
    "export_instances",
    "set_aside_verdicts",
    "export_id_of",
]

logger = logging.getLogger(__name__)

#: File names inside an export directory.
ONNX_NAME = "model.onnx"
CSV_NAME = "instances.csv"
MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "abcrown.yaml"
RESULTS_NAME = "abcrown_results.pkl"
VNNLIB_DIR = "vnnlib"

#: Where the α,β-CROWN templates live: package data (the repository's top-level ``abcrown_configs/``
#: is a copy of it for users who run abcrown.py by hand; tests/test_packaging.py keeps them identical).
TEMPLATE_DIR = Path(__file__).resolve().parent / "abcrown_configs"


class ExportError(RuntimeError):
    """The exported ONNX model failed its checks (``onnx.checker`` or parity with PyTorch)."""


@dataclass
class ExportResult:
    """What :func:`export_instances` wrote.

    Attributes:
        out_dir: the export directory (absolute).
        onnx_path, csv_path, manifest_path, config_path: the files written (absolute).
        points: the per-point records of ``manifest.json`` (one dict per exported test point).
        counts: number of points per pre-filter outcome.
        onnx_max_abs_diff: largest |PyTorch − onnxruntime| logit difference on the test inputs.
        soundness_alarms: points our bounds certified that our PGD broke (never counted certified).
        stale_dir: where the verdicts of an earlier export in ``out_dir`` were moved (or None).
    """

    out_dir: Path
    onnx_path: Path
    csv_path: Path
    manifest_path: Path
    config_path: Path
    points: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    onnx_max_abs_diff: float = 0.0
    soundness_alarms: list[str] = field(default_factory=list)
    stale_dir: Path | None = None

    @property
    def num_instances(self) -> int:
        """Number of rows of ``instances.csv`` (points sent to branch-and-bound)."""
        return sum(1 for p in self.points if p["instance"] is not None)


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


# --------------------------------------------------------------------------------------------
# The export pipeline
# --------------------------------------------------------------------------------------------


def _sha256_state(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _select_points(data: Any, start: int, count: int | None) -> tuple[list[int], Tensor, Tensor]:
    """Indices, inputs (N, C, H, W) and labels (N,) of the test points ``start … start+count−1``."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        x_all, y_all = data
        n = x_all.shape[0]
        if y_all.shape[0] != n:
            raise ValueError(f"inputs and labels differ in length: {n} vs {y_all.shape[0]}")
        getter = None
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        n, getter = len(data), data
    else:
        raise TypeError("data must be a (x, y) pair of tensors or a dataset of (x, y) items")
    if start < 0 or start >= n:
        raise ValueError(f"start {start} out of range for {n} test points")
    stop = n if count is None else min(n, start + int(count))
    if count is not None and count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    idx = list(range(start, stop))
    if getter is None:
        return idx, x_all[start:stop].float(), y_all[start:stop].long()
    items = [getter[i] for i in idx]
    xs = torch.stack([torch.as_tensor(it[0]).float() for it in items])
    ys = torch.as_tensor([int(it[1]) for it in items], dtype=torch.long)
    return idx, xs, ys


def _point_record(
    pos: int, index: int, label: int, pre: PrefilterResult, methods: Sequence[str]
) -> dict[str, Any]:
    """One point's manifest record and its pre-filter outcome (the first that applies):
    ``misclassified``, ``pre-certified``, ``attacked``, else ``bab``.

    The decisions are those of :func:`ccdist_plugin.evaluation.prefilter` (one rule for
    ``ccdist eval`` and the export); this only lays them out for the manifest.
    """
    status = pre.status[pos]
    k = pre.proved.shape[1]
    others = [j for j in range(k) if j != label]
    record: dict[str, Any] = {
        "index": index,
        "label": label,
        "prediction": int(pre.prediction[pos]),
        "correct": bool(pre.correct[pos]),
        **{f"{m}_certified": bool(pre.certified[m][pos]) for m in methods},
        **{f"{m}_margin_lb": float(pre.margin_lb[m][pos][others].min()) for m in methods},
        "proved": [j for j in others if bool(pre.proved[pos, j])],
        "pgd_broken": bool(pre.broken[pos]),
        "pgd_margin": float(pre.adv_margin[pos]),
        "prefilter_status": status,
    }
    if status == "misclassified":
        outcome = "misclassified"
    elif status in ("certified_ibp", "certified_crown"):
        outcome = "pre-certified"
    elif status == "alarm":
        # our bounds and our attack disagree: a bug in one of them. The point stays
        # pre-certified in the manifest (what the bounds said) and is never counted as certified.
        outcome = "pre-certified"
        record["soundness_alarm"] = (
            f"test point {index} (label {label}): certified by our {'/'.join(methods).upper()} "
            "bounds but our PGD found a counterexample"
        )
        logger.error("SOUNDNESS ALARM: %s", record["soundness_alarm"])
    elif status == "attacked":
        outcome = "attacked"
    else:
        outcome = "bab"
    record["outcome"] = outcome
    return record


def set_aside_verdicts(out_dir: str | os.PathLike, old_manifest: str | None = None) -> Path | None:
    """Move the verdicts of an earlier export in ``out_dir`` to ``verify.stale-<UTC time>/``.

    A re-export rewrites the model, the csv and the VNN-LIB files; verdicts about the old ones
    must never be read as verdicts about the new ones. ``old_manifest`` (the earlier
    ``manifest.json`` text, when it was already overwritten) is kept beside them. Returns the
    folder they went to (None when there was nothing to move).
    """
    out = Path(out_dir)
    names = ["verify", "verification.json", "verification.md", RESULTS_NAME]
    present = [n for n in names if (out / n).exists()]
    if not present:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    stale = out / f"verify.stale-{stamp}"
    stale.mkdir()
    for n in present:
        os.replace(out / n, stale / n)
    if old_manifest is not None:
        (stale / MANIFEST_NAME).write_text(old_manifest)
    elif (out / MANIFEST_NAME).is_file():
        os.replace(out / MANIFEST_NAME, stale / MANIFEST_NAME)
    logger.warning(
        "%s held verdicts of an earlier export: moved to %s (a re-export starts a fresh verification)",
        out,
        stale,
    )
    return stale


def export_instances(
    model: CertifiedNet,
    data: Any,
    out_dir: str | os.PathLike,
    eps: float,
    count: int | None = None,
    start: int = 0,
    drop_proven: bool = True,
    timeout_s: float = 600.0,
    template: str | os.PathLike = "digits",
    methods: Sequence[str] = ("ibp", "crown"),
    attack_steps: int = 50,
    attack_restarts: int = 3,
    verify_all: bool = False,
    dataset_name: str | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    config_overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> ExportResult:
    """Export ``model`` and the test points ``start … start+count−1`` for α,β-CROWN.

    The cascade of the paper (appendix D.3) runs first: the clean prediction, our IBP and CROWN
    bounds (``methods``), then PGD. Misclassified, pre-certified and attacked points are recorded
    in the manifest and not sent to branch-and-bound; every other point gets one VNN-LIB file
    (without the differences our bounds proved when ``drop_proven``) and one row of
    ``instances.csv``.

    The manifest records the sha256 of the ONNX model and of every VNN-LIB file, and an export id
    that is a hash of everything verified (model, ε, budget, points, outcomes, properties); every
    verdict must match them to be counted. Exporting into a folder that holds verdicts of another
    export moves them aside (:func:`set_aside_verdicts`): such a re-export starts a fresh
    verification. Exporting the very same thing again (same id) keeps them, so an interrupted
    ``ccdist eval --bab`` resumes.

    Args:
        model: a :class:`CertifiedNet` (pixel-space input, ``Normalize`` first).
        data: a dataset of ``(x, y)`` items (x in [0, 1], shape (C, H, W)) or a pair of tensors
            ``(x (N, C, H, W), y (N,))``.
        out_dir: the export directory (created; existing export files are overwritten).
        eps: ℓ∞ radius in pixel units (e.g. ``2/255``).
        count, start: which test points (default: all from ``start``).
        drop_proven: leave differences proved by IBP/CROWN out of the VNN-LIB disjunction.
        timeout_s: the time budget per instance (α,β-CROWN's ``bab.timeout``; the csv's timeout
            column; the budget a verdict must meet to count).
        template: an ``abcrown_configs/`` name or a YAML path for ``abcrown.yaml``.
        methods: our bounds used as pre-checks, a subset of ``("ibp", "crown")``.
        attack_steps, attack_restarts: the PGD pre-check (0 steps: no attack).
        verify_all: also send misclassified, pre-certified and attacked points to α,β-CROWN
            (with the full property), as a soundness cross-check of our bounds and attacks;
            their outcome still decides whether they count as certified.
        dataset_name, checkpoint_path: provenance recorded in the manifest.
        config_overrides: dotted α,β-CROWN keys for ``abcrown.yaml``, e.g. ``{"general.device": "cpu"}``.

    Returns:
        An :class:`ExportResult`.

    Raises:
        BoundedGraphMismatch: the pre-filter's soundness alarm (the network's outputs are not
            its bounded graph's, ``ccdist_plugin.graphcheck``): nothing is certified and nothing
            is exported; an earlier export in ``out_dir`` is left as it was.
    """
    if not isinstance(model, CertifiedNet):
        raise ValueError(
            f"model must be a CertifiedNet (Normalize + features + head), got {type(model).__name__}"
        )
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    bad = [m for m in methods if m not in ("ibp", "crown")]
    if bad:
        raise ValueError(f"unknown bound methods {bad}; expected 'ibp' and/or 'crown'")
    template_file = template_path(template)  # fail early on a bad template
    indices, x, y = _select_points(data, start, count)
    check_batch(model, x, y, eps)  # shapes, label and pixel range (the checks of every entry point)
    input_shape = tuple(model.input_shape)

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    old_manifest = (out / MANIFEST_NAME).read_text() if (out / MANIFEST_NAME).is_file() else None
    restore_modes = training_restorer(model)
    model.eval()
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    try:
        torch.manual_seed(seed)
        from ccdist_plugin.attacks import PGD
        from ccdist_plugin.evaluation import prefilter

        # the IBP → CROWN → PGD cascade shared with `ccdist eval` (one rule for both paths)
        attack = (
            PGD(steps=attack_steps, restarts=attack_restarts, objective="margin")
            if attack_steps > 0
            else None
        )
        pre = prefilter(model, x, y, eps, methods=methods, attack=attack, tol=CERT_TOL)
        if pre.soundness_alarm is not None:
            # the ONNX graph is traced as the bounds' graph is: α,β-CROWN would verify another network
            raise BoundedGraphMismatch(f"nothing exported: {pre.soundness_alarm}")
        mean = model.normalize.mean.flatten().tolist()
        std = model.normalize.std.flatten().tolist()
        x_norm = ((x - model.normalize.mean) / model.normalize.std).detach().cpu()
        onnx_path = out / ONNX_NAME
        max_diff = export_onnx(model.without_normalization(), onnx_path, input_shape, test_inputs=x_norm[:16])
    finally:
        restore_modes()

    k = model.num_classes
    _clear_vnnlib(out / VNNLIB_DIR)  # only now: a refused export leaves an earlier one whole
    points = [_point_record(pos, idx, int(y[pos]), pre, methods) for pos, idx in enumerate(indices)]
    rows = _write_vnnlib_files(out, points, x.cpu(), eps, mean, std, k, drop_proven, verify_all, timeout_s)

    csv_path = out / CSV_NAME
    with open(csv_path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    config_path = write_abcrown_config(out, template_file, timeout_s, input_shape, config_overrides)

    counts = {
        o: sum(p["outcome"] == o for p in points)
        for o in ("misclassified", "pre-certified", "attacked", "bab")
    }
    onnx_sha256 = file_sha256(onnx_path)
    export_id = export_id_of(onnx_sha256, eps, timeout_s, points)
    stale = None
    if _manifest_export_id(old_manifest) != export_id:
        stale = set_aside_verdicts(out, old_manifest)
    elif (out / "verify").is_dir():
        logger.info("%s: the same export as before (id %s): its verdicts stay valid", out, export_id[:12])
    manifest = {
        "format": "ccdist-export/2",
        "export_id": export_id,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(checkpoint_path) if checkpoint_path is not None else None,
        "checkpoint_sha256": file_sha256(checkpoint_path) if checkpoint_path is not None else None,
        "model_sha256": _sha256_state(model),
        "model_arch": model.arch,
        "dataset": dataset_name,
        "start": start,
        "count": len(indices),
        "indices": indices,
        "labels": [int(v) for v in y.tolist()],
        "eps": eps,
        "input_shape": list(input_shape),
        "num_classes": k,
        "normalization": {"mean": mean, "std": std},
        "onnx": ONNX_NAME,
        "onnx_sha256": onnx_sha256,
        "onnx_max_abs_diff": max_diff,
        "instances_csv": CSV_NAME,
        "abcrown_config": CONFIG_NAME,
        "template": str(template_file.name),
        "timeout_s": float(timeout_s),
        "drop_proven": bool(drop_proven),
        "verify_all": bool(verify_all),
        "methods": list(methods),
        # CROWN's intermediate bounds: "crown" (full CROWN) or "ibp" (CROWN-IBP); None without CROWN
        "crown_intermediate": pre.crown_intermediate,
        "attack": {"steps": attack_steps, "restarts": attack_restarts, "objective": "margin"},
        "cert_tol": CERT_TOL,
        "counts": counts,
        "stale_verdicts": str(stale.name) if stale is not None else None,
        "points": points,
        "versions": {"torch": torch.__version__},
    }
    manifest_path = out / MANIFEST_NAME
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    logger.debug(  # debug: `ccdist export` prints this summary itself
        "exported %d points to %s: %s; %d instances for α,β-CROWN", len(points), out, counts, len(rows)
    )
    alarms = [p["soundness_alarm"] for p in points if p.get("soundness_alarm")]
    return ExportResult(
        out, onnx_path, csv_path, manifest_path, config_path, points, counts, max_diff, alarms, stale
    )


def export_id_of(onnx_sha256: str, eps: float, timeout_s: float, points: list[dict[str, Any]]) -> str:
    """The export id: a hash of everything a verdict depends on (equal ids: the very same
    verification job). :mod:`ccdist_plugin.verify` recomputes it to detect an edited manifest."""
    fields = ("index", "label", "outcome", "instance", "vnnlib", "vnnlib_sha256", "pgd_broken")
    content = {
        "onnx_sha256": onnx_sha256,
        "eps": repr(float(eps)),
        "timeout_s": repr(float(timeout_s)),
        "points": [[p.get(k) for k in fields] for p in points],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _manifest_export_id(text: str | None) -> str | None:
    try:
        return json.loads(text).get("export_id") if text else None
    except (ValueError, AttributeError):
        return None


def _clear_vnnlib(folder: Path) -> None:
    """Remove an earlier export's VNN-LIB files (a re-export may send other points)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("point_*.vnnlib"):
        old.unlink()


def _write_vnnlib_files(
    out: Path,
    points: list[dict[str, Any]],
    x: Tensor,
    eps: float,
    mean: Sequence[float],
    std: Sequence[float],
    k: int,
    drop_proven: bool,
    verify_all: bool,
    timeout_s: float,
) -> list[tuple[str, str, str]]:
    """One VNN-LIB file per point sent to branch-and-bound (its hash and instance row go into its
    record); returns the rows of ``instances.csv``."""
    rows: list[tuple[str, str, str]] = []
    for pos, record in enumerate(points):
        outcome, idx, label = record["outcome"], record["index"], record["label"]
        send = outcome == "bab" or verify_all
        drop = record["proved"] if (drop_proven and outcome == "bab") else []
        record["dropped"] = drop
        record["instance"] = None
        record["vnnlib"] = None
        if not send:
            continue
        rel = f"{VNNLIB_DIR}/point_{idx:06d}.vnnlib"
        lo, hi = normalized_box(x[pos], eps, mean, std)
        record["targets"] = write_vnnlib(
            out / rel,
            lo,
            hi,
            label,
            k,
            drop=drop,
            comment=(
                f"ccdist export: test point {idx}, label {label}, eps {eps!r} (pixel units), "
                f"pre-filter outcome {outcome}\ninput box in normalized space (the ONNX model takes "
                f"normalized input); dropped differences (proved by our bounds): {drop}"
            ),
        )
        record["instance"] = len(rows)
        record["vnnlib"] = rel
        record["vnnlib_sha256"] = file_sha256(out / rel)
        rows.append((ONNX_NAME, rel, f"{timeout_s:g}"))
    return rows


#: Default α,β-CROWN template per dataset (teachers use ``teacher``).
DATASET_TEMPLATES = {
    "cifar10": "cifar10",
    "cifar10-jpeg": "cifar10",
    "tinyimagenet": "tinyimagenet",
    "imagenet64": "imagenet64",
    "digits": "digits",
    "mnist": "digits",
}

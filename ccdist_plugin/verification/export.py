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
  IBP/CROWN, or α-CROWN when asked), ``attacked`` (PGD found a counterexample), ``bab`` (sent to
  α,β-CROWN). A verdict counts only when it carries this export id and these hashes
  (:mod:`ccdist_plugin.verification.records`).
- ``abcrown.yaml``: the α,β-CROWN template (``abcrown_configs/<name>.yaml``) with absolute paths
  filled in; ``python abcrown.py --config <dir>/abcrown.yaml`` verifies every instance.

Exporting into a folder that holds verdicts of an earlier export moves them to
``verify.stale-<UTC time>/`` first: a re-export always starts a fresh verification.

The cascade follows the paper's verifier (IBP, CROWN, PGD, then branch-and-bound): it is
:func:`ccdist_plugin.verification.cascade.prefilter`, the one ``ccdist eval`` uses; the files are
written by :mod:`ccdist_plugin.verification.writers`. See ``docs/verification.md``.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ccdist_plugin.attacks import PGD
from ccdist_plugin.bounds import CERT_TOL, training_restorer
from ccdist_plugin.bounds.alpha_crown import AlphaCrownSettings, alpha_crown_settings
from ccdist_plugin.bounds.graphcheck import BoundedGraphMismatch
from ccdist_plugin.fileio import atomic_write_text, file_sha256
from ccdist_plugin.models import CertifiedNet
from ccdist_plugin.validate import check_batch
from ccdist_plugin.verification.cascade import PrefilterResult, prefilter
from ccdist_plugin.verification.writers import (
    CONFIG_NAME,
    CSV_NAME,
    MANIFEST_NAME,
    ONNX_NAME,
    RESULTS_NAME,
    VNNLIB_DIR,
    export_onnx,
    normalized_box,
    template_path,
    write_abcrown_config,
    write_vnnlib,
)

__all__ = ["ExportResult", "CERT_TOL", "export_instances", "set_aside_verdicts", "export_id_of"]

logger = logging.getLogger(__name__)


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

    The decisions are those of :func:`ccdist_plugin.verification.cascade.prefilter` (one rule for
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
        **{f"{m}_certified": bool(pre.certified[m][pos]) for m in _bound_names(pre, methods)},
        **{f"{m}_margin_lb": float(pre.margin_lb[m][pos][others].min()) for m in _bound_names(pre, methods)},
        "proved": [j for j in others if bool(pre.proved[pos, j])],
        "pgd_broken": bool(pre.broken[pos]),
        "pgd_margin": float(pre.adv_margin[pos]),
        "prefilter_status": status,
    }
    if status == "misclassified":
        outcome = "misclassified"
    elif status in ("certified_ibp", "certified_crown", "certified_alpha_crown"):
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


def _bound_names(pre: PrefilterResult, methods: Sequence[str]) -> list[str]:
    """Our bounds the pre-filter ran: ``methods``, and α-CROWN when it ran."""
    return [*methods, *(["alpha_crown"] if "alpha_crown" in pre.margin_lb else [])]


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


# Over 80 lines only for its docstring (the public API's reference); the body is ~50 lines of
# named steps.
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
    alpha_crown: bool | AlphaCrownSettings = False,
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
        alpha_crown: α-CROWN as a pre-filter stage after IBP and CROWN
            (:func:`ccdist_plugin.verification.cascade.prefilter`; True: the default
            :class:`~ccdist_plugin.bounds.alpha_crown.AlphaCrownSettings`): what it certifies is
            pre-certified and not sent to branch and bound. Its settings are in the manifest.

    Returns:
        An :class:`ExportResult`.

    Raises:
        BoundedGraphMismatch: the pre-filter's soundness alarm (the network's outputs are not
            its bounded graph's, the bound engine's graph check): nothing is certified and nothing
            is exported; an earlier export in ``out_dir`` is left as it was.
    """
    eps = _checked_eps(model, eps, timeout_s, methods)
    alpha = alpha_crown_settings(alpha_crown)
    template_file = template_path(template)  # fail early on a bad template
    indices, x, y = _select_points(data, start, count)
    check_batch(model, x, y, eps)  # shapes, label and pixel range (the checks of every entry point)
    input_shape = tuple(model.input_shape)

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    old_manifest = (out / MANIFEST_NAME).read_text() if (out / MANIFEST_NAME).is_file() else None
    attack = (
        PGD(steps=attack_steps, restarts=attack_restarts, objective="margin") if attack_steps > 0 else None
    )
    onnx_path = out / ONNX_NAME
    pre, max_diff = _prefilter_and_onnx(model, x, y, eps, methods, attack, seed, onnx_path, alpha)

    mean = model.normalize.mean.flatten().tolist()
    std = model.normalize.std.flatten().tolist()
    _clear_vnnlib(out / VNNLIB_DIR)  # only now: a refused export leaves an earlier one whole
    points = [_point_record(pos, idx, int(y[pos]), pre, methods) for pos, idx in enumerate(indices)]
    rows = _write_vnnlib_files(
        out, points, x.cpu(), eps, mean, std, model.num_classes, drop_proven, verify_all, timeout_s
    )
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
    stale = _set_aside_another_export(out, old_manifest, export_id)
    manifest = _manifest(
        model,
        export_id=export_id,
        checkpoint_path=checkpoint_path,
        dataset_name=dataset_name,
        start=start,
        indices=indices,
        labels=[int(v) for v in y.tolist()],
        eps=eps,
        normalization={"mean": mean, "std": std},
        onnx_sha256=onnx_sha256,
        onnx_max_abs_diff=max_diff,
        template=str(template_file.name),
        timeout_s=float(timeout_s),
        drop_proven=bool(drop_proven),
        verify_all=bool(verify_all),
        methods=list(methods),
        crown_intermediate=pre.crown_intermediate,
        alpha_crown=None if alpha is None else dataclasses.asdict(alpha),
        prefilter_timings_s={k: round(v, 3) for k, v in pre.timings_s.items()},
        attack={"steps": attack_steps, "restarts": attack_restarts, "objective": "margin"},
        counts=counts,
        stale=stale,
        points=points,
    )
    manifest_path = out / MANIFEST_NAME
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    logger.debug(  # debug: `ccdist export` prints this summary itself
        "exported %d points to %s: %s; %d instances for α,β-CROWN", len(points), out, counts, len(rows)
    )
    alarms = [p["soundness_alarm"] for p in points if p.get("soundness_alarm")]
    return ExportResult(
        out, onnx_path, csv_path, manifest_path, config_path, points, counts, max_diff, alarms, stale
    )


def _checked_eps(model: Any, eps: float, timeout_s: float, methods: Sequence[str]) -> float:
    """``eps`` as a float, after refusing what :func:`export_instances` cannot export."""
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
    return eps


def _prefilter_and_onnx(
    model: CertifiedNet,
    x: Tensor,
    y: Tensor,
    eps: float,
    methods: Sequence[str],
    attack: PGD | None,
    seed: int,
    onnx_path: Path,
    alpha_crown: AlphaCrownSettings | None = None,
) -> tuple[PrefilterResult, float]:
    """The pre-filter's outcome on the points and the exported model's largest |PyTorch − ONNX|
    difference; the model's train/eval flags are restored afterwards.

    Raises:
        BoundedGraphMismatch: the pre-filter's soundness alarm (nothing is exported).
    """
    restore_modes = training_restorer(model)
    model.eval()
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    try:
        torch.manual_seed(seed)
        # the IBP → CROWN → PGD cascade shared with `ccdist eval` (one rule for both paths)
        pre = prefilter(
            model, x, y, eps, methods=methods, attack=attack, tol=CERT_TOL, alpha_crown=alpha_crown
        )
        if pre.soundness_alarm is not None:
            # the ONNX graph is traced as the bounds' graph is: α,β-CROWN would verify another network
            raise BoundedGraphMismatch(f"nothing exported: {pre.soundness_alarm}")
        x_norm = ((x - model.normalize.mean) / model.normalize.std).detach().cpu()
        max_diff = export_onnx(
            model.without_normalization(), onnx_path, tuple(model.input_shape), test_inputs=x_norm[:16]
        )
    finally:
        restore_modes()
    return pre, max_diff


def _set_aside_another_export(out: Path, old_manifest: str | None, export_id: str) -> Path | None:
    """Move the verdicts of another export aside (:func:`set_aside_verdicts`); those of this very
    export (same id) stay, so an interrupted verification resumes. Returns where they went."""
    if _manifest_export_id(old_manifest) != export_id:
        return set_aside_verdicts(out, old_manifest)
    if (out / "verify").is_dir():
        logger.info("%s: the same export as before (id %s): its verdicts stay valid", out, export_id[:12])
    return None


def _manifest(
    model: CertifiedNet,
    *,
    export_id: str,
    checkpoint_path: str | os.PathLike | None,
    dataset_name: str | None,
    start: int,
    indices: list[int],
    labels: list[int],
    eps: float,
    normalization: dict[str, list[float]],
    onnx_sha256: str,
    onnx_max_abs_diff: float,
    template: str,
    timeout_s: float,
    drop_proven: bool,
    verify_all: bool,
    methods: list[str],
    crown_intermediate: str | None,
    alpha_crown: dict[str, Any] | None,
    prefilter_timings_s: dict[str, float],
    attack: dict[str, Any],
    counts: dict[str, int],
    stale: Path | None,
    points: list[dict[str, Any]],
) -> dict[str, Any]:
    """The content of ``manifest.json`` (see the module docstring)."""
    return {
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
        "labels": labels,
        "eps": eps,
        "input_shape": list(model.input_shape),
        "num_classes": model.num_classes,
        "normalization": normalization,
        "onnx": ONNX_NAME,
        "onnx_sha256": onnx_sha256,
        "onnx_max_abs_diff": onnx_max_abs_diff,
        "instances_csv": CSV_NAME,
        "abcrown_config": CONFIG_NAME,
        "template": template,
        "timeout_s": timeout_s,
        "drop_proven": drop_proven,
        "verify_all": verify_all,
        "methods": methods,
        # CROWN's intermediate bounds: "crown" (full CROWN) or "ibp" (CROWN-IBP); None without CROWN
        "crown_intermediate": crown_intermediate,
        # the α-CROWN stage's settings (AlphaCrownSettings), None without one
        "alpha_crown": alpha_crown,
        # seconds per pre-filter stage (standard, ibp, crown, alpha_crown, pgd): not in the export id
        "prefilter_timings_s": prefilter_timings_s,
        "attack": attack,
        "cert_tol": CERT_TOL,
        "counts": counts,
        "stale_verdicts": str(stale.name) if stale is not None else None,
        "points": points,
        "versions": {"torch": torch.__version__},
    }


def export_id_of(onnx_sha256: str, eps: float, timeout_s: float, points: list[dict[str, Any]]) -> str:
    """The export id: a hash of everything a verdict depends on (equal ids: the very same
    verification job). :mod:`ccdist_plugin.verification.records` recomputes it to detect an
    edited manifest."""
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

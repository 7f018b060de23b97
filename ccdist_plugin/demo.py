"""``ccdist demo``: the quick start on scikit-learn's 8×8 digits, on CPU in well under 2 minutes.

It trains, with the packaged ``digits-teacher`` and ``digits`` presets:

1. a PGD adversarially-trained teacher (PGD-10, SGD, cyclic lr);
2. a CC-IBP student (``loss.method = cc_ibp``, the same α);
3. a CC-Dist student distilling from the teacher;

then evaluates all three on the 300 held-out digits: standard accuracy, PGD accuracy (PGD-40,
step 0.1ε... see :data:`PGD_STEPS`), IBP-certified and CROWN-certified accuracy, and prints a table.
When :mod:`ccdist_plugin.export` is available it also exports the CC-Dist student and a handful of
test points for α,β-CROWN (``<output_dir>/export``); :func:`verify_hook` is where running α,β-CROWN
on them plugs in (it does so when ``ABCROWN_DIR`` is set and a verifier runner is available).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ccdist_plugin.config import load_preset
from ccdist_plugin.trainer import Trainer, build_model, load_data

__all__ = ["run_demo", "DemoResult", "evaluate_model", "verify_hook", "PGD_STEPS", "EXPORT_POINTS"]

log = logging.getLogger(__name__)

#: PGD evaluation of the demo: steps, step size as a multiple of ε, restarts
PGD_STEPS, PGD_STEP_REL, PGD_RESTARTS = 40, 0.1, 2
#: test points exported for α,β-CROWN
EXPORT_POINTS = 10


@dataclass
class DemoResult:
    """Rows of the demo table (accuracies in [0, 1]) and timings."""

    eps: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    export_dir: Path | None = None
    verification: Any = None

    def table(self) -> str:
        """The printed table (accuracies in %)."""
        n = self.rows[0]["n"] if self.rows else 0
        head = f"digits (8x8), eps = {self.eps:g} (pixel units, inputs in [0, 1]), {n} held-out test points"
        cols = ("model", "standard", "PGD-40", "IBP-cert", "CROWN-cert", "train s")
        lines = [head, f"{cols[0]:<18}" + "".join(f"{c:>12}" for c in cols[1:])]
        for r in self.rows:
            vals = [r["standard"], r["pgd"], r["ibp"], r["crown"]]
            lines.append(
                f"{r['model']:<18}" + "".join(f"{100 * v:>11.1f}%" for v in vals) + f"{r['train_s']:>12.1f}"
            )
        lines.append(f"total wall time {self.wall_s:.1f} s")
        if self.export_dir is not None:
            lines.append(f"CC-Dist student exported for alpha,beta-CROWN to {self.export_dir}")
        if self.verification is not None:
            lines.append(f"alpha,beta-CROWN: {self.verification}")
        return "\n".join(lines)


def evaluate_model(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> dict[str, float]:
    """Standard, PGD, IBP-certified and CROWN-certified accuracy (fractions) of ``model`` at ``eps``."""
    from ccdist_plugin.attacks import pgd_attack

    from ccdist_plugin.bounds import certify

    model.eval()
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    x_adv = pgd_attack(
        model,
        x,
        y,
        eps,
        steps=PGD_STEPS,
        step_size=PGD_STEP_REL * eps,
        random_start=True,
        restarts=PGD_RESTARTS,
    )
    with torch.no_grad():
        robust = (model(x_adv).argmax(1) == y) & correct
    ibp = certify(model, x, y, eps, method="ibp").certified
    crown = certify(model, x, y, eps, method="crown").certified
    return {
        "standard": float(correct.float().mean()),
        "pgd": float(robust.float().mean()),
        "ibp": float(ibp.float().mean()),
        "crown": float(crown.float().mean()),
        "n": int(len(y)),
    }


def verify_hook(export_dir: Path) -> Any:
    """Run α,β-CROWN on an export directory when the verifier is installed (``ABCROWN_DIR``) and a
    runner exists in ``ccdist_plugin.verify``; returns its summary, or None when it cannot run."""
    import os

    if not os.environ.get("ABCROWN_DIR"):
        return None
    try:
        from ccdist_plugin import verify  # noqa: F401  (provided by the verification area)
    except ImportError:
        log.info("ABCROWN_DIR is set but ccdist_plugin.verify is not available; skipping verification")
        return None
    runner = getattr(verify, "run_export", None)
    if runner is None:
        return None
    return runner(export_dir)


def run_demo(
    output_dir: str | Path = "runs/demo", seed: int = 0, echo: Callable[[str], None] | None = None
) -> DemoResult:
    """Train the three networks and evaluate them (see the module docstring)."""
    say = echo or (lambda _msg: None)
    start = time.perf_counter()
    out = Path(output_dir)
    base = [f"seed={seed}", "log.progress=false"]
    teacher_cfg = load_preset("digits-teacher").override(base + [f"log.output_dir={out / 'teacher'}"])
    student_cfg = load_preset("digits").override(base + [f"log.output_dir={out / 'cc_dist'}"])
    ccibp_cfg = student_cfg.override(
        ["name=digits-ccibp", "loss.method=cc_ibp", "teacher.preset=null", f"log.output_dir={out / 'cc_ibp'}"]
    )
    data = load_data(student_cfg)
    x_test, y_test = data.test.tensors()
    eps = student_cfg.eps
    result = DemoResult(eps=eps)

    runs = [
        ("PGD teacher", teacher_cfg, None),
        ("CC-IBP", ccibp_cfg, None),
        ("CC-Dist", student_cfg, "teacher"),
    ]
    models: dict[str, torch.nn.Module] = {}
    for label, cfg, teacher_key in runs:
        say(f"training {label} ({cfg.schedule.epochs} epochs, {cfg.loss.method}) ...")
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, data.spec)
        teacher = models.get(teacher_key) if teacher_key else None
        t0 = time.perf_counter()
        fit = Trainer(model, cfg, teacher=teacher).fit(data.train, data.test)
        train_s = time.perf_counter() - t0
        models["teacher" if cfg.role == "teacher" else label] = fit.model
        row = {"model": label, **evaluate_model(fit.model, x_test, y_test, eps), "train_s": train_s}
        result.rows.append(row)
        say(f"  {label}: standard {row['standard']:.3f}, IBP-certified {row['ibp']:.3f} ({train_s:.1f} s)")

    try:
        from ccdist_plugin.export import export_instances
    except ImportError:
        export_instances = None
    if export_instances is not None:
        try:
            export = export_instances(
                models["CC-Dist"],
                (x_test, y_test),
                out / "export",
                eps,
                count=EXPORT_POINTS,
                template="digits",
                dataset_name="digits",
                checkpoint_path=out / "cc_dist" / "checkpoint.pt",
                seed=seed,
            )
            result.export_dir = Path(getattr(export, "out_dir", out / "export"))
            result.verification = verify_hook(result.export_dir)
        except Exception as err:  # the demo's table must not depend on the optional export step
            log.warning("export for alpha,beta-CROWN skipped: %s", err)
    result.wall_s = time.perf_counter() - start
    return result

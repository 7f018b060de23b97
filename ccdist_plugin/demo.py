"""``ccdist demo``: the quick start on scikit-learn's 8×8 digits, on CPU in well under 2 minutes.

It trains, with the packaged ``digits-teacher`` and ``digits`` presets:

1. a PGD adversarially-trained teacher (PGD-10, SGD, cyclic lr);
2. a CC-IBP student (``loss.method = cc_ibp``, the same α);
3. a CC-Dist student distilling from the teacher;

then evaluates all three on the 300 held-out digits with :mod:`ccdist_plugin.evaluation` (the
figures of ``ccdist eval``): standard accuracy, accuracy under the evaluation attack
(:data:`ccdist_plugin.attacks.EVAL_PGD`, PGD-40), IBP-certified and CROWN-certified accuracy (sound,
float64; on these networks CROWN runs with CROWN intermediate bounds, stated under the table), and
prints a table.
When :mod:`ccdist_plugin.verification` is available it also exports the CC-Dist student and a handful of
test points for α,β-CROWN (``<output_dir>/export``) and, when α,β-CROWN is installed
(``ccdist install-verifier``, or ``ABCROWN_DIR`` set), verifies them (:func:`verify_hook`,
``ccdist_plugin.verification``; points not already certified by our IBP/CROWN or broken by PGD go to
branch and bound with a short time limit).

An output folder that holds an earlier demo (one of the three checkpoints, or the export) is refused
by ``ccdist demo`` unless ``--overwrite`` is given, which replaces the demo's own outputs
(:data:`DEMO_OUTPUTS`) and leaves anything else in the folder alone.
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
from ccdist_plugin.install import locate_verifier
from ccdist_plugin.runlock import TRAINING_OUTPUTS, claim_output_folder, describe_earlier_run
from ccdist_plugin.trainer import Trainer, build_model, load_data

__all__ = ["run_demo", "DemoResult", "evaluate_model", "verify_hook", "EXPORT_POINTS", "DEMO_OUTPUTS"]

log = logging.getLogger(__name__)

#: test points exported for α,β-CROWN, and its time limit per point (branch and bound)
EXPORT_POINTS, VERIFY_TIMEOUT_S = 10, 20.0
#: the demo's runs (sub-folders of its output folder)
DEMO_RUNS = ("teacher", "cc_ibp", "cc_dist")
#: what marks an earlier demo in the output folder, and everything the demo writes there
DEMO_MARKERS = (*(f"{run}/checkpoint.pt" for run in DEMO_RUNS), "export/manifest.json")
DEMO_OUTPUTS = (*(f"{run}/{name}" for run in DEMO_RUNS for name in TRAINING_OUTPUTS), "export")


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
        kinds = {r.get("crown_kind", "crown") for r in self.rows}
        crown_col = (
            "CROWN-cert" if kinds == {"crown"} else "CROWN-IBP-cert" if kinds == {"ibp"} else "CROWN*-cert"
        )
        cols = ("model", "standard", "PGD-40", "IBP-cert", crown_col, "train s")
        lines = [head, f"{cols[0]:<18}" + "".join(f"{c:>12}" for c in cols[1:])]
        for r in self.rows:
            vals = [r["standard"], r["pgd"], r["ibp"], r["crown"]]
            lines.append(
                f"{r['model']:<18}" + "".join(f"{100 * v:>11.1f}%" for v in vals) + f"{r['train_s']:>12.1f}"
            )
        from ccdist_plugin.attacks import EVAL_PGD, describe_pgd

        lines.append(
            f"attack: {describe_pgd(EVAL_PGD)}; {crown_col}: CROWN with "
            + ("CROWN" if kinds == {"crown"} else "IBP" if kinds == {"ibp"} else "mixed")
            + " intermediate bounds"
        )
        lines.append(f"total wall time {self.wall_s:.1f} s")
        if self.export_dir is not None:
            lines.append(f"CC-Dist student exported for alpha,beta-CROWN to {self.export_dir}")
        if self.verification is not None:
            lines.append(f"alpha,beta-CROWN: {self.verification}")
        return "\n".join(lines)


def evaluate_model(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> dict[str, float]:
    """Standard, PGD-40, IBP-certified and CROWN-certified accuracy (fractions) of ``model`` at
    ``eps``, by :func:`ccdist_plugin.evaluation.evaluate` with its defaults (the same figures as
    ``ccdist eval``); ``crown_kind`` says whether CROWN used CROWN (``"crown"``) or IBP
    (``"ibp"``, CROWN-IBP) intermediate bounds."""
    from ccdist_plugin.evaluation import EvalSettings, evaluate

    res = evaluate(model, x, y, EvalSettings(eps=eps), progress=False)
    m = res.metrics
    return {
        "standard": m["standard_acc"],
        "pgd": m["pgd_acc"],
        "ibp": m["ibp_cert_acc"],
        "crown": m["crown_cert_acc"] if res.crown_intermediate == "crown" else m["crown_ibp_cert_acc"],
        "crown_kind": res.crown_intermediate,
        "n": res.count,
    }


def verify_hook(export_dir: Path, timeout_s: float = VERIFY_TIMEOUT_S) -> str | None:
    """Run α,β-CROWN (``ccdist_plugin.verification.run_verification``) on the demo's export when it is
    installed (``ccdist install-verifier``, or ``ABCROWN_DIR`` set); returns a one-line summary, or
    None when it cannot run."""
    if locate_verifier().abcrown_dir is None:
        return None
    try:
        from ccdist_plugin.verification import run_verification
    except ImportError:
        log.info(
            "α,β-CROWN is installed but ccdist_plugin.verification is not available; skipping verification"
        )
        return None
    result = run_verification(export_dir, timeout_s=timeout_s)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(result.counts.items()) if v)
    alarms = f"; SOUNDNESS ALARMS: {len(result.soundness_alarms)}" if result.soundness_alarms else ""
    return (
        f"{result.certified}/{result.total} exported points certified "
        f"({100 * result.certified_accuracy:.0f}%; {counts}){alarms}"
    )


def run_demo(
    output_dir: str | Path = "runs/demo",
    seed: int = 0,
    echo: Callable[[str], None] | None = None,
    export: bool = True,
    verify: bool = True,
    overwrite: bool | None = None,
) -> DemoResult:
    """Train the three networks and evaluate them (see the module docstring).

    Args:
        output_dir: where the runs (and the export) are written.
        seed: seed of every run.
        echo: progress messages go here (None: silent).
        export: export the CC-Dist student and :data:`EXPORT_POINTS` test points for α,β-CROWN
            (when :mod:`ccdist_plugin.verification` is available).
        verify: run α,β-CROWN on them when it is installed (:func:`verify_hook`).
        overwrite: an earlier demo in ``output_dir``: ``False`` refuses it
            (:class:`~ccdist_plugin.runlock.RunExistsError`, ``ccdist demo`` without ``--overwrite``),
            ``True`` removes its outputs (:data:`DEMO_OUTPUTS`) first, ``None`` writes over it with a
            warning.
    """
    out = Path(output_dir)
    if overwrite is None:
        found = describe_earlier_run(out, DEMO_MARKERS)
        if found is not None:
            log.warning("%s holds an earlier demo (%s); this one writes over it", out, found)
    else:
        claim_output_folder(
            out, DEMO_MARKERS, DEMO_OUTPUTS, overwrite=overwrite, resume_option=None, what="demo"
        )
    threads = torch.get_num_threads()
    # these networks are tiny: one thread is faster than several (which spin-wait on a busy machine)
    torch.set_num_threads(1)
    try:
        return _run_demo(out, seed, echo or (lambda _msg: None), export, verify, overwrite)
    finally:
        torch.set_num_threads(threads)


def _run_demo(
    out: Path, seed: int, say: Callable[[str], None], export: bool, verify: bool, overwrite: bool | None
) -> DemoResult:
    start = time.perf_counter()
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
        model = build_model(cfg, data.spec)  # initialized from cfg.seed
        teacher = models.get(teacher_key) if teacher_key else None
        t0 = time.perf_counter()
        # the folder was checked above: an earlier run's files left there (None) go before this run writes
        replace = True if overwrite is None else overwrite
        fit = Trainer(model, cfg, teacher=teacher).fit(data.train, data.test, overwrite=replace)
        train_s = time.perf_counter() - t0
        models["teacher" if cfg.role == "teacher" else label] = fit.model
        row = {"model": label, **evaluate_model(fit.model, x_test, y_test, eps), "train_s": train_s}
        result.rows.append(row)
        say(f"  {label}: standard {row['standard']:.3f}, IBP-certified {row['ibp']:.3f} ({train_s:.1f} s)")

    try:
        from ccdist_plugin.verification import export_instances
    except ImportError:
        export_instances = None
    if export and export_instances is not None:
        try:
            exported = export_instances(
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
            result.export_dir = Path(getattr(exported, "out_dir", out / "export"))
            if verify and locate_verifier().abcrown_dir is not None:
                say("verifying the exported points with alpha,beta-CROWN ...")
                result.verification = verify_hook(result.export_dir)
        except Exception as err:  # the demo's table must not depend on the optional export step
            log.warning("export for alpha,beta-CROWN skipped: %s", err)
    result.wall_s = time.perf_counter() - start
    return result

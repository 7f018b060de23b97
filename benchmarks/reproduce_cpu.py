"""The CPU-scale reproduction (issue 9, second half): does CC-Dist beat CC-IBP on real images?

One command trains and evaluates everything, resumably (a finished run's ``result.json`` is reused)::

    python benchmarks/reproduce_cpu.py --out runs/repro-cpu --workers 2

Stages (all with the project's own code: ``Trainer``, ``bounds.certify``, ``attacks.pgd_attack``,
``export.export_instances`` + ``verify.run_verification`` for α,β-CROWN):

1. CIFAR-10 JPEG subset (in a folder of ``$CCDIST_DATA``, docs/data.md; 10k train of which 1000 are
   held out for validation, 2k test),
   ε = 2/255, a narrow cnn3. A PGD-trained teacher (longer than the students), and CC-IBP students at
   α ∈ ``--alphas`` (seed 0). The α with the best *validation* CROWN-IBP-certified accuracy is selected.
2. CC-IBP and CC-Dist (β·w ∈ ``--main-betas``, default the paper's 5) at the selected α for ``--seeds``
   seeds; a β sweep (seed 0, β·w ∈ ``--beta-sweep``) evaluated on the validation split;
   sklearn digits (mlp) at ε = 0.1.
3. Branch-and-bound (α,β-CROWN) on the first ``--bab-count`` test points of the teacher and of every
   CC-IBP / CC-Dist seed, when ``ABCROWN_DIR`` is set.
4. ``docs/results/reproduce_cpu.{json,md}`` and the plots ``docs/img/beta_sweep.png``; then
   ``python benchmarks/make_results.py`` assembles ``docs/RESULTS.md``.

``--protocol paper-cpu`` (issue 17) runs instead the paper's CIFAR-10 2/255 protocol at CPU scale
(``PAPER_CPU``: the narrow CNN-7 of the ``cifar10-jpeg-cpu`` preset, the 8-step 2.1ε training attack,
24 epochs, a 30-epoch PGD-10 teacher, α and β chosen on validation, 5 paired seeds, BaB on 200 points
at 60 s) in resumable stages (``--until``), and reports it with the pre-registered paired analysis of
``paired_analysis.py`` (``docs/results/paper_cpu.{json,md}``); ``--dataset digits`` is its smoke-test size.

Reuse: every run records its settings (``<run>/settings.json``: the job's protocol, epochs, α, β, ... and,
for CC-Dist, the teacher's weights by hash). A later invocation (another ``--until`` stage) reuses a run only
when those settings equal its own and the run's outputs are complete; otherwise it stops before training
anything with one line naming the run and the differing settings (exit 2). ``--overwrite`` retrains, from
scratch, exactly the runs whose settings differ or whose outputs are incomplete (and so the runs trained
from a retrained teacher); runs with equal settings are still reused.

Per model, on the test split, by the package's pre-filter (``evaluation.prefilter``): standard accuracy,
PGD-40 accuracy (the evaluation attack ``attacks.EVAL_PGD``: 40 steps of 0.035ε, one random start; runs
before this change used step ε/4, as their tables say), IBP-certified accuracy, and CROWN-IBP-certified
accuracy (certified by IBP or by CROWN with IBP intermediate bounds, because CROWN with CROWN intermediate
bounds costs ~1 s per image for cnn3 on this CPU). All certificates are float64 and sound.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the stages: benchmarks/reproduction/
# the stages' public names, as this script offered them before it was split (tests and resnet_cpu.py use them)
from reproduction.bab import BAB_CPU_OVERRIDES, run_bab  # noqa: E402, F401
from reproduction.issue9 import run_issue9  # noqa: E402
from reproduction.issue9_report import report, report_from_disk, select_alpha  # noqa: E402, F401
from reproduction.jobs import (  # noqa: E402, F401
    Job,
    build_student,
    cifar_overrides,
    paper_cpu_config,
    paper_cpu_schedule,
)
from reproduction.measure import diagnostics, evaluate, split_tensors  # noqa: E402, F401
from reproduction.paper_cpu import run_paper_cpu  # noqa: E402
from reproduction.paper_cpu_report import paper_cpu_analysis, paper_cpu_markdown, report_paper_cpu  # noqa: E402, F401
from reproduction.plan import (  # noqa: E402, F401
    CIFAR_EPS,
    DIGITS_EPS,
    DIGITS_VAL,
    PAPER_CPU,
    PAPER_CPU_STAGES,
    VAL_SIZE,
    paper_cpu_names,
    paper_cpu_plan,
    select_by_validation,
)
from reproduction.runfolders import (  # noqa: E402, F401
    RUN_OUTPUTS,
    SETTINGS_NAME,
    RunSettingsError,
    add_run_folder_options,
    check_run_folder,
    job_settings,
    preflight,
    run_folder_problem,
    run_script,
    teacher_weights_sha256,
    weights_sha256,
)
from reproduction.train import run_job  # noqa: E402, F401


# over 80 lines only by its options, one add_argument each
def build_parser() -> argparse.ArgumentParser:
    """The command line (``--help`` prints the module docstring and every option)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--protocol",
        choices=("issue9", "paper-cpu"),
        default="issue9",
        help="issue9: the published cnn3 runs; paper-cpu: the paper's protocol at CPU scale (issue 17: "
        "narrow CNN-7, 8-step attack, 24 epochs, paired seeds, BaB on 200 points at 60 s)",
    )
    parser.add_argument(
        "--out", default=None, help="run directory (default runs/repro-cpu, or runs/paper-cpu for paper-cpu)"
    )
    parser.add_argument("--workers", type=int, default=2, help="parallel training processes (1 thread each)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (3; paper-cpu: 5)")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (8; paper-cpu: 24)")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="(10; paper-cpu: 30)")
    parser.add_argument(
        "--teacher-steps",
        type=int,
        default=None,
        help="PGD steps of the teacher (5, step 2.5ε/steps; paper-cpu: 10, step 0.25ε)",
    )
    parser.add_argument(
        "--alphas",
        default=None,
        help="α candidates, chosen on validation (0.01,0.05; paper-cpu: 0.01,0.02,0.05)",
    )
    parser.add_argument(
        "--beta-sweep",
        default=None,
        help="β·w values of the sweep on validation (0,1,5,20,100; paper-cpu: 1,5,20, must contain 5)",
    )
    parser.add_argument(
        "--main-betas",
        default="5",
        help="β·w of the CC-Dist rows run with --seeds seeds (the paper's 5; add the value that the "
        "validation sweep favours, e.g. 5,1)",
    )
    parser.add_argument(
        "--long-teacher-epochs",
        type=int,
        default=0,
        help="also train a teacher for this many epochs and the CC-Dist rows again with it (0: off)",
    )
    parser.add_argument("--bab-count", type=int, default=None, help="(100; paper-cpu: 200)")
    parser.add_argument("--bab-timeout", type=float, default=None, help="(30; paper-cpu: 60)")
    parser.add_argument(
        "--dataset",
        choices=("cifar10-jpeg", "digits"),
        default="cifar10-jpeg",
        help="paper-cpu only: digits is the smoke test's size",
    )
    parser.add_argument("--device", default="cpu", help="paper-cpu only: training device (cpu, cuda)")
    parser.add_argument(
        "--until",
        choices=PAPER_CPU_STAGES,
        default="report",
        help="paper-cpu only: stop after this stage (every stage resumes what earlier invocations did)",
    )
    parser.add_argument("--bab-seeds", type=int, default=1, help="seeds per method sent to α,β-CROWN")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--bab-teacher", action="store_true", help="also run BaB on the teacher")
    parser.add_argument(
        "--bab-only",
        default=None,
        help="comma-separated run names: only their BaB, --workers at a time, in order",
    )
    parser.add_argument("--report-only", action="store_true", help="only write the report from finished runs")
    parser.add_argument("--docs", default="docs", help="where results/ and img/ go")
    add_run_folder_options(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    run_script(_main, parser.parse_args(argv))


def _main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from ccdist_plugin.malloc import retain_freed_memory

    retain_freed_memory()  # as the ccdist command does; the worker processes inherit it (fork)
    if args.protocol == "paper-cpu":
        args.out = args.out or "runs/paper-cpu"
        if args.report_only:
            report_paper_cpu(args.out, paper_cpu_plan(args), Path(args.docs))
        else:
            run_paper_cpu(args)
        return
    run_issue9(args)


if __name__ == "__main__":
    main()

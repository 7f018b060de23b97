"""From a checkpoint to α,β-CROWN verdicts through the Python API (the CLI equivalent is in
docs/verification.md: `ccdist export ...` then `ccdist verify ...`).

Run:
    python examples/03_export_verify.py [CHECKPOINT] [--count N]
(CCDIST_EXAMPLES_FAST=1: a 2-epoch student, 5 points, 10 s per instance; what CI runs.)
Without a checkpoint it first trains a CC-IBP student on scikit-learn's digits (about a minute
on CPU). Of the 100 test points it exports, our own IBP/CROWN bounds and PGD decide most; the
rest go to α,β-CROWN. A handful of points is often decided entirely by that pre-filter, which
leaves nothing to verify: the script then says so. α,β-CROWN runs when it is installed
(`ccdist install-verifier`, or ABCROWN_DIR pointing at it; docs/verification.md, "Install");
otherwise the script reports our own IBP/CROWN results and the install command.
"""

import argparse
import logging
import os

from ccdist_plugin.checkpoint import load_checkpoint, load_model
from ccdist_plugin.data import load_dataset
from ccdist_plugin.verification import export_instances, run_verification

logging.basicConfig(level=logging.INFO, format="%(message)s")
FAST = os.environ.get("CCDIST_EXAMPLES_FAST") == "1"
parser = argparse.ArgumentParser()
parser.add_argument("checkpoint", nargs="?", help="a ccdist checkpoint (default: train a digits student)")
parser.add_argument("--count", type=int, default=5 if FAST else 100, help="number of test points")
parser.add_argument("--out", default="runs/example03/export", help="export directory")
args = parser.parse_args()

# 1. The trained network: a checkpoint written by `ccdist train`, or a quick digits student.
if args.checkpoint is None:
    from ccdist_plugin.config import load_preset
    from ccdist_plugin.trainer import Trainer, build_model, load_data

    cfg = load_preset("digits").override(
        [
            "loss.method=cc_ibp",
            "teacher.preset=null",
            "log.progress=false",
            "log.output_dir=runs/example03/student",
            *(["schedule.epochs=2", "schedule.ramp_up_epochs=1", "optim.lr_decay_epochs=[]"] if FAST else []),
        ]
    )
    data = load_data(cfg)
    fit = Trainer(build_model(cfg, data.spec), cfg).fit(data.train, data.test)
    args.checkpoint = str(fit.checkpoint)
model = load_model(args.checkpoint)
config = load_checkpoint(args.checkpoint)["config"]
eps, dataset = float(config["eps"]), config["data"]["name"]

# 2. Export: ONNX without the normalization, one VNN-LIB per test point that our IBP/CROWN and PGD
#    could not decide, instances.csv, manifest.json and a ready abcrown.yaml.
export = export_instances(
    model,
    load_dataset(dataset).test,
    args.out,
    eps,
    count=args.count,
    timeout_s=10 if FAST else 60,
    template="digits",
    dataset_name=dataset,
    checkpoint_path=args.checkpoint,
)
print(f"pre-filter outcomes: {export.counts}; α,β-CROWN instances: {export.num_instances}")
if export.num_instances == 0:
    print("the pre-filter decided every point: nothing left for α,β-CROWN (export more points with --count)")

# 3. Verify: α,β-CROWN loaded once per worker, a hard wall-clock limit per instance; resumable, and only
#    verdicts about this export, within its time budget, count.
result = run_verification(export.out_dir)
print(result.table())

"""Quick start through the Python API: a PGD teacher and a CC-Dist student on scikit-learn's digits.

Run (CPU, about a minute):  python examples/quickstart.py
It does in Python what `ccdist train-teacher --config digits-teacher --threads 1` and
`ccdist train --config digits --teacher ... --threads 1` do on the command line (the same seeds, so the
same models: `build_model` initializes from the config's seed, as the commands do), and logs one line
per epoch (progress bars too, on a terminal). CCDIST_EXAMPLES_FAST=1 trains for 1-2 epochs only (what
CI runs).
"""

import logging
import os

import torch

from ccdist_plugin.bounds import certify
from ccdist_plugin.config import load_preset
from ccdist_plugin.trainer import Trainer, build_model, load_data, train_teacher

torch.set_num_threads(1)  # tiny networks: one CPU thread is fastest
logging.basicConfig(level=logging.INFO, format="%(message)s")  # the trainer's per-epoch lines
FAST = os.environ.get("CCDIST_EXAMPLES_FAST") == "1"

# 1. Configurations: packaged presets (see `ccdist presets`), with overrides as in `--set key=value`.
teacher_fast = ["schedule.epochs=1"] if FAST else []
student_fast = ["schedule.epochs=2", "schedule.ramp_up_epochs=1", "optim.lr_decay_epochs=[]"] if FAST else []
teacher_out = "log.output_dir=runs/quickstart/teacher"
teacher_cfg = load_preset("digits-teacher").override([*teacher_fast, teacher_out])
student_cfg = load_preset("digits").override([*student_fast, "log.output_dir=runs/quickstart/cc_dist"])

# 2. Data: 1497 training and 300 held-out digits, pixels in [0, 1].
data = load_data(student_cfg)

# 3. Teacher: PGD-10 adversarial training (SGD, cyclic lr); checkpoint in runs/quickstart/teacher.
teacher = train_teacher(build_model(teacher_cfg, data.spec), teacher_cfg, data.train, data.test).model

# 4. Student: CC-Dist (CC-IBP loss + beta * feature distillation from the teacher), same architecture.
student = build_model(student_cfg, data.spec)
result = Trainer(student, student_cfg, teacher=teacher).fit(data.train, data.test)

# 5. Certified accuracy on the held-out digits (float64, sound).
x, y = data.test.tensors()
for method in ("ibp", "crown"):
    certified = certify(result.model, x, y, student_cfg.eps, method=method).certified
    print(f"{method.upper()}-certified accuracy at eps={student_cfg.eps}: {certified.float().mean():.3f}")
print(f"checkpoint: {result.checkpoint}; curves: {result.run_dir / 'curves.png'}")

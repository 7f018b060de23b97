"""CC-Dist as a drop-in loss inside your own plain PyTorch training loop.

Run (CPU, well under a minute):  python examples/custom_loop.py
(CCDIST_EXAMPLES_FAST=1: 1 teacher and 2 student epochs, what CI runs.)
Only the loss call changes with respect to ordinary training; the ε ramp, ℓ1 and clipping of the
paper's protocol are written out by hand here (``Trainer`` does all of this, plus the Shi et al.
regularizer, checkpoints and logs).
"""

import os

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ccdist_plugin.attacks import PGD, pgd_attack
from ccdist_plugin.bounds import certify
from ccdist_plugin.data import load_dataset
from ccdist_plugin.losses import CCDistLoss
from ccdist_plugin.models import mlp
from ccdist_plugin.regularizers import l1_penalty
from ccdist_plugin.schedules import EpsSchedule

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny networks: one thread is fastest
eps = 0.1  # pixel units (inputs in [0, 1])
FAST = os.environ.get("CCDIST_EXAMPLES_FAST") == "1"
teacher_epochs, student_epochs, ramp_up_epochs = (1, 2, 1) if FAST else (5, 10, 6)
data = load_dataset("digits")
x_train, y_train = data.train.tensors()
loader = DataLoader(TensorDataset(x_train, y_train), batch_size=128, shuffle=True)


def make_net():
    return mlp(in_channels=1, input_size=8, num_classes=10, width=256, depth=2)


# 1. A PGD adversarially-trained teacher, in a plain loop.
teacher = make_net()
opt = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9)
for epoch in range(teacher_epochs):
    for x, y in loader:
        x_adv = pgd_attack(teacher, x, y, eps, steps=10, step_size=0.25 * eps)
        teacher.train()
        loss = F.cross_entropy(teacher(x_adv), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"teacher epoch {epoch + 1}: adversarial loss={loss.item():.3f}")
teacher.eval().requires_grad_(False)

# 2. The student: the CC-Dist loss object is all that differs from ordinary training.
student = make_net()
loss_fn = CCDistLoss(teacher, alpha=0.5, attack=PGD(steps=1, step_size=10.0))  # beta = 5 / w by default
opt = torch.optim.Adam(student.parameters(), lr=2e-3)
schedule = EpsSchedule(eps, warmup_epochs=1, ramp_up_epochs=ramp_up_epochs, batches_per_epoch=len(loader))
for epoch in range(student_epochs):
    for b, (x, y) in enumerate(loader):
        student.train()
        eps_t = schedule(epoch, b)
        if schedule.phase(epoch) == "warmup":
            loss = F.cross_entropy(student(x), y)  # warm-up: clean cross-entropy
        else:
            out = loss_fn(student, x, y, eps_t)  # LossOutput(loss, terms, stats)
            loss = out.loss
        loss = loss + 1e-5 * l1_penalty(student)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 10.0)
        opt.step()
    print(f"epoch {epoch + 1}: eps_t={eps_t:.3f} loss={loss.item():.3f}")

# 3. Accuracy and IBP-certified accuracy of the student on the held-out digits.
x_test, y_test = data.test.tensors()
result = certify(student.eval(), x_test, y_test, eps, method="ibp")
print(f"standard accuracy {result.correct.float().mean():.3f}")
print(f"IBP-certified accuracy {result.certified.float().mean():.3f} at eps={eps}")

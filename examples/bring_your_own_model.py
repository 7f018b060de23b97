"""Bring your own model: a small ResNet written in plain PyTorch, made certifiable with
``CertifiedNet.wrap``, trained for a few CC-Dist steps from a teacher of the same feature width,
certified by CROWN, exported for α,β-CROWN and (when installed) verified.

Run from the repository root:
    python examples/bring_your_own_model.py [--fast] [--out runs/byom]
``--fast`` (or CCDIST_EXAMPLE_FAST=1, or CCDIST_EXAMPLES_FAST=1) runs a few steps on a few points,
for CI. α,β-CROWN runs
when it is installed (``ccdist install-verifier``, or ABCROWN_DIR pointing at its
``complete_verifier`` folder) and ``--fast`` is off (docs/verification.md, "Install").

The network below has its own ``forward`` (a residual sum, a reused ReLU), so the plugin's native
bound engine does not read it and its interval bounds come from auto_LiRPA (with the native
engine's BatchNorm semantics). A network written as ``nn.Sequential`` of standard layers and
``ccdist_plugin.models.Residual`` blocks gets the native engine instead, which is faster.
"""

import argparse
import logging
import os

import torch
from torch import nn

from ccdist_plugin.bounds import certify, check_boundable
from ccdist_plugin.install import locate_verifier
from ccdist_plugin.losses import AdversarialLoss, CCDistLoss, CrossEntropyLoss
from ccdist_plugin.models import CertifiedNet
from ccdist_plugin.verification import export_instances, run_verification

logging.basicConfig(level=logging.INFO, format="%(message)s")
parser = argparse.ArgumentParser()
parser.add_argument("--fast", action="store_true", help="a few steps and points (or CCDIST_EXAMPLE_FAST=1)")
parser.add_argument("--out", default="runs/byom", help="export directory")
args = parser.parse_args()
fast = args.fast or "1" in (os.environ.get("CCDIST_EXAMPLE_FAST"), os.environ.get("CCDIST_EXAMPLES_FAST"))
epochs, points = (1, 4) if fast else (6, 20)


class TinyResNet(nn.Module):
    """Stem convolution, one pre-activation residual block, average pooling, a dense layer with
    BatchNorm and ReLU: the features (width ``width``) are a ReLU output, as CC-Dist wants."""

    def __init__(self, channels: int = 8, width: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.bn1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(channels * 16, width)
        self.bn3 = nn.BatchNorm1d(width)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(x)
        out = out + self.conv2(self.relu(self.bn2(self.conv1(self.relu(self.bn1(out))))))
        out = self.pool(out).flatten(1)
        return self.relu(self.bn3(self.fc(out)))


def wrap(channels: int) -> CertifiedNet:
    # Pixel-space inputs in [0, 1]; the normalization is prepended, so ε stays in pixel units.
    return CertifiedNet.wrap(TinyResNet(channels, 32), nn.Linear(32, 10), (1, 8, 8), mean=[0.3], std=[0.4])


def train(model: CertifiedNet, loss_fn, x: torch.Tensor, y: torch.Tensor, eps: float, epochs: int) -> None:
    """Adam, batches of 64, gradient clipping 10; one line per epoch (fast mode: 10 steps an epoch)."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for epoch in range(1, epochs + 1):
        batches = torch.randperm(x.shape[0], generator=gen).split(64)
        for idx in batches[:10] if fast else batches:
            out = loss_fn(model, x[idx], y[idx], eps)
            opt.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
        print(
            f"{type(loss_fn).__name__} epoch {epoch}/{epochs}: last batch loss {float(out.loss.detach()):.4g}"
        )
    model.eval()


# Data: scikit-learn's 8×8 digits in pixel space.
from sklearn.datasets import load_digits  # noqa: E402

digits = load_digits()
x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
y = torch.tensor(digits.target, dtype=torch.long)
x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
eps = 0.02
torch.manual_seed(0)

# 1. A teacher of the same feature width (32), PGD-trained (here: a few steps; use a wider net freely).
teacher = wrap(channels=16)
train(teacher, AdversarialLoss(), x_train, y_train, eps, epochs)
print(f"teacher clean accuracy: {(teacher(x_test).argmax(1) == y_test).float().mean():.3f}")

# 2. The student: which engine bounds it? ("auto_lirpa" for this plain-PyTorch forward)
student = wrap(channels=8)
print(f"student bounds engine: {check_boundable(student)}")
train(student, CrossEntropyLoss(), x_train, y_train, eps, epochs)  # a clean warm-up, then CC-Dist
train(student, CCDistLoss(teacher=teacher, alpha=0.5), x_train, y_train, eps, epochs)

# 3. CROWN certificates (float64, through auto_LiRPA for this network).
res = certify(student, x_test[:points], y_test[:points], eps, method="crown")
print(f"student clean {res.correct.float().mean():.3f}, CROWN-certified {res.certified.float().mean():.3f}")

# 4. Export (ONNX without the normalization, VNN-LIB per undecided point) and verify when installed.
#    verify_all: α,β-CROWN also re-checks the points our bounds and PGD already decided (a cross-check).
verify = locate_verifier().abcrown_dir is not None and not fast
export = export_instances(
    student, (x_test, y_test), args.out, eps, count=points, timeout_s=30, verify_all=verify
)
print(f"pre-filter outcomes: {export.counts}; α,β-CROWN instances: {export.num_instances}")
if verify:
    print(run_verification(export.out_dir).table())
else:
    print("α,β-CROWN not run (install it with ccdist install-verifier and leave --fast off to verify)")

"""ccdist_plugin: certified training with distillation (CC-Dist) for the auto_LiRPA / α,β-CROWN ecosystem.

Where things are:
- ``models``: certifiable networks (``features`` + affine ``head``, normalization inside; residual
  blocks; ``CertifiedNet.wrap`` for your own).
- ``bounds/``: the bound engine, bottom-up: ``layers`` (supported layers, ``UnsupportedLayerError``,
  BatchNorm's scale and shift), ``lirpa`` (auto_LiRPA backend), ``ibp`` (IBP, last-layer elision),
  ``crown`` (back-substitution), ``graphcheck`` (the bounded graph is the forward), ``certification``
  (float-safe ``certify``), ``crown_ibp`` (differentiable CROWN-IBP for training), ``penultimate``
  (bounds at the penultimate layer); ``ccdist_plugin.bounds`` re-exports their public names.
- ``attacks``: ℓ∞ PGD and the one evaluation attack (``EVAL_PGD``).
- ``losses/``: CC-Dist, CC-IBP and the other losses, as drop-in objects that describe themselves:
  ``terms`` (pure functions), ``inputs`` (the per-batch attack + bound pass), ``base``
  (``RobustLoss``), ``expressive``, ``distillation``, ``scheduled``, ``registry``.
- ``trainer`` / ``step`` / ``train_data`` / ``training_logs`` / ``config`` / ``schedules`` /
  ``regularizers`` / ``checkpoint`` / ``runlock``: the training protocol (``step.training_step`` is one
  step).
- ``data``: dataset loaders and augmentation; ``validate``: the input checks.
- ``verification``: the pre-filter (``cascade``), ONNX + VNN-LIB export, α,β-CROWN runs (``runner``,
  ``abcrown_worker``), verdicts and their summaries (``export`` and ``verify`` are its old paths).
- ``evaluation`` / ``reports``: metrics and reports; ``demo``: the quick start; ``tune``: ``ccdist tune``.
- ``accumulate``: gradient accumulation; ``install``: ``ccdist install-verifier``.
- ``cli``: the ``ccdist`` commands.

The layers and the rule for where new code goes: docs/architecture.md.
"""

from importlib import import_module as _import_module

from ccdist_plugin.attacks import PGD, pgd_attack
from ccdist_plugin.bounds import (
    certify,
    crown_margin_lower_bound,
    feature_bounds,
    input_box,
    interval_bounds,
    margin_lower_bound,
)
from ccdist_plugin.losses import (
    AdversarialLoss,
    CCDist0Loss,
    CCDist1Loss,
    CCDistLoss,
    CCIBPLoss,
    CrossEntropyLoss,
    ExpIBPLoss,
    IBPLoss,
    LogitDistLoss,
    MTLIBPLoss,
    SABRLoss,
    distillation_term,
    list_losses,
    make_loss,
)
from ccdist_plugin.models import (
    CertifiedNet,
    Residual,
    check_compatible,
    cnn3,
    cnn7,
    create_model,
    list_models,
    mlp,
    preact_resnet18,
)
from ccdist_plugin.version import __version__ as __version__

# Heavier submodules load on first use, so `import ccdist_plugin` stays quick.
_LAZY = {
    "Trainer": "ccdist_plugin.trainer",
    "train_teacher": "ccdist_plugin.trainer",
    "build_model": "ccdist_plugin.trainer",
    "load_data": "ccdist_plugin.trainer",
    "TrainConfig": "ccdist_plugin.config",
    "load_preset": "ccdist_plugin.config",
    "list_presets": "ccdist_plugin.config",
    "load_model": "ccdist_plugin.checkpoint",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(_import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ccdist_plugin' has no attribute {name!r}")


__all__ = [
    "PGD",
    "pgd_attack",
    "certify",
    "crown_margin_lower_bound",
    "feature_bounds",
    "input_box",
    "interval_bounds",
    "margin_lower_bound",
    "AdversarialLoss",
    "CCDist0Loss",
    "CCDist1Loss",
    "CCDistLoss",
    "CCIBPLoss",
    "CrossEntropyLoss",
    "ExpIBPLoss",
    "IBPLoss",
    "LogitDistLoss",
    "MTLIBPLoss",
    "SABRLoss",
    "distillation_term",
    "list_losses",
    "make_loss",
    "CertifiedNet",
    "check_compatible",
    "cnn3",
    "cnn7",
    "create_model",
    "list_models",
    "mlp",
    "preact_resnet18",
    "Residual",
    *_LAZY,
]


def __dir__() -> list[str]:
    # the public API (lazy names included), not the submodules and helpers the imports above leave behind
    return sorted([*__all__, "__version__"])

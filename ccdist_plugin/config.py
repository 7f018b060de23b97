"""Typed, frozen training configuration, loaded from and saved to YAML.

A :class:`TrainConfig` describes one training run (a PGD teacher or a certified student) completely:
dataset, model, ε (pixel space), loss and its attack, ε/lr schedules, optimizer, regularization,
teacher checkpoint, logging and checkpointing. It is built from nested frozen dataclasses, each
validated in ``__post_init__``.

Loading is strict: an unknown or mistyped key is a ``ValueError`` naming the key and the nearest
valid one (``difflib``), e.g. ``unknown key 'optim.lr_decay_epoch'; did you mean 'lr_decay_epochs'?``.
Float fields accept fractions written as strings (``eps: 2/255``).

Example::

    cfg = load_config("cifar10-2")                      # a packaged preset, or a YAML file path
    cfg = cfg.override(["loss.alpha=0.5", "epochs=10"])  # --set key=value
    cfg.to_yaml("run/config.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

__all__ = [
    "DataConfig",
    "ModelConfig",
    "AttackConfig",
    "LossConfig",
    "ScheduleConfig",
    "OptimConfig",
    "TeacherConfig",
    "LogConfig",
    "TrainConfig",
    "load_config",
    "load_preset",
    "list_presets",
    "preset_description",
    "config_diff",
    "parse_override",
    "convert_value",
]

_METHOD_NOTE = "a name registered in ccdist_plugin.losses (list_losses())"


_FLOAT32_MAX = 3.4028234663852886e38


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class DataConfig:
    """Which dataset to train on.

    Attributes:
        name: dataset registry name for ``ccdist_plugin.data.load_dataset`` (``digits``, ``cifar10``,
            ``cifar10-jpeg``, ``tinyimagenet``, ``imagenet64``...).
        root: directory or file holding the data (``None``: the dataset's default location).
        val_split: fraction (0-1) or number (>= 1) of training examples held out for validation
            (0: no held-out split; the test split is then used for the per-epoch validation metrics).
        augment: random crop/flip as the dataset's spec prescribes (docs/method.md "Data").
        options: further reader options for ``load_dataset`` (e.g. ``{test_size: 300}`` for digits,
            ``{train_file: ..., test_file: ...}`` for cifar10-jpeg).
    """

    name: str = "digits"
    root: str | None = None
    val_split: float = 0.0
    augment: bool = True
    options: dict = field(default_factory=dict)

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``ccdist_plugin.data.load_dataset`` (val_split as an int count when >= 1)."""
        val: int | float | None = None
        if self.val_split >= 1:
            val = int(self.val_split)
        elif self.val_split > 0:
            val = float(self.val_split)
        return {"root": self.root, "val_split": val, **self.options}

    def __post_init__(self) -> None:
        _check(bool(self.name), "data.name must be a non-empty dataset name")
        _check(self.val_split >= 0, f"data.val_split must be >= 0, got {self.val_split}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture (``ccdist_plugin.models.create_model``); input shape, classes and normalization
    come from the dataset.

    Attributes:
        name: ``cnn7``, ``cnn3``, ``mlp`` or ``preact_resnet18``.
        width: feature width w (units of the penultimate layer; ``None``: the constructor's default,
            512 for cnn7); for ``preact_resnet18`` the first stage's channels (default 64), its
            feature width being 8 × ``width``.
        channels: convolution channels (cnn7: 5 entries, cnn3: 2; ``None``: default).
        depth: hidden layers of an mlp (``None``: default).
        batch_norm: BatchNorm after each hidden layer for cnn3/mlp (``None``: default; cnn7 always has it).
        activation: ``relu`` (or ``tanh``).
        init: ``shi`` (Shi et al. 2021, docs/method.md) or ``default`` (PyTorch's).
    """

    name: str = "cnn7"
    width: int | None = None
    channels: tuple[int, ...] | None = None
    depth: int | None = None
    batch_norm: bool | None = None
    activation: str = "relu"
    init: str = "shi"

    def __post_init__(self) -> None:
        _check(self.init in ("shi", "default"), f"model.init must be 'shi' or 'default', got {self.init!r}")
        _check(self.width is None or self.width > 0, f"model.width must be positive, got {self.width}")

    def constructor_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``create_model`` besides the dataset-given ones (None entries dropped)."""
        out: dict[str, Any] = {"activation": self.activation, "init": self.init}
        for key in ("width", "channels", "depth", "batch_norm"):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class AttackConfig:
    """PGD attack used inside a loss (``ccdist_plugin.attacks.PGD``). Step sizes are multiples of ε.

    Attributes:
        steps: PGD iterations (1: single-step attack of CC-IBP, 8: the 2.1ε attack, 10: teachers).
        step_size: step size as a multiple of the attacked ball's radius ``eps_factor`` × ε (10.0 for
            the 1-step attack, 0.25 otherwise; ``ccdist_plugin.attacks.PGD.step_size``).
        eps_factor: the attack's ball is ``eps_factor`` × ε (2.1 for the enlarged-ball attack of
            De Palma et al. 2024b; the adversarial point may then lie outside the ε-ball).
        restarts: random restarts.
        objective: ``ce`` (cross-entropy) or ``margin``.
        random_start: uniform random start in the ball.
    """

    steps: int = 1
    step_size: float = 10.0
    eps_factor: float = 1.0
    restarts: int = 1
    objective: str = "ce"
    random_start: bool = True

    def __post_init__(self) -> None:
        _check(self.steps >= 0, f"attack.steps must be >= 0, got {self.steps}")
        _check(self.step_size > 0, f"attack.step_size must be > 0, got {self.step_size}")
        _check(self.eps_factor >= 1.0, f"attack.eps_factor must be >= 1, got {self.eps_factor}")
        _check(self.restarts >= 1, f"attack.restarts must be >= 1, got {self.restarts}")
        _check(self.objective in ("ce", "margin"), "attack.objective must be 'ce' or 'margin'")

    def build(self):
        """The ``ccdist_plugin.attacks.PGD`` object this describes."""
        from ccdist_plugin.attacks import PGD

        return PGD(**dataclasses.asdict(self))


@dataclass(frozen=True)
class LossConfig:
    """The training loss.

    Which fields a loss takes is the loss class's own description (``config_keys``,
    ``option_keys``; ``ccdist_plugin.losses.RobustLoss.from_config``): a field it does not take must
    keep its default here (or the value the loss implies, α = 1 for ``ibp``), else building the loss
    is a ``ValueError`` naming the field.

    Attributes:
        method: loss name, ``ccdist_plugin.losses.list_losses()`` (``cc_dist``, ``cc_ibp``,
            ``ibp``, ``pgd_at`` for PGD teachers, ``mtl_ibp``, ``exp_ibp``, ``sabr``, ...).
        alpha: convex-combination coefficient α of CC-IBP / CC-Dist (and MTL-IBP, Exp-IBP).
        beta: distillation weight β (``None``: the loss's default, 5/w for CC-Dist); only with a teacher.
        attack: the PGD attack inside the loss.
        options: further keyword arguments for the loss constructor (e.g. ``{lam: 0.4}`` for SABR).
        distill_layer: where a teacher is distilled onto: ``features`` (the activations before the
            head, the paper's default) or ``penultimate`` (the input of the penultimate affine layer,
            appendix E.9; β then defaults to 2/w with w that layer's input width).
    """

    method: str = "cc_dist"
    alpha: float = 0.5
    beta: float | None = None
    attack: AttackConfig = field(default_factory=AttackConfig)
    options: dict = field(default_factory=dict)
    distill_layer: str = "features"

    def __post_init__(self) -> None:
        _check(bool(self.method), f"loss.method must be {_METHOD_NOTE}")
        _check(
            self.distill_layer in ("features", "penultimate"),
            f"loss.distill_layer must be 'features' or 'penultimate', got {self.distill_layer!r}",
        )
        _check(0.0 <= self.alpha <= 1.0, f"loss.alpha must lie in [0, 1], got {self.alpha}")
        _check(self.beta is None or self.beta >= 0, f"loss.beta must be >= 0, got {self.beta}")


@dataclass(frozen=True)
class ScheduleConfig:
    """Epochs and the ε schedule (docs/method.md "Student training").

    Attributes:
        epochs: total training epochs.
        warmup_epochs: epochs of clean cross-entropy before the ramp (1 for students, 0 for teachers).
        ramp_up_epochs: epochs over which ε grows from 0 to its target (per batch, smoothed schedule);
            0 means the full ε from the first non-warm-up batch (teachers).
        eps_mid: fraction of the ramp covered by the polynomial part of the smoothed schedule (0.25).
        eps_beta: degree of that polynomial (4.0).
    """

    epochs: int = 10
    warmup_epochs: int = 1
    ramp_up_epochs: int = 5
    eps_mid: float = 0.25
    eps_beta: float = 4.0

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"schedule.epochs must be >= 1, got {self.epochs}")
        _check(self.warmup_epochs >= 0, "schedule.warmup_epochs must be >= 0")
        _check(self.ramp_up_epochs >= 0, "schedule.ramp_up_epochs must be >= 0")
        _check(
            self.warmup_epochs + self.ramp_up_epochs <= self.epochs,
            f"schedule: warmup_epochs + ramp_up_epochs ({self.warmup_epochs} + {self.ramp_up_epochs}) "
            f"exceeds epochs ({self.epochs})",
        )
        _check(0.0 < self.eps_mid < 1.0, f"schedule.eps_mid must lie in (0, 1), got {self.eps_mid}")
        _check(self.eps_beta >= 1.0, f"schedule.eps_beta must be >= 1, got {self.eps_beta}")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer, learning-rate schedule and regularization.

    Attributes:
        optimizer: ``adam`` (students) or ``sgd`` (teachers, with ``momentum``).
        lr: base learning rate (Adam 5e-4), or the peak of the cyclic schedule (0.2).
        momentum: SGD momentum (0.9).
        weight_decay: L2 weight decay passed to the optimizer (0 in the paper).
        lr_schedule: ``step`` (×``lr_decay_factor`` at each of ``lr_decay_epochs``), ``cyclic``
            (per batch, 0 → lr over the first half of training, then back to 0) or ``constant``.
        lr_decay_epochs: epochs (counted from 0; "decay at 120" = from the 121st epoch) of the step decays.
        lr_decay_factor: multiplicative decay (0.2).
        batch_size: examples per batch (128).
        grad_clip: maximum gradient ℓ2 norm (10; 0 disables clipping).
        l1: ℓ1 coefficient on all Conv/Linear weights (not biases, not BatchNorm).
        shi_lambda: λ of the Shi et al. (2021) regularizer, applied during ramp-up with weight
            λ(1 − ε_t/ε) (0.5 on CIFAR-10, 0.2 on TinyImageNet/ImageNet64; 0 disables it).
        shi_tau: τ of the Shi regularizer (0.5).
        accumulate: gradient accumulation: each batch is split into this many micro-batches whose
            weighted gradients add up to the batch's, so that only one micro-batch's graph lives at a
            time (1: off). It must divide ``batch_size``; BatchNorm layers normalize with the whole
            batch's statistics (docs/training.md, "Gradient accumulation").
        batchnorm_gradient: with ``accumulate`` > 1 and BatchNorm, how the gradient goes through the
            batch statistics: ``exact`` (default: the whole batch's gradient, at the cost of one more
            pass over the micro-batches per BatchNorm layer in depth) or ``micro_batch`` (one pass;
            each micro-batch differentiates the statistics as its own, an approximation that
            improves as micro-batches grow). Ignored without BatchNorm or with ``accumulate: 1``.
    """

    optimizer: str = "adam"
    lr: float = 5e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "step"
    lr_decay_epochs: tuple[int, ...] = ()
    lr_decay_factor: float = 0.2
    batch_size: int = 128
    grad_clip: float = 10.0
    l1: float = 0.0
    shi_lambda: float = 0.5
    shi_tau: float = 0.5
    accumulate: int = 1
    batchnorm_gradient: str = "exact"

    def __post_init__(self) -> None:
        _check(
            self.optimizer in ("adam", "sgd"),
            f"optim.optimizer must be 'adam' or 'sgd', got {self.optimizer!r}",
        )
        _check(
            self.lr_schedule in ("step", "cyclic", "constant"),
            f"optim.lr_schedule must be 'step', 'cyclic' or 'constant', got {self.lr_schedule!r}",
        )
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        # a float32 network cannot take a step this large: its weights would become inf at once
        _check(self.lr <= _FLOAT32_MAX, f"optim.lr must be finite and <= 3.4e38 (float32), got {self.lr}")
        _check(self.batch_size >= 1, f"optim.batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_clip >= 0, "optim.grad_clip must be >= 0")
        _check(self.l1 >= 0, "optim.l1 must be >= 0")
        _check(self.shi_lambda >= 0, "optim.shi_lambda must be >= 0")
        _check(self.shi_tau > 0, "optim.shi_tau must be > 0")
        _check(
            type(self.accumulate) is int and self.accumulate >= 1,
            f"optim.accumulate must be an integer >= 1, got {self.accumulate!r}",
        )
        _check(
            self.batchnorm_gradient in ("exact", "micro_batch"),
            f"optim.batchnorm_gradient must be 'exact' or 'micro_batch', got {self.batchnorm_gradient!r}",
        )
        _check(
            self.batch_size % self.accumulate == 0,
            f"optim.accumulate={self.accumulate} does not divide optim.batch_size={self.batch_size} "
            "(each batch is split into that many equal micro-batches)",
        )
        _check(
            list(self.lr_decay_epochs) == sorted(self.lr_decay_epochs),
            f"optim.lr_decay_epochs must be increasing, got {list(self.lr_decay_epochs)}",
        )


@dataclass(frozen=True)
class TeacherConfig:
    """Where the student's teacher comes from (CC-Dist and the other distillation losses).

    Attributes:
        checkpoint: path of a teacher checkpoint written by ``ccdist train-teacher`` (``None``: pass the
            teacher to ``Trainer`` or ``ccdist train --teacher``).
        preset: the teacher preset that trains a matching teacher (documentation for the user).
    """

    checkpoint: str | None = None
    preset: str | None = None


@dataclass(frozen=True)
class LogConfig:
    """Outputs of a run.

    Attributes:
        output_dir: run directory (config.yaml, checkpoint.pt, metrics.csv/jsonl, curves.png, tensorboard/).
        checkpoint_every: write ``checkpoint.pt`` every N epochs (and always at the end).
        val_size: validation examples used per epoch for clean and IBP-certified accuracy (0: skip).
        progress: tqdm progress bars (also off when stderr is not a terminal).
        tensorboard: write TensorBoard scalars when ``torch.utils.tensorboard`` is importable.
        plot: save a PNG of the training curves at the end.
    """

    output_dir: str = "runs/default"
    checkpoint_every: int = 1
    val_size: int = 1000
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        _check(self.checkpoint_every >= 1, "log.checkpoint_every must be >= 1")
        _check(self.val_size >= 0, "log.val_size must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Attributes:
        name: run/preset name.
        role: ``student`` (certified training) or ``teacher`` (PGD adversarial training).
        eps: target perturbation radius ε in pixel space (inputs in [0, 1]), e.g. 2/255.
        seed: seed of every random number generator (torch, numpy, python, data order).
        device: ``cpu``, ``cuda``, ``cuda:0``... (``auto``: cuda when available).
        channels_last: keep the weights and the 4-D batches (and the teacher) in channels-last
            memory format. Same results up to float rounding; on CPU a CNN-7 step (plain or CC-IBP)
            took 0.94-0.95× the NCHW time (``python benchmarks/speed.py``, docs/RESULTS.md); off by
            default because GPUs were not measured.
        data, model, loss, schedule, optim, teacher, log: the sections above.
    """

    name: str = "run"
    role: str = "student"
    eps: float = 0.1
    seed: int = 0
    device: str = "auto"
    channels_last: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        _check(self.role in ("student", "teacher"), f"role must be 'student' or 'teacher', got {self.role!r}")
        _check(self.eps > 0, f"eps must be > 0 (pixel space), got {self.eps}")
        _check(
            self.eps <= 1, f"eps is in pixel space ([0, 1] inputs); {self.eps} > 1 looks like a 0-255 value"
        )

    # ------------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        """Nested plain-python dict (tuples as lists), suitable for YAML and checkpoints."""
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build and validate from a nested dict; unknown/mistyped keys raise ``ValueError``."""
        return _build(cls, data, "")

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML text; written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> TrainConfig:
        """Load from a YAML file path or YAML text."""
        path = Path(path_or_text)
        is_file = isinstance(path_or_text, Path) or (
            "\n" not in str(path_or_text) and len(str(path_or_text)) < 4096 and path.is_file()
        )
        if is_file:
            try:
                data = yaml.safe_load(path.read_text())
            except yaml.YAMLError as err:
                raise ValueError(f"{path}: invalid YAML: {err}") from err
            if data is None:  # all defaults would only fail later, confusingly
                raise ValueError(f"config file {str(path)!r} is empty; start from a preset (ccdist presets)")
        else:
            data = yaml.safe_load(str(path_or_text))
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"config must be a YAML mapping, got {type(data).__name__}")
        data.pop("_comment", None)
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> TrainConfig:
        """``dataclasses.replace`` on the top level (validated)."""
        return dataclasses.replace(self, **changes)

    def override(self, assignments: list[str] | tuple[str, ...]) -> TrainConfig:
        """Apply ``key.sub=value`` assignments (values parsed as YAML) and revalidate.

        >>> TrainConfig().override(["loss.alpha=0.25", "eps=2/255"]).loss.alpha
        0.25
        """
        return self.override_values([parse_override(item) for item in assignments])

    def override_values(self, values: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> TrainConfig:
        """Set dotted keys to values already parsed (``{"loss.alpha": 0.25}``, or ``(key, value)``
        pairs applied in order) and revalidate: the checks of :meth:`override` (an unknown key is
        named with the nearest valid one).

        >>> TrainConfig().override_values({"loss.alpha": 0.25, "optim.lr": 1e-05}).optim.lr
        1e-05
        """
        data = self.to_dict()
        for key, value in values.items() if isinstance(values, Mapping) else values:
            _assign(data, key, value)
        return TrainConfig.from_dict(data)


# ---------------------------------------------------------------------------- helpers


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``"a.b=value"`` into ``("a.b", parsed value)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value (e.g. loss.alpha=0.5)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def convert_value(value: Any, tp: Any, key: str) -> Any:
    """``value`` read as type ``tp`` the way a config field of that type is read (a float takes
    ``0.5``, ``1`` or ``"2/255"``; a bool only true/false; ``X | None`` also None), for values the
    dataclasses do not type themselves (``loss.options``); otherwise a ``ValueError`` naming ``key``.

    >>> convert_value("2/255", float, "loss.options.lam") == 2 / 255
    True
    """
    return _convert(value, tp, key)


def _assign(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    cls: type = TrainConfig
    for depth, part in enumerate(parts):
        valid = [f.name for f in dataclasses.fields(cls)]
        where = ".".join(parts[:depth])
        if part not in valid:
            raise ValueError(_unknown_key_message(part, valid, where))
        if depth == len(parts) - 1:
            node[part] = value
            return
        hints = typing.get_type_hints(cls)
        sub = hints[part]
        if not (isinstance(sub, type) and dataclasses.is_dataclass(sub)):
            if isinstance(node.get(part), dict):  # free-form dict (loss.options)
                node[part] = dict(node[part])
                node[part][".".join(parts[depth + 1 :])] = value
                return
            raise ValueError(f"{'.'.join(parts[: depth + 1])} is not a section; cannot set {dotted}")
        node = node.setdefault(part, {})
        cls = sub


def _unknown_key_message(key: str, valid: list[str], where: str) -> str:
    full = f"{where}.{key}" if where else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
    return (
        f"unknown config key {full!r}{hint} (valid keys{' in ' + where if where else ''}: {', '.join(valid)})"
    )


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _parse_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"config key {key!r} expects a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                return float(num) / float(den)
            return float(text)
        except (ValueError, ZeroDivisionError):
            pass
    raise ValueError(f"config key {key!r} expects a number (e.g. 0.5 or 2/255), got {value!r}")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"config key {key!r}: bad value {value!r}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} is a section and expects a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {key!r} expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"config key {key!r} expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"config key {key!r} expects an integer, got {value!r}")
    if tp is float:
        return _parse_float(value, key)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"config key {key!r} expects a string, got {value!r}")
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} expects a list, got {value!r}")
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} expects a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"config key {key!r}: unsupported field type {tp!r}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in valid:
            raise ValueError(_unknown_key_message(str(key), valid, where))
        full = f"{where}.{key}" if where else key
        kwargs[key] = _convert(value, hints[key], full)
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - all fields have defaults
        raise ValueError(f"{where or 'config'}: {err}") from err


# ---------------------------------------------------------------------------- presets


def _preset_dir() -> Path:
    return Path(__file__).resolve().parent / "presets"


def list_presets() -> list[str]:
    """Names of the packaged presets (``ccdist presets``)."""
    return sorted(p.name[: -len(".yaml")] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def preset_description(name: str) -> str:
    """The first sentence, whole, of the ``#`` comment a preset file opens with ("" without one).

    >>> preset_description("digits-teacher")
    "Quick start teacher: PGD-10 adversarial training on sklearn's 8x8 digits (CPU, well under a minute)."
    """
    if name not in list_presets():
        raise ValueError(f"unknown preset {name!r} (available: {', '.join(list_presets())})")
    header = []
    for line in (_preset_dir() / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    text = " ".join(w for w in header if w)
    end = re.search(r"[.!?](?=\s+[A-Z])", text)  # a sentence ends before a capital: "e.g. x" does not
    return text[: end.end()] if end else text


def load_preset(name: str) -> TrainConfig:
    """Load a packaged preset by name (e.g. ``cifar10-2``, ``cifar10-2-teacher``, ``digits``)."""
    names = list_presets()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint} (available: {', '.join(names)})")
    return TrainConfig.from_yaml((_preset_dir() / f"{name}.yaml").read_text())


def load_config(preset_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A preset name or a YAML file, then ``key=value`` overrides."""
    path = Path(preset_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        cfg = TrainConfig.from_yaml(path)
    else:
        cfg = load_preset(str(preset_or_path))
    return cfg.override(list(overrides)) if overrides else cfg


def config_diff(
    a: dict[str, Any] | TrainConfig, b: dict[str, Any] | TrainConfig, ignore: tuple[str, ...] = ()
) -> list[str]:
    """Differences between two configs as ``"key: a_value != b_value"`` strings (dotted keys).

    Keys listed in ``ignore`` (dotted prefixes, e.g. ``"log"``) are skipped.
    """
    da = a.to_dict() if isinstance(a, TrainConfig) else a
    db = b.to_dict() if isinstance(b, TrainConfig) else b
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if any(prefix == p or prefix.startswith(p + ".") for p in ignore):
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for key in list(x) + [k for k in y if k not in x]:
                walk(x.get(key), y.get(key), f"{prefix}.{key}" if prefix else str(key))
        elif _to_plain(x) != _to_plain(y):
            out.append(f"{prefix}: {x!r} != {y!r}")

    walk(da, db, "")
    return out

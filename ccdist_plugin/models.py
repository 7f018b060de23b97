"""Certifiable networks: ``features`` (up to the last activation) followed by an affine ``head``.

Every model speaks pixel space: inputs lie in [0, 1] and per-channel normalization is the first
layer of ``features`` (a :class:`Normalize`), so that bounds, attacks and ε are all in pixel
units and the ONNX exporter can strip the normalization (α,β-CROWN mishandles a Sub/Div in front
of the first convolution).

Only standard ``torch.nn`` layers are used (auto_LiRPA parses those and crashes on custom
BatchNorm-like modules); the normalization buffers are shaped (1, C, 1, 1), which α,β-CROWN accepts.

Architectures:
- :func:`cnn7`: the CNN-7 of Shi et al. (2021) used throughout the paper (docs/method.md, "Student training").
- :func:`cnn3`: two convolutions and one hidden dense layer, for fast CPU work.
- :func:`mlp`: a small fully connected network.
- :func:`preact_resnet18`: the pre-activation ResNet-18 of He et al. (2016), with the average
  pooling moved before the last BatchNorm + ReLU so that the features are a ReLU output.

Residual connections are written with :class:`Residual` (``branch(x) + shortcut(x)``), a plain
container of standard layers that the bound engines, auto_LiRPA and the ONNX exporter all trace.
Any other feature extractor can be made certifiable with :meth:`CertifiedNet.wrap` (docs/method.md,
"Bounds").
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "Normalize",
    "Residual",
    "CertifiedNet",
    "cnn7",
    "cnn3",
    "mlp",
    "preact_resnet18",
    "create_model",
    "list_models",
    "shi_init",
    "check_compatible",
    "register_wrap_check",
]


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with buffers shaped (1, C, 1, 1).

    Args:
        mean: per-channel means, length C.
        std: per-channel standard deviations, length C (must be non-zero).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.as_tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        if mean_t.shape != std_t.shape:
            raise ValueError(f"Normalize: mean has {mean_t.numel()} channels but std has {std_t.numel()}")
        if bool((std_t == 0).any()):
            raise ValueError("Normalize: std must be non-zero")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class Residual(nn.Module):
    """``forward(x) = branch(x) + shortcut(x)``: a residual connection built from standard layers.

    Interval bounds add the two branches' intervals (centre + centre, radius + radius); CROWN adds
    the two branches' back-substituted coefficients (``ccdist_plugin.bounds``). Both branches see
    the same input, including, in train mode, the same reference batch for BatchNorm statistics.

    Args:
        branch: the residual branch (usually an ``nn.Sequential``).
        shortcut: the skip path; ``None`` means the identity.
    """

    def __init__(self, branch: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.branch = branch
        self.shortcut = nn.Identity() if shortcut is None else shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x) + self.shortcut(x)


#: what ``CertifiedNet.wrap(check_bounds=True)`` runs on the network it built, ``check(net, example)``
_wrap_check: Callable[[CertifiedNet, torch.Tensor], None] | None = None


def register_wrap_check(check: Callable[[CertifiedNet, torch.Tensor], None]) -> None:
    """Set the check ``CertifiedNet.wrap(check_bounds=True)`` runs on the network it built (with an
    input batch of its shape): that an engine bounds it and that its bounded graph is its forward.

    The bound engine knows what it can bound, and sits above the models, which import nothing from
    it; :mod:`ccdist_plugin.bounds.graphcheck` registers its check when it is imported, which
    ``import ccdist_plugin`` (so any import of this module) does.
    """
    global _wrap_check
    _wrap_check = check


class CertifiedNet(nn.Module):
    """``forward(x) = head(features(x))`` with ``features`` ending in the last activation.

    Attributes:
        features: ``nn.Sequential`` whose first layer is :class:`Normalize`.
        head: the final ``nn.Linear`` (the affine head of Lemma 3.3).
        input_shape: (C, H, W) of one input.
        arch: the constructor name and keyword arguments, enough to rebuild the network
            (stored in checkpoints).
    """

    def __init__(self, features: nn.Sequential, head: nn.Linear, input_shape: Sequence[int], arch: dict):
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise TypeError("CertifiedNet: head must be an nn.Linear (the affine head of Lemma 3.3)")
        if not isinstance(features[0], Normalize):
            raise TypeError("CertifiedNet: the first layer of features must be Normalize")
        self.features = features
        self.head = head
        self.input_shape = tuple(int(s) for s in input_shape)
        self.arch = dict(arch)

    @property
    def feature_dim(self) -> int:
        """Feature width w = dim h(x)."""
        return self.head.in_features

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def normalize(self) -> Normalize:
        return self.features[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def without_normalization(self) -> nn.Sequential:
        """The same network without its :class:`Normalize` layer (shares parameters and the
        train/eval mode, so that restoring the copy's mode restores the network's)."""
        view = nn.Sequential(*list(self.features)[1:], self.head)
        view.training = self.training  # the container's own flag only: the layers keep theirs
        return view

    @classmethod
    def wrap(
        cls,
        features: nn.Module,
        head: nn.Module,
        input_shape: Sequence[int],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        check_bounds: bool = True,
    ) -> CertifiedNet:
        """Make a certifiable network of your own feature extractor and linear head.

        ``forward(x) = head(features(normalize(x)))`` on pixel-space inputs in [0, 1]; the
        per-channel normalization (``mean``/``std``, default none) is prepended as for the built-in
        models, so ε stays in pixel units. ``features`` may be any module that auto_LiRPA can
        bound (convolutions, BatchNorm, ReLU, additions, concatenations, pooling, ...); it must map
        a (B, *input_shape) batch to (B, head.in_features) features. Bounds use the native engine
        when every layer of ``features`` is one it supports (``nn.Sequential`` and
        :class:`Residual` of standard layers), auto_LiRPA otherwise (``ccdist_plugin.bounds``).

        Such a network is not rebuilt from a checkpoint by name: build it again with the same code
        and load the checkpoint's ``model_state`` into it.

        Args:
            features: the feature extractor, ending in the activation whose output is distilled.
            head: the final ``nn.Linear`` (the affine head the bounds elide into).
            input_shape: (C, H, W) of one input, without the batch dimension.
            mean, std: per-channel normalization (length C).
            check_bounds: check now that one of the two engines can bound ``features`` (tracing it
                with auto_LiRPA when the native engine cannot), so that an unsupported layer is
                reported here rather than at the first training step; and that the graph the
                bounds describe is the forward (``ccdist_plugin.bounds.graphcheck``): tracing
                ``features`` must not warn, and on probe batches of sizes 1 to 5 spread over [0, 1]
                the forward must equal the bounded graph. Without the check, certification still
                compares the two on the points it certifies and certifies nothing where they differ.

        Raises:
            ValueError: ``head`` is not an ``nn.Linear``; the shapes do not fit; no engine can
                bound a layer of ``features`` (the message names it); or ``features`` are not the
                graph the bounds describe, e.g. its forward branches on a tensor value or on the
                batch size, or loops over the batch (``BoundedGraphMismatch``, naming what
                differs).
        """
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"CertifiedNet.wrap: head must be an nn.Linear (the affine layer the bounds fold the logit "
                f"differences into), got {type(head).__name__}; move other layers into features"
            )
        if not isinstance(features, nn.Module):
            raise ValueError(
                f"CertifiedNet.wrap: features must be an nn.Module, got {type(features).__name__}"
            )
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3 or any(s < 1 for s in shape):
            raise ValueError(f"CertifiedNet.wrap: input_shape must be (C, H, W), got {tuple(input_shape)}")
        normalize = _normalize_layer(shape[0], mean, std)
        arch = dict(
            name="wrapped",
            input_shape=list(shape),
            mean=None if mean is None else list(mean),
            std=None if std is None else list(std),
        )
        net = cls(nn.Sequential(normalize, features), head, shape, arch)
        zeros, probe = _probe_features(net, features, normalize, shape)
        if probe.ndim != 2 or probe.shape[1] != head.in_features:
            raise ValueError(
                f"CertifiedNet.wrap: features map (B, {shape}) to {tuple(probe.shape)}, but the head takes "
                f"(B, {head.in_features}); end features with a flatten to the head's input width"
            )
        if check_bounds:
            if _wrap_check is None:  # never skipped silently
                raise RuntimeError(
                    "CertifiedNet.wrap: no bound engine registered its check (import ccdist_plugin.bounds)"
                )
            _wrap_check(net, zeros.detach())
        return net


def _probe_features(
    net: CertifiedNet, features: nn.Module, normalize: Normalize, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (2, *shape) batch of zeros (on the features' device and dtype, where ``normalize`` moves
    too) and the features of it, for ``CertifiedNet.wrap``'s shape check."""
    was_training = features.training  # the wrapped network keeps the mode features had
    try:
        net.eval()  # a shape probe must not move BatchNorm running statistics
        with torch.no_grad():
            first = next(iter(features.parameters()), None)
            zeros = torch.zeros(2, *shape)
            if first is not None:
                zeros = zeros.to(first.device, first.dtype)
                normalize.to(first.device, first.dtype)
            probe = features(normalize(zeros))
    except Exception as exc:
        raise ValueError(f"CertifiedNet.wrap: features fail on a (2, {shape}) input: {exc}") from exc
    finally:
        net.train(was_training)
    return zeros, probe


def _normalize_layer(
    in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> Normalize:
    mean = [0.0] * in_channels if mean is None else list(mean)
    std = [1.0] * in_channels if std is None else list(std)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(
            f"mean/std have {len(mean)}/{len(std)} entries but the network has {in_channels} input channels"
        )
    return Normalize(mean, std)


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "tanh":
        return nn.Tanh()
    raise ValueError(f"unknown activation {name!r}; expected 'relu' or 'tanh'")


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _arch_record(
    name: str,
    in_channels: int,
    input_size: int,
    num_classes: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    **options,
) -> dict:
    """What a checkpoint stores to rebuild the network: ``create_model(**record)``."""
    return dict(
        name=name,
        in_channels=in_channels,
        input_size=input_size,
        num_classes=num_classes,
        mean=None if mean is None else list(mean),
        std=None if std is None else list(std),
        **options,
    )


def _finish(features: list[nn.Module], width: int, num_classes: int, input_shape, arch: dict, init: str):
    net = CertifiedNet(nn.Sequential(*features), nn.Linear(width, num_classes), input_shape, arch)
    if init == "shi":
        shi_init(net)
    elif init != "default":
        raise ValueError(f"unknown init {init!r}; expected 'shi' or 'default'")
    return net


def cnn7(
    in_channels: int = 3,
    input_size: int = 32,
    num_classes: int = 10,
    width: int = 512,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    activation: str = "relu",
    init: str = "shi",
    channels: Sequence[int] = (64, 64, 128, 128, 128),
) -> CertifiedNet:
    """CNN-7 (docs/method.md): five 3×3 convolutions (stride 1, 1, 2, 1, 1; the fifth has stride 2 on
    64×64 inputs), each followed by BatchNorm2d and the activation; Linear → ``width``, BatchNorm1d,
    activation; Linear → classes. ``channels`` may be narrowed for CPU experiments.
    """
    if input_size not in (32, 64) and input_size < 8:
        raise ValueError(f"cnn7: input_size {input_size} too small")
    if len(channels) != 5:
        raise ValueError("cnn7: channels must have 5 entries")
    strides = [1, 1, 2, 1, 2 if input_size >= 64 else 1]
    layers: list[nn.Module] = [_normalize_layer(in_channels, mean, std)]
    c_in, size = in_channels, input_size
    for c_out, stride in zip(channels, strides, strict=True):
        layers += [
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
            nn.BatchNorm2d(c_out),
            _activation(activation),
        ]
        c_in, size = c_out, _conv_out(size, 3, stride, 1)
    layers += [
        nn.Flatten(),
        nn.Linear(c_in * size * size, width),
        nn.BatchNorm1d(width),
        _activation(activation),
    ]
    arch = _arch_record(
        "cnn7",
        in_channels,
        input_size,
        num_classes,
        mean,
        std,
        width=width,
        activation=activation,
        channels=list(channels),
    )
    return _finish(layers, width, num_classes, (in_channels, input_size, input_size), arch, init)


def cnn3(
    in_channels: int = 3,
    input_size: int = 32,
    num_classes: int = 10,
    width: int = 256,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    activation: str = "relu",
    init: str = "shi",
    channels: Sequence[int] = (32, 64),
    batch_norm: bool = True,
) -> CertifiedNet:
    """A small CNN for CPU work: 3×3 conv (stride 1), 4×4 conv (stride 2), Linear → ``width``,
    each followed by BatchNorm (optional) and the activation; Linear → classes."""
    if len(channels) != 2:
        raise ValueError("cnn3: channels must have 2 entries")
    layers: list[nn.Module] = [_normalize_layer(in_channels, mean, std)]
    c1, c2 = channels
    size2 = _conv_out(_conv_out(input_size, 3, 1, 1), 4, 2, 1)
    if size2 < 1:
        raise ValueError(f"cnn3: input_size {input_size} too small")
    layers += [nn.Conv2d(in_channels, c1, 3, stride=1, padding=1)]
    layers += [nn.BatchNorm2d(c1)] if batch_norm else []
    layers += [_activation(activation), nn.Conv2d(c1, c2, 4, stride=2, padding=1)]
    layers += [nn.BatchNorm2d(c2)] if batch_norm else []
    layers += [_activation(activation), nn.Flatten(), nn.Linear(c2 * size2 * size2, width)]
    layers += [nn.BatchNorm1d(width)] if batch_norm else []
    layers += [_activation(activation)]
    arch = _arch_record(
        "cnn3",
        in_channels,
        input_size,
        num_classes,
        mean,
        std,
        width=width,
        activation=activation,
        channels=list(channels),
        batch_norm=batch_norm,
    )
    return _finish(layers, width, num_classes, (in_channels, input_size, input_size), arch, init)


def mlp(
    in_channels: int = 1,
    input_size: int = 8,
    num_classes: int = 10,
    width: int = 128,
    depth: int = 2,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    activation: str = "relu",
    init: str = "shi",
    batch_norm: bool = False,
) -> CertifiedNet:
    """A fully connected network with ``depth`` hidden layers of ``width`` units."""
    if depth < 1:
        raise ValueError("mlp: depth must be >= 1")
    layers: list[nn.Module] = [_normalize_layer(in_channels, mean, std), nn.Flatten()]
    d_in = in_channels * input_size * input_size
    for _ in range(depth):
        layers += [nn.Linear(d_in, width)]
        layers += [nn.BatchNorm1d(width)] if batch_norm else []
        layers += [_activation(activation)]
        d_in = width
    arch = _arch_record(
        "mlp",
        in_channels,
        input_size,
        num_classes,
        mean,
        std,
        width=width,
        depth=depth,
        activation=activation,
        batch_norm=batch_norm,
    )
    return _finish(layers, width, num_classes, (in_channels, input_size, input_size), arch, init)


def _preact_block(c_in: int, c_out: int, stride: int, activation: str) -> nn.Module:
    """One pre-activation basic block (He et al. 2016): BN, act, conv3×3, BN, act, conv3×3, plus the
    input. A block that changes the shape takes its shortcut (a strided 1×1 convolution) from the
    pre-activated input, as in the reference implementation, so BN + act come before the split."""

    def conv(ci: int, co: int, k: int, s: int) -> nn.Conv2d:
        return nn.Conv2d(ci, co, k, stride=s, padding=k // 2, bias=False)

    if stride == 1 and c_in == c_out:
        return Residual(
            nn.Sequential(
                nn.BatchNorm2d(c_in),
                _activation(activation),
                conv(c_in, c_out, 3, 1),
                nn.BatchNorm2d(c_out),
                _activation(activation),
                conv(c_out, c_out, 3, 1),
            )
        )
    return nn.Sequential(
        nn.BatchNorm2d(c_in),
        _activation(activation),
        Residual(
            nn.Sequential(
                conv(c_in, c_out, 3, stride),
                nn.BatchNorm2d(c_out),
                _activation(activation),
                conv(c_out, c_out, 3, 1),
            ),
            conv(c_in, c_out, 1, stride),
        ),
    )


def preact_resnet18(
    in_channels: int = 3,
    input_size: int = 32,
    num_classes: int = 10,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    width: int = 64,
    activation: str = "relu",
    init: str = "shi",
    pool_before_last_bn: bool = True,
) -> CertifiedNet:
    """PreActResNet18 (He et al. 2016, pre-activation): a 3×3 convolution to ``width`` channels,
    four stages of two pre-activation basic blocks with ``width`` × (1, 2, 4, 8) channels (64-128-256-512
    by default; stride 1, 2, 2, 2), then global average pooling; the head is a Linear from the
    8 × ``width`` pooled channels to the classes.

    The feature space must be a ReLU output, as for every student (docs/method.md, "Teacher"), so by
    default (``pool_before_last_bn=True``) the average pooling is moved before the last BatchNorm +
    ReLU: ``features`` end with AvgPool2d, Flatten, BatchNorm1d, ReLU, and the feature width is
    8 × ``width``. ``pool_before_last_bn=False`` gives the standard ordering (BatchNorm2d, ReLU,
    AvgPool2d, Flatten), whose features are an average of ReLU outputs.

    Convolutions have no bias (each is followed by BatchNorm, or added to a path that is). Shi et
    al. initialization (``init="shi"``) applies as for :func:`cnn7`.
    """
    if width < 1:
        raise ValueError(f"preact_resnet18: width must be >= 1, got {width}")
    layers: list[nn.Module] = [
        _normalize_layer(in_channels, mean, std),
        nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False),
    ]
    c_in, size = width, input_size
    for stage, stride in enumerate((1, 2, 2, 2)):
        c_out = width * 2**stage
        for block in range(2):
            s = stride if block == 0 else 1
            layers.append(_preact_block(c_in, c_out, s, activation))
            c_in, size = c_out, _conv_out(size, 3, s, 1)
    if size < 1:
        raise ValueError(f"preact_resnet18: input_size {input_size} too small")
    if pool_before_last_bn:
        layers += [nn.AvgPool2d(size), nn.Flatten(), nn.BatchNorm1d(c_in), _activation(activation)]
    else:
        layers += [nn.BatchNorm2d(c_in), _activation(activation), nn.AvgPool2d(size), nn.Flatten()]
    arch = _arch_record(
        "preact_resnet18",
        in_channels,
        input_size,
        num_classes,
        mean,
        std,
        width=width,
        activation=activation,
        pool_before_last_bn=pool_before_last_bn,
    )
    return _finish(layers, c_in, num_classes, (in_channels, input_size, input_size), arch, init)


_REGISTRY = {"cnn7": cnn7, "cnn3": cnn3, "mlp": mlp, "preact_resnet18": preact_resnet18}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> CertifiedNet:
    """Build a registered architecture by name, e.g. ``create_model("cnn7", num_classes=10)``."""
    if name == "wrapped":
        raise ValueError(
            "a network made with CertifiedNet.wrap cannot be rebuilt by name: build it again with the same "
            "code and load the checkpoint's model_state into it"
        )
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    constructor = _REGISTRY[name]
    accepted = inspect.signature(constructor).parameters
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise ValueError(
            f"model {name!r} takes no option(s) {', '.join(unknown)}; it takes {', '.join(accepted)}"
        )
    return constructor(**kwargs)


def model_from_arch(arch: dict, init: str = "default") -> CertifiedNet:
    """Rebuild a network from ``CertifiedNet.arch`` (as saved in checkpoints)."""
    kwargs = {k: v for k, v in arch.items() if k != "name"}
    return create_model(arch["name"], init=init, **kwargs)


@torch.no_grad()
def shi_init(model: nn.Module) -> nn.Module:
    """Initialization of Shi et al. (2021): every Conv/Linear weight except the last layer's is
    drawn from N(0, σ²) with σ = √(2π)/fan_in, which keeps IBP bounds from growing with depth.
    Biases and BatchNorm keep PyTorch's defaults."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers[:-1]:
        fan_in = layer.weight[0].numel()
        layer.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in)
    return model


def check_compatible(teacher: nn.Module, student: nn.Module) -> None:
    """Raise ``ValueError`` naming the difference when a teacher cannot distil onto a student.

    The distillation term compares features one to one, so both must be :class:`CertifiedNet`
    with the same feature width, input shape and class count; their normalizations must agree
    too, else the two networks would see different inputs.
    """
    problems = []
    for name, net in (("teacher", teacher), ("student", student)):
        if not isinstance(net, CertifiedNet):
            raise ValueError(f"{name} is a {type(net).__name__}, not a CertifiedNet (features + head)")
    if teacher.feature_dim != student.feature_dim:
        problems.append(f"feature width: teacher {teacher.feature_dim} vs student {student.feature_dim}")
    if teacher.input_shape != student.input_shape:
        problems.append(f"input shape: teacher {teacher.input_shape} vs student {student.input_shape}")
    if teacher.num_classes != student.num_classes:
        problems.append(f"classes: teacher {teacher.num_classes} vs student {student.num_classes}")
    tn, sn = teacher.normalize, student.normalize
    if tn.mean.shape != sn.mean.shape or not (
        torch.allclose(tn.mean.cpu(), sn.mean.cpu()) and torch.allclose(tn.std.cpu(), sn.std.cpu())
    ):
        problems.append(
            f"normalization: teacher mean/std {tn.mean.flatten().tolist()}/{tn.std.flatten().tolist()} vs "
            f"student {sn.mean.flatten().tolist()}/{sn.std.flatten().tolist()}"
        )
    if problems:
        raise ValueError("teacher and student are incompatible: " + "; ".join(problems))

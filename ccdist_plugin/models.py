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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "Normalize",
    "CertifiedNet",
    "cnn7",
    "cnn3",
    "mlp",
    "create_model",
    "list_models",
    "shi_init",
    "check_compatible",
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
        """The same network without its :class:`Normalize` layer (shares parameters)."""
        return nn.Sequential(*list(self.features)[1:], self.head)


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
    arch = dict(
        name="cnn7",
        in_channels=in_channels,
        input_size=input_size,
        num_classes=num_classes,
        width=width,
        mean=None if mean is None else list(mean),
        std=None if std is None else list(std),
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
    arch = dict(
        name="cnn3",
        in_channels=in_channels,
        input_size=input_size,
        num_classes=num_classes,
        width=width,
        mean=None if mean is None else list(mean),
        std=None if std is None else list(std),
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
    arch = dict(
        name="mlp",
        in_channels=in_channels,
        input_size=input_size,
        num_classes=num_classes,
        width=width,
        depth=depth,
        mean=None if mean is None else list(mean),
        std=None if std is None else list(std),
        activation=activation,
        batch_norm=batch_norm,
    )
    return _finish(layers, width, num_classes, (in_channels, input_size, input_size), arch, init)


_REGISTRY = {"cnn7": cnn7, "cnn3": cnn3, "mlp": mlp}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> CertifiedNet:
    """Build a registered architecture by name, e.g. ``create_model("cnn7", num_classes=10)``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)


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

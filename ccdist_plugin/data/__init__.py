"""Datasets for certified training: readers for the standard on-disk formats, batching and augmentation.

Quick use::

    from ccdist_plugin.data import BatchIterator, load_dataset

    data = load_dataset("cifar10", root="~/datasets", val_split=1000)
    spec = data.spec
    model = cnn7(spec.in_channels, spec.input_size, spec.num_classes, mean=spec.mean, std=spec.std)
    train = BatchIterator(data.train, batch_size=128, shuffle=True, augment=True, seed=0)
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for x, y in train:  # x float32 (B, C, H, W) in [0, 1], y int64 (B,)
            ...

Images are held as uint8 (N, C, H, W) arrays (memory-mapped for the large sets) and converted to float
one batch at a time. See ``docs/data.md`` for formats, defaults and measured load times.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arrays import ArrayDataset, ChunkedArray, MappedArray, stratified_split
from .augment import augment_batch
from .formats import (
    LAYOUTS,
    DatasetFormatError,
    DatasetNotFoundError,
    default_cache_dir,
    not_found,
    read_cifar10,
    read_cifar10_npz,
    read_digits,
    read_imagenet64,
    read_mnist,
    read_tinyimagenet,
)
from .iterate import BatchIterator, derive_seed
from .spec import DOWNLOAD_PAGES, DatasetSpec, dataset_spec, list_datasets

__all__ = [
    "ArrayDataset",
    "BatchIterator",
    "ChunkedArray",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "Datasets",
    "DOWNLOAD_PAGES",
    "LAYOUTS",
    "MappedArray",
    "augment_batch",
    "dataset_spec",
    "default_cache_dir",
    "default_data_dirs",
    "derive_seed",
    "list_datasets",
    "load_dataset",
    "stratified_split",
]


@dataclass
class Datasets:
    """What :func:`load_dataset` returns.

    Attributes:
        train: training set (without the validation examples when ``val_split`` was given).
        test: evaluation set (TinyImageNet and ImageNet64: their labelled validation sets, as in the paper).
        spec: the :class:`DatasetSpec` (shape, classes, normalization, augmentation).
        classes: class names (or wnids / indices), ``len == spec.num_classes``.
        val: validation split carved from the training data, or None.
        root: the folder the files were read from (None for digits).
    """

    train: ArrayDataset
    test: ArrayDataset
    spec: DatasetSpec
    classes: tuple[str, ...] = ()
    val: ArrayDataset | None = None
    root: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def fingerprints(self) -> dict[str, str]:
        """Fingerprint of every split (for checkpoints)."""
        out = {"train": self.train.fingerprint(), "test": self.test.fingerprint()}
        if self.val is not None:
            out["val"] = self.val.fingerprint()
        return out


def default_data_dirs() -> list[Path]:
    """Folders searched when no root is given: those of ``$CCDIST_DATA`` (``os.pathsep``-separated),
    in order. Nothing else is searched: a dataset elsewhere needs ``root=`` (``--set data.root=...``)."""
    env = os.environ.get("CCDIST_DATA", "")
    unique: list[Path] = []
    for d in (Path(p).expanduser() for p in env.split(os.pathsep) if p):
        if d not in unique:
            unique.append(d)
    return unique


_READERS = {
    "cifar10": read_cifar10,
    "cifar10-jpeg": read_cifar10_npz,
    "tinyimagenet": read_tinyimagenet,
    "imagenet64": read_imagenet64,
    "mnist": read_mnist,
}


def _read(name: str, root: str | os.PathLike | None, options: dict[str, Any]):
    if name == "digits":
        return read_digits(**options), None
    reader = _READERS[name]
    if root is not None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise not_found(name, [path], "root folder does not exist")
        return reader(path, **options), path
    if name == "cifar10-jpeg" and (options.get("train_file") or options.get("test_file")):
        return reader(None, **options), None
    searched = default_data_dirs()
    for directory in searched:
        if not directory.is_dir():
            continue
        try:
            return reader(directory, **options), directory
        except DatasetNotFoundError:
            continue
    # the command line rewrites "set CCDIST_DATA or pass root=" into its option (cli.common.data_not_found)
    raise not_found(name, searched, "no root given; set CCDIST_DATA or pass root=")


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    val_split: int | float | None = None,
    split_seed: int = 0,
    **options: Any,
) -> Datasets:
    """Read a dataset from its standard on-disk format.

    Args:
        name: one of :func:`list_datasets`: ``"cifar10"``, ``"cifar10-jpeg"``, ``"digits"``,
            ``"imagenet64"``, ``"mnist"``, ``"tinyimagenet"``.
        root: folder holding the data (the dataset's own folder or its parent, e.g. the folder containing
            ``cifar-10-batches-py``). None: search :func:`default_data_dirs`. Ignored for digits.
        val_split: carve a validation set from the training data: an int (number of examples) or a float
            in (0, 1) (fraction); None or 0: no validation set. Stratified by class and deterministic
            given ``split_seed``.
        split_seed: seed of the validation split.
        **options: reader options: ``cache``/``cache_dir`` (tinyimagenet, imagenet64),
            ``train_file``/``test_file`` (cifar10-jpeg), ``test_size`` (digits).

    Raises:
        DatasetNotFoundError: the files are missing (the message names the expected layout and download page).
        DatasetFormatError: the files are malformed.
        ValueError: unknown name, option or bad ``val_split``.
    """
    dataset_spec(name)  # validates the name
    if name == "digits":
        accepted = set(inspect.signature(read_digits).parameters) - {"split_seed"}
    else:
        accepted = set(inspect.signature(_READERS[name]).parameters) - {"root"}
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(
            f"load_dataset({name!r}): unknown option(s) {sorted(unknown)}; accepted: {sorted(accepted)}"
        )
    (train, test, classes), where = _read(name, root, options)
    spec = train.spec
    val = None
    if val_split is not None and not (isinstance(val_split, (int, float)) and val_split == 0):
        n = len(train)
        if isinstance(val_split, bool) or not isinstance(val_split, (int, float)):
            raise ValueError(f"val_split must be an int or a float, got {val_split!r}")
        if isinstance(val_split, float):
            if not 0.0 < val_split < 1.0:
                raise ValueError(f"val_split as a fraction must lie in (0, 1), got {val_split}")
            n_val = round(val_split * n)
        else:
            n_val = int(val_split)
        if not 0 < n_val < n:
            raise ValueError(
                f"val_split={val_split!r} gives {n_val} of {n} training examples; need 0 < n_val < n"
            )
        train_pos, val_pos = stratified_split(train.labels, n_val, split_seed)
        train, val = train.subset(train_pos), train.subset(val_pos)
    return Datasets(
        train=train,
        test=test,
        spec=spec,
        classes=tuple(classes),
        val=val,
        root=None if where is None else str(where),
    )

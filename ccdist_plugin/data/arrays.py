"""uint8 image storage (in memory, memory-mapped, or chunked) and the map-style dataset over it."""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .spec import DatasetSpec

__all__ = ["ArrayDataset", "MappedArray", "ChunkedArray", "open_npy", "open_npz_member", "stratified_split"]


class MappedArray:
    """A read-only memory map of a raw C-order array stored at ``offset`` bytes into ``path``.

    Unlike ``np.memmap`` it pickles as its location (not its contents), so a dataset holding one can be
    sent to DataLoader worker processes without copying gigabytes; the map is reopened lazily.
    """

    def __init__(self, path: str | os.PathLike, offset: int, shape: Sequence[int], dtype: Any):
        self.path = os.fspath(path)
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._map: np.memmap | None = None

    def _array(self) -> np.memmap:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        return self._map

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self._array()[key])

    def reshape(self, *shape: int) -> MappedArray:
        if int(np.prod(shape)) != int(np.prod(self.shape)):
            raise ValueError(f"cannot reshape {self.shape} to {shape}")
        return MappedArray(self.path, self.offset, shape, self.dtype)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_map"] = None
        return state

    def __repr__(self) -> str:
        return f"MappedArray({self.path!r}, offset={self.offset}, shape={self.shape}, dtype={self.dtype})"


class ChunkedArray:
    """Rows of several arrays (same row shape and dtype) seen as one array; fancy-indexable along axis 0."""

    def __init__(self, chunks: Sequence[Any]):
        if not chunks:
            raise ValueError("ChunkedArray needs at least one chunk")
        row_shapes = {tuple(c.shape[1:]) for c in chunks}
        if len(row_shapes) != 1:
            raise ValueError(f"ChunkedArray: chunks have different row shapes {sorted(row_shapes)}")
        self.chunks = list(chunks)
        self.dtype = np.dtype(chunks[0].dtype)
        sizes = np.array([len(c) for c in chunks], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.shape = (int(self.starts[-1]), *row_shapes.pop())

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            index = int(key) + (self.shape[0] if key < 0 else 0)
            chunk = int(np.searchsorted(self.starts, index, side="right") - 1)
            return np.asarray(self.chunks[chunk][index - self.starts[chunk]])
        index = np.arange(self.shape[0])[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)
        chunk_of = np.searchsorted(self.starts, index, side="right") - 1
        out = np.empty((len(index), *self.shape[1:]), dtype=self.dtype)
        for chunk in np.unique(chunk_of):
            mask = chunk_of == chunk
            out[mask] = self.chunks[chunk][index[mask] - self.starts[chunk]]
        return out


def read_npy_header(fileobj: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fileobj)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fileobj)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fileobj)
    raise ValueError(f"unsupported .npy format version {version}")


def open_npy(path: str | os.PathLike) -> MappedArray:
    """Memory-map an ``.npy`` file (C order, no object dtype)."""
    with open(path, "rb") as f:
        shape, fortran, dtype = read_npy_header(f)
        offset = f.tell()
    if fortran or dtype.hasobject:
        raise ValueError(f"{path}: cannot memory-map a Fortran-ordered or object array")
    return MappedArray(path, offset, shape, dtype)


def open_npz_member(path: str | os.PathLike, key: str) -> MappedArray | None:
    """Memory-map array ``key`` of an ``.npz`` when it is stored uncompressed (``np.savez``); else None.

    ``np.load(..., mmap_mode="r")`` silently reads npz members into memory; this finds the member's bytes
    inside the zip file instead.
    """
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(key + ".npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        header_offset = info.header_offset
    with open(path, "rb") as f:
        f.seek(header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: bad zip local header for {key}.npy")
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
        f.seek(header_offset + 30 + name_len + extra_len)
        shape, fortran, dtype = read_npy_header(f)
        offset = f.tell()
    if fortran or dtype.hasobject:
        return None
    return MappedArray(path, offset, shape, dtype)


def stratified_split(labels: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of positions into (train, val), ``n_val`` of them in val, classes proportional.

    Each example gets the key (rank within its class in a seeded random order + 0.5) / class size; the
    ``n_val`` smallest keys go to validation, so every class contributes its share up to rounding.
    Returns sorted int64 position arrays.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if not 0 < n_val < n:
        raise ValueError(f"validation split must leave both parts non-empty: {n_val} of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    shuffled = labels[perm]
    _, inverse, counts = np.unique(shuffled, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, dtype=np.float64)
    rank[order] = np.arange(n) - np.repeat(starts, counts)
    key = (rank + 0.5) / counts[inverse]
    chosen = np.zeros(n, dtype=bool)
    chosen[perm[np.argsort(key, kind="stable")[:n_val]]] = True
    return np.flatnonzero(~chosen).astype(np.int64), np.flatnonzero(chosen).astype(np.int64)


class ArrayDataset(Dataset):
    """Map-style dataset over uint8 images (N, C, H, W) and int64 labels (N,).

    ``dataset[i]`` is ``(x, y)`` with ``x`` a float32 tensor (C, H, W) in [0, 1] (``uint8 / scale``) and
    ``y`` an int64 scalar tensor, so it works with ``torch.utils.data.DataLoader``. For training, prefer
    :class:`~ccdist_plugin.data.BatchIterator`, which converts and augments whole batches at once.

    Args:
        images: uint8 array-like (N, C, H, W): ``np.ndarray``, :class:`MappedArray` or :class:`ChunkedArray`.
        labels: int labels (N,), in [0, num_classes).
        spec: the dataset's :class:`DatasetSpec` (augmentation settings, normalization).
        scale: value that maps to 1.0 (255 for images, 16 for scikit-learn digits).
        rows: optional positions into ``images`` that this dataset exposes (a view; used by splits).
    """

    def __init__(
        self,
        images: Any,
        labels: np.ndarray,
        spec: DatasetSpec,
        scale: float = 255.0,
        rows: np.ndarray | None = None,
    ):
        labels = np.asarray(labels, dtype=np.int64)
        if len(images.shape) != 4:
            raise ValueError(f"ArrayDataset: images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if np.dtype(images.dtype) != np.uint8:
            raise ValueError(f"ArrayDataset: images must be uint8, got {images.dtype}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"ArrayDataset: {images.shape[0]} images but labels have shape {labels.shape}")
        if tuple(images.shape[1:]) != tuple(spec.input_shape):
            raise ValueError(
                f"ArrayDataset: images are {tuple(images.shape[1:])} "
                f"but {spec.name} expects {spec.input_shape}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise ValueError(
                f"ArrayDataset: labels must lie in [0, {spec.num_classes}), "
                f"got [{labels.min()}, {labels.max()}]"
            )
        self.images = images
        self._all_labels = labels
        self.spec = spec
        self.scale = float(scale)
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._all_labels) if self.rows is None else len(self.rows)

    @property
    def labels(self) -> np.ndarray:
        """int64 labels (len(self),) in dataset order."""
        return self._all_labels if self.rows is None else self._all_labels[self.rows]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def _rows_of(self, positions: np.ndarray) -> np.ndarray:
        return positions if self.rows is None else self.rows[positions]

    def uint8_batch(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw ``(images uint8 (B, C, H, W), labels int64 (B,))`` at the given positions."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < -len(self) or positions.max() >= len(self)):
            raise IndexError(f"positions out of range for a dataset of {len(self)}")
        positions = positions % max(len(self), 1)
        rows = self._rows_of(positions)
        return np.ascontiguousarray(self.images[rows]), self._all_labels[rows]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)}")
        row = self._rows_of(np.array([index % len(self)]))[0]
        x = torch.from_numpy(np.array(self.images[row], dtype=np.uint8)).float().div_(self.scale)
        return x, torch.tensor(self._all_labels[row], dtype=torch.int64)

    def subset(self, positions: Sequence[int] | np.ndarray) -> ArrayDataset:
        """A view on some positions of this dataset (no image copy)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise ValueError(f"subset positions must lie in [0, {len(self)})")
        return ArrayDataset(self.images, self._all_labels, self.spec, self.scale, self._rows_of(positions))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole dataset as ``(x float32 (N, C, H, W) in [0, 1], y int64 (N,))`` (small sets only)."""
        x, y = self.uint8_batch(np.arange(len(self)))
        return torch.from_numpy(x).float().div_(self.scale), torch.from_numpy(y)

    def fingerprint(self) -> str:
        """Short hash of the shape, all labels and a fixed sample of images, for checkpoints to record."""
        h = hashlib.sha256()
        h.update(repr((self.spec.name, len(self), self.input_shape, self.scale)).encode())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        if len(self):
            sample = np.unique(np.linspace(0, len(self) - 1, num=min(len(self), 64)).astype(np.int64))
            h.update(self.uint8_batch(sample)[0].tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        storage = type(self.images).__name__
        return f"ArrayDataset({self.spec.name}, n={len(self)}, shape={self.input_shape}, storage={storage})"

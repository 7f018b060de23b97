"""Readers for the datasets' standard on-disk formats (no torchvision, no downloads).

Every reader returns ``(train, test, classes)``: two :class:`ArrayDataset` and the class names. Problems
with the files raise :class:`DatasetNotFoundError` or :class:`DatasetFormatError` with one message that
names the expected path and layout and where to download the data.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import ArrayDataset, ChunkedArray, MappedArray, open_npy, open_npz_member, read_npy_header
from .spec import DOWNLOAD_PAGES, dataset_spec

__all__ = [
    "DatasetNotFoundError",
    "DatasetFormatError",
    "LAYOUTS",
    "read_cifar10",
    "read_tinyimagenet",
    "read_imagenet64",
    "read_mnist",
    "read_digits",
    "read_cifar10_npz",
    "default_cache_dir",
]

log = logging.getLogger(__name__)

#: The layout each reader expects under its root (shown in error messages).
LAYOUTS: dict[str, str] = {
    "cifar10": "cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch} (python pickles)",
    "tinyimagenet": (
        "tiny-imagenet-200/{train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
        "val/val_annotations.txt, wnids.txt}"
    ),
    "imagenet64": (
        "a folder (or its sub-folders, e.g. Imagenet64_train_npz/ and Imagenet64_val_npz/) with "
        "train_data_batch_1..10[.npz] and val_data[.npz] "
        "(npz with keys data (N, 12288) uint8, labels 1..1000)"
    ),
    "mnist": (
        "{train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte}"
        "[.gz] in the root, root/raw or root/MNIST/raw"
    ),
    "digits": "nothing (bundled with scikit-learn)",
    "cifar10-jpeg": (
        "cifar10-jpeg-train10k.npz and cifar10-jpeg-test2k.npz (keys x (N, 32, 32, 3) uint8, y, classes)"
    ),
}

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where they were looked for."""


class DatasetFormatError(ValueError):
    """The dataset's files exist but are not in the expected format."""


def _how_to_get(name: str) -> str:
    return f"Expected layout: {LAYOUTS[name]}. Obtain it from {DOWNLOAD_PAGES[name]}."


def not_found(name: str, looked_in: Sequence[Path | str], what: str = "") -> DatasetNotFoundError:
    places = ", ".join(str(p) for p in looked_in) or "(no root given)"
    detail = f" ({what})" if what else ""
    return DatasetNotFoundError(
        f"{name}: dataset not found{detail}; looked in: {places}. {_how_to_get(name)}"
    )


def malformed(name: str, path: Path | str, problem: str) -> DatasetFormatError:
    return DatasetFormatError(f"{name}: malformed file {path}: {problem}. {_how_to_get(name)}")


def _guarded(name: str, path: Path, read: Callable[[], Any]) -> Any:
    """Run ``read()``; turn low-level errors (numpy, zip, pickle, PIL, I/O) into one DatasetFormatError."""
    try:
        return read()
    except (DatasetFormatError, DatasetNotFoundError):
        raise
    except Exception as err:  # noqa: BLE001 - every low-level failure becomes one clear message
        raise malformed(name, path, f"{type(err).__name__}: {err}") from None


def default_cache_dir() -> Path:
    """``$CCDIST_CACHE`` or ``~/.cache/ccdist_plugin``: where decoded JPEGs / decompressed npz go."""
    env = os.environ.get("CCDIST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ccdist_plugin"


def _first_existing(candidates: Sequence[Path], check: Callable[[Path], bool]) -> Path | None:
    for c in candidates:
        if c.is_dir() and check(c):
            return c
    return None


def _with_spec(name: str, **changes: Any):
    spec = dataset_spec(name)
    return dataclasses.replace(spec, **changes) if changes else spec


# --------------------------------------------------------------------------------------------- CIFAR-10


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR batches: allows only what a dict of numpy arrays and lists needs."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")
        return super().find_class(module, name)


def _load_cifar_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    if not isinstance(obj, dict):
        raise malformed("cifar10", path, f"expected a dict, got {type(obj).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _guarded("cifar10", path, lambda: _load_cifar_pickle(path))
    if "data" not in d or "labels" not in d:
        raise malformed("cifar10", path, f"missing keys b'data'/b'labels' (found {sorted(map(str, d))})")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise malformed("cifar10", path, f"data must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise malformed("cifar10", path, f"{data.shape[0]} images but {labels.shape[0]} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise malformed("cifar10", path, f"labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(root: Path) -> tuple[ArrayDataset, ArrayDataset, tuple[str, ...]]:
    """CIFAR-10 python pickles (``cifar-10-batches-py``), in memory (about 180 MB)."""
    candidates = [root / "cifar-10-batches-py", root]
    base = _first_existing(candidates, lambda p: (p / "test_batch").is_file())
    if base is None:
        raise not_found("cifar10", candidates, "no test_batch")
    batch_files = sorted(
        (p for p in base.iterdir() if re.fullmatch(r"data_batch_\d+", p.name)), key=lambda p: int(p.name[11:])
    )
    if not batch_files:
        raise not_found("cifar10", [base], "no data_batch_1..5")
    if len(batch_files) != 5:
        log.warning("cifar10: found %d of the 5 training batches in %s", len(batch_files), base)
    parts = [_cifar_batch(p) for p in batch_files]
    x_test, y_test = _cifar_batch(base / "test_batch")
    classes = CIFAR10_CLASSES
    meta = base / "batches.meta"
    if meta.is_file():
        names = _guarded("cifar10", meta, lambda: _load_cifar_pickle(meta)).get("label_names")
        if names is not None and len(names) == 10:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    spec = dataset_spec("cifar10")
    train = ArrayDataset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), spec)
    return train, ArrayDataset(x_test, y_test, spec), classes


# ------------------------------------------------------------------------------------------ TinyImageNet

_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def _decode_images(name: str, paths: Sequence[str], size: int, out: np.ndarray) -> None:
    """Decode RGB images into ``out`` (N, 3, size, size) uint8 with a thread pool (PIL releases the GIL)."""
    from PIL import Image

    def decode(i: int) -> None:
        path = paths[i]
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except Exception as err:  # noqa: BLE001
            raise malformed(name, path, f"cannot decode image ({type(err).__name__}: {err})") from None
        if rgb.size != (size, size):
            raise malformed(name, path, f"image is {rgb.size[0]}x{rgb.size[1]}, expected {size}x{size}")
        out[i] = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(decode, range(len(paths))))


def _cached_decode(
    name: str, key_parts: Sequence[str], paths: Sequence[str], size: int, cache_dir: Path | None
) -> Any:
    """Decoded images, from the cache when its key (paths, sizes, mtimes) matches; else decode and store."""
    shape = (len(paths), 3, size, size)
    if cache_dir is None:
        out = np.empty(shape, dtype=np.uint8)
        _decode_images(name, paths, size, out)
        return out
    h = hashlib.sha256()
    for part in key_parts:
        h.update(part.encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    cache_file = cache_dir / f"{name}-{key_parts[-1]}-{h.hexdigest()[:16]}.npy"
    if cache_file.is_file():
        try:
            cached = open_npy(cache_file)
            if cached.shape == shape and cached.dtype == np.uint8:
                log.info("%s: using decoded cache %s", name, cache_file)
                return cached
        except (OSError, ValueError):
            pass
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    except OSError as err:
        log.warning("%s: cannot write cache in %s (%s); decoding into memory", name, cache_dir, err)
        out = np.empty(shape, dtype=np.uint8)
        _decode_images(name, paths, size, out)
        return out
    try:
        log.info("%s: decoding %d images once into %s", name, len(paths), cache_file)
        _decode_images(name, paths, size, out)
        out.flush()
        del out
        os.replace(tmp, cache_file)
    finally:
        if tmp.exists():
            tmp.unlink()
    return open_npy(cache_file)


def _image_files(folder: Path) -> list[str]:
    """Sorted paths (strings: 100k ``Path`` objects cost seconds) of the images in ``folder``."""
    with os.scandir(folder) as entries:
        return sorted(e.path for e in entries if os.path.splitext(e.name)[1].lower() in _IMAGE_SUFFIXES)


def read_tinyimagenet(
    root: Path, cache: bool = True, cache_dir: str | os.PathLike | None = None
) -> tuple[ArrayDataset, ArrayDataset, tuple[str, ...]]:
    """TinyImageNet (``tiny-imagenet-200``); the test set is the labelled validation set, as in the paper.

    Class index = position of the wnid in sorted order (as an ``ImageFolder`` over ``train/`` would give).
    JPEGs are decoded once (threads) and cached as a memory-mapped uint8 ``.npy`` in ``cache_dir``
    (default :func:`default_cache_dir`); ``cache=False`` decodes into memory each time.
    """
    candidates = [root / "tiny-imagenet-200", root]
    base = _first_existing(candidates, lambda p: (p / "train").is_dir() and (p / "val").is_dir())
    if base is None:
        raise not_found("tinyimagenet", candidates, "no train/ and val/ folders")
    train_dir, val_dir = base / "train", base / "val"
    wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not wnids:
        raise malformed("tinyimagenet", train_dir, "no class folders train/<wnid>/")
    wnids_file = base / "wnids.txt"
    if wnids_file.is_file():
        listed = sorted(line.strip() for line in wnids_file.read_text().splitlines() if line.strip())
        if listed != wnids:
            raise malformed(
                "tinyimagenet", wnids_file, "wnids.txt does not list exactly the train/ class folders"
            )
    class_of = {w: i for i, w in enumerate(wnids)}
    train_paths: list[str] = []
    train_labels: list[int] = []
    for wnid in wnids:
        folder = train_dir / wnid / "images"
        if not folder.is_dir():
            folder = train_dir / wnid
        files = _image_files(folder)
        if not files:
            raise malformed("tinyimagenet", folder, "no images (expected train/<wnid>/images/*.JPEG)")
        train_paths += files
        train_labels += [class_of[wnid]] * len(files)
    annotations = val_dir / "val_annotations.txt"
    if not annotations.is_file():
        raise not_found("tinyimagenet", [annotations], "no val/val_annotations.txt")
    val_paths: list[str] = []
    val_labels: list[int] = []
    for line_no, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2 or fields[1] not in class_of:
            raise malformed(
                "tinyimagenet", annotations, f"line {line_no}: expected '<file>\\t<known wnid>\\t...'"
            )
        path = os.path.join(val_dir, "images", fields[0])
        if not os.path.isfile(path):
            raise not_found("tinyimagenet", [path], f"image listed on line {line_no} of val_annotations.txt")
        val_paths.append(path)
        val_labels.append(class_of[fields[1]])
    if not val_paths:
        raise malformed("tinyimagenet", annotations, "no validation images listed")
    directory = None if not cache else Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = str(base.resolve())
    x_train = _cached_decode("tinyimagenet", [key, "train"], train_paths, 64, directory)
    x_val = _cached_decode("tinyimagenet", [key, "val"], val_paths, 64, directory)
    spec = (
        _with_spec("tinyimagenet", num_classes=len(wnids))
        if len(wnids) != 200
        else dataset_spec("tinyimagenet")
    )
    if len(wnids) != 200:
        log.warning("tinyimagenet: found %d classes (the full dataset has 200)", len(wnids))
    classes = tuple(wnids)
    words = base / "words.txt"
    if words.is_file():
        names = dict(line.split("\t", 1) for line in words.read_text().splitlines() if "\t" in line)
        classes = tuple(names.get(w, w).strip() for w in wnids)
    return (
        ArrayDataset(x_train, np.array(train_labels, dtype=np.int64), spec),
        ArrayDataset(x_val, np.array(val_labels, dtype=np.int64), spec),
        classes,
    )


# ------------------------------------------------------------------------------------------- ImageNet64

_IMAGENET64_ROW = 3 * 64 * 64


def _npz_images(path: Path, cache_dir: Path | None) -> Any:
    """The ``data`` array of an ImageNet64 npz as (N, 3, 64, 64) uint8, memory-mapped when possible."""

    def open_data() -> Any:
        with zipfile.ZipFile(path) as zf:
            if "data.npy" not in zf.namelist() or "labels.npy" not in zf.namelist():
                raise malformed("imagenet64", path, f"expected keys data and labels, found {zf.namelist()}")
        mapped = open_npz_member(path, "data")
        if mapped is not None:
            return mapped
        return _decompressed_member(path, "data", cache_dir)

    data = _guarded("imagenet64", path, open_data)
    if np.dtype(data.dtype) != np.uint8 or len(data.shape) != 2 or data.shape[1] != _IMAGENET64_ROW:
        raise malformed(
            "imagenet64",
            path,
            f"data must be uint8 (N, {_IMAGENET64_ROW}) flat CHW rows (ImageNet32 files have 3072), "
            f"got {data.dtype} {tuple(data.shape)}",
        )
    if isinstance(data, MappedArray):
        return data.reshape(data.shape[0], 3, 64, 64)
    return data.reshape(-1, 3, 64, 64)


def _decompressed_member(path: Path, key: str, cache_dir: Path | None) -> Any:
    """A compressed npz member, decompressed once (streaming) into a cached ``.npy`` and memory-mapped."""
    st = path.stat()
    if cache_dir is None:
        with np.load(path, allow_pickle=False) as npz:
            return np.ascontiguousarray(npz[key])
    digest = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{key}".encode()).hexdigest()
    cache_file = cache_dir / f"imagenet64-{path.name.removesuffix('.npz')}-{digest[:16]}.npy"
    if cache_file.is_file():
        return open_npy(cache_file)
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp.touch()
    except OSError as err:
        log.warning(
            "imagenet64: cannot write cache in %s (%s); decompressing %s into memory", cache_dir, err, path
        )
        return _decompressed_member(path, key, None)
    log.info("imagenet64: decompressing %s once into %s", path, cache_file)
    try:
        with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as member:
            shape, fortran, dtype = read_npy_header(member)
            if fortran or dtype.hasobject:
                raise ValueError("Fortran-ordered or object array")
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            flat = out.reshape(-1).view(np.uint8)
            done, chunk = 0, 1 << 26
            while done < flat.size:
                n = member.readinto(memoryview(flat[done : done + chunk]))
                if not n:
                    raise ValueError(f"member {key}.npy is truncated")
                done += n
            out.flush()
            del out, flat
        os.replace(tmp, cache_file)
    finally:
        if tmp.exists():
            tmp.unlink()
    return open_npy(cache_file)


def _npz_labels(path: Path) -> np.ndarray:
    def read() -> np.ndarray:
        with np.load(path, allow_pickle=False) as npz:
            return np.asarray(npz["labels"]).reshape(-1)

    labels = _guarded("imagenet64", path, read)
    if not np.issubdtype(labels.dtype, np.integer):
        raise malformed("imagenet64", path, f"labels must be integers, got {labels.dtype}")
    if len(labels) and (labels.min() < 1 or labels.max() > 1000):
        raise malformed(
            "imagenet64", path, f"labels must be 1-based in 1..1000, got {labels.min()}..{labels.max()}"
        )
    return labels.astype(np.int64) - 1


def _imagenet64_split(files: list[Path], cache_dir: Path | None) -> ArrayDataset:
    images, labels = [], []
    for f in files:
        x = _npz_images(f, cache_dir)
        y = _npz_labels(f)
        if len(y) != x.shape[0]:
            raise malformed("imagenet64", f, f"{x.shape[0]} images but {len(y)} labels")
        images.append(x)
        labels.append(y)
    storage = images[0] if len(images) == 1 else ChunkedArray(images)
    return ArrayDataset(storage, np.concatenate(labels), dataset_spec("imagenet64"))


def read_imagenet64(
    root: Path, cache: bool = True, cache_dir: str | os.PathLike | None = None
) -> tuple[ArrayDataset, ArrayDataset, tuple[str, ...]]:
    """Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017), npz batches; the test set is ``val_data``.

    Labels are stored 1-based and returned 0-based. Batches saved with ``np.savez`` (uncompressed) are
    memory-mapped in place; compressed ones are decompressed once into ``cache_dir`` (``cache=False``:
    into memory).
    """
    candidates = [root] + (sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else [])
    train_files: list[Path] = []
    val_files: list[Path] = []
    for folder in candidates:
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = re.fullmatch(r"train_data_batch_(\d+)(\.npz)?", p.name)
            if m and p.is_file():
                train_files.append(p)
            elif re.fullmatch(r"val_data(\.npz)?", p.name) and p.is_file():
                val_files.append(p)
    if not train_files or not val_files:
        missing = "train_data_batch_*" if not train_files else "val_data"
        raise not_found("imagenet64", candidates, f"no {missing} file")
    if len(val_files) > 1:
        raise malformed("imagenet64", root, f"several val_data files: {[str(p) for p in val_files]}")
    train_files.sort(
        key=lambda p: int(re.search(r"(\d+)", p.name.removeprefix("train_data_batch_")).group(1))
    )
    if len(train_files) != 10:
        log.warning("imagenet64: found %d of the 10 training batches", len(train_files))
    directory = None if not cache else Path(cache_dir) if cache_dir is not None else default_cache_dir()
    train = _imagenet64_split(train_files, directory)
    test = _imagenet64_split(val_files, directory)
    return train, test, tuple(str(i) for i in range(1000))


# ------------------------------------------------------------------------------------------------ MNIST

_IDX_MAGIC = {"images": 2051, "labels": 2049}


def _read_idx(path: Path, kind: str) -> np.ndarray:
    def read() -> np.ndarray:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.GzipFile(fileobj=io.BytesIO(raw)).read()
        return np.frombuffer(raw, dtype=np.uint8)

    buf = _guarded("mnist", path, read)
    if len(buf) < 8:
        raise malformed("mnist", path, "file too short for an idx header")
    magic = int.from_bytes(buf[:4].tobytes(), "big")
    if magic != _IDX_MAGIC[kind]:
        raise malformed("mnist", path, f"idx magic number {magic}, expected {_IDX_MAGIC[kind]} for {kind}")
    ndim = int(buf[3])
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(buf[4 + 4 * i : 8 + 4 * i].tobytes(), "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(buf) != expected:
        raise malformed(
            "mnist", path, f"header says {dims} ({expected} bytes) but the file has {len(buf)} bytes"
        )
    return buf[header:].reshape(dims)


def _find_idx(bases: Sequence[Path], prefix: str, kind: str) -> Path | None:
    ndim = 3 if kind == "images" else 1
    for base in bases:
        for sep in ("-", "."):
            for suffix in ("", ".gz"):
                p = base / f"{prefix}-{kind}{sep}idx{ndim}-ubyte{suffix}"
                if p.is_file():
                    return p
    return None


def read_mnist(root: Path) -> tuple[ArrayDataset, ArrayDataset, tuple[str, ...]]:
    """MNIST idx files (gzipped or not), in memory (about 55 MB)."""
    bases = [root, root / "raw", root / "MNIST" / "raw", root / "mnist"]
    spec = dataset_spec("mnist")
    out = []
    for prefix in ("train", "t10k"):
        image_file, label_file = _find_idx(bases, prefix, "images"), _find_idx(bases, prefix, "labels")
        if image_file is None or label_file is None:
            raise not_found("mnist", bases, f"no {prefix}-images-idx3-ubyte / {prefix}-labels-idx1-ubyte")
        images, labels = _read_idx(image_file, "images"), _read_idx(label_file, "labels")
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise malformed("mnist", image_file, f"images must be (N, 28, 28), got {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise malformed("mnist", label_file, f"{len(images)} images but labels have shape {labels.shape}")
        if len(labels) and labels.max() > 9:
            raise malformed("mnist", label_file, f"labels must lie in 0..9, got max {labels.max()}")
        out.append(ArrayDataset(images.reshape(-1, 1, 28, 28), labels.astype(np.int64), spec))
    return out[0], out[1], tuple(str(i) for i in range(10))


# ----------------------------------------------------------------------------------------------- digits


def read_digits(
    test_size: int = 300, split_seed: int = 0
) -> tuple[ArrayDataset, ArrayDataset, tuple[str, ...]]:
    """scikit-learn's 8x8 digits (1797 images, values 0..16, stored as uint8 with scale 16).

    Fixed stratified split: ``train_test_split(test_size=300, stratify=y, random_state=0)``, i.e.
    1497 train / 300 test.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise not_found("digits", [], "scikit-learn is not installed") from None
    bunch = load_digits()
    images = bunch.images.astype(np.uint8).reshape(-1, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=split_seed
    )
    spec = dataset_spec("digits")
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return (
        ArrayDataset(images[train_idx], labels[train_idx], spec, scale=16.0),
        ArrayDataset(images[test_idx], labels[test_idx], spec, scale=16.0),
        tuple(str(i) for i in range(10)),
    )


# ---------------------------------------------------------------------------------- CIFAR-10 JPEG subset

CIFAR10_JPEG_FILES = ("cifar10-jpeg-train10k.npz", "cifar10-jpeg-test2k.npz")


def _read_cifar_npz(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    def read() -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz.files or "y" not in npz.files:
                raise malformed("cifar10-jpeg", path, f"expected keys x, y (and classes), found {npz.files}")
            return npz["x"], npz["y"], npz["classes"] if "classes" in npz.files else None

    x, y, classes = _guarded("cifar10-jpeg", path, read)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise malformed("cifar10-jpeg", path, f"x must be uint8 (N, 32, 32, 3) HWC, got {x.dtype} {x.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
        raise malformed(
            "cifar10-jpeg", path, f"y must be integers of shape ({len(x)},), got {y.dtype} {y.shape}"
        )
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise malformed("cifar10-jpeg", path, f"labels must lie in 0..9, got {y.min()}..{y.max()}")
    names = tuple(str(c) for c in classes) if classes is not None and len(classes) == 10 else CIFAR10_CLASSES
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y.astype(np.int64), names


def read_cifar10_npz(
    root: Path | None,
    train_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
) -> tuple[ArrayDataset, ArrayDataset, tuple[str, ...]]:
    """The CIFAR-10 JPEG subset (or any npz pair with keys x uint8 NHWC, y, classes), in memory."""
    paths = []
    for given, default in zip((train_file, test_file), CIFAR10_JPEG_FILES, strict=True):
        if given is not None:
            p = Path(given).expanduser()
            if not p.is_absolute() and root is not None and not p.is_file():
                p = root / p
        else:
            if root is None:
                raise not_found("cifar10-jpeg", [], "give a root folder or train_file/test_file")
            p = root / default
        if not p.is_file():
            raise not_found("cifar10-jpeg", [p])
        paths.append(p)
    x_train, y_train, classes = _read_cifar_npz(paths[0])
    x_test, y_test, _ = _read_cifar_npz(paths[1])
    spec = dataset_spec("cifar10-jpeg")
    return ArrayDataset(x_train, y_train, spec), ArrayDataset(x_test, y_test, spec), classes

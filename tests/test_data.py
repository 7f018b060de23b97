"""Dataset readers (tiny files in each real format), batching, augmentation and error messages."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ccdist_plugin.data import (
    ArrayDataset,
    BatchIterator,
    ChunkedArray,
    DatasetFormatError,
    DatasetNotFoundError,
    DatasetSpec,
    MappedArray,
    augment_batch,
    dataset_spec,
    default_data_dirs,
    list_datasets,
    load_dataset,
    stratified_split,
)

REPO = Path(__file__).resolve().parents[1]
# The CIFAR-10 JPEG subset (docs/data.md): the first folder of $CCDIST_DATA (.ci/run sets it), else the
# contributors' workspace copy beside the repository; the test that reads it skips when neither has it.
SHARED_DATA = Path(os.environ.get("CCDIST_DATA", "").split(os.pathsep)[0] or REPO.parent / "shared" / "data")


# ------------------------------------------------------------------------------------------ file writers


def _cifar_images(labels: np.ndarray, offset: int) -> np.ndarray:
    """Rows of 3072 uint8 in CHW order: channel c of image i is filled with 10 * label + c + offset."""
    n = len(labels)
    img = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    for c in range(3):
        img[:, c] = (10 * labels + c + offset)[:, None, None]
    return img.reshape(n, 3072)


def write_cifar(root: Path, n_batches: int = 2, per_batch: int = 20, protocol: int = 2) -> Path:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, n_batches + 1)] + ["test_batch"]
    for k, name in enumerate(names):
        labels = rng.integers(0, 10, per_batch)
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in labels],
            b"data": _cifar_images(labels, offset=k),
            b"filenames": [f"img{i}.png".encode() for i in range(per_batch)],
        }
        with open(base / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    with open(base / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=protocol)
    return base


TINY_WNIDS = ["n03000000", "n01000000", "n02000000"]  # deliberately not sorted in wnids.txt


def _class_color(wnid: str) -> tuple[int, int, int]:
    k = sorted(TINY_WNIDS).index(wnid)
    return (40 + 80 * k, 200 - 60 * k, 30 + 30 * k)


def write_tinyimagenet(root: Path, per_class: int = 3, val_per_class: int = 2) -> Path:
    from PIL import Image

    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (base / "words.txt").write_text("".join(f"{w}\tthing {w[1:3]}\n" for w in TINY_WNIDS))
    lines = []
    for w in TINY_WNIDS:
        folder = base / "train" / w / "images"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (64, 64), _class_color(w)).save(folder / f"{w}_{i}.JPEG", quality=95)
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    for j, w in enumerate(TINY_WNIDS * val_per_class):
        name = f"val_{j}.JPEG"
        Image.new("RGB", (64, 64), _class_color(w)).save(base / "val" / "images" / name, quality=95)
        lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    # one grayscale JPEG, as the real set has: must come back as 3 equal channels
    Image.new("L", (64, 64), 128).save(base / "train" / TINY_WNIDS[0] / "images" / "gray.JPEG")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def _imagenet64_rows(labels_1based: np.ndarray) -> np.ndarray:
    """Flat CHW rows: channel c of an image with 1-based label L is filled with (L + 50 * c) % 256."""
    n = len(labels_1based)
    img = np.empty((n, 3, 64, 64), dtype=np.uint8)
    for c in range(3):
        img[:, c] = ((labels_1based + 50 * c) % 256)[:, None, None]
    img[:, 0, 0, 1] = 7  # one marker pixel to check row-major H, W order
    return img.reshape(n, 3 * 64 * 64)


def write_imagenet64(root: Path, batches: int = 2, per_batch: int = 6, val: int = 5) -> Path:
    folder = root / "Imagenet64_train_npz"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for b in range(1, batches + 1):
        labels = rng.integers(1, 1001, per_batch)
        labels[0] = 1000 if b == 1 else 1  # both ends of the 1-based range
        data = _imagenet64_rows(labels)
        np.savez(folder / f"train_data_batch_{b}.npz", data=data, labels=labels.tolist(), mean=data.mean(0))
    val_folder = root / "Imagenet64_val_npz"
    val_folder.mkdir()
    labels = rng.integers(1, 1001, val)
    np.savez_compressed(val_folder / "val_data.npz", data=_imagenet64_rows(labels), labels=labels.tolist())
    return root


def _idx(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


def write_mnist(root: Path, n_train: int = 12, n_test: int = 7) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for prefix, n, gz in (("train", n_train, True), ("t10k", n_test, False)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = np.repeat((labels * 25).astype(np.uint8)[:, None, None], 28, 1).repeat(28, 2)
        images[:, 0, 27] = 255
        for kind, arr, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            data = _idx(arr, magic)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (raw / name).write_bytes(data)
    return root


# -------------------------------------------------------------------------------------------- specs


def test_registry_and_specs():
    assert list_datasets() == ["cifar10", "cifar10-jpeg", "digits", "imagenet64", "mnist", "tinyimagenet"]
    cifar = dataset_spec("cifar10")
    assert cifar.mean == (0.4914, 0.4822, 0.4465) and cifar.std == (0.2023, 0.1994, 0.2010)
    assert (cifar.crop_padding, cifar.padding_mode, cifar.flip) == (2, "replicate", True)
    assert dataset_spec("tinyimagenet").input_shape == (3, 64, 64)
    assert dataset_spec("tinyimagenet").std == (0.2302, 0.2265, 0.2262)
    assert dataset_spec("imagenet64").mean == (0.4815, 0.4578, 0.4082)
    assert dataset_spec("imagenet64").crop_padding == 4 and dataset_spec("imagenet64").num_classes == 1000
    assert dataset_spec("mnist").mean == (0.0,) and not dataset_spec("mnist").flip
    assert DatasetSpec.from_dict(cifar.to_dict()) == cifar
    with pytest.raises(ValueError, match="unknown dataset 'cifar100'"):
        dataset_spec("cifar100")
    with pytest.raises(ValueError, match="mean/std"):
        DatasetSpec("bad", (3, 8, 8), 10, (0.5,), (0.5,))


# -------------------------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_pickles(tmp_path, protocol):
    write_cifar(tmp_path, protocol=protocol)
    data = load_dataset("cifar10", tmp_path)
    assert len(data.train) == 40 and len(data.test) == 20
    assert data.spec == dataset_spec("cifar10")
    assert data.classes == tuple(f"class{i}" for i in range(10))
    x, y = data.train[25]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # batch 2 (offset 1): channel c holds 10 * label + c + 1
    expected = torch.tensor([10 * int(y) + c + 1 for c in range(3)], dtype=torch.float32) / 255
    assert torch.equal(x[:, 5, 7], expected)
    xt, yt = data.test.tensors()
    assert torch.equal(xt[:, 2, 0, 0] * 255, (10 * yt + 2 + 2).float())
    assert 0.0 <= float(xt.min()) and float(xt.max()) <= 1.0
    # the folder itself works as root, too
    assert len(load_dataset("cifar10", tmp_path / "cifar-10-batches-py").train) == 40


def test_cifar10_python2_era_pickles(tmp_path):
    """The real batches were written by Python 2 / numpy 1 and name ``numpy.core.multiarray``."""
    base = write_cifar(tmp_path, protocol=2)
    for path in base.iterdir():
        path.write_bytes(path.read_bytes().replace(b"cnumpy._core.", b"cnumpy.core."))
    assert b"cnumpy.core.multiarray" in (base / "test_batch").read_bytes()
    data = load_dataset("cifar10", tmp_path)
    assert len(data.train) == 40 and data.train.images.dtype == np.uint8


def test_cifar10_default_root_from_env(tmp_path, monkeypatch):
    write_cifar(tmp_path / "data")
    monkeypatch.setenv("CCDIST_DATA", str(tmp_path / "data"))
    assert default_data_dirs()[0] == tmp_path / "data"
    data = load_dataset("cifar10")
    assert data.root == str(tmp_path / "data") and len(data.test) == 20


def test_cifar10_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", tmp_path)
    msg = str(err.value)
    assert "cifar-10-batches-py" in msg and "https://www.cs.toronto.edu/~kriz/cifar.html" in msg
    assert str(tmp_path) in msg
    base = write_cifar(tmp_path)
    (base / "data_batch_2").write_bytes(b"this is not a pickle")
    with pytest.raises(DatasetFormatError) as err:
        load_dataset("cifar10", tmp_path)
    assert "data_batch_2" in str(err.value) and "cifar-10-batches-py" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    with open(base / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}, f)
    with pytest.raises(DatasetFormatError, match=r"uint8 \(N, 3072\)"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_pickle_cannot_run_code(tmp_path):
    base = write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (base / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DatasetFormatError, match="refusing to load builtins.print"):
        load_dataset("cifar10", tmp_path)


# ---------------------------------------------------------------------------------------- TinyImageNet


def test_tinyimagenet_folder(tmp_path):
    write_tinyimagenet(tmp_path)
    cache = tmp_path / "cache"
    data = load_dataset("tinyimagenet", tmp_path, cache_dir=cache)
    assert len(data.train) == 3 * 3 + 1 and len(data.test) == 3 * 2
    assert data.spec.num_classes == 3 and data.spec.input_shape == (3, 64, 64)
    assert data.spec.mean == dataset_spec("tinyimagenet").mean
    assert data.classes == ("thing 01", "thing 02", "thing 03")  # words.txt names, sorted-wnid order
    for split in (data.train, data.test):
        x, y = split.tensors()
        assert x.shape[1:] == (3, 64, 64) and 0 <= float(x.min()) and float(x.max()) <= 1
        gray = (x[:, 0] == x[:, 1]).all(dim=(1, 2)) & (x[:, 0, 0, 0] == 128 / 255)
        for i in range(len(y)):
            if bool(gray[i]):
                assert int(y[i]) == sorted(TINY_WNIDS).index(TINY_WNIDS[0])
                continue
            color = torch.tensor(_class_color(sorted(TINY_WNIDS)[int(y[i])]), dtype=torch.float32) / 255
            assert torch.allclose(x[i, :, 32, 32], color, atol=3 / 255), "label must be the sorted wnid index"
    # decoded once into the cache, then memory-mapped
    assert len(list(cache.glob("*.npy"))) == 2 and isinstance(data.train.images, MappedArray)
    again = load_dataset("tinyimagenet", tmp_path / "tiny-imagenet-200", cache_dir=cache)
    assert again.train.fingerprint() == data.train.fingerprint()
    in_memory = load_dataset("tinyimagenet", tmp_path, cache=False)
    assert isinstance(in_memory.train.images, np.ndarray)
    assert in_memory.test.fingerprint() == data.test.fingerprint()


def test_tinyimagenet_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cs231n.stanford.edu/tiny-imagenet-200.zip"):
        load_dataset("tinyimagenet", tmp_path)
    base = write_tinyimagenet(tmp_path)
    bad = base / "train" / TINY_WNIDS[1] / "images" / f"{TINY_WNIDS[1]}_0.JPEG"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetFormatError, match="cannot decode image") as err:
        load_dataset("tinyimagenet", tmp_path, cache=False)
    assert bad.name in str(err.value)
    bad.unlink()
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn09999999\t0\t0\t1\t1\n")
    with pytest.raises(DatasetFormatError, match="line 1"):
        load_dataset("tinyimagenet", tmp_path, cache=False)


# ------------------------------------------------------------------------------------------ ImageNet64


def test_imagenet64_npz(tmp_path):
    write_imagenet64(tmp_path)
    data = load_dataset("imagenet64", tmp_path, cache_dir=tmp_path / "cache")
    assert len(data.train) == 12 and len(data.test) == 5
    assert data.spec == dataset_spec("imagenet64")
    # uncompressed training batches are memory-mapped in place, the compressed val batch via the cache
    assert isinstance(data.train.images, ChunkedArray)
    assert all(isinstance(c, MappedArray) for c in data.train.images.chunks)
    assert isinstance(data.test.images, MappedArray) and len(list((tmp_path / "cache").glob("*.npy"))) == 1
    for split in (data.train, data.test):
        x, y = split.tensors()
        assert x.shape == (len(split), 3, 64, 64)
        one_based = y + 1
        for c in range(3):
            assert torch.equal((x[:, c, 5, 9] * 255).round().long(), (one_based + 50 * c) % 256)
        assert torch.all(x[:, 0, 0, 1] == 7 / 255)
    assert int(data.train.labels[0]) == 999 and int(data.train.labels[6]) == 0  # 1-based 1000 and 1
    # a memory-mapped dataset pickles as file locations, not as its pixels
    blob = pickle.dumps(data.train)
    assert len(blob) < 4000
    assert pickle.loads(blob).fingerprint() == data.train.fingerprint()


def test_imagenet64_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train_data_batch") as err:
        load_dataset("imagenet64", tmp_path)
    assert "image-net.org" in str(err.value)
    write_imagenet64(tmp_path)
    bad = tmp_path / "Imagenet64_train_npz" / "train_data_batch_2.npz"
    np.savez(bad, data=np.zeros((4, 3072), np.uint8), labels=[1, 2, 3, 4])
    with pytest.raises(DatasetFormatError, match="12288"):
        load_dataset("imagenet64", tmp_path, cache=False)
    np.savez(bad, data=np.zeros((2, 12288), np.uint8), labels=[0, 3])
    with pytest.raises(DatasetFormatError, match="1-based"):
        load_dataset("imagenet64", tmp_path, cache=False)
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(DatasetFormatError, match="train_data_batch_2") as err:
        load_dataset("imagenet64", tmp_path, cache=False)
    assert err.value.__cause__ is None


# ----------------------------------------------------------------------------------------------- MNIST


def test_mnist_idx_gz_and_plain(tmp_path):
    write_mnist(tmp_path)
    data = load_dataset("mnist", tmp_path)
    assert len(data.train) == 12 and len(data.test) == 7
    for split in (data.train, data.test):
        x, y = split.tensors()
        assert x.shape[1:] == (1, 28, 28)
        assert torch.equal((x[:, 0, 14, 3] * 255).round().long(), y * 25)
        assert torch.all(x[:, 0, 0, 27] == 1.0)


def test_mnist_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte") as err:
        load_dataset("mnist", tmp_path)
    assert "yann.lecun.com/exdb/mnist" in str(err.value)
    write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    labels = raw / "t10k-labels-idx1-ubyte"
    labels.write_bytes(_idx(np.zeros(7, np.uint8), 2051))
    with pytest.raises(DatasetFormatError, match="magic number 2051, expected 2049"):
        load_dataset("mnist", tmp_path)
    labels.write_bytes(_idx(np.zeros(7, np.uint8), 2049)[:-2])
    with pytest.raises(DatasetFormatError, match="header says"):
        load_dataset("mnist", tmp_path)


# ------------------------------------------------------------------------------------ digits and npz set


def test_digits_fixed_stratified_split():
    data = load_dataset("digits")
    assert len(data.train) == 1497 and len(data.test) == 300
    x, y = data.test.tensors()
    assert x.shape[1:] == (1, 8, 8) and float(x.max()) == 1.0 and float(x.min()) == 0.0
    assert torch.equal(x * 16, (x * 16).round())
    counts = torch.bincount(y, minlength=10)
    assert int(counts.min()) >= 29 and int(counts.max()) <= 31
    assert load_dataset("digits").test.fingerprint() == data.test.fingerprint()


def test_cifar10_npz_files(tmp_path):
    rng = np.random.default_rng(3)
    for name, n in (("a.npz", 30), ("b.npz", 10)):
        y = rng.integers(0, 10, n)
        x = np.zeros((n, 32, 32, 3), np.uint8)
        x[..., 1] = (y * 20)[:, None, None]
        np.savez(tmp_path / name, x=x, y=y, classes=np.array([f"c{i}" for i in range(10)]))
    data = load_dataset("cifar10-jpeg", train_file=tmp_path / "a.npz", test_file=tmp_path / "b.npz")
    assert len(data.train) == 30 and data.classes[3] == "c3"
    x, y = data.train.tensors()
    assert torch.equal((x[:, 1, 4, 4] * 255).round().long(), y * 20) and float(x[:, 0].max()) == 0.0
    with pytest.raises(DatasetNotFoundError, match="cifar10-jpeg-train10k.npz"):
        load_dataset("cifar10-jpeg", tmp_path)
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 3, 32, 32), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(DatasetFormatError, match="HWC"):
        load_dataset("cifar10-jpeg", tmp_path, train_file="a.npz", test_file="b.npz")


@pytest.mark.skipif(
    not (SHARED_DATA / "cifar10-jpeg-train10k.npz").is_file(),
    reason="the CIFAR-10 JPEG subset is not in $CCDIST_DATA (docs/data.md, 'CIFAR-10 JPEG subset')",
)
def test_real_cifar10_jpeg_subset():
    data = load_dataset("cifar10-jpeg", SHARED_DATA, val_split=1000)
    assert (len(data.train), len(data.val), len(data.test)) == (9000, 1000, 2000)
    assert torch.equal(torch.bincount(torch.from_numpy(data.val.labels)), torch.full((10,), 100))
    x, _ = next(iter(BatchIterator(data.test, 500)))
    mean = x.mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(dataset_spec("cifar10").mean), atol=0.03)


def test_unknown_name_and_option(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("svhn", tmp_path)
    with pytest.raises(ValueError, match="unknown option"):
        load_dataset("cifar10", tmp_path, shuffle=True)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nowhere")
    monkeypatch.setenv("CCDIST_DATA", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="set CCDIST_DATA or pass root=") as err:
        load_dataset("mnist")
    assert str(tmp_path) in str(err.value) and "yann.lecun.com" in str(err.value)


def test_no_root_searches_only_ccdist_data(tmp_path, monkeypatch):
    """Without root= and $CCDIST_DATA nothing is searched: not a ``shared/data`` folder beside the
    working directory or the checkout (a copy there must not be picked up silently)."""
    beside = tmp_path / "shared" / "data"
    write_cifar(beside)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.delenv("CCDIST_DATA", raising=False)
    assert default_data_dirs() == []
    with pytest.raises(DatasetNotFoundError, match="no root given") as err:
        load_dataset("cifar10")
    assert "cs.toronto.edu" in str(err.value)  # the download page
    monkeypatch.setenv("CCDIST_DATA", os.pathsep.join([str(tmp_path / "nowhere"), str(beside), str(beside)]))
    assert default_data_dirs() == [tmp_path / "nowhere", beside]
    assert load_dataset("cifar10").root == str(beside)


# ----------------------------------------------------------------------------------- validation split


def test_val_split_is_stratified_disjoint_and_deterministic():
    full = load_dataset("digits")
    data = load_dataset("digits", val_split=0.2, split_seed=5)
    assert len(data.val) == round(0.2 * 1497) and len(data.train) + len(data.val) == 1497
    rows = np.concatenate([data.train.rows, data.val.rows])
    assert np.array_equal(np.sort(rows), np.arange(1497))
    assert np.array_equal(data.val.labels, full.train.labels[data.val.rows])
    share = np.bincount(data.val.labels, minlength=10) / np.bincount(full.train.labels, minlength=10)
    assert np.all(np.abs(share - 0.2) < 0.02)
    again = load_dataset("digits", val_split=0.2, split_seed=5)
    assert np.array_equal(again.val.rows, data.val.rows)
    other = load_dataset("digits", val_split=0.2, split_seed=6)
    assert not np.array_equal(other.val.rows, data.val.rows)
    assert len(load_dataset("digits", val_split=100).val) == 100
    assert load_dataset("digits", val_split=0).val is None
    with pytest.raises(ValueError, match="val_split"):
        load_dataset("digits", val_split=1.5)
    with pytest.raises(ValueError, match="need 0 < n_val < n"):
        load_dataset("digits", val_split=1497)
    train, val = stratified_split(np.array([0, 0, 0, 1, 1, 1]), 2, seed=0)
    assert sorted(np.array([0, 0, 0, 1, 1, 1])[val].tolist()) == [0, 1]


# ------------------------------------------------------------------------------------------ augmentation


def _reference_augment(x, pad, flip, seed, mode):
    """Per-image pad / crop / flip with torch ops, replaying augment_batch's random draws."""
    g = torch.Generator().manual_seed(seed)
    b = x.shape[0]
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=g) if pad else torch.zeros(b, 1, dtype=torch.long)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=g) if pad else torch.zeros(b, 1, dtype=torch.long)
    flips = torch.rand(b, 1, generator=g) < 0.5 if flip else torch.zeros(b, 1, dtype=torch.bool)
    out = []
    h, w = x.shape[2:]
    for i in range(b):
        padded = F.pad(x[i : i + 1].float(), (pad,) * 4, mode=mode)
        crop = padded[0, :, dy[i, 0] : dy[i, 0] + h, dx[i, 0] : dx[i, 0] + w]
        out.append(crop.flip(-1) if bool(flips[i, 0]) else crop)
    return torch.stack(out).to(x.dtype)


@pytest.mark.parametrize("mode", ["replicate", "constant"])
@pytest.mark.parametrize("pad,flip", [(2, True), (4, True), (3, False), (0, True)])
def test_augment_batch_matches_per_image_reference(mode, pad, flip):
    x = torch.randint(0, 256, (16, 3, 12, 10), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    out = augment_batch(x, pad, flip, torch.Generator().manual_seed(7), mode)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, _reference_augment(x, pad, flip, 7, mode))


def test_augment_batch_bounds_determinism_and_errors():
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    a = augment_batch(x, 2, True, torch.Generator().manual_seed(3))
    b = augment_batch(x, 2, True, torch.Generator().manual_seed(3))
    c = augment_batch(x, 2, True, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    for i in range(64):  # edge padding only repeats pixels of the same image and channel
        assert set(a[i, 0].flatten().tolist()) <= set(x[i, 0].flatten().tolist())
    assert torch.equal(augment_batch(x, 0, False), x)
    with pytest.raises(ValueError, match="B, C, H, W"):
        augment_batch(x[0], 2, True)
    with pytest.raises(ValueError, match="padding_mode"):
        augment_batch(x, 2, True, padding_mode="reflect")


# ------------------------------------------------------------------------------------------- iteration


def _collect(it):
    return [(x.clone(), y.clone()) for x, y in it]


def test_batch_iterator_order_augmentation_and_resume():
    data = load_dataset("digits")
    spec = DatasetSpec(
        "toy", (1, 8, 8), 10, (0.0,), (1.0,), crop_padding=1, padding_mode="replicate", flip=True
    )
    train = ArrayDataset(data.train.images, data.train.labels, spec, scale=16.0)
    it = BatchIterator(train, 100, shuffle=True, augment=True, seed=3)
    assert len(it) == 15
    epoch0 = _collect(it)
    assert it.epoch == 1  # a full pass advances the epoch
    epoch1 = _collect(it)
    assert sum(len(y) for _, y in epoch0) == 1497 and epoch0[-1][1].shape == (97,)
    assert not torch.equal(epoch0[0][1], epoch1[0][1])
    # each epoch visits every example once
    assert torch.equal(
        torch.cat([y for _, y in epoch0]).sort().values, torch.from_numpy(np.sort(train.labels))
    )
    # same seed and epoch: identical batches; resuming mid-epoch reproduces the tail
    again = BatchIterator(train, 100, shuffle=True, augment=True, seed=3)
    again.set_epoch(1, start_batch=10)
    tail = _collect(again)
    assert len(tail) == 5
    for (xa, ya), (xb, yb) in zip(tail, epoch1[10:], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # augmented batches stay in [0, 1] and differ from the clean ones
    clean = BatchIterator(train, 100, shuffle=True, augment=False, seed=3, drop_last=True)
    clean_batches = _collect(clean)
    assert len(clean_batches) == 14
    assert torch.equal(clean_batches[0][1], epoch0[0][1])
    assert not torch.equal(clean_batches[0][0], epoch0[0][0])
    assert all(0 <= float(x.min()) and float(x.max()) <= 1 for x, _ in epoch0)


def test_batch_iterator_without_shuffle_is_the_dataset():
    data = load_dataset("digits")
    x_all, y_all = data.test.tensors()
    batches = _collect(BatchIterator(data.test, 64))
    assert torch.equal(torch.cat([x for x, _ in batches]), x_all)
    assert torch.equal(torch.cat([y for _, y in batches]), y_all)
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(data.test, 0)
    with pytest.raises(ValueError, match="non-negative"):
        BatchIterator(data.test, 8, seed=-1)


def test_dataloader_compatibility_and_subsets():
    data = load_dataset("digits")
    loader = torch.utils.data.DataLoader(data.test, batch_size=50, shuffle=False)
    x, y = next(iter(loader))
    assert x.shape == (50, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, data.test.tensors()[0][:50])
    sub = data.test.subset([5, 1, 2])
    assert len(sub) == 3 and torch.equal(sub[0][0], data.test[5][0])
    assert torch.equal(sub[-1][0], data.test[2][0])
    assert sub.fingerprint() != data.test.fingerprint()
    with pytest.raises(IndexError):
        sub[3]
    with pytest.raises(ValueError, match="labels must lie"):
        ArrayDataset(np.zeros((2, 1, 8, 8), np.uint8), np.array([0, 10]), dataset_spec("digits"))

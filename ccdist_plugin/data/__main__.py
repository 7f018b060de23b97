"""Measure dataset load time and memory, or write a synthetic ImageNet64-sized npz.

    python -m ccdist_plugin.data measure cifar10-jpeg [--root DIR] [--epochs 1] [--batch-size 256]
    python -m ccdist_plugin.data synthetic-imagenet64 OUT_DIR [--train-images 128116] [--val-images 50000]
    python -m ccdist_plugin.data synthetic-tinyimagenet OUT_DIR [--per-class 500] [--val-images 10000]

``measure`` prints one JSON object: load time, resident memory (total, anonymous, file-backed) before and
after loading, the peak during loading, and the time of full augmented passes with :class:`BatchIterator`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def _proc_status() -> dict[str, float]:
    """Memory fields of /proc/self/status in MiB (Linux); empty elsewhere."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _evict_from_page_cache(root: Path) -> int:
    """posix_fadvise(DONTNEED) on the dataset's files, so the first pass reads from disk; returns bytes."""
    total = 0
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            total += path.stat().st_size
    return total


def measure(args: argparse.Namespace) -> dict:
    import torch

    from . import BatchIterator, load_dataset

    torch.set_num_threads(args.threads)
    options = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    result: dict = {"dataset": args.name, "root": args.root, "threads": args.threads}
    if args.cold and args.root:
        result["evicted_bytes"] = _evict_from_page_cache(Path(args.root))
    result["mem_before_MiB"] = _proc_status()
    result["peak_reset"] = _reset_peak()
    start = time.perf_counter()
    data = load_dataset(args.name, args.root, **options)
    result["load_s"] = round(time.perf_counter() - start, 3)
    result["mem_after_load_MiB"] = _proc_status()
    result["sizes"] = {"train": len(data.train), "test": len(data.test)}
    result["storage"] = type(data.train.images).__name__
    result["uint8_bytes_train"] = int(np.prod(data.train.images.shape))
    iterator = BatchIterator(data.train, args.batch_size, shuffle=True, augment=True, seed=0)
    passes = []
    for epoch in range(args.epochs):
        iterator.set_epoch(epoch)
        start = time.perf_counter()
        seen = 0
        for x, _ in iterator:
            seen += len(x)
        seconds = time.perf_counter() - start
        passes.append({"epoch_s": round(seconds, 3), "images_per_s": round(seen / seconds)})
    result["augmented_passes"] = passes
    result["mem_after_passes_MiB"] = _proc_status()
    return result


def synthetic_imagenet64(args: argparse.Namespace) -> dict:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for name, n in (("train_data_batch_1.npz", args.train_images), ("val_data.npz", args.val_images)):
        data = np.empty((n, 3 * 64 * 64), dtype=np.uint8)
        for start in range(0, n, 8192):  # random pixels, chunked to bound temporary memory
            stop = min(n, start + 8192)
            data[start:stop] = rng.integers(0, 256, (stop - start, data.shape[1]), dtype=np.uint8)
        labels = rng.integers(1, 1001, n)
        save = np.savez_compressed if args.compressed else np.savez
        save(out / name, data=data, labels=labels)
        del data
        written[name] = (out / name).stat().st_size
    return {"out_dir": str(out), "bytes": written}


def synthetic_tinyimagenet(args: argparse.Namespace) -> dict:
    """A full-size ``tiny-imagenet-200`` folder of smooth random JPEGs (8x8 noise upsampled to 64x64)."""
    from PIL import Image

    base = Path(args.out_dir) / "tiny-imagenet-200"
    rng = np.random.default_rng(0)
    wnids = [f"n{i:08d}" for i in range(args.classes)]
    (base / "val" / "images").mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")

    def save(path: Path) -> None:
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        small.resize((64, 64), Image.BILINEAR).save(path, quality=90)

    for wnid in wnids:
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.per_class):
            save(folder / f"{wnid}_{i}.JPEG")
    lines = []
    for j in range(args.val_images):
        save(base / "val" / "images" / f"val_{j}.JPEG")
        lines.append(f"val_{j}.JPEG\t{wnids[j % len(wnids)]}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return {"out_dir": str(base), "train_images": len(wnids) * args.per_class, "val_images": args.val_images}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ccdist_plugin.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="load a dataset and report time and memory")
    m.add_argument("name")
    m.add_argument("--root", default=None)
    m.add_argument("--cache-dir", default=None)
    m.add_argument("--epochs", type=int, default=1, help="augmented passes over the training set to time")
    m.add_argument("--batch-size", type=int, default=256)
    m.add_argument("--threads", type=int, default=1, help="torch threads")
    m.add_argument("--cold", action="store_true", help="evict the root's files from the page cache first")
    s = sub.add_parser("synthetic-imagenet64", help="write random ImageNet64-format npz batches")
    s.add_argument("out_dir")
    s.add_argument("--train-images", type=int, default=128116, help="one real training batch holds 128116")
    s.add_argument("--val-images", type=int, default=50000)
    s.add_argument("--compressed", action="store_true", help="np.savez_compressed instead of np.savez")
    t = sub.add_parser("synthetic-tinyimagenet", help="write a random tiny-imagenet-200 folder of JPEGs")
    t.add_argument("out_dir")
    t.add_argument("--classes", type=int, default=200)
    t.add_argument("--per-class", type=int, default=500)
    t.add_argument("--val-images", type=int, default=10000)
    args = parser.parse_args(argv)
    commands = {
        "measure": measure,
        "synthetic-imagenet64": synthetic_imagenet64,
        "synthetic-tinyimagenet": synthetic_tinyimagenet,
    }
    result = commands[args.command](args)
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fast, deterministic, resumable mini-batch iteration over an :class:`ArrayDataset`."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .arrays import ArrayDataset
from .augment import augment_batch

__all__ = ["BatchIterator", "derive_seed"]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on ``keys`` (non-negative ints), via ``numpy.random.SeedSequence``."""
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seeds must be non-negative, got {keys}")
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class BatchIterator:
    """Yield ``(x float32 (B, C, H, W) in [0, 1], y int64 (B,))`` batches of a dataset.

    Each batch is one fancy-index into the uint8 storage, then (when ``augment``) one vectorized
    :func:`augment_batch` on the uint8 batch, a transfer to ``device`` and a single float conversion.

    Determinism: the order of epoch ``e`` is a permutation drawn from ``derive_seed(seed, e, 0)``, and batch
    ``b`` of epoch ``e`` is augmented with a generator seeded by ``derive_seed(seed, e, b + 1)``. So a batch
    depends only on (seed, epoch, batch index), never on what ran before; to resume mid-epoch call
    ``set_epoch(epoch, start_batch=b)``. After a complete pass the epoch advances by one by itself, so
    plain repeated iteration also gives fresh orders; calling ``set_epoch`` before each epoch is the
    explicit way.

    Args:
        dataset: an :class:`ArrayDataset`.
        batch_size: examples per batch.
        shuffle: draw a new order per epoch (else dataset order).
        augment: apply the dataset spec's random crop / flip (training only; never for evaluation).
        seed: non-negative base seed.
        drop_last: drop the final incomplete batch.
        device: where the yielded tensors live.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
    ):
        if not isinstance(dataset, ArrayDataset):
            raise TypeError(f"BatchIterator needs an ArrayDataset, got {type(dataset).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        derive_seed(seed)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.device = torch.device(device)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration produce epoch ``epoch``, starting at batch ``start_batch``."""
        if epoch < 0 or start_batch < 0:
            raise ValueError(f"epoch and start_batch must be >= 0, got {epoch}, {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """Positions of the dataset in the order epoch ``epoch`` visits them."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng(derive_seed(self.seed, epoch, 0)).permutation(n).astype(np.int64)

    def batch(
        self, positions: np.ndarray, epoch: int = 0, batch_index: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Load, augment (if enabled) and convert the examples at ``positions``."""
        images, labels = self.dataset.uint8_batch(positions)
        x = torch.from_numpy(images)
        if self.augment:
            spec = self.dataset.spec
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, batch_index + 1))
            x = augment_batch(x, spec.crop_padding, spec.flip, generator, spec.padding_mode)
        y = torch.from_numpy(labels)
        if self.device.type != "cpu":
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
        return x.float().div_(self.dataset.scale), y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self.start_batch
        order = self.order(epoch)
        for b in range(start, len(self)):
            yield self.batch(order[b * self.batch_size : (b + 1) * self.batch_size], epoch, b)
        self.epoch, self.start_batch = epoch + 1, 0

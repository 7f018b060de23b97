"""The training data of a run, whatever the user passed (a ``ccdist_plugin.data`` dataset, a
``BatchIterator``, a torch ``Dataset`` or ``DataLoader``, an ``(x, y)`` tuple of tensors): deterministic
per-epoch batches for :class:`~ccdist_plugin.trainer.Trainer`, and the validation examples."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ccdist_plugin import distributed

__all__ = ["EpochBatches", "validation_tensors"]


class EpochBatches:
    """Deterministic per-epoch batches over whatever the user passed, on the training device (under
    torchrun: this rank's share)."""

    def __init__(
        self,
        data: Any,
        batch_size: int,
        shuffle: bool,
        augment: bool,
        seed: int,
        device,
        channels_last: bool = False,
    ):
        from ccdist_plugin.data import ArrayDataset, BatchIterator

        self.device = device
        self.channels_last = channels_last
        self.fingerprint: str | None = None
        self._loader = None
        self._dataset = None
        self._iterator = None
        if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
            data = TensorDataset(*data)
        if isinstance(data, ArrayDataset):
            self.fingerprint = data.fingerprint()
            self._iterator = BatchIterator(data, batch_size, shuffle, augment, seed, False, device)
        elif isinstance(data, BatchIterator):
            self.fingerprint = data.dataset.fingerprint()
            self._iterator = data
        elif isinstance(data, DataLoader):
            self._loader = data
        elif isinstance(data, Dataset):
            self._dataset = data
        else:
            raise ValueError(
                f"training data must be a ccdist_plugin.data dataset, a BatchIterator, a torch Dataset or "
                f"DataLoader, or an (x, y) tuple of tensors; got {type(data).__name__}"
            )
        self._iterator = distributed.shard_batches(self._iterator)  # this rank's slices under torchrun
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed

    def __len__(self) -> int:
        if self._iterator is not None:
            return len(self._iterator)
        if self._loader is not None:
            return len(self._loader)
        return math.ceil(len(self._dataset) / self.batch_size)

    def epoch(self, epoch: int):
        if self._iterator is not None:
            self._iterator.set_epoch(epoch)
            source = self._iterator
        elif self._loader is not None:
            source = self._loader
        else:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            source = DataLoader(self._dataset, self.batch_size, shuffle=self.shuffle, generator=gen)
        for x, y in source:
            if self.channels_last and x.ndim == 4:  # moved and laid out in one copy
                x = x.to(self.device, memory_format=torch.channels_last)
            yield x.to(self.device), y.to(self.device)


def validation_tensors(data: Any, size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first ``size`` examples of a validation set as (x, y) tensors (None when no data)."""
    if data is None or size <= 0:
        return None
    from ccdist_plugin.data import ArrayDataset, BatchIterator

    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0][:size], data[1][:size]
    if isinstance(data, BatchIterator):
        data = data.dataset
    if isinstance(data, ArrayDataset):
        x, y = data.uint8_batch(np.arange(min(size, len(data))))
        return torch.from_numpy(x).float().div_(data.scale), torch.from_numpy(y)
    source = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=256, shuffle=False)
    xs, ys, n = [], [], 0
    for x, y in source:
        xs.append(x)
        ys.append(y)
        n += x.shape[0]
        if n >= size:
            break
    if not xs:
        return None
    return torch.cat(xs)[:size], torch.cat(ys)[:size]

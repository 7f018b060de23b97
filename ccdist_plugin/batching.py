"""The one batching helper: contiguous slices of at most ``size`` examples covering ``range(n)``,
used wherever a batch is processed in pieces (certification, evaluation, attacks, validation)."""

from __future__ import annotations

__all__ = ["batch_slices"]


def batch_slices(n: int, size: int) -> list[slice]:
    """``[slice(0, size), slice(size, 2·size), ..., slice(·, n)]``: the last one may be shorter.

    >>> batch_slices(5, 2)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]

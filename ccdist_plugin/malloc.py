"""Keep freed memory for reuse on CPU (glibc): large element-wise ops and CC-IBP steps get faster.

glibc's ``malloc`` serves blocks above its mmap threshold (at most 32 MiB) with fresh ``mmap``
pages and returns them to the OS on ``free``. A CNN-7 activation at batch 128 (128×64×32×32 floats,
33.5 MiB) is just above that maximum, so every such tensor a training step creates is
page-faulted in from scratch. ``python benchmarks/speed.py --only allocator`` measures the effect
in alternated fresh processes (docs/RESULTS.md): ``x + x`` on such a tensor took 0.34× the time, a
CC-IBP CNN-7 step 0.86× and a plain step 0.99×; interval bounds create about three times the
activations of a plain forward pass, so they gain most. PyTorch's CPU-performance guide
recommends the same cure through jemalloc or tcmalloc.

This changes process-wide allocator settings, so the library never calls it on import; the
``ccdist`` command line calls it on Linux (``--no-malloc-tuning`` opts out) and scripts may call
it first thing. The cost is memory the process keeps after its peak instead of returning it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["retain_freed_memory"]

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_MAX = -4


def retain_freed_memory(enable: bool = True) -> bool:
    """Serve large allocations from the heap and keep freed heap memory (glibc ``mallopt``);
    ``enable=False`` puts glibc's default limits back (memory the heap already holds stays there).

    Returns True when the settings were applied, False where they do not apply (not Linux, or
    a C library without ``mallopt``, e.g. musl); never raises.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if not enable:  # glibc's defaults: up to 65536 mmap-served blocks, trim above 128 KiB
        return bool(mallopt(_M_MMAP_MAX, 65536)) and bool(mallopt(_M_TRIM_THRESHOLD, 128 * 1024))
    # no mmap-served blocks; trim the heap only when 2 GiB lie free at its top
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))

"""Keeping freed memory in the process while training, instead of handing it back each step.

glibc's malloc serves blocks over 32 MiB (and, after a free, smaller ones above its
adaptive threshold) with fresh `mmap`s and returns them with `munmap`; the kernel then
zeroes new pages for the next step's copy. A training step of the ISBI 2012 `cpu` recipe
allocates and frees such blocks (oneDNN's and Eigen's convolution buffers) about 30 times:
some 8,000 page faults a step, the kernel time that a slow virtual machine multiplies
(BENCHMARKS.md, "Training throughput against the machine's peak"). Serving every block
from the heap and never trimming it turns them into about 600.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt's parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse, for the rest of this process.

    Returns False where the C library has no `mallopt` (musl, macOS): nothing changes there.
    The process's resident memory then stays near its peak, which is what a training
    process reaches in its first steps anyway.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; the largest int keeps the top of the heap however big.
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))

"""train.keep_freed_memory: with it, large blocks come from the heap and stay there."""

import ctypes
import ctypes.util
import subprocess
import sys
from pathlib import Path

import pytest


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc_mallinfo2():
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
    except (OSError, AttributeError, TypeError):
        return None
    function.restype = MallInfo2
    return function


needs_glibc = pytest.mark.skipif(_glibc_mallinfo2() is None, reason="needs glibc >= 2.33 (mallinfo2)")

# In a fresh process, so that this test's malloc settings do not reach the others'.
# Prints: bytes mapped apart from the heap while a 64 MiB block is held, then the heap's
# free bytes after it is freed.
PROBE = """
import sys
import numpy as np
from pipeline.training import allocator
from tests.test_allocator import _glibc_mallinfo2
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory()
mallinfo2 = _glibc_mallinfo2()
block = np.ones(64 * 2**20, dtype=np.uint8)
mapped = mallinfo2().hblkhd
del block
print(mapped, mallinfo2().fordblks)
"""


def _probe(mode: str) -> tuple[int, int]:
    output = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])  # where `tests.test_allocator` imports from
    return tuple(map(int, output.stdout.split()))


@needs_glibc
def test_a_large_block_comes_from_the_heap_and_stays_there_once_kept():
    mapped, free_after = _probe("keep")
    assert mapped < 2**20  # the 64 MiB block was not a separate mapping
    assert free_after >= 64 * 2**20  # freed, it stays in the heap for the next step


@needs_glibc
def test_without_it_glibc_maps_a_large_block_apart_and_returns_it():
    mapped, free_after = _probe("default")
    assert mapped >= 64 * 2**20 and free_after < 64 * 2**20

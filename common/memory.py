"""The C allocator, set for a process that frees and reallocates d-sized arrays every round.

glibc hands blocks over its mmap threshold (dynamic, 128 KiB to 32 MiB) straight back to the
kernel when freed and trims the heap's free top, so the next round's arrays of the same size
come back as fresh pages: at d = 1e6 every float64 temporary then costs ~2,000 page faults,
and numpy's `abs`, `partition` or `x - h` run 2-4x slower than on reused memory (measured:
TopK at d = 1e6, 7.5 ms -> 3.5 ms). Keeping freed memory in the heap costs nothing in peak
RSS in a worker, whose temporaries are few and equal-sized, and is what `MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=...` do from the environment; here it is done with mallopt(3) at start,
so containers and remote workers get it without setting anything.

That is for workers (and the in-process engine). In the coordinator, blocks kept without bound
fragment around gRPC's buffers of every stream (at n = 8, d = 1e6 a peak of 336-376 MB against
the 357 MB its memory target allows), yet left to glibc it refaults the round's buffers (the
received updates, x, the broadcast) every round. So it gets a bounded setting: blocks under
8 MiB (a 4 MiB chunk, a d = 1e6 float32 vector) from the heap, and up to 48 MiB of freed heap
kept. Measured at n = 8, d = 1e6 (GD, 3 runs each): 13.7 -> 16.7 rounds/s at a peak of
307-335 MB (277-309 before); at n = 8, d = 1e7 the peak stays at 0.79 GB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
KEEP_BYTES = 1 << 30  # free memory at the heap's top is returned to the kernel above this only
ROUND_MMAP_BYTES = 8 << 20  # the coordinator: blocks from this size on are mmap'd (and returned at once)
ROUND_TRIM_BYTES = 48 << 20  # ... and free heap beyond this, at its top, is returned
OPT_OUT = "THREEPC_ALLOCATOR"  # "glibc": leave the allocator as it is (benchmarks compare both)


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and keep what is freed for reuse; True if it was set.

    Nothing changes off glibc, when `THREEPC_ALLOCATOR=glibc`, or when the user set any
    MALLOC_* variable (theirs wins).
    """
    return _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_BYTES))


def keep_round_buffers() -> bool:
    """The coordinator's setting: blocks under ROUND_MMAP_BYTES from the heap, and up to
    ROUND_TRIM_BYTES of freed heap kept; True if it was set (same conditions as above)."""
    return _mallopt((M_MMAP_THRESHOLD, ROUND_MMAP_BYTES), (M_TRIM_THRESHOLD, ROUND_TRIM_BYTES))


def _mallopt(*settings: tuple[int, int]) -> bool:
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT) == "glibc":
        return False
    if any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # musl and others: no mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = [mallopt(param, value) for param, value in settings]  # each one, whatever the others did
    return all(applied)

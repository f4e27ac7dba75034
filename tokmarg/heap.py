"""Hand freed heap memory back to the system between the reduce's big steps.

glibc keeps what Python and numpy free in its arenas, so the peak RSS of a long reduce creeps up
with the small objects of earlier steps (the dataset scan's million strings, Arrow's per-file
buffers). Arrow's pool releases what it keeps; ``malloc_trim(0)`` returns malloc's free pages
(elsewhere than glibc, macOS or musl, that part does nothing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

import pyarrow as pa


@functools.cache
def _trim():  # noqa: ANN202 - a ctypes function or None
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release(collect: bool = True) -> None:
    """Give the freed heap pages back: Arrow's pool's and (where the C library can) malloc's;
    ``collect`` first collects garbage (a fifth of a second with torch and transformers imported:
    between big steps, not between small ones, where arrays are freed as they go)."""
    if collect:
        gc.collect()
    pa.default_memory_pool().release_unused()
    trim = _trim()
    if trim is not None:
        trim(0)

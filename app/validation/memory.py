"""Keep the process's memory from ratcheting up after giant lines.

glibc's malloc serves large blocks with mmap and returns them to the system when freed, but
each time such a block is freed it raises its mmap threshold (up to 32 MiB), so the next
multi-megabyte buffers (an 8 MiB line, its parsed text, the tokenizer's working memory) come
from the heap and stay resident after they are freed: a file of several lines near the 8 MiB
limit then leaves the process 40-50 MB larger. Fixing the threshold at 1 MiB keeps large
buffers in mmap, so they go back to the system as soon as they are freed.

This is a process-wide setting with no effect on correctness; it is applied once, on glibc
only (elsewhere it does nothing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from typing import Final

__all__ = ["MMAP_THRESHOLD_BYTES", "return_large_blocks_to_the_system"]

MMAP_THRESHOLD_BYTES: Final = 1024 * 1024
_M_MMAP_THRESHOLD: Final = -3  # from glibc's <malloc.h>

_lock = threading.Lock()
_applied = False


def return_large_blocks_to_the_system() -> bool:
    """Fix glibc's mmap threshold (once); whether it is in effect."""
    global _applied
    with _lock:
        if _applied or not sys.platform.startswith("linux"):
            return _applied
        _applied = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # musl or another libc: nothing to tune
            return True
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        return True

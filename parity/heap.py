"""Give the C heap's free memory back to the system between the phases of a run.

glibc keeps memory that numpy and torch free, and does not return it: after it frees a block
above its mmap threshold it raises the threshold (up to 32 MiB), so the next big arrays of a
real-size run (a 512-token step's (512, C) records, each 1.5-8 MiB) come from the heap, where a
freed block stays counted in the process's RSS. Measured on a 0.1B model, `parity run --ids
random:512:5`: after the reference's and the replay's steps the run's own RSS stayed ~0.4 GB
above what it held, which is a third of issue 9's whole allowance (1.3x weights + file).
``malloc_trim(0)`` returns those free pages; where there is no glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_libc = None


def trim_heap() -> None:
    """Return the heap's free pages to the system (glibc ``malloc_trim``); a no-op elsewhere."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or None)
            _libc = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)

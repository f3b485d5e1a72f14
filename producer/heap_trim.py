"""Give the C heap's free pages back to the kernel after a burst of parsing.

Reading a target binary (ELF, .gopclntab, DWARF, disassembly) allocates tens of MB for a
moment, on the parsing thread's own glibc arena. Freed, that memory stays resident: glibc
returns only the top of the main heap on its own. `malloc_trim(0)` releases the free pages
of every arena (madvise), so the agent's resident size goes back to where it was. Called
once per binary parsed, not per process: it costs about a millisecond.
"""

from __future__ import annotations

import ctypes
import gc
from functools import cache
from typing import Any


@cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to do
        return None


def release_free_memory() -> None:
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)

"""Keep freed heap memory for reuse: large request messages land in warm pages, not fresh ones.

gRPC hands every request to Python as one `bytes` object (512 KiB for a batch-8 `convnet` request),
and a frontend holds several at once. With glibc's defaults, a freed allocation above 128 KiB goes back
to the kernel (munmap), or the heap's top is trimmed once more than twice that is free there, so the
next request's bytes are faulted in and zeroed page by page again: ~100 page faults and about a quarter
of a frontend's CPU per 512 KiB request (`bench/results/large_requests.md`). Raising glibc's trim
threshold, and the size above which it maps allocations directly, lets the heap keep that memory for
the next request.
The cost is memory: each process may hold up to `keep_bytes` freed at the heap's top (per malloc arena)
instead of returning it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger("trtserve")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)


def keep_freed_heap(keep_bytes: int) -> bool:
    """Let this process keep up to `keep_bytes` of freed heap (glibc's trim threshold) and take
    allocations up to half of it (at most 32 MiB) from the heap instead of fresh mappings. 0 keeps
    glibc's defaults. False when it could not be applied (not glibc, or glibc refused the values)."""
    if keep_bytes <= 0:
        return False
    if platform.libc_ver()[0] != "glibc":
        log.info("--heap-keep-bytes needs glibc's malloc; this C library keeps its own defaults")
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    mmap_threshold = min(keep_bytes // 2, MAX_MMAP_THRESHOLD)
    # Setting either parameter also stops glibc from moving the mmap threshold by itself.
    applied = bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold))
                   and libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(keep_bytes)))
    if applied:
        log.debug("keeping up to %d bytes of freed heap, allocations up to %d bytes from the heap",
                  keep_bytes, mmap_threshold)
    else:
        log.warning("glibc refused --heap-keep-bytes %d; its malloc defaults stay", keep_bytes)
    return applied

"""glibc malloc settings for processes that allocate and free large buffers at a high rate (the server's front
processes, the load generator; not the workers, where no gain was measured).

Every image the front receives passes through several buffers of its size (150 KB at 224x224 uint8; gRPC's
message, the deserialised request), freed again a few milliseconds later. glibc gives the top of a heap back to
the operating system as soon as more than M_TRIM_THRESHOLD (128 KB by default, then adjusted) is free there, so
under load the same pages are returned and faulted back in (zeroed by the kernel) over and over: a cost per byte
received, paid on the event loop. Keeping up to `trim_bytes` free per heap removes that churn (`make bench`,
front_cost), and serving allocations up to `mmap_bytes` from the heap keeps a message of many images (4.8 MB for
32 at 224x224) from being mapped and faulted in afresh each time. Memory is still given back: the server's
MemorySweeper (server/resnet_serve/server/memory.py) calls malloc_trim once traffic goes quiet, which ignores the
threshold.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # mallopt(3) parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
TRIM_BYTES = 32 << 20  # at 64 MB the server stayed over 100 MB larger after test_hostile's attacks (CI)
MMAP_BYTES = 32 << 20  # HEAP_MAX_SIZE / 2 on 64-bit, a cap some glibc versions enforce (2.36 here takes any)


def keep_freed_memory(trim_bytes: int = TRIM_BYTES, mmap_bytes: int = MMAP_BYTES) -> bool:
    """Set glibc's trim and mmap thresholds for this process. False where the C library is not glibc, or refuses
    the mmap threshold: nothing is changed then."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it, and only glibc's mallopt takes these)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not mallopt(M_MMAP_THRESHOLD, mmap_bytes):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, trim_bytes))

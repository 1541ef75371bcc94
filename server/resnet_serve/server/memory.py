"""Gives the memory of large requests back to the operating system after a burst of them.

A refused or failed request's payload (up to --max-message-bytes, often held two or three times: gRPC's buffers,
the deserialised message, the bytes handed to the decoder) can stay alive in reference cycles (an exception's
traceback holds the frame that holds the request) until Python's cyclic collector happens to run, which it does by
object count, not size; and what is freed stays in the C allocator's arenas. Measured on the tiny model: forty
8 MB images, mostly refused, left the front process 300-800 MB larger for good. So once requests totalling
`threshold_bytes` have been received, or any request and then a quiet second, a sweep collects cycles and asks
glibc to return free pages. The front keeps what it frees while it is busy (common/malloc.py: up to 32 MB per heap
instead of glibc's 128 KB), so the quiet second after any traffic is when that memory goes back: at most one
sweep per quiet spell, none under steady load.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)


def _malloc_trim() -> None:
    """glibc's malloc_trim(0): release free memory of every arena (a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


class MemorySweeper:
    def __init__(self, threshold_bytes: int = 64 * 1024 * 1024, interval_s: float = 1.0,
                 quiet_bytes: int = 1):
        self.threshold_bytes, self.interval_s, self.quiet_bytes = threshold_bytes, interval_s, quiet_bytes
        self.received = 0  # request bytes since the last sweep
        self.sweeps = 0

    @staticmethod
    def freeze_startup() -> None:
        """Move everything alive at start (modules, descriptors, the model's state) out of the collector's sight,
        so a sweep scans only what requests created since: a few ms instead of 40-200 ms of stalled loop."""
        gc.collect()
        gc.freeze()

    def note(self, nbytes: int) -> None:
        """A request of nbytes arrived (called on the event loop, where gRPC deserialises)."""
        self.received += nbytes

    async def run(self) -> None:
        """Sweep every `threshold_bytes` received, and once a burst is over (an interval without requests)
        after at least `quiet_bytes` (by default any request at all)."""
        loop = asyncio.get_running_loop()
        seen = 0
        while True:
            await asyncio.sleep(self.interval_s)
            quiet, seen = self.received == seen, self.received
            if self.received >= self.threshold_bytes or (quiet and self.received >= self.quiet_bytes):
                self.received = seen = 0
                self.sweeps += 1
                gc.collect()
                await loop.run_in_executor(None, _malloc_trim)  # ctypes releases the GIL for the call

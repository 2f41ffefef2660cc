"""Shared-memory tensor transport: one arena per model worker, owned and carved up by the parent.

The parent creates the segment, allocates one block per request (inputs, then room for the outputs),
and frees the block in `finally` once the worker's answer has been read (or the worker died). The
worker only reads and writes inside the blocks named in the messages it receives.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import uuid
from multiprocessing import shared_memory
from pathlib import Path

from service.errors import ResourceExhausted

ALIGN = 64  # cache-line alignment keeps numpy views of every tensor aligned


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def segment_prefix() -> str:
    """Name prefix of every segment this process creates (leak checks look for it in /dev/shm)."""
    return f"trtserve-{os.getpid()}-"


class Arena:
    """A shared-memory segment plus a first-fit allocator with coalescing, used from one event loop."""

    def __init__(self, size: int) -> None:
        self.size = _align(size)
        self._shm = shared_memory.SharedMemory(
            name=segment_prefix() + uuid.uuid4().hex[:12], create=True, size=self.size
        )
        self.buf = self._shm.buf
        self._free: list[tuple[int, int]] = [(0, self.size)]  # sorted (offset, size)
        self._waiters: list[asyncio.Future[None]] = []
        self.used = 0

    @property
    def name(self) -> str:
        return self._shm.name

    def try_alloc(self, nbytes: int) -> int | None:
        """Offset of a new block of at least `nbytes`, or None when no free range is large enough."""
        need = _align(max(nbytes, 1))
        for i, (off, size) in enumerate(self._free):
            if size >= need:
                if size == need:
                    del self._free[i]
                else:
                    self._free[i] = (off + need, size - need)
                self.used += need
                return off
        return None

    async def alloc(self, nbytes: int, wait_s: float | None) -> int:
        """Allocate, waiting for other requests to free space; ResourceExhausted when it cannot fit."""
        if _align(max(nbytes, 1)) > self.size:
            raise ResourceExhausted(
                f"request needs {nbytes} bytes of shared memory but the model's arena holds {self.size}; "
                "raise --shm-bytes-per-model"
            )
        loop = asyncio.get_running_loop()
        deadline = None if wait_s is None else loop.time() + wait_s
        while (off := self.try_alloc(nbytes)) is None:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                raise ResourceExhausted(
                    f"shared memory for this model stayed full for {wait_s:.1f}s "
                    f"({self.used} of {self.size} bytes in use)"
                ) from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return off

    def free(self, offset: int, nbytes: int) -> None:
        """Return a block and wake the requests waiting for space."""
        self._release(offset, nbytes)
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _release(self, offset: int, nbytes: int) -> None:
        size = _align(max(nbytes, 1))
        self.used -= size
        i = bisect.bisect(self._free, (offset, 0))
        self._free.insert(i, (offset, size))
        # coalesce with the next and the previous free range
        if i + 1 < len(self._free) and offset + size == self._free[i + 1][0]:
            self._free[i] = (offset, size + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            prev_off, prev_size = self._free[i - 1]
            self._free[i - 1] = (prev_off, prev_size + self._free[i][1])
            del self._free[i]

    def close(self) -> None:
        """Unmap and remove the segment (idempotent)."""
        if self._shm is None:
            return
        self.buf = None
        try:
            self._shm.close()
        except BufferError:
            pass  # a view is still alive somewhere; unlinking still removes the name
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass
        self._shm = None


def attach(name: str) -> shared_memory.SharedMemory:
    """Open the parent's segment from a worker process (the parent alone unlinks it)."""
    return shared_memory.SharedMemory(name=name, create=False)


def remove_segments_of(pid: int) -> int:
    """Remove the segments a dead process created (its arenas); how many there were."""
    removed = 0
    for path in Path("/dev/shm").glob(f"trtserve-{pid}-*"):
        try:
            segment = shared_memory.SharedMemory(name=path.name, create=False)
        except FileNotFoundError:
            continue
        segment.close()
        segment.unlink()
        removed += 1
    return removed

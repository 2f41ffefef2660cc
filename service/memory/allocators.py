"""Where the buffer pool's bytes come from: plain host memory, or CUDA device memory plus pinned staging.

An allocator hands out `Buffer`s: host-visible bytes (page-aligned host memory, or pinned host staging)
and, on a GPU, a device allocation of the same size. It also owns the stream the copies and the
engines run on, and `sync()` waits for work queued there, so that the pool frees a buffer only after
the work on it has finished. `CudaAllocator` imports cuda-python lazily: CPU machines never import it.
"""

from __future__ import annotations

import mmap
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service.errors import InternalError, ResourceExhausted

PAGE = mmap.PAGESIZE
DEVICE_ALIGNMENT = 256  # cudaMalloc's guaranteed alignment; reported bytes are rounded to it


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass
class Buffer:
    """One allocation: `host` (uint8, host-visible: host or pinned memory), `device_ptr` (0 when the
    allocator has no device memory) and the bytes it holds by memory kind."""

    nbytes: int
    host: np.ndarray
    device_ptr: int = 0
    held: dict[str, int] = field(default_factory=dict)


class Allocator(Protocol):
    """What the pool needs from an allocator. `memories` lists the kinds it allocates from."""

    memories: tuple[str, ...]
    device_id: int | None

    def footprint(self, nbytes: int) -> dict[str, int]: ...
    def allocate(self, nbytes: int) -> Buffer: ...
    def free(self, buf: Buffer) -> None: ...
    def sync(self) -> None: ...
    def upload(self, buf: Buffer, nbytes: int) -> None: ...
    def download(self, buf: Buffer, nbytes: int) -> None: ...
    def close(self) -> None: ...


class HostAllocator:
    """Page-aligned host memory (anonymous mmap) for engines that run on the CPU. Freed when the pool
    and every view of it let go; copies are no-ops since host memory is what the engine reads."""

    memories = ("host",)
    device_id = None

    def footprint(self, nbytes: int) -> dict[str, int]:
        return {"host": round_up(nbytes, PAGE)}

    def allocate(self, nbytes: int) -> Buffer:
        size = round_up(nbytes, PAGE)
        if size == 0:
            return Buffer(0, np.empty(0, np.uint8), 0, {"host": 0})
        try:
            host = np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)
        except (OSError, MemoryError) as exc:
            raise ResourceExhausted(f"cannot allocate {size} bytes of host memory: {exc}") from exc
        return Buffer(nbytes, host, 0, {"host": size})

    def free(self, buf: Buffer) -> None:
        # Views still held elsewhere keep the mapping alive (no use after free); the pool forgets it.
        buf.host = np.empty(0, np.uint8)

    def sync(self) -> None:
        pass

    def upload(self, buf: Buffer, nbytes: int) -> None:
        pass

    def download(self, buf: Buffer, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


class _Pinned:
    """Pinned host memory exposed to numpy; freed when the last numpy view of it goes away."""

    def __init__(self, ptr: int, nbytes: int, free: Any) -> None:
        self.__array_interface__ = {"data": (ptr, False), "shape": (nbytes,), "typestr": "|u1", "version": 3}
        weakref.finalize(self, free, ptr)


class CudaAllocator:
    """Device memory (cudaMalloc) plus a pinned host staging buffer (cudaMallocHost) per binding, one
    non-blocking stream for the engines and the copies around their runs (`stream`, its handle as an int),
    and a second one for the rows copied straight from pinned host memory (`copy_stream`, `upload_from`):
    those copies, made while the engine still runs the batch before, overlap its run on the GPU instead
    of queueing behind it (a batch-64 `convnet` upload: 4 MiB, ~0.08 ms of a 1.2 ms run on the H200;
    served +2%, bench/results/gpu/runs/47). A run waits for its rows through an event (`uploads_queued`,
    `wait`). The caller makes sure no run still reads the buffers it copies into: the worker prepares a
    set only after the batch that last used it ended."""

    memories = ("device", "pinned")

    def __init__(self, device_id: int = 0, stream: int | None = None) -> None:
        from cuda.bindings import runtime as cudart  # lazily: CPU machines never import cuda

        self._rt = cudart
        self.device_id = device_id
        self._check(cudart.cudaSetDevice(device_id), "cudaSetDevice")
        self._own_stream = stream is None
        if stream is None:
            stream = self._new_stream()
        self.stream = stream
        self.copy_stream: int | None = self._new_stream()
        # One event per input set of a pool (at most two): a set's rows are queued while the other runs.
        self._events = [int(self._check(cudart.cudaEventCreateWithFlags(cudart.cudaEventDisableTiming),
                                        "cudaEventCreate")) for _ in range(2)]
        self._registered: dict[int, int] = {}  # start -> end of host ranges pinned with register_host

    def _new_stream(self) -> int:
        rt = self._rt
        return int(self._check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate"))

    def _check(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self._rt.cudaError_t.cudaSuccess:
            name = self._rt.cudaGetErrorName(err)[1].decode()
            if err == self._rt.cudaError_t.cudaErrorMemoryAllocation:
                raise ResourceExhausted(f"{what}: out of memory on cuda:{self.device_id} ({name})")
            raise InternalError(f"{what} failed on cuda:{self.device_id}: {name}")
        return rest[0] if len(rest) == 1 else tuple(rest)

    def footprint(self, nbytes: int) -> dict[str, int]:
        return {"device": round_up(nbytes, DEVICE_ALIGNMENT), "pinned": round_up(nbytes, PAGE)}

    def allocate(self, nbytes: int) -> Buffer:
        held = self.footprint(nbytes)
        if nbytes == 0:
            return Buffer(0, np.empty(0, np.uint8), 0, dict.fromkeys(held, 0))
        rt = self._rt
        self._check(rt.cudaSetDevice(self.device_id), "cudaSetDevice")  # per thread in CUDA
        dev = int(self._check(rt.cudaMalloc(held["device"]), f"cudaMalloc({held['device']})"))
        try:
            pinned = int(self._check(rt.cudaMallocHost(held["pinned"]), f"cudaMallocHost({held['pinned']})"))
        except Exception:
            rt.cudaFree(dev)
            raise
        host = np.asarray(_Pinned(pinned, held["pinned"], rt.cudaFreeHost))
        return Buffer(nbytes, host, dev, held)

    def free(self, buf: Buffer) -> None:
        """Frees the device memory now (call `sync` first); pinned memory goes with its last view."""
        if buf.device_ptr:
            self._check(self._rt.cudaFree(buf.device_ptr), "cudaFree")
            buf.device_ptr = 0
        buf.host = np.empty(0, np.uint8)

    def sync(self) -> None:
        """Wait for everything queued on both streams."""
        for stream in (self.copy_stream, self.stream):
            self._check(self._rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def upload(self, buf: Buffer, nbytes: int) -> None:
        """Queue a host-to-device copy of the first `nbytes` on the stream."""
        if nbytes:
            rt = self._rt
            self._check(rt.cudaMemcpyAsync(
                buf.device_ptr, buf.host.ctypes.data, nbytes,
                rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream,
            ), "cudaMemcpyAsync(H2D)")

    def download(self, buf: Buffer, nbytes: int) -> None:
        """Queue a device-to-host copy of the first `nbytes`; `sync()` before reading the host side."""
        if nbytes:
            rt = self._rt
            self._check(rt.cudaMemcpyAsync(
                buf.host.ctypes.data, buf.device_ptr, nbytes,
                rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream,
            ), "cudaMemcpyAsync(D2H)")

    def register_host(self, view: memoryview) -> None:
        """Page-lock memory the engine's inputs arrive in (a worker's shared-memory arenas), so that rows
        can be copied from it straight to the device (`upload_from`): no staging copy, DMA speed."""
        array = np.frombuffer(view, np.uint8)
        ptr = array.ctypes.data
        if ptr in self._registered:
            return
        rt = self._rt
        self._check(rt.cudaHostRegister(ptr, array.nbytes, rt.cudaHostRegisterDefault), "cudaHostRegister")
        # Replaced, not changed in place: the engine thread reads it (is_registered) meanwhile.
        self._registered = {**self._registered, ptr: ptr + array.nbytes}

    def unregister_host(self, view: memoryview) -> None:
        """Undo `register_host` (after `sync`: no copy from the range may still be queued)."""
        ptr = np.frombuffer(view, np.uint8).ctypes.data
        if ptr in self._registered:
            self._registered = {start: end for start, end in self._registered.items() if start != ptr}
            self._rt.cudaHostUnregister(ptr)

    def is_registered(self, ptr: int, nbytes: int) -> bool:
        """True when `ptr .. ptr + nbytes` lies in one range pinned by `register_host`."""
        return any(start <= ptr and ptr + nbytes <= end for start, end in self._registered.items())

    def upload_from(self, device_ptr: int, host_ptr: int, nbytes: int) -> None:
        """Queue a copy of `nbytes` from a registered host range to a device address on the copy stream
        (a run waits for it through `uploads_queued` and `wait`)."""
        if nbytes:
            rt = self._rt
            self._check(rt.cudaMemcpyAsync(device_ptr, host_ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                           self.copy_stream), "cudaMemcpyAsync(H2D)")

    def uploads_queued(self, side: int) -> int:
        """An event (input set `side`'s own) that completes when the copies queued on the copy stream so far
        are done; `wait` makes the engines' stream wait for it."""
        event = self._events[side]
        self._check(self._rt.cudaEventRecord(event, self.copy_stream), "cudaEventRecord")
        return event

    def wait(self, event: int) -> None:
        """Make the work queued on `stream` from now on wait for `event` (the GPU waits, not this thread)."""
        self._check(self._rt.cudaStreamWaitEvent(self.stream, event, 0), "cudaStreamWaitEvent")

    def close(self) -> None:
        """Wait for both streams; destroy the copy stream, the events, and the stream if this allocator
        created it; unpin registered ranges."""
        if self.stream is not None:
            self.sync()
            for ptr in self._registered:
                self._rt.cudaHostUnregister(ptr)
            self._registered = {}
            for event in self._events:
                self._rt.cudaEventDestroy(event)
            self._rt.cudaStreamDestroy(self.copy_stream)
            if self._own_stream:
                self._rt.cudaStreamDestroy(self.stream)
            self.stream = self.copy_stream = None

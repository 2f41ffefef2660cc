"""One growable set of input/output buffers per model, shared by all its engines.

The pool holds one buffer per pooled binding, sized for the largest batch seen (or more, with geometric
growth); a batch of b rows gets views of the first b rows. It never shrinks on its own. `max_pool_bytes`
caps the bytes it holds over all memory kinds: a batch that would need more fails with
RESOURCE_EXHAUSTED and leaves the existing buffers, and every smaller batch, working.

Only fixed-size tensors are pooled: a BYTES tensor or one with a variable (-1) non-batch dim has no
per-row size. `split_poolable` separates them; the caller passes such inputs as its own arrays (add
them to `BufferSet.inputs`) and gets such outputs from the engine (the registry returns them).

A `BufferSet` is valid until the next `views` call that grows the pool (growth frees the old buffers
once the allocator's stream is idle): take one per executed batch, use it, drop it.

With `input_sets=2` the pool holds two sets of input buffers (outputs stay one set): `views(rows, side)`
fills one side's inputs while an engine still reads the other's, so a worker can upload the next batch
while the current one runs (GPU pools: the device would otherwise wait for the upload). Both sides grow
together; growing needs no batch running on either (`fits` says whether a batch would grow it).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.datatypes import numpy_dtype
from service.errors import InternalError, ResourceExhausted
from service.memory.allocators import Allocator, Buffer, HostAllocator

MEMORIES = ("host", "pinned", "device")


@dataclass(frozen=True)
class PoolTensor:
    """A pooled binding: numpy dtype and the shape of one row (the dims after the batch dim)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


def split_poolable(specs: Iterable[Any]) -> tuple[list[PoolTensor], list[str]]:
    """Repository TensorSpecs (name, KServe datatype, dims) -> (pooled tensors, names left unpooled)."""
    pooled, unpooled = [], []
    for spec in specs:
        if spec.datatype == "BYTES" or any(d < 0 for d in spec.dims):
            unpooled.append(spec.name)
        else:
            pooled.append(PoolTensor(spec.name, numpy_dtype(spec.datatype), tuple(spec.dims)))
    return pooled, unpooled


@dataclass(frozen=True)
class DeviceView:
    """Rows of a device buffer: what a GPU engine binds (`ptr` is a device address)."""

    ptr: int
    dtype: np.dtype
    shape: tuple[int, ...]
    device_id: int

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)

    def __getitem__(self, rows: slice) -> DeviceView:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("device views slice rows contiguously")
        row_bytes = self.nbytes // self.shape[0] if self.shape[0] else 0
        stop = max(start, stop)
        return DeviceView(self.ptr + start * row_bytes, self.dtype, (stop - start, *self.shape[1:]),
                          self.device_id)


@dataclass
class BufferSet:
    """Views of the pool for one executed batch of `rows` rows. `inputs`/`outputs` are host-visible
    numpy views (host memory, or the pinned staging of a GPU pool); `device_inputs`/`device_outputs`
    are the device buffers (empty for a host pool). `upload()`/`download()` copy the rows between
    them on the allocator's stream; `download()` returns once the results are on the host. Inputs named
    in `uploaded` were put on the device by the caller (straight from pinned memory, on the allocator's copy
    stream): `upload()` skips them, and makes the stream wait for `ready`, the event they complete at."""

    rows: int
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    device_inputs: dict[str, DeviceView] = field(default_factory=dict)
    device_outputs: dict[str, DeviceView] = field(default_factory=dict)
    _allocator: Allocator | None = None
    _in: list[tuple[str, Buffer, int]] = field(default_factory=list)
    _out: list[tuple[str, Buffer, int]] = field(default_factory=list)
    uploaded: set[str] = field(default_factory=set)
    ready: Any = None

    def slice(self, start: int, stop: int) -> BufferSet:
        """Rows start..stop of every view (inputs added by the caller too); chunks do no copies."""
        def cut(views: dict[str, Any]) -> dict[str, Any]:
            return {name: v[start:stop] for name, v in views.items()}
        return BufferSet(stop - start, cut(self.inputs), cut(self.outputs),
                         cut(self.device_inputs), cut(self.device_outputs))

    def upload(self) -> None:
        """Queue the copy of the pooled input rows to the device (no-op for a host pool); the run queued
        after it also waits for the rows the caller uploaded."""
        if self.ready is not None:
            self._allocator.wait(self.ready)
        self._copy([c for c in self._in if c[0] not in self.uploaded], "upload")

    def download(self) -> None:
        """Copy the pooled output rows back from the device and wait for them (no-op for a host pool)."""
        self._copy(self._out, "download")
        if self._allocator is not None and self._out:
            self._allocator.sync()

    def _copy(self, copies: list[tuple[str, Buffer, int]], direction: str) -> None:
        if self._allocator is None:
            return
        for _, buf, nbytes in copies:
            if nbytes and not buf.device_ptr:
                raise InternalError("buffer set used after the pool grew (its buffers were freed)")
            getattr(self._allocator, direction)(buf, nbytes)


class BufferPool:
    """The growable per-model pool. `growth`: "exact" (rows = the batch) or "geometric" (at least
    twice the old rows, capped at `max_rows` and by `max_pool_bytes`). `input_sets`: 1, or 2 for
    uploading one batch while another runs (module docstring). Thread-safe."""

    def __init__(self, inputs: Sequence[PoolTensor], outputs: Sequence[PoolTensor], *,
                 growth: str = "geometric", max_pool_bytes: int | None = None,
                 max_rows: int | None = None, allocator: Allocator | None = None, model: str = "",
                 input_sets: int = 1) -> None:
        if growth not in ("geometric", "exact"):
            raise ValueError(f"growth must be geometric or exact, got {growth!r}")
        if input_sets not in (1, 2):
            raise ValueError(f"input_sets must be 1 or 2, got {input_sets}")
        names = [t.name for t in (*inputs, *outputs)]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tensor names in {names}")
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.growth, self.max_pool_bytes, self.max_rows = growth, max_pool_bytes, max_rows
        self.allocator: Allocator = allocator if allocator is not None else HostAllocator()
        self.model = model
        self.input_sets = input_sets
        self._lock = threading.Lock()
        self._rows = 0
        # (tensor name, side) -> buffer; outputs are all side 0
        self._buffers: dict[tuple[str, int], Buffer] = {}
        self._grows = 0
        # (rows, side) -> the views `_view` made for them: the same until the buffers change (grow, close)
        self._cached: dict[tuple[int, int], BufferSet] = {}

    @property
    def capacity_rows(self) -> int:
        return self._rows

    @property
    def grows(self) -> int:
        return self._grows

    def bytes_for(self, rows: int) -> int:
        """Bytes the pool would hold, over all memory kinds, at `rows` rows."""
        return sum(sum(self.allocator.footprint(rows * t.row_bytes).values()) for t, _ in self._bindings())

    def fits(self, batch: int) -> bool:
        """Whether `views(batch)` is served without growing the pool."""
        return batch <= self._rows

    def _bindings(self) -> list[tuple[PoolTensor, int]]:
        """Every (tensor, side) the pool holds a buffer for."""
        return [(t, side) for t in self.inputs for side in range(self.input_sets)] + [(t, 0) for t in self.outputs]

    def bytes_by_memory(self) -> dict[str, int]:
        """Bytes allocated now, by memory kind (host, pinned, device); always all three keys."""
        with self._lock:
            held = dict.fromkeys(MEMORIES, 0)
            for buf in self._buffers.values():
                for kind, n in buf.held.items():
                    held[kind] += n
            return held

    def views(self, batch: int, side: int = 0) -> BufferSet:
        """Views of `batch` rows of every pooled binding (inputs of set `side`), growing the pool first
        if it is smaller. ResourceExhausted when `max_pool_bytes` cannot hold the batch (the pool is
        left as it was)."""
        if batch < 0:
            raise ValueError(f"batch must be >= 0, got {batch}")
        if not 0 <= side < self.input_sets:
            raise ValueError(f"side must be in 0..{self.input_sets - 1}, got {side}")
        with self._lock:
            if batch > self._rows:
                self._grow(batch)
            views = self._cached.get((batch, side))
            if views is None:
                views = self._view(batch, side)
                if self._buffers:  # batch 0 of an empty pool gets fresh arrays each time
                    self._cached[(batch, side)] = views
        # Fresh dicts around the same views: callers add their unpooled inputs to them.
        return BufferSet(batch, dict(views.inputs), dict(views.outputs), dict(views.device_inputs),
                         dict(views.device_outputs), views._allocator, views._in, views._out)

    def _grow(self, batch: int) -> None:
        cap = self.max_pool_bytes
        need = self.bytes_for(batch)
        if cap is not None and need > cap:
            who = f"model '{self.model}': " if self.model else ""
            raise ResourceExhausted(
                f"{who}a batch of {batch} needs {need} bytes of buffer pool, over the model's "
                f"max_pool_bytes cap of {cap} (the pool holds {self.bytes_for(self._rows)} bytes "
                f"for {self._rows} rows); send smaller batches or raise max_pool_bytes"
            )
        target = batch if self.growth == "exact" else max(batch, 2 * self._rows)
        if self.max_rows is not None:
            target = max(batch, min(target, self.max_rows))
        if cap is not None and self.bytes_for(target) > cap:
            lo, hi = batch, target  # bytes_for(lo) fits, bytes_for(hi) does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if self.bytes_for(mid) <= cap else (lo, mid)
            target = lo
        new: dict[tuple[str, int], Buffer] = {}
        try:
            for t, side in self._bindings():
                new[(t.name, side)] = self.allocator.allocate(target * t.row_bytes)
        except BaseException:
            for buf in new.values():
                self.allocator.free(buf)
            raise
        old, self._buffers, self._rows = self._buffers, new, target
        self._cached.clear()
        self._grows += 1
        if old:
            self.allocator.sync()  # work queued on the old buffers must finish before they go
            for buf in old.values():
                self.allocator.free(buf)

    def _view(self, rows: int, side: int) -> BufferSet:
        alloc = self.allocator if self.allocator.device_id is not None else None
        sets: list[tuple[dict[str, np.ndarray], dict[str, DeviceView], list[tuple[str, Buffer, int]]]] = []
        for tensors, key_side in ((self.inputs, side), (self.outputs, 0)):
            host: dict[str, np.ndarray] = {}
            device: dict[str, DeviceView] = {}
            copies: list[tuple[str, Buffer, int]] = []
            for t in tensors:
                shape = (rows, *t.shape)
                buf = self._buffers.get((t.name, key_side))
                if buf is None:  # nothing allocated yet: only batch 0 gets here
                    host[t.name] = np.empty(shape, t.dtype)
                    continue
                nbytes = rows * t.row_bytes
                host[t.name] = buf.host[:nbytes].view(t.dtype).reshape(shape)
                if alloc is not None:
                    device[t.name] = DeviceView(buf.device_ptr, t.dtype, shape, int(alloc.device_id))
                    copies.append((t.name, buf, nbytes))
            sets.append((host, device, copies))
        (hin, din, cin), (hout, dout, cout) = sets
        return BufferSet(rows, hin, hout, din, dout, alloc, cin, cout)

    def close(self) -> None:
        """Free every buffer (after the stream is idle); the pool is empty afterwards."""
        with self._lock:
            if self._buffers:
                self.allocator.sync()
                for buf in self._buffers.values():
                    self.allocator.free(buf)
            self._buffers, self._rows = {}, 0
            self._cached.clear()

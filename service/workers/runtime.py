"""What a worker runs batches on: the model's engine registry and buffer pool.

A batch of requests is gathered row-wise straight into the pool's input buffers (`prepare`), executed
by the registry (`execute`: it picks, builds and reuses engines by capacity), and each request's rows are
read back out of the pool's output buffers. Models without a batch dimension bypass registry and pool.

A GPU pool holds two sets of input buffers, so the worker can prepare the next batch (queue its uploads)
while the engine runs the current one on the other set (`can_overlap`); the device then goes from one
batch to the next without waiting for the Python that gathers a batch, and rows from the frontends'
pinned arenas are copied on their own stream while the current batch computes.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from service.datatypes import numpy_dtype
from service.engines.base import Engine, EngineBuilder
from service.engines.plan_cache import PlanCache
from service.engines.policy import from_config
from service.engines.registry import EngineRegistry
from service.errors import ConfigError, InternalError, ResourceExhausted, ServeError
from service.memory.allocators import HostAllocator
from service.memory.pool import BufferPool, BufferSet, split_poolable
from service.metrics import WorkerStats
from service.repository import ModelSpec
from service.workers.direct import DirectLane

if TYPE_CHECKING:
    from service.workers.worker import WorkerOptions

log = logging.getLogger("trtserve.worker")
CLOSE_BUILDS_WAIT_S = 60.0  # longest `close` waits for engine builds still running


@dataclass
class Item:
    """One request of a batch: its input arrays (views of shared memory) and, after the run, its outputs."""

    rows: int
    inputs: dict[str, np.ndarray]
    queued_s: float = 0.0
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    error: ServeError | None = None


@dataclass
class Prepared:
    """A batch `prepare` gathered into the pool (input set `side`), for `execute` on any thread. `bufs`
    is None when the items run one by one: no batch dimension, or the merged batch is over the pool cap."""

    items: list[Item]
    bufs: BufferSet | None = None
    side: int = 0
    input_s: float = 0.0


@dataclass
class Execution:
    """One engine execution: the requests it served and its seconds per phase."""

    items: list[Item]
    input_s: float = 0.0
    infer_s: float = 0.0
    output_s: float = 0.0

    @property
    def rows(self) -> int:
        return sum(i.rows for i in self.items)


class ModelRuntime:
    """Runs batches for one model inside its worker; reports engine and pool figures to `stats`."""

    def __init__(self, spec: ModelSpec, options: WorkerOptions, stats: WorkerStats) -> None:
        self.spec = spec
        self.stats = stats
        self._allocator = self._make_allocator()
        self._builder = self._make_builder(options)
        self._engine: Engine | None = None
        self.pool: BufferPool | None = None
        self.registry: EngineRegistry | None = None
        self._request_s: float | None = None  # without a batch dimension: recent seconds per request
        self.direct: DirectLane | None = None  # single requests straight on pool and engine, where it can
        if spec.max_batch_size == 0:
            self._engine = self._builder.build(1)
            return
        policy = from_config(spec.config.engine_policy, options.default_policy)
        pooled_in, unpooled_in = split_poolable(spec.inputs)
        self._can_pad = not unpooled_in  # spare rows exist only in pooled buffers
        pooled_out, _ = split_poolable(spec.outputs)
        self.pool = BufferPool(pooled_in, pooled_out, growth=policy.pool_growth,
                               max_pool_bytes=policy.max_pool_bytes, max_rows=spec.max_batch_size,
                               allocator=self._allocator, model=spec.name,
                               input_sets=2 if spec.use_gpu else 1)
        self._side = 0  # the input set the next batch is prepared in
        self._device_engines = False  # whether rows may go straight to the device: set once an engine lives
        cache = PlanCache(options.engine_cache_dir, self._on_event) if options.engine_cache_dir else None
        self.registry = EngineRegistry(self._builder, policy, spec.max_batch_size, cache, self._on_event,
                                       prime=self._prime)
        self.registry.warm_up()
        if not self.registry.live_capacities():
            self._first_engine()
        self._device_engines = self.registry.binds_device_buffers()
        self._grows = 0
        self.refresh_gauges()
        self.direct = DirectLane.for_runtime(self)

    def _first_engine(self) -> None:
        """Build the first engine (capacity for one row) and run one zero row through it, so a model that
        cannot run here fails to load instead of failing its first request."""
        self._run_batch(self._gather([Item(1, self._zeros(1))], side=0))

    def _zeros(self, rows: int) -> dict[str, np.ndarray]:
        """Inputs of `rows` rows of zeros (empty strings for BYTES; variable dims as 1)."""
        return {t.name: (np.full((rows, *(max(d, 1) for d in t.dims)), b"", dtype=object)
                         if t.datatype == "BYTES"
                         else np.zeros((rows, *(max(d, 1) for d in t.dims)), numpy_dtype(t.datatype)))
                for t in self.spec.inputs}

    def _prime(self, engine: Engine, capacity: int) -> None:
        """The registry's prime: one run of a new engine at its full capacity on zeros, on the build
        thread, before the engine takes batches (and outside the pool, which batches are using)."""
        engine.run(self._zeros(capacity))

    def _make_allocator(self) -> Any:
        """Device buffers with pinned staging for models on a GPU, page-aligned host memory otherwise."""
        if self.spec.use_gpu:
            from service.memory.allocators import CudaAllocator

            return CudaAllocator(self.spec.gpu_device)
        return HostAllocator()

    def _make_builder(self, options: WorkerOptions) -> EngineBuilder:
        """The engine builder for the model's backend; imports only the backend in use."""
        if self.spec.backend == "onnxruntime":
            from service.engines.onnxruntime_backend import OnnxRuntimeBuilder

            return OnnxRuntimeBuilder(self.spec, intra_op_threads=options.intra_op_threads,
                                      spinning=options.intra_op_spinning,
                                      stream=getattr(self._allocator, "stream", None))
        if self.spec.backend == "tensorrt":
            from service.engines.tensorrt_backend import TensorRTBuilder

            return TensorRTBuilder.from_spec(self.spec, cache_dir=options.engine_cache_dir,
                                             device=self.spec.gpu_device,
                                             stream=getattr(self._allocator, "stream", None))
        raise ConfigError(f"model '{self.spec.name}': backend '{self.spec.backend}' is not supported")

    def _on_event(self, kind: str, **fields: Any) -> None:
        # Called from build threads too; WorkerStats is thread-safe.
        if kind == "build":
            self.stats.record_build(fields["reason"], float(fields.get("duration_s", 0.0)))
        elif kind == "build_failed":
            # Counted as reason "failed"; the engines already live keep serving.
            log.error("model %s: building an engine of capacity %s failed (retry in %.0fs): %s", self.spec.name,
                      fields.get("capacity"), fields.get("retry_in_s", 0.0), fields.get("error"))
            self.stats.record_build("failed", float(fields.get("duration_s", 0.0)))
        elif kind in ("plan_cache_invalid", "plan_load_failed", "plan_cache_write_failed"):
            log.warning("model %s: %s: %s", self.spec.name, kind, fields.get("why") or fields.get("error"))

    def refresh_gauges(self) -> None:
        """Engine and pool gauges, sampled from the compute loop."""
        if self.registry is None or self.pool is None:
            return
        s = self.registry.stats()
        self.stats.set_engines(s["engines_live"], s["max_capacity"], s["engine_device_bytes"])
        self.stats.set_pool(self.pool.bytes_by_memory(), self.pool.max_pool_bytes or 0)
        if self.pool.grows > self._grows:
            self.stats.record_pool_grow(self.pool.grows - self._grows)
            self._grows = self.pool.grows

    def run(self, items: list[Item]) -> list[Execution]:
        """Execute the items, as one batch where possible; sets each item's outputs, or its error.
        Returns the executions that ran (for statistics)."""
        return self.execute(self.prepare(items))

    def can_overlap(self) -> bool:
        """Whether a batch may be prepared while another one runs: there is a second input set and the
        pool holds the largest batch (growing frees the buffers the running batch uses)."""
        if self.registry is None:
            return True  # no pool: nothing is shared between batches
        return self.pool.input_sets == 2 and self.pool.fits(self.spec.max_batch_size)

    def prepare(self, items: list[Item]) -> Prepared:
        """Gather the items' rows into the next input set (on a GPU: the uploads are queued on the
        pool's stream, ahead of the run). ResourceExhausted when one request alone is over the pool cap."""
        if self.registry is None:
            return Prepared(items)
        side, self._side = self._side, (self._side + 1) % self.pool.input_sets
        try:
            return self._gather(items, side)
        except ResourceExhausted:
            if len(items) == 1:
                raise
            return Prepared(items, side=side)  # the merged batch is over the pool cap: one by one

    def execute(self, prepared: Prepared, detach: bool = False) -> list[Execution]:
        """Run a prepared batch; sets each item's outputs (views of the pool until the next batch; with
        `detach`, views of one copy of the batch's outputs, which the next batch leaves alone), or its
        error. Returns the executions that ran."""
        if self.registry is None:  # no batch dimension: one request per execution
            done = []
            for item in prepared.items:
                t0 = time.perf_counter()
                item.outputs = self._engine.run(item.inputs)
                seconds = time.perf_counter() - t0
                done.append(Execution([item], infer_s=seconds))
                self._request_s = seconds if self._request_s is None else 0.8 * self._request_s + 0.2 * seconds
            return done
        if prepared.bufs is not None:
            return [self._run_batch(prepared, detach)]
        # Each request alone may still fit the cap. Its outputs are copied out of the pool, which the
        # next request's run reuses.
        done = []
        for item in prepared.items:
            try:
                done.append(self._run_batch(self._gather([item], prepared.side)))
                item.outputs = {name: array.copy() for name, array in item.outputs.items()}
            except ServeError as exc:
                item.error = exc
        return done

    def _gather(self, items: list[Item], side: int) -> Prepared:
        """Views of input set `side` for the items' rows, filled with them."""
        t0 = time.perf_counter()
        bufs = self._views(sum(i.rows for i in items), side)
        starts = list(itertools.accumulate((i.rows for i in items), initial=0))  # np.cumsum: 5 us more
        for t in self.spec.inputs:
            if t.name in bufs.inputs and self._upload_direct(t.name, bufs, items, starts):
                continue
            if t.name in bufs.inputs:
                view = bufs.inputs[t.name]
                for item, start in zip(items, starts):
                    view[start:start + item.rows] = item.inputs[t.name]
            else:
                bufs.inputs[t.name] = np.concatenate([i.inputs[t.name] for i in items])
        if bufs.uploaded:
            bufs.ready = self._allocator.uploads_queued(side)
        return Prepared(items, bufs, side, time.perf_counter() - t0)

    def _run_batch(self, prepared: Prepared, detach: bool = False) -> Execution:
        """Execute a gathered batch and point each item at its output rows (of a copy, with `detach`)."""
        items, bufs = prepared.items, prepared.bufs
        rows = sum(i.rows for i in items)
        t1 = time.perf_counter()
        extra = self.registry.execute(rows, bufs)
        t2 = time.perf_counter()
        pooled = {name: view[:rows].copy() if detach else view[:rows] for name, view in bufs.outputs.items()}
        outputs = {**pooled, **extra}
        for name, array in outputs.items():
            if array.shape[0] != rows:
                raise InternalError(f"model '{self.spec.name}' returned {array.shape[0]} rows for output "
                                    f"'{name}' but the batch had {rows}")
        start = 0
        for item in items:
            item.outputs = {name: array[start:start + item.rows] for name, array in outputs.items()}
            start += item.rows
        return Execution(items, prepared.input_s, t2 - t1, time.perf_counter() - t2)

    def expected_seconds(self, rows: int) -> float | None:
        """How long a batch of `rows` is expected to run (None: unknown, or it would wait for a build).
        Without a batch dimension: one request, from the recent ones."""
        return self.registry.expected_seconds(rows) if self.registry is not None else self._request_s

    def register_shared(self, buf: memoryview) -> None:
        """Pin a shared-memory arena requests arrive in, where the pool is on a GPU, so that their rows go
        straight to the device (see `_upload_direct`); without it they are staged (one more copy)."""
        if self.pool is None or not hasattr(self._allocator, "register_host"):
            return
        try:
            self._allocator.register_host(buf)
        except ServeError as exc:
            log.warning("model %s: cannot pin shared memory (%s); inputs are staged", self.spec.name, exc.message)

    def unregister_shared(self, buf: memoryview) -> None:
        """Undo `register_shared` (between batches: nothing may still be copying from it)."""
        if self.pool is not None and hasattr(self._allocator, "unregister_host"):
            self._allocator.sync()
            self._allocator.unregister_host(buf)

    def _upload_direct(self, name: str, bufs: BufferSet, items: list[Item], starts: list[int]) -> bool:
        """Queue each request's rows of input `name` from pinned shared memory straight into the device
        buffer, on the allocator's copy stream (the run waits for them: `_gather` records the event). False,
        changing nothing, unless the pool is on a GPU, its engines read the device buffers (not the host
        views: BYTES models), and every request's array is contiguous, of the pool's dtype, and pinned."""
        device = bufs.device_inputs.get(name)
        if device is None or not self._device_engines or not getattr(self._allocator, "is_registered", None):
            return False
        arrays = [item.inputs[name] for item in items]
        if not all(a.dtype == device.dtype and a.flags.c_contiguous
                   and self._allocator.is_registered(a.ctypes.data, a.nbytes) for a in arrays):
            return False
        row_bytes = device.dtype.itemsize * int(np.prod(device.shape[1:]))
        for array, start in zip(arrays, starts):
            self._allocator.upload_from(device.ptr + int(start) * row_bytes, array.ctypes.data, array.nbytes)
        bufs.uploaded.add(name)
        return True

    def _views(self, rows: int, side: int) -> BufferSet:
        """Pool views for a batch of `rows`: as many rows as the engine runs it at (padding engines run
        their capacity), or just `rows` when the pool cap leaves no room for the spare rows."""
        padded = self.registry.rows_for(rows) if self._can_pad else rows
        if padded > rows:
            try:
                return self.pool.views(padded, side)
            except ResourceExhausted:
                pass
        return self.pool.views(rows, side)

    def empty_outputs(self) -> dict[str, np.ndarray]:
        """Outputs of a 0-row request: nothing is built or run."""
        return {t.name: np.empty((0, *(max(d, 0) for d in t.dims)), dtype=numpy_dtype(t.datatype))
                for t in self.spec.outputs}

    def close(self) -> None:
        """Close the engines, the pool and the allocator. A build still running creates its session on the
        allocator's stream, so the allocator waits for it (at most CLOSE_BUILDS_WAIT_S, then it is left
        open: the process is ending) instead of destroying the stream under it (a crash in ONNX Runtime)."""
        building = False
        if self.registry is not None:
            self.registry.close()
            building = not self.registry.wait_for_builds(CLOSE_BUILDS_WAIT_S)
            if building:
                log.warning("model %s: an engine build still runs after %.0f s; its CUDA stream is left open",
                            self.spec.name, CLOSE_BUILDS_WAIT_S)
        for part in (self._engine, self.pool, None if building else self._allocator):
            if part is not None:
                part.close()

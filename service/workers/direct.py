"""The worker's direct lane: a request that runs by itself on arrival goes straight from the frontend's
arena into the pool's rows and through the live engine on a binding made once per row count.

Through the general path (input arrays, Item, Prepared, BufferSet, the registry's choice, the engine's
binding lookup, Execution) a `tiny` request cost the worker ~160 µs of CPU, isolated at 8 in flight,
where the engine's own run takes ~7 and a worker that only received, ran a fixed binding and answered
took ~55 (bench/results/profile.md, session 10). The lane is that short path, keeping what the general
path guarantees: the rows run in the pool's buffers, on the engine the registry chose for their count,
held for the run (a retired engine is not closed under it) and timed for the registry's estimates; a
binding is remade when the pool grows or the live engines change. It serves host pools whose tensors
are all pooled (fixed-size, no variable dims) on engines that can `bind`; anything else, and any
request it does not recognise, takes the general path, which also reports what is wrong with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from service.memory.pool import split_poolable
from service.workers.protocol import InputSlot

if TYPE_CHECKING:
    from service.workers.runtime import ModelRuntime

_MAX_PLANS = 64  # row counts with a binding; clients send a handful of batch sizes


@dataclass(slots=True)
class _Plan:
    """A binding of one engine to the pool's rows for one row count."""

    held: Any  # the registry's slot it was made for
    grows: int  # the pool's `grows` then: growing frees the buffers it points into
    run: Callable[[], None]
    inputs: list[tuple[memoryview, tuple[int, ...], int]]  # per input in spec order: its rows' bytes, shape, nbytes
    outputs: dict[str, np.ndarray]  # the pool's output rows, by name


class DirectLane:
    """Runs single requests of one model straight on its pool and live engine (see the module doc)."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self._registry = runtime.registry
        self._pool = runtime.pool
        self._names = [t.name for t in runtime.spec.inputs]
        self._plans: dict[int, _Plan | None] = {}  # rows -> plan; None: the engine cannot bind
        self._generation = -1  # of the registry's live engines, when the plans were made

    @classmethod
    def for_runtime(cls, runtime: ModelRuntime) -> DirectLane | None:
        """The lane of a runtime that it can serve: a batching model on a host pool holding every input
        and output (no BYTES, no variable dims); None otherwise."""
        spec = runtime.spec
        if runtime.registry is None or runtime.pool is None or spec.use_gpu or runtime.pool.input_sets != 1:
            return None
        if split_poolable(spec.inputs)[1] or split_poolable(spec.outputs)[1]:
            return None
        return cls(runtime)

    def run(self, buf: memoryview, inputs: Sequence[InputSlot],
            rows: int) -> tuple[dict[str, np.ndarray], float, float] | None:
        """Run one request of `rows` rows whose inputs lie in `buf` where `inputs` say. Returns its outputs
        (views of the pool's rows, valid until the next run) and the seconds spent copying the inputs in
        and running; None when the lane does not take it (nothing chosen yet for `rows`, a padding
        engine, an engine that cannot bind, inputs not exactly as the spec and `rows` imply)."""
        registry = self._registry
        if registry.generation != self._generation:
            self._plans.clear()  # bindings of engines that are gone would keep them alive
            self._generation = registry.generation
        held = registry.hold(rows)
        if held is None:
            return None
        seconds = None
        try:
            plan = self._plans.get(rows)
            if plan is None and rows in self._plans:
                return None  # the engine cannot bind
            if plan is None or plan.held is not held or plan.grows != self._pool.grows:
                plan = self._plan(held, rows)
                if plan is None:
                    return None
            start = time.perf_counter()
            if len(inputs) != len(plan.inputs):
                return None
            for index, (slot, (dest, want_shape, want_nbytes)) in enumerate(zip(inputs, plan.inputs)):
                got, shape, offset, nbytes = slot
                if got != index or shape != want_shape or nbytes != want_nbytes or offset + nbytes > buf.nbytes:
                    return None
                dest[:] = buf[offset:offset + nbytes]
            copied = time.perf_counter()
            plan.run()
            seconds = time.perf_counter() - copied
            return plan.outputs, copied - start, seconds
        finally:
            registry.release(held, rows, seconds)

    def _plan(self, held: Any, rows: int) -> _Plan | None:
        """Bind the held engine to the pool's rows for `rows` (growing the pool if it is smaller)."""
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        bufs = self._pool.views(rows)
        bind = getattr(held.engine, "bind", None)
        run = bind(bufs.inputs, bufs.outputs) if bind is not None else None
        if run is None:
            self._plans[rows] = None
            return None
        views = [bufs.inputs[name] for name in self._names]
        plan = _Plan(held, self._pool.grows, run,
                     [(memoryview(v).cast("B"), v.shape, v.nbytes) for v in views], dict(bufs.outputs))
        self._plans[rows] = plan
        return plan

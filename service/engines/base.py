"""The two interfaces every backend implements: an `Engine` that runs batches, and an `EngineBuilder`
that makes one engine per capacity.

Capacity contract: an engine built for capacity M serves any batch 1..M (for TensorRT its optimization
profile spans batch 1..M; ONNX Runtime is shape-dynamic anyway). The engine only enforces that bound;
which capacities exist, which engine serves a batch and when an engine is released is decided by the
engine registry, never by an engine or a builder.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Engine(Protocol):
    """A runnable model instance for batches 1..`capacity`.

    `run` takes one array per model input (leading dim = batch, all inputs the same batch) and returns
    one array per model output, in the model spec's order. A batch above `capacity` raises
    `service.errors.InvalidArgument`; the caller splits such a batch or asks the registry for a larger
    engine. `run` may be called from any thread; `close` is called by the registry once no work is in
    flight, releases what the engine holds (sessions, device memory) and is idempotent.
    """

    capacity: int

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns a new dict keyed by output name."""
        ...

    def close(self) -> None:
        """Release the engine's resources; later `run` calls fail."""
        ...


@runtime_checkable
class EngineBuilder(Protocol):
    """Makes engines for one model. `backend` names it ("onnxruntime", "tensorrt") for metrics and the
    plan-cache key. `build(capacity)` returns a ready engine serving batches 1..capacity; it may be slow
    (TensorRT) and is called off the request path by the registry."""

    backend: str

    def build(self, capacity: int) -> Engine:
        """Build (or load from a cache) an engine for batches 1..capacity."""
        ...

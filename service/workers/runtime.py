"""What a worker runs a request on: the model's engine (and, with batching, its registry and pool)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from service.datatypes import numpy_dtype
from service.engines.base import Engine, EngineBuilder
from service.errors import ConfigError, InternalError
from service.repository import ModelSpec

if TYPE_CHECKING:
    from service.workers.worker import WorkerOptions


def make_builder(spec: ModelSpec, options: WorkerOptions) -> EngineBuilder:
    """The engine builder for the model's backend; imports only the backend in use."""
    if spec.backend == "onnxruntime":
        from service.engines.onnxruntime_backend import OnnxRuntimeBuilder

        return OnnxRuntimeBuilder(spec, intra_op_threads=options.intra_op_threads)
    raise ConfigError(f"model '{spec.name}': backend '{spec.backend}' is not supported by this server")


class ModelRuntime:
    """Runs requests for one model inside its worker."""

    def __init__(self, spec: ModelSpec, options: WorkerOptions) -> None:
        self.spec = spec
        self._builder = make_builder(spec, options)
        self._engine: Engine = self._builder.build(max(spec.max_batch_size, 1))

    def execute(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """Run one request; returns the requested outputs, checked to have one row per input row."""
        rows = next(iter(inputs.values())).shape[0] if self.spec.max_batch_size > 0 else None
        if rows == 0:  # an empty batch needs no engine
            return {name: _empty(self.spec, name) for name in output_names}
        outputs = self._engine.run(inputs)
        if rows is not None:
            for name in output_names:
                if outputs[name].shape[:1] != (rows,):
                    raise InternalError(
                        f"model '{self.spec.name}' returned {outputs[name].shape[0]} rows for output '{name}' "
                        f"but the request had {rows}"
                    )
        return {name: outputs[name] for name in output_names}

    def close(self) -> None:
        self._engine.close()


def _empty(spec: ModelSpec, name: str) -> np.ndarray:
    out = next(t for t in spec.outputs if t.name == name)
    return np.empty((0, *(max(d, 0) for d in out.dims)), dtype=numpy_dtype(out.datatype))

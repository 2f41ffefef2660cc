"""What bench.gpu's (a) is measured against, in this process on the GPU: the engine alone on host arrays
(as a program running it by itself), the same engine with its input and output resident in device memory
(the GPU's own rate), and the worker's batch path without the processes around it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _rate(run: Callable[[], object], rows: int, seconds: float) -> float:
    """Rows/s of `run` called back to back for `seconds`, after five warm-up calls."""
    for _ in range(5):
        run()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run()
        n += 1
    return n * rows / (time.perf_counter() - t0)


def _engine(repo: Path, model: str):
    """The model's spec and an ONNX Runtime engine of its full capacity, as the worker builds it."""
    from service.engines.onnxruntime_backend import OnnxRuntimeBuilder
    from service.repository import ModelRepository

    spec = ModelRepository(repo).load_spec(model)
    return spec, OnnxRuntimeBuilder(spec).build(spec.max_batch_size)


def engine_alone(repo: Path, model: str, batch: int, seconds: float) -> float:
    """Inferences/s of the ONNX Runtime engine in this process at `batch`, inputs and outputs in host
    memory (ONNX Runtime copies them, as a program running the engine by itself would)."""
    spec, engine = _engine(repo, model)
    x = {"x": np.random.default_rng(0).standard_normal((batch, *spec.inputs[0].dims), dtype=np.float32)}
    try:
        return _rate(lambda: engine.run(x), batch, seconds)
    finally:
        engine.close()


def engine_on_device(repo: Path, model: str, batch: int, seconds: float) -> float:
    """Inferences/s of the same engine with its input and output resident in device memory (IOBinding,
    no copies): what the GPU computes by itself, without the uploads and downloads that requests arriving
    in host memory need."""
    import onnxruntime as ort

    from service.datatypes import numpy_dtype
    from service.memory.pool import DeviceView

    spec, engine = _engine(repo, model)
    x = np.random.default_rng(0).standard_normal((batch, *spec.inputs[0].dims), dtype=np.float32)
    out = spec.outputs[0]
    x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
    y_dev = ort.OrtValue.ortvalue_from_shape_and_type([batch, *out.dims], numpy_dtype(out.datatype), "cuda", 0)
    inputs = {"x": DeviceView(x_dev.data_ptr(), x.dtype, x.shape, 0)}
    outputs = {out.name: DeviceView(y_dev.data_ptr(), numpy_dtype(out.datatype), (batch, *out.dims), 0)}
    try:
        return _rate(lambda: engine.run_into(inputs, outputs), batch, seconds)
    finally:
        engine.close()


def runtime_alone(repo: Path, model: str, requests: int, rows: int, seconds: float) -> float:
    """Inferences/s of the worker's batch path without the processes around it: `requests` requests of
    `rows` rows gathered into the pool, run, split back (ModelRuntime.run, as the worker calls it)."""
    from service.metrics import WorkerStats
    from service.repository import ModelRepository
    from service.workers.runtime import Item, ModelRuntime
    from service.workers.worker import WorkerOptions

    spec = ModelRepository(repo).load_spec(model)
    runtime = ModelRuntime(spec, WorkerOptions(), WorkerStats())
    x = {"x": np.random.default_rng(1).standard_normal((rows, *spec.inputs[0].dims), dtype=np.float32)}
    try:
        return _rate(lambda: runtime.run([Item(rows, x) for _ in range(requests)]), requests * rows, seconds)
    finally:
        runtime.close()

"""The TensorRT backend: a builder that turns a model into serialized plans (one per capacity) and
engines that run a plan on device buffers.

The engine registry caches plans: it asks `plan_key_parts(capacity)` for the key, `build_plan` on a
miss and `load_plan` to get an engine; `build(capacity)` (the EngineBuilder protocol) does both
without a cache. Building works without a GPU (TensorRT for RTX); loading and running need a GPU the
installed flavour supports. Execution is deliberately thin: `run_into` binds the buffer pool's device
views and enqueues on the pool's CUDA stream (given to the builder), so the copies around it are the
pool's, as on the ONNX Runtime GPU path; `run` stages numpy arrays itself (Engine protocol, tests).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.engines.plan_cache import ModelDigest
from service.engines.tensorrt_build import (
    PRECISIONS,
    PlanOptions,
    TensorRTModule,
    build_serialized_plan,
    cuda_runtime,
    device_label,
    import_tensorrt,
    plan_problem,
    shared_logger,
    write_atomic,
)
from service.errors import ConfigError, InternalError, InvalidArgument, Unavailable
from service.proto import model_config_pb2

if TYPE_CHECKING:
    from service.repository import ModelSpec

PLAN_FORMAT = 1  # bump when a change here changes the plans built from the same inputs


class PlanLoadError(Unavailable):
    """A plan cannot be loaded here. `rebuild` is True when building it afresh can help (damaged
    plan, other TensorRT version), False when it cannot (no usable GPU, no cuda-python)."""

    def __init__(self, message: str, rebuild: bool) -> None:
        super().__init__(message)
        self.rebuild = rebuild


@dataclass(frozen=True)
class DeviceTensor:
    """A device buffer view: address and the shape of its rows (the pool's DeviceView is one too)."""

    ptr: int
    shape: tuple[int, ...]


def _cuda(cudart: Any, what: str, result: Any) -> Any:
    """Unwrap a cuda-python call's (error, value...) tuple; InternalError on a CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise InternalError(f"CUDA {what} failed: {cudart.cudaGetErrorString(err)[1]!r}")
    return values[0] if len(values) == 1 else None


class TensorRTEngine:
    """A deserialized plan and its execution context, serving batches 1..capacity on one CUDA stream.

    `stream` should be the buffer pool's stream (the registry copies rows to and from the device on
    it); without one the engine makes its own and synchronizes around device views it is handed.
    """

    buffer_memory = "device"  # the registry hands run_into the pool's device views

    def __init__(self, spec: ModelSpec, capacity: int, trt: TensorRTModule, engine: Any, context: Any,
                 cudart: Any, stream: int | None = None, runtime_cache: Any = None,
                 runtime_cache_path: Path | None = None) -> None:
        self.spec, self.capacity = spec, capacity
        self._trt, self._engine, self._context, self._cudart = trt, engine, context, cudart
        self._runtime_cache, self._runtime_cache_path = runtime_cache, runtime_cache_path
        self._own_stream = stream is None
        self.stream = int(_cuda(cudart, "cudaStreamCreate", cudart.cudaStreamCreate())
                          if stream is None else stream)
        self._lock = threading.Lock()  # an execution context is not thread-safe
        self._batched = spec.max_batch_size > 0
        mode = trt.module.TensorIOMode
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == mode.INPUT]
        self.output_names = [t.name for t in spec.outputs]  # the build marks exactly these as outputs
        self._dims = {n: tuple(engine.get_tensor_shape(n)) for n in self.input_names}
        self._dtypes = {n: np.dtype(trt.module.nptype(engine.get_tensor_dtype(n))) for n in names}
        size = getattr(engine, "device_memory_size_v2", None)
        self.device_memory_bytes = int(size if size is not None else engine.device_memory_size)

    def output_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """The shape of every output for an executed batch of `batch` rows (for sizing buffers)."""
        with self._lock:
            context = self._live()
            for name, dims in self._dims.items():
                context.set_input_shape(name, (batch, *dims[1:]) if self._batched else dims)
            return {n: tuple(context.get_tensor_shape(n)) for n in self.output_names}

    def run_into(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run one batch on `self.stream`. Each input is a device view (`ptr`, `shape`) or a numpy
        array (staged through a temporary device buffer); each output named in `outputs` is written
        into its device view (or numpy array). Returns the outputs that had no view, as arrays.

        With device views only, returns once the work is enqueued: the caller synchronizes the
        stream (the pool's `download()` does) before reading the outputs or refilling the inputs.
        """
        cudart = self._cudart
        with self._lock:
            context = self._live()
            temps: list[int] = []
            try:
                host_out = self._bind(context, inputs, outputs, temps)
                views = (*inputs.values(), *outputs.values())
                foreign = self._own_stream and any(hasattr(v, "ptr") for v in views)
                if foreign:  # device views filled on another stream: let that work finish first
                    _cuda(cudart, "cudaDeviceSynchronize", cudart.cudaDeviceSynchronize())
                self._enqueue(context, host_out)
                if temps or foreign:
                    _cuda(cudart, "cudaStreamSynchronize", cudart.cudaStreamSynchronize(self.stream))
            finally:
                if temps:  # never free memory the stream may still use
                    cudart.cudaStreamSynchronize(self.stream)
                for ptr in temps:
                    cudart.cudaFree(ptr)
        for view, target, _ in host_out.values():
            if view is not None and view is not target:
                np.copyto(view, target, casting="no")
        return {name: target for name, (view, target, _) in host_out.items() if view is None}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch of host arrays; every output as a new array (the Engine protocol)."""
        return self.run_into(inputs, {})

    def close(self) -> None:
        """Persist the runtime cache (TensorRT for RTX), free the context, engine and own stream."""
        with self._lock:
            if self._context is None:
                return
            if self._runtime_cache is not None and self._runtime_cache_path is not None:
                write_atomic(self._runtime_cache_path, bytes(self._runtime_cache.serialize()))
            self._cudart.cudaStreamSynchronize(self.stream)  # no queued work may outlive the context
            self._context = self._engine = self._runtime_cache = None
            if self._own_stream:
                self._cudart.cudaStreamDestroy(self.stream)

    def _bind(self, context: Any, inputs: Mapping[str, Any], outputs: Mapping[str, Any],
              temps: list[int]) -> dict[str, tuple[Any, np.ndarray, int]]:
        """Set input shapes and every tensor address; host inputs are queued for upload. Returns the
        outputs to download: name -> (caller's numpy view or None, host target, device address)."""
        cudart, kind = self._cudart, self._cudart.cudaMemcpyKind

        def device(nbytes: int) -> int:
            temps.append(int(_cuda(cudart, "cudaMalloc", cudart.cudaMalloc(max(nbytes, 1)))))
            return temps[-1]

        for name in self.input_names:
            value = self._view(inputs, name, "input")
            shape = tuple(value.shape)
            if self._batched and not 1 <= shape[0] <= self.capacity:
                raise InvalidArgument(f"model '{self.spec.name}': batch {shape[0]} is outside this "
                                      f"engine's capacity 1..{self.capacity}")
            if not context.set_input_shape(name, shape):
                raise InvalidArgument(f"model '{self.spec.name}': input '{name}' shape {list(shape)} is "
                                      f"outside the engine's profile")
            if hasattr(value, "ptr"):
                context.set_tensor_address(name, int(value.ptr))
                continue
            array = np.ascontiguousarray(value)
            if array.dtype != self._dtypes[name]:
                raise InvalidArgument(f"model '{self.spec.name}': input '{name}' has dtype "
                                      f"{array.dtype}, expected {self._dtypes[name]}")
            ptr = device(array.nbytes)
            _cuda(cudart, "cudaMemcpyAsync", cudart.cudaMemcpyAsync(
                ptr, array.ctypes.data, array.nbytes, kind.cudaMemcpyHostToDevice, self.stream))
            context.set_tensor_address(name, ptr)
        host_out = {}
        for name in self.output_names:
            view = outputs.get(name)
            if hasattr(view, "ptr"):
                context.set_tensor_address(name, int(view.ptr))
                continue
            shape = tuple(context.get_tensor_shape(name))
            usable = isinstance(view, np.ndarray) and view.flags.c_contiguous
            target = view if usable else np.empty(shape, self._dtypes[name])
            host_out[name] = (view, target, device(target.nbytes))
            context.set_tensor_address(name, host_out[name][2])
        return host_out

    def _enqueue(self, context: Any, host_out: dict[str, tuple[Any, np.ndarray, int]]) -> None:
        cudart = self._cudart
        if not context.execute_async_v3(self.stream):
            raise InternalError(f"model '{self.spec.name}': TensorRT could not enqueue the batch")
        for _, target, ptr in host_out.values():
            _cuda(cudart, "cudaMemcpyAsync", cudart.cudaMemcpyAsync(
                target.ctypes.data, ptr, target.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                self.stream))

    def _live(self) -> Any:
        if self._context is None:
            raise Unavailable(f"model '{self.spec.name}': engine (capacity {self.capacity}) is closed")
        return self._context

    def _view(self, views: Mapping[str, Any], name: str, kind: str) -> Any:
        if name not in views:
            raise InvalidArgument(f"model '{self.spec.name}': {kind} '{name}' is missing "
                                  f"(got {sorted(views)})")
        return views[name]


class TensorRTBuilder:
    """EngineBuilder for TensorRT, plus the plan-cache extension the engine registry uses."""

    backend = "tensorrt"

    def __init__(self, spec: ModelSpec, cache_dir: Path | None = None, precision: str = "fp32",
                 workspace_bytes: int = 0, opt_batch_size: int = 0, device: int | None = None,
                 stream: int | None = None) -> None:
        self.spec = spec
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        # Also accepts the config enum's names (FP16, ...); PRECISION_UNSET means the default, FP32.
        self.precision = (precision or "fp32").lower().replace("precision_unset", "fp32")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"model '{spec.name}': precision '{precision}' is not one of "
                              f"{[p.upper() for p in PRECISIONS]}")
        if workspace_bytes < 0 or opt_batch_size < 0:
            raise ConfigError(f"model '{spec.name}': workspace_bytes and opt_batch_size must be >= 0")
        self.workspace_bytes = int(workspace_bytes)
        self.opt_batch_size = int(opt_batch_size)
        self.device = device
        self.stream = stream  # the buffer pool's CUDA stream, which engines run on (None: their own)
        self._model_digest = ModelDigest(spec.model_path)

    @classmethod
    def from_spec(cls, spec: ModelSpec, cache_dir: Path | None = None, device: int | None = None,
                  stream: int | None = None, default_precision: str = "fp32") -> TensorRTBuilder:
        """A builder configured by the model's `engine_policy` (precision, workspace, opt batch)."""
        policy = spec.config.engine_policy
        precision = (model_config_pb2.Precision.Name(policy.precision) if policy.precision
                     else default_precision)
        return cls(spec, cache_dir, precision, policy.workspace_bytes, policy.opt_batch_size, device,
                   stream)

    @cached_property
    def trt(self) -> TensorRTModule:
        """The TensorRT flavour in use (imported on first use; ConfigError when there is none)."""
        return import_tensorrt()

    def plan_key_parts(self, capacity: int) -> dict[str, Any]:
        """Everything that changes the plan for `capacity`; the registry hashes it into the cache key."""
        self._check_capacity(capacity)
        spec, trt = self.spec, self.trt
        return {
            "backend": self.backend, "flavour": trt.flavour, "version": trt.version,
            "format": PLAN_FORMAT, "model_sha256": self._model_digest(),
            "device": device_label(self.device), "precision": self.precision,
            "workspace_bytes": self.workspace_bytes, "opt_batch_size": self._opt(capacity),
            "capacity": capacity, "max_batch_size": spec.max_batch_size,
            "inputs": [[t.name, t.datatype, list(t.dims)] for t in spec.inputs],
            "outputs": [t.name for t in spec.outputs],
        }

    def build_plan(self, capacity: int) -> bytes:
        """Parse the model and build a serialized plan for batches 1..capacity (no GPU needed for RTX)."""
        self._check_capacity(capacity)
        trt = self.trt
        timing = (self.cache_dir / f"timing-{trt.flavour}-{trt.version}-{device_label(self.device)}.cache"
                  if self.cache_dir is not None and trt.flavour == "tensorrt" else None)
        options = PlanOptions(capacity, self._opt(capacity), self.precision, self.workspace_bytes, timing)
        self._set_device()
        return build_serialized_plan(trt, self.spec, self.spec.model_path.read_bytes(), options)

    def load_plan(self, plan: bytes, capacity: int) -> TensorRTEngine:
        """Deserialize `plan` into an engine; PlanLoadError (with `.rebuild`) when it cannot run here."""
        spec, trt = self.spec, self.trt
        m = trt.module
        cudart = cuda_runtime()
        if cudart is None:
            raise PlanLoadError(f"model '{spec.name}': running TensorRT plans needs cuda-python "
                                f"(pip install 'trtserve[gpu]')", rebuild=False)
        self._set_device()
        problem = plan_problem(trt, plan)
        if problem is not None:
            rebuild = "MALFORMED_ENGINE" in problem or "VERSION_MISMATCH" in problem
            raise PlanLoadError(f"model '{spec.name}': {problem}", rebuild=rebuild)
        logger = shared_logger(m)
        with logger.capture() as errors:
            engine = m.Runtime(logger).deserialize_cuda_engine(plan)
        if engine is None:
            raise PlanLoadError(f"model '{spec.name}': {trt.flavour} {trt.version} could not load the "
                                f"plan: " + ("; ".join(errors[-10:]) or "no message"), rebuild=True)
        self._check_profile(engine, capacity)
        cache, cache_path, config = None, None, None
        if hasattr(engine, "create_runtime_config") and trt.flavour == "tensorrt-rtx":
            # TensorRT for RTX compiles kernels when the engine loads; the runtime cache keeps them.
            config = engine.create_runtime_config()
            cache = config.create_runtime_cache()
            if self.cache_dir is not None:
                label = device_label(self.device)
                cache_path = self.cache_dir / f"runtime-{trt.flavour}-{trt.version}-{label}.cache"
                if cache_path.is_file():
                    cache.deserialize(cache_path.read_bytes())  # False (ignored) when stale
            config.set_runtime_cache(cache)
        with logger.capture() as errors:
            context = (engine.create_execution_context(config) if config is not None
                       else engine.create_execution_context())
        if context is None:
            raise InternalError(f"model '{spec.name}': no execution context: {'; '.join(errors[-10:])}")
        return TensorRTEngine(spec, capacity, trt, engine, context, cudart, self.stream, cache, cache_path)

    def build(self, capacity: int) -> TensorRTEngine:
        """EngineBuilder protocol without a plan cache: build a plan and load it."""
        return self.load_plan(self.build_plan(capacity), capacity)

    def _check_capacity(self, capacity: int) -> None:
        limit = self.spec.max_batch_size if self.spec.max_batch_size > 0 else 1
        if not 1 <= capacity <= limit:
            raise InvalidArgument(f"model '{self.spec.name}': engine capacity {capacity} is outside "
                                  f"1..{limit} (max_batch_size)")

    def _opt(self, capacity: int) -> int:
        return min(self.opt_batch_size, capacity) if self.opt_batch_size > 0 else capacity

    def _set_device(self) -> None:
        cudart = cuda_runtime()
        if cudart is not None and self.device is not None:
            _cuda(cudart, "cudaSetDevice", cudart.cudaSetDevice(self.device))

    def _check_profile(self, engine: Any, capacity: int) -> None:
        # A plan under another key's file name would serve the wrong batches: refuse it.
        if self.spec.max_batch_size <= 0:
            return
        for name in (t.name for t in self.spec.inputs):
            if engine.get_tensor_shape(name)[0] != -1:
                continue  # a fixed batch dim (capacity 1) has no profile
            top = engine.get_tensor_profile_shape(name, 0)[2][0]
            if top != capacity:
                raise PlanLoadError(f"model '{self.spec.name}': the plan serves batches up to {top}, "
                                    f"not {capacity}", rebuild=True)


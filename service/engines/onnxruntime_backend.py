"""The ONNX Runtime backend: one InferenceSession per engine, on the CPU or the CUDA provider.

ONNX Runtime sessions are shape-dynamic, so capacity is only a bound the engine enforces; each capacity
is still its own engine object (and session) because the registry owns engines per capacity and releases
them independently.

Plans, for the registry's on-disk cache (`plan_key_parts`, `build_plan`, `load_plan`): a plan is the
model as ONNX Runtime optimized it for this provider (`SessionOptions.optimized_model_filepath`), in an
envelope naming what it was built from and a checksum; loading one opens a session with graph
optimization off, skipping the optimizer. One optimized model serves every capacity, so the capacity is
not in the key (the engine enforces it). The CPU plan is optimized at ORT_ENABLE_ALL, whose NCHWc
layouts depend on the CPU's vector width, so the key names the CPU's instruction sets; the CUDA plan
stops at ORT_ENABLE_EXTENDED (the levels above only change CPU layouts). External weights are not
copied into plans: the plan refers to the files beside the model, whose bytes are in the key.

Engines run on the buffer pool through IOBinding (`run_into`): ONNX Runtime reads the pool's input rows
and writes its output rows in place, host views on the CPU, device views under CUDA.
"""

from __future__ import annotations

import json
import logging
import platform
import struct
import tempfile
import threading
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.datatypes import numpy_dtype
from service.engines.plan_cache import ModelDigest
from service.errors import ConfigError, InternalError, InvalidArgument, Unavailable
from service.proto import model_config_pb2
from service.repository import ModelSpec, TensorSpec

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PLAN_FORMAT = 1  # bump when a change here changes the plans built from the same inputs
PLAN_MAGIC = b"TSORTPLN"
_PLAN_HEAD = struct.Struct("<8sI")  # magic, length of the JSON header; then the header, then the model
# Provider options that do not change the optimized graph (a stream address even differs per process).
_RUNTIME_OPTIONS = frozenset({"device_id", "user_compute_stream", "has_user_compute_stream"})
# CPU features ONNX Runtime's kernels and layouts depend on (x86 /proc/cpuinfo "flags", Arm "Features").
_ISA_FLAGS = frozenset({
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
    "asimd", "asimddp", "asimdhp", "fphp", "i8mm", "bf16", "sve", "sve2",
})
# IOBindings an engine keeps (one per set of views; the pool's views change only when it grows).
_MAX_BINDINGS = 16
# Where a model loaded from bytes finds its external weights (ONNX Runtime session config key).
_EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"

# ONNX Runtime's type strings -> KServe datatype names (BF16 has no numpy dtype to feed it with).
_ORT_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _gpu_device_id(spec: ModelSpec) -> int:
    for group in spec.config.instance_group:
        if group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and group.gpus:
            return int(group.gpus[0])
    return 0


def providers_for(spec: ModelSpec, stream: int | None = None) -> list[str | tuple[str, dict[str, Any]]]:
    """Execution providers for a model: CUDA first (then CPU) when the config asks for a GPU, else CPU.
    `stream` (a CUDA stream handle) makes the CUDA provider run on it, e.g. the buffer pool's stream.

    Raises ConfigError when a GPU is requested but this onnxruntime build has no CUDA provider.
    """
    if not spec.use_gpu:
        return [CPU]
    if CUDA not in ort.get_available_providers():
        raise ConfigError(
            f"model '{spec.name}': config asks for a GPU instance (instance_group kind KIND_GPU) but "
            f"onnxruntime {ort.__version__} has no {CUDA} (available: "
            f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu or use KIND_CPU"
        )
    options = {"device_id": str(_gpu_device_id(spec))}
    if stream is not None:
        options |= {"has_user_compute_stream": "1", "user_compute_stream": str(int(stream))}
    return [(CUDA, options), CPU]


def optimization_level(providers: list[Any]) -> ort.GraphOptimizationLevel:
    """ORT_ENABLE_ALL on the CPU; ORT_ENABLE_EXTENDED under CUDA, where the levels above only re-layout
    CPU nodes and a saved model would carry CPU-specific layouts for nothing."""
    if any(_name(p) == CUDA for p in providers):
        return ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def session_options(intra_op_threads: int = 0,
                    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                    ) -> ort.SessionOptions:
    """Graph optimization `level` (full by default), warning-level logging, `intra_op_threads`
    (0 = ONNX Runtime's default)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = intra_op_threads
    opts.log_severity_level = 2  # warning
    return opts


class PlanError(Unavailable):
    """A plan that cannot be used here. `rebuild` (read by the plan cache): True when building it
    afresh can help (damaged, or built by another ONNX Runtime, provider or model file)."""

    def __init__(self, message: str, rebuild: bool = True) -> None:
        super().__init__(message)
        self.rebuild = rebuild


class OnnxRuntimeEngine:
    """An Engine over one InferenceSession, serving batches 1..capacity of one model.

    `buffer_memory` is "device" under CUDA (the registry then hands `run_into` the pool's device views),
    except for models with BYTES tensors, which ONNX Runtime takes as host arrays only. `stream` is the
    CUDA stream the session runs on (None: its own). `device_memory_bytes` is 0: ONNX Runtime does not
    report what its arena holds (weights, activations), so only the pool's bytes are counted.
    """

    device_memory_bytes = 0

    def __init__(self, spec: ModelSpec, capacity: int, session: ort.InferenceSession,
                 stream: int | None = None) -> None:
        self.spec = spec
        self.capacity = capacity
        self.stream = stream
        self._session: ort.InferenceSession | None = session
        self._batched = spec.max_batch_size > 0
        self._inputs = [(t.name, numpy_dtype(t.datatype), t) for t in spec.inputs]
        self._input_names = frozenset(t.name for t in spec.inputs)
        self._input_order = [t.name for t in spec.inputs]
        self._output_names = [t.name for t in spec.outputs]
        self._output_dtypes = {t.name: numpy_dtype(t.datatype) for t in spec.outputs}
        # IOBinding takes fixed-size elements only: BYTES models run through `run` (and copies).
        self._strings = any(t.datatype == "BYTES" for t in (*spec.inputs, *spec.outputs))
        cuda = CUDA in session.get_providers()
        self.buffer_memory = "device" if cuda and not self._strings else "host"
        # `_binding_key` -> (IOBinding, device ids): the pool hands the same views batch after batch,
        # so their binding is made once (binding costs more than the run for a small model).
        self._bindings: dict[tuple, tuple[Any, set[int]]] = {}

    @property
    def providers(self) -> list[str]:
        """The providers the session actually runs on (CUDA may be missing if it failed to start)."""
        return self._session.get_providers() if self._session is not None else []

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; every output of the spec, in spec order."""
        session = self._live()
        self._check(inputs)
        feeds = {name: _text(name, inputs[name]) if inputs[name].dtype == object else inputs[name]
                 for name in inputs}
        try:
            outputs = session.run(self._output_names, feeds)
        except Exception as exc:  # onnxruntime raises its own unexported exception types
            raise InternalError(f"model '{self.spec.name}': onnxruntime run failed: {exc}") from exc
        return dict(zip(self._output_names, outputs))

    def run_into(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run one batch with IOBinding: ONNX Runtime reads `inputs` and writes each output named in
        `outputs` into its view, in place. Views are numpy arrays (host memory) or device views (`ptr`,
        `dtype`, `shape`, `device_id`). Rows of the pool's buffers are C-contiguous; a host view that is
        not goes through a copy. Returns the outputs that had no view, as arrays. BYTES models run
        through `run`, then copy into the views."""
        session = self._live()
        self._check(inputs)
        if self._strings:
            return self._run_and_copy(inputs, outputs)
        self._check_views(outputs)
        key = self._binding_key(inputs, outputs)
        # Taken out while it runs, so that a concurrent run with the same views binds its own.
        cached = self._bindings.pop(key, None) if key is not None else None
        held: list[np.ndarray] = []  # contiguous input copies, alive until the run ends
        allocated: list[str] = []  # outputs ONNX Runtime allocates (no usable view)
        if cached is None:
            binding, device_ids = self._bind(session, inputs, outputs, held, allocated)
        else:
            binding, device_ids = cached
        foreign = bool(device_ids) and self.stream is None  # the pool's views, filled on its own stream
        if foreign:
            _synchronize(device_ids)
        try:
            session.run_with_iobinding(binding)
        except Exception as exc:
            raise InternalError(f"model '{self.spec.name}': onnxruntime run failed: {exc}") from exc
        if foreign:
            _synchronize(device_ids)  # before the pool copies the outputs back on its stream
        if key is not None:
            if len(self._bindings) >= _MAX_BINDINGS:
                self._bindings.clear()
            self._bindings[key] = (binding, device_ids)
        if not allocated:
            return {}  # every output was written into its view: no OrtValues to fetch
        results = dict(zip(self._output_names, binding.get_outputs()))
        extra: dict[str, np.ndarray] = {}
        for name in allocated:
            array, view = results[name].numpy(), outputs.get(name)
            if view is None:
                extra[name] = array
            else:
                self._copy_into(name, view, array)
        return extra

    def _check_views(self, outputs: Mapping[str, Any]) -> None:
        for name in self._output_names:
            view, dtype = outputs.get(name), self._output_dtypes[name]
            if view is not None and view.dtype != dtype:
                raise InternalError(f"model '{self.spec.name}': output '{name}' view is {view.dtype}, "
                                    f"expected {dtype}")
            if isinstance(view, np.ndarray) and not view.flags.writeable:
                raise InternalError(f"model '{self.spec.name}': output '{name}' view is read-only")

    def _binding_key(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> tuple | None:
        """What a binding of these views binds: each view's address and shape, inputs then outputs
        in spec order (the pool's addresses change when it grows). None when the binding cannot be
        reused: an input needs a contiguous copy or an output has no usable view."""
        key = []
        for view in (*(inputs[name] for name in self._input_order),
                     *(outputs.get(name) for name in self._output_names)):
            if view is None:
                return None
            if hasattr(view, "ptr"):
                key.append((int(view.ptr), int(view.device_id), tuple(view.shape)))
            elif view.flags.c_contiguous:
                key.append((view.ctypes.data, view.shape))
            else:
                return None
        return tuple(key)

    def _bind(self, session: ort.InferenceSession, inputs: Mapping[str, Any], outputs: Mapping[str, Any],
              held: list[np.ndarray], allocated: list[str]) -> tuple[Any, set[int]]:
        """A new IOBinding of the views, and the devices they are on. Appends the input copies it
        made to `held` and the outputs left to ONNX Runtime to allocate to `allocated`."""
        binding = session.io_binding()
        device_ids: set[int] = set()
        for name, dtype, _ in self._inputs:
            value = inputs[name]
            if hasattr(value, "ptr"):
                device_ids.add(int(value.device_id))
                binding.bind_input(name, "cuda", int(value.device_id), dtype.type, list(value.shape),
                                   int(value.ptr))
                continue
            array = value if value.flags.c_contiguous else np.ascontiguousarray(value)
            held.append(array)
            binding.bind_input(name, "cpu", 0, dtype.type, list(array.shape), array.ctypes.data)
        for name in self._output_names:
            view, dtype = outputs.get(name), self._output_dtypes[name]
            if hasattr(view, "ptr"):
                device_ids.add(int(view.device_id))
                binding.bind_output(name, "cuda", int(view.device_id), dtype.type, list(view.shape),
                                    int(view.ptr))
            elif view is not None and view.flags.c_contiguous:
                binding.bind_output(name, "cpu", 0, dtype.type, list(view.shape), view.ctypes.data)
            else:
                binding.bind_output(name, "cpu")
                allocated.append(name)
        return binding, device_ids

    def _run_and_copy(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if any(hasattr(v, "ptr") for v in (*inputs.values(), *outputs.values())):
            raise InternalError(f"model '{self.spec.name}' has BYTES tensors: its engine takes host "
                                f"arrays only (buffer_memory 'host'), not device views")
        extra: dict[str, np.ndarray] = {}
        for name, result in self.run(dict(inputs)).items():
            view = outputs.get(name)
            if view is None:
                extra[name] = result
            else:
                self._copy_into(name, view, result)
        return extra

    def _copy_into(self, name: str, view: np.ndarray, result: np.ndarray) -> None:
        if result.shape != view.shape or result.dtype != view.dtype:
            raise InternalError(f"model '{self.spec.name}': output '{name}' is {result.dtype}"
                                f"{list(result.shape)}, its view is {view.dtype}{list(view.shape)}")
        np.copyto(view, result, casting="no")

    def _live(self) -> ort.InferenceSession:
        session = self._session
        if session is None:
            raise Unavailable(f"model '{self.spec.name}': engine (capacity {self.capacity}) is closed")
        return session

    def _check(self, inputs: Mapping[str, Any]) -> None:
        # The frontend validates requests; this guards the engine's own contract (capacity, dtypes).
        # Inputs are numpy arrays or device views: both have `dtype` and `shape`.
        if inputs.keys() != self._input_names:
            missing = sorted(self._input_names - inputs.keys())
            unknown = sorted(inputs.keys() - self._input_names)
            raise InvalidArgument(
                f"model '{self.spec.name}': expected inputs {sorted(self._input_names)}"
                + (f", missing {missing}" if missing else "") + (f", unknown {unknown}" if unknown else "")
            )
        batch = None
        for name, dtype, tensor in self._inputs:
            array = inputs[name]
            if array.dtype != dtype:
                raise InvalidArgument(
                    f"model '{self.spec.name}': input '{name}' has dtype {array.dtype}, "
                    f"expected {dtype} ({tensor.datatype})"
                )
            shape = array.shape[1:] if self._batched else array.shape
            if len(shape) != len(tensor.dims) or any(
                d != -1 and d != s for d, s in zip(tensor.dims, shape)
            ):
                raise InvalidArgument(
                    f"model '{self.spec.name}': input '{name}' has shape {list(array.shape)}, expected "
                    f"{(['batch'] if self._batched else []) + list(tensor.dims)}"
                )
            if not self._batched:
                continue
            if batch is None:
                batch = array.shape[0]
            elif array.shape[0] != batch:
                raise InvalidArgument(
                    f"model '{self.spec.name}': input '{name}' has batch {array.shape[0]}, "
                    f"expected {batch} like the other inputs"
                )
        if batch is not None and not 1 <= batch <= self.capacity:
            raise InvalidArgument(
                f"model '{self.spec.name}': batch {batch} is outside this engine's capacity "
                f"1..{self.capacity}"
            )

    def close(self) -> None:
        """Drop the session (ONNX Runtime frees it when the last reference goes)."""
        self._session = None
        self._bindings = {}


class OnnxRuntimeBuilder:
    """EngineBuilder for ONNX Runtime, plus the plan-cache extension the engine registry uses.

    `build(capacity)` opens a session on the model file; with a plan cache the registry calls
    `plan_key_parts`, then `build_plan` (optimize: the slow step) on a miss and `load_plan`. `stream`:
    the buffer pool's CUDA stream for CUDA engines to run on (None: ONNX Runtime's own, and the engine
    synchronizes the device before binding the pool's device views).
    """

    backend = "onnxruntime"

    def __init__(self, spec: ModelSpec, intra_op_threads: int = 0, stream: int | None = None) -> None:
        self.spec = spec
        self.intra_op_threads = intra_op_threads
        self.stream = stream
        self._lock = threading.Lock()
        self._model_digest = ModelDigest(spec.model_path)
        self._cpu: str | None = None
        # The plan build_plan returned last and the session it was verified with: the load_plan that
        # follows a build (the registry's cache miss) takes that session instead of opening another.
        self._verified: tuple[bytes, ort.InferenceSession] | None = None

    def build(self, capacity: int) -> OnnxRuntimeEngine:
        """A ready engine for batches 1..capacity; ConfigError when the model file does not match the spec."""
        self._check_capacity(capacity)
        providers = self.providers()
        opts = session_options(self.intra_op_threads, optimization_level(providers))
        session = self._open(opts, providers)
        self._check_session(session)
        return OnnxRuntimeEngine(self.spec, capacity, session, self.stream)

    def providers(self) -> list[str | tuple[str, dict[str, Any]]]:
        """The execution providers of this builder's sessions (ConfigError when CUDA is wanted but absent)."""
        return providers_for(self.spec, self.stream)

    def plan_key_parts(self, capacity: int) -> dict[str, Any]:
        """Everything that changes the plan: ONNX Runtime version, model bytes (and the files beside
        it), providers, device and optimization level. Not the capacity: one optimized model serves
        every capacity. Not the thread count: it does not change the optimized graph."""
        self._check_capacity(capacity)
        return self._parts(self.providers())

    def build_plan(self, capacity: int) -> bytes:
        """Optimize the model for this provider and return it as a plan. The plan is loaded once
        before it is returned, so an unloadable one is never cached: if the optimized model does not
        load (an optimized model saved from a CUDA session may hold ONNX Runtime's own Memcpy nodes),
        the plan is an empty one that says so, and loading it opens the model file as `build` does."""
        self._check_capacity(capacity)
        providers = self.providers()
        with tempfile.TemporaryDirectory(prefix="trtserve-ort-") as tmp:
            target = Path(tmp) / "model.optimized.onnx"
            opts = session_options(self.intra_op_threads, optimization_level(providers))
            opts.optimized_model_filepath = str(target)
            opts.log_severity_level = 3  # not the "hardware specific" warning: the key names the CPU
            self._check_session(self._open(opts, providers))
            plan = self._envelope(target.read_bytes(), providers, optimized=True)
        try:
            session = self._load(plan, providers)
        except PlanError as exc:
            log.warning("model '%s': the optimized model does not load (%s); plans will optimize on load",
                        self.spec.name, exc)
            plan = self._envelope(b"", providers, optimized=False)
            session = self._load(plan, providers)
        with self._lock:
            self._verified = (plan, session)
        return plan

    def load_plan(self, plan: bytes, capacity: int) -> OnnxRuntimeEngine:
        """An engine from a `build_plan` plan, without optimizing again. PlanError (`rebuild`) when the
        plan is damaged or was built by another ONNX Runtime, provider or model file; ConfigError
        (`rebuild` False: the plan is fine) when the config does not match the model or CUDA does not
        start here."""
        self._check_capacity(capacity)
        try:
            providers = self.providers()
        except ConfigError as exc:
            exc.rebuild = False  # type: ignore[attr-defined]
            raise
        session = None
        with self._lock:
            if self._verified is not None and self._verified[0] is plan:
                session, self._verified = self._verified[1], None
        if session is None:
            session = self._load(plan, providers)
        try:
            self._check_session(session)
        except ConfigError as exc:
            exc.rebuild = False  # type: ignore[attr-defined]
            raise
        return OnnxRuntimeEngine(self.spec, capacity, session, self.stream)

    def _parts(self, providers: list[Any]) -> dict[str, Any]:
        return {
            "backend": self.backend, "version": ort.__version__, "format": PLAN_FORMAT,
            "model_sha256": self._model_digest(), "providers": _provider_key(providers),
            "device": self._device(providers), "graph_optimization": optimization_level(providers).name,
        }

    def _envelope(self, model: bytes, providers: list[Any], optimized: bool) -> bytes:
        header = {**self._parts(providers), "optimized": optimized, "model_bytes": len(model),
                  "model_crc32": zlib.crc32(model)}
        raw = json.dumps(header, sort_keys=True).encode()
        return _PLAN_HEAD.pack(PLAN_MAGIC, len(raw)) + raw + model

    def _load(self, plan: bytes, providers: list[Any]) -> ort.InferenceSession:
        """A session on the plan's model; PlanError when the plan is damaged or not for this builder."""
        name = self.spec.name
        header, model = _open_envelope(name, plan)
        expected = self._parts(providers)
        wrong = sorted(k for k, v in expected.items() if header.get(k) != json.loads(json.dumps(v)))
        if wrong:
            raise PlanError(f"model '{name}': the plan was built for other {', '.join(wrong)} "
                            f"({', '.join(f'{k}={header.get(k)!r}' for k in wrong)})")
        if not header.get("optimized"):  # the model file (its bytes are in the key), optimized now
            return self._open(session_options(self.intra_op_threads, optimization_level(providers)), providers)
        opts = session_options(self.intra_op_threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        # External weights stay in the files beside the model (hashed into the key); the plan names them.
        opts.add_session_config_entry(_EXTERNAL_FOLDER, str(self.spec.model_path.parent))
        try:
            return ort.InferenceSession(model, sess_options=opts, providers=providers)
        except Exception as exc:
            raise PlanError(f"model '{name}': onnxruntime {ort.__version__} cannot load the plan: {exc}"
                            ) from exc

    def _open(self, opts: ort.SessionOptions, providers: list[Any]) -> ort.InferenceSession:
        spec = self.spec
        try:
            return ort.InferenceSession(str(spec.model_path), sess_options=opts, providers=providers)
        except Exception as exc:  # a missing, corrupt or unsupported model file
            raise ConfigError(f"model '{spec.name}': cannot load {spec.model_path}: {exc}") from exc

    def _check_capacity(self, capacity: int) -> None:
        spec = self.spec
        limit = spec.max_batch_size if spec.max_batch_size > 0 else 1
        if not 1 <= capacity <= limit:
            raise InvalidArgument(
                f"model '{spec.name}': engine capacity {capacity} is outside 1..{limit} (max_batch_size)"
            )

    def _check_session(self, session: ort.InferenceSession) -> None:
        spec = self.spec
        if spec.use_gpu and CUDA not in session.get_providers():
            raise ConfigError(
                f"model '{spec.name}': {CUDA} failed to start (no CUDA device or libraries?); "
                f"session runs on {session.get_providers()}"
            )
        self._check_signature(session)

    def _check_signature(self, session: ort.InferenceSession) -> None:
        """The config's inputs/outputs must exist in the model with the same datatype and rank."""
        spec = self.spec
        model_inputs = {i.name: i for i in session.get_inputs()}
        model_outputs = {o.name: o for o in session.get_outputs()}
        _match(spec, "input", spec.inputs, model_inputs)
        _match(spec, "output", spec.outputs, model_outputs)
        unconfigured = sorted(model_inputs.keys() - {t.name for t in spec.inputs})
        if unconfigured:
            raise ConfigError(
                f"model '{spec.name}': {spec.model_path} needs input(s) {unconfigured} "
                f"that config.pbtxt does not declare"
            )

    def _device(self, providers: list[Any]) -> str:
        if any(_name(p) == CUDA for p in providers):
            return f"cuda:{_gpu_device_id(self.spec)}"
        if self._cpu is None:
            self._cpu = f"cpu:{platform.machine()}:{_cpu_features()}"
        return self._cpu

def _open_envelope(model: str, plan: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, model bytes) of a plan; PlanError when it is not one, or truncated or damaged."""
    if len(plan) < _PLAN_HEAD.size:
        raise PlanError(f"model '{model}': truncated plan ({len(plan)} bytes)")
    magic, size = _PLAN_HEAD.unpack_from(plan)
    if magic != PLAN_MAGIC:
        raise PlanError(f"model '{model}': not an onnxruntime plan (bad magic)")
    view = memoryview(plan)
    start = _PLAN_HEAD.size + size
    try:
        header = json.loads(bytes(view[_PLAN_HEAD.size:start]))
        length, crc = int(header["model_bytes"]), int(header["model_crc32"])
    except (ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"model '{model}': damaged plan header ({exc})") from None
    if len(view) - start != length:
        raise PlanError(f"model '{model}': plan holds {len(view) - start} model bytes, its header says {length}")
    # CRC32, not a cryptographic hash: this catches damage (the cache file itself is sha256-checked),
    # at several GB/s on big models.
    if zlib.crc32(view[start:]) != crc:
        raise PlanError(f"model '{model}': plan checksum mismatch")
    return header, bytes(view[start:])  # onnxruntime takes bytes only: the one copy


def _name(provider: str | tuple[str, dict[str, Any]]) -> str:
    return provider if isinstance(provider, str) else provider[0]


def _provider_key(providers: list[Any]) -> list[Any]:
    """Providers with the options that change the optimized graph (not device ids or streams)."""
    key: list[Any] = []
    for p in providers:
        options = {} if isinstance(p, str) else {k: v for k, v in p[1].items() if k not in _RUNTIME_OPTIONS}
        key.append([_name(p), options] if options else _name(p))
    return key


def _cpu_features() -> str:
    """The instruction-set features of this CPU that ONNX Runtime's CPU plans depend on."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or "unknown"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return ",".join(sorted(set(value.split()) & _ISA_FLAGS))
    return platform.processor() or "unknown"


def _synchronize(device_ids: set[int]) -> None:
    """Wait for all work on the devices (their views were filled on a stream the session does not use)."""
    from cuda.bindings import runtime as cudart  # only device views get here: cuda-python is there

    def check(result: Any, what: str, device: int) -> None:
        err = result[0] if isinstance(result, tuple) else result
        if err != cudart.cudaError_t.cudaSuccess:
            raise InternalError(f"{what} failed on cuda:{device}: {cudart.cudaGetErrorName(err)[1]!r}")

    for device in sorted(device_ids):
        check(cudart.cudaSetDevice(device), "cudaSetDevice", device)
        check(cudart.cudaDeviceSynchronize(), "cudaDeviceSynchronize", device)


def _match(spec: ModelSpec, kind: str, tensors: tuple[TensorSpec, ...], model: dict[str, Any]) -> None:
    for tensor in tensors:
        node = model.get(tensor.name)
        if node is None:
            raise ConfigError(
                f"model '{spec.name}': config.pbtxt {kind} '{tensor.name}' is not in {spec.model_path} "
                f"({kind}s there: {sorted(model)})"
            )
        if tensor.datatype == "BF16":
            raise ConfigError(
                f"model '{spec.name}': {kind} '{tensor.name}' is BF16, which the onnxruntime backend "
                f"does not support (numpy has no bfloat16 to feed it with)"
            )
        datatype = _ORT_TYPES.get(node.type, node.type)
        if datatype != tensor.datatype:
            raise ConfigError(
                f"model '{spec.name}': config.pbtxt {kind} '{tensor.name}' data_type is "
                f"{tensor.datatype} but the model has {datatype}"
            )
        if node.shape is None:
            continue  # the model does not say; ONNX Runtime checks at run time
        shape = list(node.shape[1:] if spec.max_batch_size > 0 else node.shape)
        # A batched model needs a dynamic first dim (a fixed one serves only that one batch size).
        batch_ok = spec.max_batch_size == 0 or (
            len(node.shape) >= 1
            and (not isinstance(node.shape[0], int) or node.shape[0] == spec.max_batch_size == 1)
        )
        if not batch_ok or len(shape) != len(tensor.dims) or any(
            isinstance(m, int) and d != -1 and m != d for m, d in zip(shape, tensor.dims)
        ):
            raise ConfigError(
                f"model '{spec.name}': config.pbtxt {kind} '{tensor.name}' dims {list(tensor.dims)}"
                f"{' (after the batch dim)' if spec.max_batch_size > 0 else ''} do not match the model's "
                f"shape {node.shape}"
            )


def _text(name: str, array: np.ndarray) -> np.ndarray:
    """BYTES elements as str: ONNX Runtime's Python binding takes strings only (it would str() a bytes)."""
    try:
        return np.array([e.decode("utf-8") if isinstance(e, bytes) else e for e in array.ravel()],
                        dtype=object).reshape(array.shape)
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"input '{name}': ONNX Runtime string tensors must be UTF-8 ({exc})") from None

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

The engine itself (sessions on the buffer pool through IOBinding) is in `onnxruntime_engine.py`.
"""

from __future__ import annotations

import json
import logging
import platform
import struct
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Any

import onnxruntime as ort

from service.engines.onnxruntime_engine import CUDA, OnnxRuntimeEngine
from service.engines.plan_cache import ModelDigest
from service.errors import ConfigError, InvalidArgument, Unavailable
from service.repository import ModelSpec, TensorSpec

log = logging.getLogger(__name__)

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
    options = {"device_id": str(spec.gpu_device)}
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
                    spinning: bool = False) -> ort.SessionOptions:
    """Graph optimization `level` (full by default), warning-level logging, `intra_op_threads`
    (0 = ONNX Runtime's default). Without `spinning` the intra-op threads sleep between runs: ONNX
    Runtime's default busy-wait keeps them on the CPU the frontend process and the other models need
    (measured with bench.batching and bench.engine_sweep on 2 shared cores)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = intra_op_threads
    opts.log_severity_level = 2  # warning
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class PlanError(Unavailable):
    """A plan that cannot be used here. `rebuild` (read by the plan cache): True when building it
    afresh can help (damaged, or built by another ONNX Runtime, provider or model file)."""

    def __init__(self, message: str, rebuild: bool = True) -> None:
        super().__init__(message)
        self.rebuild = rebuild


class OnnxRuntimeBuilder:
    """EngineBuilder for ONNX Runtime, plus the plan-cache extension the engine registry uses.

    `build(capacity)` opens a session on the model file; with a plan cache the registry calls
    `plan_key_parts`, then `build_plan` (optimize: the slow step) on a miss and `load_plan`. `stream`:
    the buffer pool's CUDA stream for CUDA engines to run on (None: ONNX Runtime's own, and the engine
    synchronizes the device before binding the pool's device views).
    """

    backend = "onnxruntime"

    def __init__(self, spec: ModelSpec, intra_op_threads: int = 0, stream: int | None = None,
                 spinning: bool = False) -> None:
        self.spec = spec
        self.intra_op_threads, self.spinning = intra_op_threads, spinning
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
        opts = self._options(optimization_level(providers))
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
            opts = self._options(optimization_level(providers))
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
            return self._open(self._options(optimization_level(providers)), providers)
        opts = self._options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        # External weights stay in the files beside the model (hashed into the key); the plan names them.
        opts.add_session_config_entry(_EXTERNAL_FOLDER, str(self.spec.model_path.parent))
        try:
            return ort.InferenceSession(model, sess_options=opts, providers=providers)
        except Exception as exc:
            raise PlanError(f"model '{name}': onnxruntime {ort.__version__} cannot load the plan: {exc}"
                            ) from exc

    def _options(self, level: ort.GraphOptimizationLevel) -> ort.SessionOptions:
        return session_options(self.intra_op_threads, level, self.spinning)

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
            return f"cuda:{self.spec.gpu_device}"
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



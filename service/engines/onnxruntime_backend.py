"""The ONNX Runtime backend: one InferenceSession per engine, on the CPU or the CUDA provider.

ONNX Runtime sessions are shape-dynamic, so capacity is only a bound the engine enforces; each capacity
is still its own engine object (and session) because the registry owns engines per capacity and releases
them independently. Sessions share nothing for now.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from service.datatypes import numpy_dtype
from service.errors import ConfigError, InternalError, InvalidArgument, Unavailable
from service.proto import model_config_pb2
from service.repository import ModelSpec, TensorSpec

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

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


def providers_for(spec: ModelSpec) -> list[str | tuple[str, dict[str, Any]]]:
    """Execution providers for a model: CUDA first (then CPU) when the config asks for a GPU, else CPU.

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
    return [(CUDA, {"device_id": str(_gpu_device_id(spec))}), CPU]


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    """Full graph optimization, warning-level logging, `intra_op_threads` (0 = ONNX Runtime's default)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = intra_op_threads
    opts.log_severity_level = 2  # warning
    return opts


class OnnxRuntimeEngine:
    """An Engine over one InferenceSession, serving batches 1..capacity of one model."""

    def __init__(self, spec: ModelSpec, capacity: int, session: ort.InferenceSession) -> None:
        self.spec = spec
        self.capacity = capacity
        self._session: ort.InferenceSession | None = session
        self._batched = spec.max_batch_size > 0
        self._inputs = [(t.name, numpy_dtype(t.datatype), t) for t in spec.inputs]
        self._input_names = frozenset(t.name for t in spec.inputs)
        self._output_names = [t.name for t in spec.outputs]

    @property
    def providers(self) -> list[str]:
        """The providers the session actually runs on (CUDA may be missing if it failed to start)."""
        return self._session.get_providers() if self._session is not None else []

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; every output of the spec, in spec order."""
        session = self._session
        if session is None:
            raise Unavailable(f"model '{self.spec.name}': engine (capacity {self.capacity}) is closed")
        self._check(inputs)
        feeds = {name: _text(name, inputs[name]) if inputs[name].dtype == object else inputs[name]
                 for name in inputs}
        try:
            outputs = session.run(self._output_names, feeds)
        except Exception as exc:  # onnxruntime raises its own unexported exception types
            raise InternalError(f"model '{self.spec.name}': onnxruntime run failed: {exc}") from exc
        return dict(zip(self._output_names, outputs))

    def _check(self, inputs: dict[str, np.ndarray]) -> None:
        # The frontend validates requests; this guards the engine's own contract (capacity, dtypes).
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


class OnnxRuntimeBuilder:
    """EngineBuilder for ONNX Runtime: each `build(capacity)` opens a new session on the model file."""

    backend = "onnxruntime"

    def __init__(self, spec: ModelSpec, intra_op_threads: int = 0) -> None:
        self.spec = spec
        self.intra_op_threads = intra_op_threads

    def build(self, capacity: int) -> OnnxRuntimeEngine:
        """A ready engine for batches 1..capacity; ConfigError when the model file does not match the spec."""
        spec = self.spec
        limit = spec.max_batch_size if spec.max_batch_size > 0 else 1
        if not 1 <= capacity <= limit:
            raise InvalidArgument(
                f"model '{spec.name}': engine capacity {capacity} is outside 1..{limit} (max_batch_size)"
            )
        providers = providers_for(spec)
        try:
            session = ort.InferenceSession(
                str(spec.model_path), sess_options=session_options(self.intra_op_threads),
                providers=providers,
            )
        except Exception as exc:  # a missing, corrupt or unsupported model file
            raise ConfigError(f"model '{spec.name}': cannot load {spec.model_path}: {exc}") from exc
        if spec.use_gpu and CUDA not in session.get_providers():
            raise ConfigError(
                f"model '{spec.name}': {CUDA} failed to start (no CUDA device or libraries?); "
                f"session runs on {session.get_providers()}"
            )
        self._check_signature(session)
        return OnnxRuntimeEngine(spec, capacity, session)

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

"""The build half of the TensorRT backend: import the library, parse ONNX, one batch profile, serialize.

Two flavours share one Python API, and this module handles both (by feature, not by version number):
- NVIDIA TensorRT (`tensorrt`, 10 or later) builds for the GPU it runs on. It has the FP16 builder flag
  (until strong typing becomes unconditional) and a timing cache, kept in a file beside the plan cache.
- TensorRT for RTX (`tensorrt_rtx_bindings` from the `tensorrt-rtx-cu13-*` wheels, or `tensorrt_rtx`)
  builds ahead of time on a CPU; its plans run on Ampere and later consumer architectures (not on
  Hopper, compute capability 9.0). Networks are strongly typed, so there is no FP16 flag: FP16 needs
  an FP16 model. Its timing cache is a deprecated no-op that forces a GPU query, so it is not used;
  its kernels are compiled at load time and persisted in a runtime cache instead (tensorrt_backend).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

from service.errors import ConfigError

if TYPE_CHECKING:
    from service.repository import ModelSpec

_log = logging.getLogger(__name__)

# (module name, flavour), tried in order: full TensorRT wins where both are installed.
CANDIDATES: tuple[tuple[str, str], ...] = (
    ("tensorrt", "tensorrt"),
    ("tensorrt_rtx_bindings", "tensorrt-rtx"),
    ("tensorrt_rtx", "tensorrt-rtx"),
)
PRECISIONS = ("fp32", "fp16", "tf32")
CPU_BUILD = "cpu-build"  # device label of a plan built where no CUDA device is visible
_TRT_TO_KSERVE = {
    "FLOAT": "FP32", "HALF": "FP16", "BF16": "BF16", "INT8": "INT8", "INT32": "INT32",
    "INT64": "INT64", "BOOL": "BOOL", "UINT8": "UINT8",
}


class TensorRTModule(NamedTuple):
    """The imported TensorRT Python module, its flavour ("tensorrt" | "tensorrt-rtx") and version."""

    module: ModuleType
    flavour: str
    version: str


def import_tensorrt(candidates: Sequence[tuple[str, str]] = CANDIDATES) -> TensorRTModule:
    """The first importable TensorRT flavour; ConfigError naming what to install when there is none."""
    reasons = []
    for name, flavour in candidates:
        try:
            module = importlib.import_module(name)
        except (ImportError, OSError) as exc:  # OSError: the module is there but its libraries are not
            reasons.append(f"{name}: {exc}")
            continue
        return TensorRTModule(module, flavour, str(getattr(module, "__version__", "unknown")))
    raise ConfigError(
        "backend 'tensorrt' needs TensorRT, which is not installed (" + "; ".join(reasons) + "). "
        "Install TensorRT for RTX with `pip install 'trtserve[tensorrt]'`, or NVIDIA's `tensorrt` "
        "package (TensorRT 10 or later) for data-centre GPUs"
    )


def cuda_runtime() -> Any | None:
    """cuda-python's runtime module (`cuda.bindings.runtime`, older `cuda.cudart`), or None."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def device_label(device: int | None = None) -> str:
    """'sm_90' for CUDA device `device` (default 0), or CPU_BUILD where no device (or no cuda-python) is."""
    cudart = cuda_runtime()
    if cudart is None:
        return CPU_BUILD
    ok = cudart.cudaError_t.cudaSuccess
    err, count = cudart.cudaGetDeviceCount()
    if err != ok or count == 0:
        return CPU_BUILD
    attr = cudart.cudaDeviceAttr
    err1, major = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device or 0)
    err2, minor = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device or 0)
    if err1 != ok or err2 != ok:
        return CPU_BUILD
    return f"sm_{major}{minor}"


@functools.cache
def shared_logger(trt: ModuleType) -> Any:
    """The one TensorRT ILogger of this process for module `trt`, forwarding to Python logging.

    One per process because TensorRT keeps the first logger it is given and ignores later ones (and
    must never see it freed). `with logger.capture() as errors:` collects the error messages logged
    on the calling thread, for exception messages.
    """

    class ForwardingLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self._local = threading.local()

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)  # 0 internal error, 1 error, 2 warning, 3 info, 4 verbose
            errors = getattr(self._local, "errors", None)
            if level <= 1 and errors is not None:
                errors.append(msg)
            _log.log({0: logging.ERROR, 1: logging.ERROR, 2: logging.WARNING}.get(level, logging.DEBUG),
                     "TensorRT: %s", msg)

        @contextlib.contextmanager
        def capture(self) -> Iterator[list[str]]:
            outer = getattr(self._local, "errors", None)
            self._local.errors = errors = []
            try:
                yield errors
            finally:
                self._local.errors = outer

    return ForwardingLogger()


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class PlanOptions:
    """Everything besides the model that shapes a plan (all of it goes into the plan-cache key)."""

    capacity: int
    opt_batch_size: int  # already clamped to 1..capacity
    precision: str  # one of PRECISIONS
    workspace_bytes: int  # 0 = TensorRT's default
    timing_cache: Path | None = None  # used by full TensorRT only


def build_serialized_plan(trt: TensorRTModule, spec: ModelSpec, model: bytes, options: PlanOptions) -> bytes:
    """Parse `model` (the bytes of spec.model_path) and build a plan for batches 1..options.capacity.

    ConfigError for a model the parser rejects (each error with node index, name, operator and reason),
    for inputs that do not match config.pbtxt, and for a precision this flavour cannot honour.
    """
    logger = shared_logger(trt.module)
    with logger.capture() as errors:
        return _build(trt, spec, model, options, logger, errors)


def _build(trt: TensorRTModule, spec: ModelSpec, model: bytes, options: PlanOptions, logger: Any,
           errors: list[str]) -> bytes:
    m = trt.module
    builder = m.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = m.OnnxParser(network, logger)
    if not parser.parse(model, str(spec.model_path)):
        raise ConfigError(
            f"model '{spec.name}': {trt.flavour} {trt.version}'s ONNX parser rejected {spec.model_path}: "
            + "; ".join(_parser_errors(parser))
        )
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shapes = _profile_shapes(spec, tensor.name, _kserve_type(tensor.dtype), tuple(tensor.shape), options)
        if shapes is not None:
            profile.set_shape(tensor.name, *shapes)
    _select_outputs(spec, network)
    config.add_optimization_profile(profile)
    _set_precision(trt, spec, config, options.precision)
    if options.workspace_bytes > 0:
        config.set_memory_pool_limit(m.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    timing = _attach_timing_cache(trt, config, options.timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ConfigError(
            f"model '{spec.name}': {trt.flavour} {trt.version} could not build a plan for capacity "
            f"{options.capacity}: " + ("; ".join(errors[-10:]) or "no message from TensorRT")
        )
    if timing is not None and options.timing_cache is not None:
        write_atomic(options.timing_cache, bytes(timing.serialize()))
    return bytes(plan)


def plan_problem(trt: TensorRTModule, plan: bytes) -> str | None:
    """Why this machine cannot run `plan`, from the plan's header alone (no GPU needed to read it).

    None when the flavour says the plan is valid here, or has no header check (full TensorRT before
    `get_engine_validity`). On a machine without a GPU TensorRT for RTX answers INVALID for every plan;
    a damaged header additionally shows MALFORMED_ENGINE.
    """
    m = trt.module
    check = getattr(m.Runtime(shared_logger(m)), "get_engine_validity", None)
    if check is None:
        return None
    validity, diagnostics = check(plan)
    if validity != m.EngineValidity.INVALID:
        return None
    flags = [name for name, value in m.EngineInvalidityDiagnostics.__members__.items()
             if int(diagnostics) & int(value)]
    return (f"{trt.flavour} {trt.version} cannot run this plan here: "
            + (", ".join(flags) if flags else "no usable CUDA device or driver"))


def _network_flags(trt: TensorRTModule) -> int:
    # TensorRT 10 networks are always explicit-batch (the flag is deprecated); older ones must ask.
    flag = getattr(trt.module.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    major = int(trt.version.split(".")[0]) if trt.version.split(".")[0].isdigit() else 10
    return 1 << int(flag) if flag is not None and trt.flavour == "tensorrt" and major < 10 else 0


def _parser_errors(parser: Any) -> list[str]:
    errors = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = int(e.node())
        name = getattr(e, "node_name", lambda: "")()
        op = getattr(e, "node_operator", lambda: "")()
        where = (f"node {node}" + (f" '{name}'" if name else "") + (f" ({op})" if op else "")
                 if node >= 0 else "model")
        errors.append(f"{where}: {e.desc()} [{getattr(e.code(), 'name', e.code())}]")
    return errors or ["no error reported"]


def _kserve_type(dtype: Any) -> str:
    return _TRT_TO_KSERVE.get(dtype.name, dtype.name)


def _profile_shapes(spec: ModelSpec, name: str, datatype: str, dims: tuple[int, ...],
                    options: PlanOptions) -> tuple[tuple[int, ...], ...] | None:
    """(min, opt, max) for one network input, or None when it has no dynamic dims."""
    where = f"model '{spec.name}': input '{name}'"
    tensor = next((t for t in spec.inputs if t.name == name), None)
    if tensor is None:
        raise ConfigError(f"{where} of {spec.model_path} is not declared in config.pbtxt "
                          f"(declared: {[t.name for t in spec.inputs]})")
    if datatype != tensor.datatype:
        raise ConfigError(f"{where}: config.pbtxt says {tensor.datatype}, the model has {datatype}")
    batched = spec.max_batch_size > 0
    if len(dims) != len(tensor.dims) + batched:
        raise ConfigError(f"{where}: the model's shape {list(dims)} does not match config dims "
                          f"{list(tensor.dims)}{' plus a batch dim' if batched else ''}")
    fixed = []
    for i, (model_dim, config_dim) in enumerate(zip(dims[batched:], tensor.dims)):
        if model_dim == -1 and config_dim == -1:
            raise ConfigError(f"{where}: dim {i} is dynamic in both the model and config.pbtxt; the "
                              f"tensorrt backend needs every non-batch dim fixed: set it in config.pbtxt")
        if -1 not in (model_dim, config_dim) and model_dim != config_dim:
            raise ConfigError(f"{where}: dim {i} is {model_dim} in the model, {config_dim} in config.pbtxt")
        fixed.append(config_dim if model_dim == -1 else model_dim)
    rest = tuple(fixed)
    if not batched or dims[0] == options.capacity == 1:
        full = rest if not batched else (1, *rest)
        return (full, full, full) if -1 in dims else None
    if dims[0] != -1:
        raise ConfigError(f"{where}: the model's batch dim is fixed at {dims[0]}; export it with a "
                          f"dynamic batch dim to serve batches up to {options.capacity}")
    return (1, *rest), (options.opt_batch_size, *rest), (options.capacity, *rest)


def _select_outputs(spec: ModelSpec, network: Any) -> None:
    """Every configured output must exist; the others are unmarked, so the plan has exactly these."""
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    names = {t.name for t in outputs}
    missing = [t.name for t in spec.outputs if t.name not in names]
    if missing:
        raise ConfigError(f"model '{spec.name}': config.pbtxt output(s) {missing} are not outputs of "
                          f"{spec.model_path} (outputs there: {sorted(names)})")
    wanted = {t.name: t.datatype for t in spec.outputs}
    for tensor in outputs:
        if tensor.name not in wanted:
            network.unmark_output(tensor)
        elif _kserve_type(tensor.dtype) != wanted[tensor.name]:
            raise ConfigError(f"model '{spec.name}': output '{tensor.name}': config.pbtxt says "
                              f"{wanted[tensor.name]}, the model has {_kserve_type(tensor.dtype)}")


def _set_precision(trt: TensorRTModule, spec: ModelSpec, config: Any, precision: str) -> None:
    flags = trt.module.BuilderFlag
    if precision == "fp16" and not hasattr(flags, "FP16"):
        raise ConfigError(
            f"model '{spec.name}': precision FP16 is not a build option in {trt.flavour} {trt.version}, "
            f"which builds strongly typed networks: convert the ONNX model to FP16 and set precision FP32"
        )
    if precision == "tf32" and not hasattr(flags, "TF32"):
        raise ConfigError(f"model '{spec.name}': {trt.flavour} {trt.version} has no TF32 build option")
    if hasattr(flags, "TF32"):
        # TF32 is on by default; FP32 means exact FP32 math (comparable with ONNX Runtime's results).
        (config.set_flag if precision == "tf32" else config.clear_flag)(flags.TF32)
    if precision == "fp16":
        config.set_flag(flags.FP16)


def _attach_timing_cache(trt: TensorRTModule, config: Any, path: Path | None) -> Any | None:
    if trt.flavour != "tensorrt" or path is None:
        return None  # TensorRT for RTX: a no-op that would force a GPU query during the CPU build
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None and data:  # unreadable (other version, damaged): start afresh
        cache = config.create_timing_cache(b"")
    if cache is not None:
        config.set_timing_cache(cache, False)
    return cache

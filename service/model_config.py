"""Parsing and validation of one model's `config.pbtxt`, and its cross-check against the ONNX graph.

Every error is a `ConfigError` whose message starts with the file it is about, then the field
(`input[0].dims`, `engine_policy.bucket_sizes[1]`, ...), then what was found and what was expected.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import onnx
from google.protobuf import text_format
from google.protobuf.message import Message

from service.datatypes import CONFIG_TYPES, DATATYPE_OF_CONFIG_TYPE
from service.errors import ConfigError
from service.proto import model_config_pb2 as mc

SUPPORTED_BACKENDS = ("onnxruntime", "tensorrt")
DEFAULT_MODEL_FILENAME = "model.onnx"
# Triton platform names we accept, and the backend each one means.
_BACKEND_OF_PLATFORM = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}
_PLATFORM_OF_BACKEND = {b: p for p, b in _BACKEND_OF_PLATFORM.items()}

_KSERVE_OF_ONNX = {
    onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.UINT16: "UINT16",
    onnx.TensorProto.UINT32: "UINT32", onnx.TensorProto.UINT64: "UINT64", onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT16: "INT16", onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16", onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.DOUBLE: "FP64", onnx.TensorProto.STRING: "BYTES",
}


def _fail(path: Path, field: str, problem: str) -> ConfigError:
    return ConfigError(f"{path}: {field}: {problem}")


def parse_config(path: Path) -> mc.ModelConfig:
    """Read and parse `path` as a text-format ModelConfig; ConfigError names the file, line and field."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the model config: {e}") from None
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as e:
        # str(e) is "LINE:COL : detail"; re-state the position in words and keep protobuf's detail.
        detail = str(e).split(" : ", 1)[-1]
        raise ConfigError(f"{path}: line {e.GetLine()} column {e.GetColumn()}: {detail}") from None


def datatype_of(data_type: int) -> str:
    """The KServe datatype name of a config DataType enum value (TYPE_STRING -> BYTES)."""
    return DATATYPE_OF_CONFIG_TYPE[mc.DataType.Name(data_type)]


def validate_config(config: mc.ModelConfig, path: Path, dir_name: str) -> mc.ModelConfig:
    """Check `config` (read from `path` in model directory `dir_name`) and return a normalized copy.

    The copy has `name` filled in, `backend` set to one of SUPPORTED_BACKENDS and, when it was empty,
    `platform` set to the matching Triton platform, so the ModelConfig RPC can return it as is.
    """
    out = mc.ModelConfig()
    out.CopyFrom(config)
    _check_enums(out, path, "")
    if out.name and out.name != dir_name:
        raise _fail(path, "name", f"'{out.name}' differs from the directory name '{dir_name}'; "
                                  "leave it empty or make them equal")
    out.name = dir_name
    mbs = out.max_batch_size
    if mbs < 0:
        raise _fail(path, "max_batch_size", f"{mbs} is negative; use 0 (no batching) or a positive size")
    _check_tensors(path, "input", out.input, mbs)
    _check_tensors(path, "output", out.output, mbs)
    _normalize_backend(out, path)
    model_uses_gpu(out, path)
    _check_engine_policy(out, path)
    for i, size in enumerate(out.dynamic_batching.preferred_batch_size):
        _check_size(path, f"dynamic_batching.preferred_batch_size[{i}]", size, mbs)
    policy = out.version_policy
    if policy.WhichOneof("policy_choice") == "specific":
        if not policy.specific.versions:
            raise _fail(path, "version_policy.specific.versions", "lists no version")
        for i, v in enumerate(policy.specific.versions):
            if v < 1:
                raise _fail(path, f"version_policy.specific.versions[{i}]", f"{v} is not a version (>= 1)")
    filename = out.default_model_filename
    if filename and (filename in (".", "..") or any(c in filename for c in "/\\\0")):
        raise _fail(path, "default_model_filename",
                    f"'{filename}' must be a plain file name inside the version directory")
    return out


def model_filename(config: mc.ModelConfig) -> str:
    """The model file every version directory must hold."""
    return config.default_model_filename or DEFAULT_MODEL_FILENAME


def model_uses_gpu(config: mc.ModelConfig, path: Path) -> bool:
    """True when an instance group asks for KIND_GPU; KIND_CPU, KIND_AUTO and no group mean the CPU.

    One worker serves the model on one kind of device, so mixing GPU and CPU groups is an error;
    `count` beyond one instance is accepted and ignored.
    """
    kinds = set()
    for i, group in enumerate(config.instance_group):
        field = f"instance_group[{i}]"
        if group.kind == mc.ModelInstanceGroup.KIND_MODEL:
            raise _fail(path, f"{field}.kind", "KIND_MODEL is not supported; use KIND_CPU or KIND_GPU")
        if group.count < 0:
            raise _fail(path, f"{field}.count", f"{group.count} is negative")
        if any(g < 0 for g in group.gpus):
            raise _fail(path, f"{field}.gpus", f"{list(group.gpus)} holds a negative device index")
        kinds.add(group.kind == mc.ModelInstanceGroup.KIND_GPU)
    if len(kinds) > 1:
        raise _fail(path, "instance_group", "mixes KIND_GPU with CPU groups; one model runs on one kind")
    return kinds == {True}


def _check_enums(msg: Message, path: Path, prefix: str) -> None:
    # proto3 enums are open: text_format accepts `data_type: 99`; reject numbers the enum does not name.
    for fd, value in msg.ListFields():
        field = f"{prefix}{fd.name}"
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            for key, item in value.items():
                if isinstance(item, Message):
                    _check_enums(item, path, f"{field}[{key!r}].")
        elif fd.message_type is not None:
            items = value if fd.is_repeated else [value]
            for i, item in enumerate(items):
                _check_enums(item, path, f"{field}[{i}]." if fd.is_repeated else f"{field}.")
        elif fd.enum_type is not None:
            for v in value if fd.is_repeated else [value]:
                if v not in fd.enum_type.values_by_number:
                    names = ", ".join(fd.enum_type.values_by_name)
                    raise _fail(path, field, f"{v} is not a value of {fd.enum_type.name}; expected one of {names}")


def _check_tensors(path: Path, kind: str, tensors: Iterable, mbs: int) -> None:
    seen: set[str] = set()
    for i, t in enumerate(tensors):
        field = f"{kind}[{i}]"
        if not t.name:
            raise _fail(path, f"{field}.name", "is empty")
        if t.name in seen:
            raise _fail(path, f"{field}.name", f"'{t.name}' is configured twice; {kind} names must be unique")
        seen.add(t.name)
        if t.data_type == mc.TYPE_INVALID:
            raise _fail(path, f"{field}.data_type", f"is not set for {kind} '{t.name}'")
        if mc.DataType.Name(t.data_type) not in DATATYPE_OF_CONFIG_TYPE:
            raise _fail(path, f"{field}.data_type", f"{mc.DataType.Name(t.data_type)} is not supported")
        if not t.dims and mbs == 0:
            raise _fail(path, f"{field}.dims", f"{kind} '{t.name}' needs at least one dim "
                                               "when max_batch_size is 0")
        for j, d in enumerate(t.dims):
            if d < 1 and d != -1:
                raise _fail(path, f"{field}.dims[{j}]", f"{kind} '{t.name}' has dim {d}; "
                                                        "each dim must be >= 1 or -1 (any)")
    if not seen:
        raise _fail(path, kind, f"the model needs at least one {kind}")


def _normalize_backend(config: mc.ModelConfig, path: Path) -> None:
    supported = f"supported backends: {', '.join(SUPPORTED_BACKENDS)} (platforms: " \
                f"{', '.join(_BACKEND_OF_PLATFORM)})"
    backend, platform = config.backend, config.platform
    if platform and platform not in _BACKEND_OF_PLATFORM:
        raise _fail(path, "platform", f"'{platform}' is not supported; {supported}")
    if backend and backend not in SUPPORTED_BACKENDS:
        raise _fail(path, "backend", f"'{backend}' is not supported; {supported}")
    implied = _BACKEND_OF_PLATFORM.get(platform)
    if backend and implied and backend != implied:
        raise _fail(path, "backend", f"'{backend}' contradicts platform '{platform}'")
    config.backend = backend or implied or "onnxruntime"
    config.platform = platform or _PLATFORM_OF_BACKEND[config.backend]


def _check_size(path: Path, field: str, size: int, mbs: int) -> None:
    if not 1 <= size <= mbs:
        raise _fail(path, field, f"{size} is outside 1..max_batch_size ({mbs})")


def _check_engine_policy(config: mc.ModelConfig, path: Path) -> None:
    # max_engines only matters in MULTI mode; elsewhere it is accepted and ignored.
    ep, mbs = config.engine_policy, config.max_batch_size
    if ep.bucket == mc.LIST and not ep.bucket_sizes:
        raise _fail(path, "engine_policy.bucket_sizes", "bucket: LIST needs at least one size")
    if ep.bucket_sizes and ep.bucket != mc.LIST:
        raise _fail(path, "engine_policy.bucket_sizes",
                    f"is only used with bucket: LIST (bucket is {mc.BucketPolicy.Name(ep.bucket)})")
    for name in ("bucket_sizes", "warmup_batch_sizes"):
        for i, size in enumerate(getattr(ep, name)):
            _check_size(path, f"engine_policy.{name}[{i}]", size, mbs)
    if not 0 <= ep.opt_batch_size <= mbs:
        raise _fail(path, "engine_policy.opt_batch_size",
                    f"{ep.opt_batch_size} is outside 0..max_batch_size ({mbs}); 0 means the capacity")


def check_onnx_model(model_path: Path, config: mc.ModelConfig, config_path: Path) -> None:
    """Check that every configured input/output is in the ONNX graph with the same type and rank.

    Also requires every graph input without an initializer to be configured, since the engine must
    feed it. Only the graph is read (`load_external_data=False`).
    """
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, OSError, ValueError... on a bad file
        raise ConfigError(f"{model_path}: not a readable ONNX model: {type(e).__name__}: {e}") from None
    if not model.HasField("graph") or not model.graph.output:
        raise ConfigError(f"{model_path}: not an ONNX model (no graph with outputs)")
    graph = model.graph
    initialized = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    batched = int(config.max_batch_size > 0)
    for kind, tensors, values in (("input", config.input, graph.input),
                                  ("output", config.output, graph.output)):
        by_name = {v.name: v for v in values}
        for i, t in enumerate(tensors):
            value = by_name.get(t.name)
            if value is None:
                graph_names = ", ".join(n for n in by_name if n not in initialized) or "none"
                raise _fail(config_path, f"{kind}[{i}].name", f"'{t.name}' is not an {kind} of the graph in "
                                                              f"{model_path}; graph {kind}s: {graph_names}")
            _compare(config_path, f"{kind}[{i}]", t, value, model_path, batched, config.max_batch_size)
    configured = {t.name for t in config.input}
    for v in graph.input:
        if v.name not in initialized and v.name not in configured:
            raise _fail(config_path, "input", f"graph input '{v.name}' of {model_path} is not configured")


def _compare(path: Path, field: str, t: Message, value: onnx.ValueInfoProto, model_path: Path,
             batched: int, mbs: int) -> None:
    if value.type.WhichOneof("value") != "tensor_type":
        raise _fail(path, field, f"'{t.name}' is not a tensor in {model_path}")
    tt = value.type.tensor_type
    want = datatype_of(t.data_type)
    got = _KSERVE_OF_ONNX.get(tt.elem_type)
    if got != want:
        onnx_name = onnx.TensorProto.DataType.Name(tt.elem_type) \
            if tt.elem_type in onnx.TensorProto.DataType.values() else str(tt.elem_type)
        raise _fail(path, f"{field}.data_type", f"'{t.name}' is {CONFIG_TYPES[want]} in the config but "
                                                f"{onnx_name} ({got or 'unsupported'}) in {model_path}")
    if not tt.HasField("shape"):
        return  # rank unknown in the graph: nothing to compare
    gdims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
    cdims = list(t.dims)
    if len(gdims) != len(cdims) + batched:
        batch_note = " plus the batch dim" if batched else ""
        raise _fail(path, f"{field}.dims", f"'{t.name}' has rank {len(cdims) + batched} in the config "
                                           f"(dims {cdims}{batch_note}) but rank {len(gdims)} in "
                                           f"{model_path} (shape {gdims})")
    if batched and gdims[0] != -1 and not gdims[0] == 1 == mbs:
        raise _fail(path, "max_batch_size", f"{mbs} but the graph in {model_path} fixes the batch dim "
                                            f"of '{t.name}' to {gdims[0]}")
    for j, (c, g) in enumerate(zip(cdims, gdims[batched:])):
        if c != -1 and g != -1 and c != g:
            raise _fail(path, f"{field}.dims[{j}]", f"'{t.name}' has dim {c} in the config but {g} in "
                                                    f"{model_path} (shape {gdims})")

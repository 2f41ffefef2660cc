"""ModelInferRequest -> validated raw tensors (answers are written by `response_wire`).

Every check a client can fail happens here, in the frontend, before a request reaches a worker: names,
datatypes, shapes against the model config, and the byte or element count that the declared shape
implies against what was actually received, before anything is allocated. Typed `contents` are
converted to raw form with numpy so the worker sees one format.
"""

from __future__ import annotations

import math

import numpy as np

from service import tensors
from service.datatypes import NUMPY_DTYPES
from service.errors import InvalidArgument
from service.frontend.response_wire import ResponseEncoder
from service.proto import inference_pb2
from service.repository import ModelSpec, TensorSpec
from service.tensors import WireTensor

_fmt = tensors.format_shape

# KServe datatype -> the InferTensorContents field that carries it (FP16/BF16 have none: raw only).
TYPED_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# The wire type of each numeric field, used to read it with np.fromiter before narrowing.
_FIELD_DTYPES: dict[str, np.dtype] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}
_ALL_FIELDS = (*_FIELD_DTYPES, "bytes_contents")


def config_shape(spec: ModelSpec, tensor: TensorSpec) -> tuple[int, ...]:
    """The full shape a tensor has on the wire: -1 batch dim prepended when the model batches."""
    return (-1, *tensor.dims) if spec.max_batch_size > 0 else tuple(tensor.dims)


def tensor_metadata(
    spec: ModelSpec,
) -> tuple[list[inference_pb2.ModelMetadataResponse.TensorMetadata], ...]:
    """(inputs, outputs) metadata for ModelMetadata, in config order."""
    meta = inference_pb2.ModelMetadataResponse.TensorMetadata
    return tuple(
        [meta(name=t.name, datatype=t.datatype, shape=config_shape(spec, t)) for t in group]
        for group in (spec.inputs, spec.outputs)
    )


def _check_names(request: inference_pb2.ModelInferRequest, spec: ModelSpec) -> dict[str, int]:
    """Index in the request of each configured input; unknown, duplicate and missing inputs fail."""
    known = {t.name for t in spec.inputs}
    index_of: dict[str, int] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name not in known:
            raise InvalidArgument(
                f"unknown input '{tensor.name}' for model '{spec.name}'; expected inputs: "
                + ", ".join(t.name for t in spec.inputs)
            )
        if tensor.name in index_of:
            raise InvalidArgument(f"input '{tensor.name}' is given more than once")
        if "shared_memory_region" in tensor.parameters:
            raise InvalidArgument(
                f"input '{tensor.name}': shared-memory inputs are not supported; "
                "send the data in raw_input_contents or contents"
            )
        index_of[tensor.name] = index
    missing = [t.name for t in spec.inputs if t.name not in index_of]
    if missing:
        raise InvalidArgument(
            f"missing input {', '.join(repr(n) for n in missing)} for model '{spec.name}'; expected inputs: "
            + ", ".join(t.name for t in spec.inputs)
        )
    return index_of


def _check_shape(tensor: inference_pb2.ModelInferRequest.InferInputTensor, cfg: TensorSpec,
                 spec: ModelSpec) -> tuple[int, ...]:
    """The tensor's declared datatype and shape, checked against the config."""
    label = f"input '{cfg.name}'"
    if tensor.datatype not in NUMPY_DTYPES:
        raise InvalidArgument(
            f"{label}: unknown datatype '{tensor.datatype}'; expected {cfg.datatype} "
            f"(known datatypes: {', '.join(NUMPY_DTYPES)})"
        )
    if tensor.datatype != cfg.datatype:
        raise InvalidArgument(f"{label}: expected datatype {cfg.datatype}, got {tensor.datatype}")
    expected = config_shape(spec, cfg)
    shape = tuple(tensor.shape)
    if len(shape) != len(expected):
        raise InvalidArgument(
            f"{label}: expected {len(expected)} dims (shape {_fmt(expected)}), "
            f"got {len(shape)} (shape {_fmt(shape)})"
        )
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{label}: shape {_fmt(shape)} has a negative dim; expected {_fmt(expected)}")
    if spec.max_batch_size > 0 and shape[0] > spec.max_batch_size:
        raise InvalidArgument(
            f"{label}: batch size {shape[0]} exceeds max_batch_size {spec.max_batch_size} "
            f"of model '{spec.name}'"
        )
    for axis, (got, want) in enumerate(zip(shape, expected)):
        if want != -1 and got != want:
            raise InvalidArgument(
                f"{label}: expected shape {_fmt(expected)} (dim {axis} = {want}), got {_fmt(shape)}"
            )
    tensors.check_shape(cfg.datatype, shape, label)
    return shape


def _check_raw_size(data: bytes, datatype: str, shape: tuple[int, ...], label: str) -> None:
    if datatype == "BYTES":
        tensors.check_bytes(data, tensors.element_count(shape), label)
        return
    expected = tensors.raw_size(datatype, shape)
    if len(data) != expected:
        raise InvalidArgument(
            f"{label}: expected {expected} bytes for shape {_fmt(shape)} of {datatype}, "
            f"got {len(data)} in raw_input_contents"
        )
    if datatype == "BOOL" and data and np.frombuffer(data, dtype=np.uint8).max() > 1:
        raise InvalidArgument(f"{label}: BOOL elements must be bytes 0 or 1 in raw_input_contents")


def _typed_to_raw(tensor: inference_pb2.ModelInferRequest.InferInputTensor, datatype: str,
                  shape: tuple[int, ...]) -> bytes | memoryview:
    """Typed `contents` in raw form; the element count is checked before anything is converted."""
    label = f"input '{tensor.name}'"
    count = tensors.element_count(shape)
    field = TYPED_FIELDS.get(datatype)
    contents = tensor.contents
    if field is None:
        if tensor.HasField("contents") or count:
            raise InvalidArgument(
                f"{label}: {datatype} has no typed contents field; send its data in raw_input_contents"
            )
        return b""
    for other in _ALL_FIELDS:
        if other != field and len(getattr(contents, other)):
            raise InvalidArgument(f"{label}: datatype {datatype} expects data in {field}, got {other}")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"{label}: expected {count} elements for shape {_fmt(shape)} of {datatype} in {field}, "
            f"got {len(values)}"
        )
    if datatype == "BYTES":
        return tensors.pack_bytes(values, label)
    array = np.fromiter(values, dtype=_FIELD_DTYPES[field], count=count)
    target = NUMPY_DTYPES[datatype]
    if target.kind in "iu" and target.itemsize < array.dtype.itemsize and count:
        info = np.iinfo(target)
        bad = (array < info.min) | (array > info.max)
        if bad.any():
            raise InvalidArgument(
                f"{label}: value {array[bad][0]} in {field} is out of range for {datatype} "
                f"[{info.min}, {info.max}]"
            )
        array = array.astype(target)
    return tensors.to_raw(array, datatype, name=label)


def _requested_outputs(request: inference_pb2.ModelInferRequest, spec: ModelSpec) -> list[str]:
    known = [t.name for t in spec.outputs]
    if not len(request.outputs):
        return known
    names: list[str] = []
    for output in request.outputs:
        if output.name not in known:
            raise InvalidArgument(
                f"unknown output '{output.name}' requested from model '{spec.name}'; "
                f"expected one of: {', '.join(known)}"
            )
        if output.name in names:
            raise InvalidArgument(f"output '{output.name}' is requested more than once")
        if "shared_memory_region" in output.parameters:
            raise InvalidArgument(f"output '{output.name}': shared-memory outputs are not supported")
        if "classification" in output.parameters:
            raise InvalidArgument(f"output '{output.name}': classification outputs are not supported")
        names.append(output.name)
    return names or known


_FIXED, _BOOL, _BYTES = 0, 1, 2  # how `_decode_fast` checks an input's bytes


class RequestPlan:
    """What `decode_request`'s fast path checks a request against, computed once per ModelSpec object:
    per input (name, datatype, label, full config shape, fixed dims without the batch dim or None when
    one is -1, elements per row, bytes per element, kind); None when the spec has an input the fast path
    cannot judge (a dim below -1, an unknown datatype). Also the encoder of the model's answers, and
    whether every input is of a fixed-size datatype other than BOOL (`fixed_only`: a request's head then
    decides everything but its byte counts, see `templates.py`)."""

    __slots__ = ("fixed_only", "inputs", "max_batch", "output_names", "response", "spec")

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.response = ResponseEncoder(spec)
        self.max_batch = spec.max_batch_size
        self.output_names = tuple(t.name for t in spec.outputs)
        entries: list[tuple] | None = []
        for cfg in spec.inputs:
            if cfg.datatype not in NUMPY_DTYPES or any(d < -1 for d in cfg.dims):
                entries = None
                break
            kind = {"BOOL": _BOOL, "BYTES": _BYTES}.get(cfg.datatype, _FIXED)
            fixed = None if -1 in cfg.dims else list(cfg.dims)
            entries.append((cfg.name, cfg.datatype, f"input '{cfg.name}'", list(config_shape(spec, cfg)), fixed,
                            math.prod(cfg.dims), NUMPY_DTYPES[cfg.datatype].itemsize, kind))
        self.inputs = tuple(entries) if entries else None
        self.fixed_only = self.inputs is not None and all(entry[-1] == _FIXED for entry in self.inputs)


class RequestPlans:
    """RequestPlans by ModelSpec object, for one servicer (a reload makes a new spec, hence a new plan;
    at most `limit` kept: a handful of specs are live at a time). A plan holds its spec, so an id is not
    reused while its plan is kept."""

    def __init__(self, limit: int = 64) -> None:
        self._plans: dict[int, RequestPlan] = {}
        self._limit = limit

    def get(self, spec: ModelSpec) -> RequestPlan:
        plan = self._plans.get(id(spec))
        if plan is None:
            if len(self._plans) >= self._limit:
                self._plans.clear()
            plan = self._plans[id(spec)] = RequestPlan(spec)
        return plan

    def __len__(self) -> int:
        return len(self._plans)


def _decode_fast(request: inference_pb2.ModelInferRequest, plan: RequestPlan,
                 raw: list[bytes] | list[memoryview]) -> list[WireTensor] | None:
    """The common request in one pass: raw contents only, inputs in config order without parameters, a
    positive element count. None for anything else, valid or not, and never an exception: `decode_checked`
    then runs every check and names what is wrong. What this accepts, those checks accept with the same
    result (a positive byte count that the data matches also bounds the shape)."""
    entries = plan.inputs
    inputs = request.inputs
    if entries is None or len(raw) != len(entries) or len(inputs) != len(entries):
        return None
    max_batch = plan.max_batch
    batch = 0
    decoded: list[WireTensor] = []
    for (name, datatype, label, expected, fixed, row, itemsize, kind), tensor, data in zip(entries, inputs, raw):
        if tensor.name != name or tensor.datatype != datatype or tensor.parameters or tensor.HasField("contents"):
            return None
        shape = tensor.shape[:]
        if len(shape) != len(expected):
            return None
        if fixed is None:  # a -1 dim: every dim positive, the others as configured
            for got, want in zip(shape, expected):
                if got <= 0 or (want != -1 and got != want):
                    return None
            count = math.prod(shape)
        elif max_batch > 0:
            if shape[1:] != fixed:
                return None
            count = shape[0] * row
        else:
            if shape != fixed:
                return None
            count = row
        if count <= 0:  # also rules out a batch dim below 1 (the configured dims are >= 0 here)
            return None
        if max_batch > 0:
            if shape[0] > max_batch or (batch and shape[0] != batch):
                return None
            batch = shape[0]
        if kind == _BYTES:
            if not _bytes_cover(data, count, label):
                return None
        elif len(data) != count * itemsize or (kind == _BOOL and _bool_bytes_invalid(data)):
            return None
        decoded.append(WireTensor(name, datatype, tuple(shape), data))
    return decoded


def _bytes_cover(data: bytes | memoryview, count: int, label: str) -> bool:
    """Whether raw BYTES data is exactly `count` length-prefixed elements (`tensors.check_bytes`'s rule)."""
    try:
        tensors.check_bytes(data, count, label)
    except InvalidArgument:
        return False
    return True


def _bool_bytes_invalid(data: bytes | memoryview) -> bool:
    """Whether raw BOOL data has a byte other than 0 or 1."""
    if isinstance(data, bytes):
        return bool(data.translate(None, b"\x00\x01"))
    return bool(np.frombuffer(data, dtype=np.uint8).max() > 1)


def decode_request(
    request: inference_pb2.ModelInferRequest, spec: ModelSpec, raw: list[memoryview] | None = None,
    plan: RequestPlan | None = None,
) -> tuple[list[WireTensor], list[str]]:
    """The request's inputs in config order as raw tensors, and the output names to return. `raw`: the
    raw contents when they were kept out of the message (`request_wire`); `plan`: the spec's RequestPlan
    when the caller keeps one (`RequestPlans`), else one is made for this call.

    Raises InvalidArgument, naming the input and what was expected, for anything malformed.
    """
    if raw is None:
        raw = request.raw_input_contents[:]  # each access copies out of the message: do it once
    plan = plan or RequestPlan(spec)
    decoded = _decode_fast(request, plan, raw)
    if decoded is None:
        return decode_checked(request, spec, raw)
    return decoded, (list(plan.output_names) if not len(request.outputs) else _requested_outputs(request, spec))


def decode_checked(
    request: inference_pb2.ModelInferRequest, spec: ModelSpec, raw: list[bytes] | list[memoryview] | None = None
) -> tuple[list[WireTensor], list[str]]:
    """`decode_request` without its fast path: every check, in the order that decides which error a
    malformed request gets."""
    if raw is None:
        raw = request.raw_input_contents[:]
    index_of = _check_names(request, spec)
    output_names = _requested_outputs(request, spec)
    if raw:
        typed = [t.name for t in request.inputs if t.HasField("contents")]
        if typed:
            raise InvalidArgument(
                f"input '{typed[0]}': both raw_input_contents and typed contents given; use one form"
            )
        if len(raw) != len(request.inputs):
            raise InvalidArgument(
                f"raw_input_contents has {len(raw)} entries but the request has {len(request.inputs)} "
                "inputs; expected one entry per input, in request order"
            )
    shapes: list[tuple[int, ...]] = []
    batch_from: TensorSpec | None = None
    for cfg in spec.inputs:
        shape = _check_shape(request.inputs[index_of[cfg.name]], cfg, spec)
        if spec.max_batch_size > 0:
            if batch_from is None:
                batch_from = cfg
            elif shape[0] != shapes[0][0]:
                raise InvalidArgument(
                    f"input '{cfg.name}': batch size {shape[0]} differs from {shapes[0][0]} of input "
                    f"'{batch_from.name}'; all inputs must have the same batch size"
                )
        shapes.append(shape)
    decoded: list[WireTensor] = []
    for cfg, shape in zip(spec.inputs, shapes):
        index = index_of[cfg.name]
        if raw:
            data: bytes | memoryview = raw[index]
            _check_raw_size(raw[index], cfg.datatype, shape, f"input '{cfg.name}'")
        else:
            data = _typed_to_raw(request.inputs[index], cfg.datatype, shape)
        decoded.append(WireTensor(cfg.name, cfg.datatype, shape, data))
    return decoded, output_names


"""Tensor codec: every KServe datatype raw and typed, wire compatibility with tritonclient, malformed requests."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import tensors
from service.datatypes import numpy_dtype
from service.errors import InvalidArgument
from service.frontend import codec
from service.frontend.codec import (
    TYPED_FIELDS,
    WireTensor,
    decode_checked,
    decode_request,
    tensor_metadata,
)
from service.frontend.response_wire import ResponseEncoder
from service.proto import inference_pb2, model_config_pb2
from service.repository import ModelSpec, TensorSpec

Request = inference_pb2.ModelInferRequest


def make_spec(inputs, outputs=(("y", "FP32", (4,)),), max_batch_size=8, name="m") -> ModelSpec:
    return ModelSpec(
        name=name,
        version=3,
        versions=(3,),
        model_path=Path("/nonexistent/model.onnx"),
        max_batch_size=max_batch_size,
        inputs=tuple(TensorSpec(n, d, tuple(s)) for n, d, s in inputs),
        outputs=tuple(TensorSpec(n, d, tuple(s)) for n, d, s in outputs),
        backend="onnxruntime",
        use_gpu=False,
        config=model_config_pb2.ModelConfig(name=name),
    )


def add_raw(request, name, datatype, shape, data) -> None:
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(bytes(data))


def add_typed(request, name, datatype, shape, field, values) -> None:
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    getattr(tensor.contents, field).extend(values)


def sample(datatype: str) -> np.ndarray:
    """A [2,3] array with the extremes of the datatype."""
    if datatype == "BYTES":
        return np.array([[b"", "héllo wörld".encode(), b"\x00\xff\x00"], [b"a", "日本語".encode(), b""]],
                        dtype=object)
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    dtype = numpy_dtype(datatype)
    if datatype == "BF16":
        # bfloat16 words of 1.0, -2.0, inf, nan, 0, 3.140625
        return np.array([[0x3F80, 0xC000, 0x7F80], [0x7FC0, 0x0000, 0x4049]], dtype=dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([[info.min, info.max, 0], [1, info.max - 1, info.min + 1]], dtype=dtype)
    info = np.finfo(dtype)
    return np.array([[info.min, info.max, 0.0], [-1.5, np.inf, np.nan]], dtype=dtype)


ALL_TYPES = ["BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64",
             "FP16", "BF16", "FP32", "FP64", "BYTES"]


def roundtrip_spec(datatype: str) -> ModelSpec:
    return make_spec([("in", datatype, (3,))], [("out", datatype, (3,))])


@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_raw_roundtrip(datatype):
    array = sample(datatype)
    assert tensors.datatype_of(array) == ("UINT16" if datatype == "BF16" else datatype)
    spec = roundtrip_spec(datatype)
    request = Request(id="req-1")
    add_raw(request, "in", datatype, array.shape, tensors.to_raw(array, datatype))
    (wire,), outputs = decode_request(request, spec)
    assert outputs == ["out"]
    assert (wire.name, wire.datatype, wire.shape) == ("in", datatype, (2, 3))
    decoded = tensors.to_array(wire.datatype, wire.shape, wire.data)
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)

    # outputs as a worker makes them: to_raw's memoryview for fixed sizes, bytes for BYTES
    response = inference_pb2.ModelInferResponse.FromString(ResponseEncoder(spec).encode(
        request.id, [WireTensor("out", datatype, wire.shape, tensors.to_raw(decoded, datatype))]))
    assert (response.model_name, response.model_version, response.id) == ("m", "3", "req-1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("out", datatype, [2, 3])]
    back = tensors.to_array(datatype, response.outputs[0].shape, response.raw_output_contents[0])
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("datatype", [t for t in ALL_TYPES if t not in ("FP16", "BF16")])
def test_typed_roundtrip(datatype):
    array = sample(datatype)
    request = Request()
    add_typed(request, "in", datatype, array.shape, TYPED_FIELDS[datatype], array.ravel().tolist())
    (wire,), _ = decode_request(request, roundtrip_spec(datatype))
    decoded = tensors.to_array(datatype, wire.shape, wire.data)
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)
    # typed input becomes exactly the raw form a raw request would carry
    assert bytes(wire.data) == bytes(tensors.to_raw(array, datatype))


def test_bytes_accepts_str_elements_and_empty_tensor():
    raw = tensors.to_raw(np.array(["", "ß", "x"], dtype=object), "BYTES")
    assert raw == b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00" + "ß".encode() + b"\x01\x00\x00\x00x"
    assert tensors.to_array("BYTES", (3,), raw).tolist() == [b"", "ß".encode(), b"x"]
    assert tensors.to_array("BYTES", (0, 5), b"").shape == (0, 5)
    assert tensors.to_raw(np.array(["ab", "c"]), "BYTES") == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"


def test_fixed_size_to_array_is_zero_copy():
    buf = bytearray(np.arange(6, dtype="<f4").tobytes())
    array = tensors.to_array("FP32", (2, 3), buf)
    buf[0:4] = np.float32(42).tobytes()
    assert array[0, 0] == 42
    assert np.shares_memory(array, np.frombuffer(buf, dtype=np.uint8))


def test_to_raw_converts_byte_order_and_rejects_lossy_casts():
    big = np.array([1.0, 2.0], dtype=">f4")
    assert bytes(tensors.to_raw(big, "FP32")) == np.array([1.0, 2.0], dtype="<f4").tobytes()
    assert bytes(tensors.to_raw(np.array([1, 2], dtype=np.int32), "INT64")) == np.array([1, 2], "<i8").tobytes()
    assert bytes(tensors.to_raw(np.arange(6).reshape(2, 3).T, "INT64")) == np.arange(6).reshape(2, 3).T.copy().tobytes()
    with pytest.raises(InvalidArgument, match="float64 as FP32"):
        tensors.to_raw(np.zeros(2), "FP32")
    assert tensors.raw_size("FP64", (2**40, 2**40)) == 2**83
    with pytest.raises(ValueError):
        tensors.raw_size("BYTES", (1,))


def test_bytes_fixed_width_fast_path_and_irregular_lengths_agree():
    same = [b"abcd", b"efgh", b"ijkl"]
    mixed = [b"abcd", b"", b"ijklmnop"]
    for elements in (same, mixed, [b""], [b"", b""], [b"\x00" * 9]):
        raw = tensors.pack_bytes(elements)
        assert tensors.to_array("BYTES", (len(elements),), raw).tolist() == elements
    # same total size as three 4-byte elements, but prefixes say otherwise: must not pass the fast path
    forged = b"\x04\x00\x00\x00abcd" + b"\x05\x00\x00\x00efgh" + b"\x03\x00\x00\x00ijkl"
    assert len(forged) == 3 * 8
    with pytest.raises(InvalidArgument):
        tensors.to_array("BYTES", (3,), forged)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=20), max_size=10))
def test_bytes_pack_parse_property(elements):
    raw = tensors.pack_bytes(elements)
    assert tensors.to_array("BYTES", (len(elements),), raw).tolist() == elements


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(min_value=0, max_value=20))
def test_bytes_garbage_only_invalid_argument(buf, count):
    try:
        array = tensors.to_array("BYTES", (count,), buf)
    except InvalidArgument:
        return
    assert tensors.pack_bytes(array.tolist()) == buf


def test_requested_outputs_in_request_order():
    spec = make_spec([("x", "FP32", (4,))], [("y", "FP32", (4,)), ("z", "INT64", (-1,))])
    request = Request()
    add_raw(request, "x", "FP32", [1, 4], bytes(16))
    request.outputs.add(name="z")
    request.outputs.add(name="y")
    assert decode_request(request, spec)[1] == ["z", "y"]
    del request.outputs[:]
    assert decode_request(request, spec)[1] == ["y", "z"]


def test_inputs_returned_in_config_order():
    spec = make_spec([("a", "FP32", (4,)), ("b", "INT64", (-1,))])
    request = Request()
    add_raw(request, "b", "INT64", [2, 1], np.array([7, 8], "<i8").tobytes())
    add_raw(request, "a", "FP32", [2, 4], np.ones(8, "<f4").tobytes())
    wire, _ = decode_request(request, spec)
    assert [w.name for w in wire] == ["a", "b"]
    assert tensors.to_array("INT64", wire[1].shape, wire[1].data).ravel().tolist() == [7, 8]
    assert tensors.to_array("FP32", wire[0].shape, wire[0].data).sum() == 8


def test_batch_zero_is_valid():
    spec = make_spec([("a", "FP32", (4,)), ("s", "BYTES", (-1,))])
    request = Request()
    add_raw(request, "a", "FP32", [0, 4], b"")
    add_raw(request, "s", "BYTES", [0, 3], b"")
    wire, _ = decode_request(request, spec)
    assert [w.shape for w in wire] == [(0, 4), (0, 3)]
    assert tensors.to_array("FP32", (0, 4), wire[0].data).shape == (0, 4)
    typed = Request()
    add_typed(typed, "a", "FP32", [0, 4], "fp32_contents", [])
    add_typed(typed, "s", "BYTES", [0, 2], "bytes_contents", [])
    assert [w.shape for w in decode_request(typed, spec)[0]] == [(0, 4), (0, 2)]


def test_no_batch_dim_model():
    spec = make_spec([("x", "INT32", (2, -1))], max_batch_size=0)
    request = Request()
    add_raw(request, "x", "INT32", [2, 3], np.arange(6, dtype="<i4").tobytes())
    (wire,), _ = decode_request(request, spec)
    assert wire.shape == (2, 3)
    with pytest.raises(InvalidArgument, match=r"expected 2 dims \(shape \[2,-1\]\)"):
        bad = Request()
        add_raw(bad, "x", "INT32", [1, 2, 3], bytes(24))
        decode_request(bad, spec)


def test_tensor_metadata():
    spec = make_spec([("x", "FP32", (4,))], [("y", "INT64", (-1, 2))])
    inputs, outputs = tensor_metadata(spec)
    assert [(t.name, t.datatype, list(t.shape)) for t in inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in outputs] == [("y", "INT64", [-1, -1, 2])]
    spec0 = make_spec([("x", "FP32", (4,))], max_batch_size=0)
    assert list(tensor_metadata(spec0)[0][0].shape) == [4]


@pytest.mark.parametrize("declared", [[2**62, 2**62], [0, 2**62, 2**62], [3, 2**61]])
def test_huge_declared_shape_fails_fast_without_allocation(declared):
    specs = [make_spec([("x", "FP32", (-1,) * (len(declared) - 1))]),
             make_spec([("x", "FP32", (-1,) * len(declared))], max_batch_size=0),
             make_spec([("x", "BYTES", (-1,) * len(declared))], max_batch_size=0)]
    for spec in specs:
        request = Request()
        add_raw(request, "x", spec.inputs[0].datatype, declared, bytes(64))
        tracemalloc.start()
        start = time.perf_counter()
        with pytest.raises(InvalidArgument, match="input 'x'"):
            decode_request(request, spec)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert elapsed < 0.5
        assert peak < 256 * 1024
    # the same shapes are refused by to_array itself (the worker side)
    with pytest.raises(InvalidArgument, match="too large"):
        tensors.to_array("FP32", [0, 2**62, 2**62], b"")


def test_wire_compatible_with_tritonclient():
    tritonclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import InferResult, service_pb2
    from tritonclient.grpc._utils import _get_inference_request

    types = [t for t in ALL_TYPES if t != "BF16"]  # tritonclient's BF16 takes float32 input
    spec = make_spec([(f"in_{t}", t, (3,)) for t in types], [(f"out_{t}", t, (3,)) for t in types])
    inputs = []
    for datatype in types:
        infer_input = tritonclient.InferInput(f"in_{datatype}", [2, 3], datatype)
        infer_input.set_data_from_numpy(sample(datatype))
        inputs.append(infer_input)
    outputs = [tritonclient.InferRequestedOutput(f"out_{t}") for t in reversed(types)]
    theirs = _get_inference_request(
        model_name="m", inputs=inputs, model_version="", request_id="abc", outputs=outputs,
        sequence_id=0, sequence_start=False, sequence_end=False, priority=0, timeout=None, parameters=None,
    )
    ours = Request()
    ours.ParseFromString(theirs.SerializeToString())
    assert ours.SerializeToString() == theirs.SerializeToString()
    wire, names = decode_request(ours, spec)
    assert names == [f"out_{t}" for t in reversed(types)]
    for datatype, tensor in zip(types, wire):
        np.testing.assert_array_equal(tensors.to_array(datatype, tensor.shape, tensor.data), sample(datatype))

    response = ResponseEncoder(spec).encode(ours.id, [WireTensor(f"out_{w.datatype}", w.datatype, w.shape, w.data)
                                                      for w in wire])
    parsed = service_pb2.ModelInferResponse()
    parsed.ParseFromString(response)
    result = InferResult(parsed)
    assert result.get_response().id == "abc"
    for datatype in types:
        got = result.as_numpy(f"out_{datatype}")
        np.testing.assert_array_equal(got, sample(datatype))


# --- malformed requests -------------------------------------------------------------------------

TWO = make_spec([("x", "FP32", (4,)), ("ids", "INT64", (-1,))],
                [("y", "FP32", (4,)), ("z", "INT64", (-1,))])
SMALL = {"INT8": "int_contents", "INT16": "int_contents", "UINT8": "uint_contents",
         "UINT16": "uint_contents", "FP16": None, "BYTES": "bytes_contents", "BOOL": "bool_contents"}
ONE_OF = {t: make_spec([("v", t, (-1,))]) for t in SMALL}


def good(x_shape=(2, 4), ids_shape=(2, 3)) -> Request:
    request = Request()
    add_raw(request, "x", "FP32", x_shape, bytes(4 * int(np.prod(x_shape))))
    add_raw(request, "ids", "INT64", ids_shape, bytes(8 * int(np.prod(ids_shape))))
    return request


def typed_two() -> Request:
    request = Request()
    add_typed(request, "x", "FP32", [1, 4], "fp32_contents", [1.0] * 4)
    add_typed(request, "ids", "INT64", [1, 2], "int64_contents", [1, 2])
    return request


def _mutate(build, change):
    def make():
        request = build()
        change(request)
        return request
    return make


def _raw_v(datatype, shape, data):
    def make():
        request = Request()
        add_raw(request, "v", datatype, shape, data)
        return request
    return make


def _typed_v(datatype, field, values):
    def make():
        request = Request()
        add_typed(request, "v", datatype, [1, len(values)], field, values)
        return request
    return make


def _set(path_value):
    def change(request):
        for attr, value in path_value:
            obj = request.inputs[0]
            if attr == "shape":
                del obj.shape[:]
                obj.shape.extend(value)
            else:
                setattr(obj, attr, value)
    return change


MALFORMED = [
    # (id, spec, request factory, substring of message)
    ("unknown-datatype", TWO, _mutate(good, _set([("datatype", "FP31")])),
     "input 'x': unknown datatype 'FP31'; expected FP32"),
    ("wrong-datatype", TWO, _mutate(good, _set([("datatype", "FP64")])),
     "input 'x': expected datatype FP32, got FP64"),
    ("rank-too-small", TWO, _mutate(good, _set([("shape", [8])])), "input 'x': expected 2 dims"),
    ("rank-too-large", TWO, _mutate(good, _set([("shape", [2, 4, 1])])),
     "input 'x': expected 2 dims (shape [-1,4]), got 3"),
    ("negative-batch", TWO, _mutate(good, _set([("shape", [-1, 4])])), "input 'x': shape [-1,4] has a negative dim"),
    ("negative-dim", TWO, _mutate(good, lambda r: r.inputs[1].shape.__setitem__(1, -3)),
     "input 'ids': shape [2,-3] has a negative dim"),
    ("config-dim", TWO, lambda: good(x_shape=(2, 5)), "input 'x': expected shape [-1,4] (dim 1 = 4), got [2,5]"),
    ("batch-over-max", TWO, lambda: good(x_shape=(9, 4), ids_shape=(9, 1)),
     "input 'x': batch size 9 exceeds max_batch_size 8"),
    ("batch-mismatch", TWO, lambda: good(ids_shape=(3, 1)),
     "input 'ids': batch size 3 differs from 2 of input 'x'"),
    ("huge-wildcard", TWO, _mutate(good, lambda r: r.inputs[1].shape.__setitem__(1, 2**40)),
     f"input 'ids': expected {2 * 2**40 * 8} bytes for shape [2,{2**40}] of INT64, got 48"),
    ("overflowing-product", TWO, _mutate(good, lambda r: r.inputs[1].shape.__setitem__(1, 2**62)),
     "input 'ids': shape [2,4611686018427387904] of INT64 is too large"),
    ("byte-count", TWO, _mutate(good, lambda r: r.raw_input_contents.__setitem__(0, bytes(31))),
     "input 'x': expected 32 bytes for shape [2,4] of FP32, got 31"),
    ("raw-fewer", TWO, _mutate(good, lambda r: r.raw_input_contents.pop()),
     "raw_input_contents has 1 entries but the request has 2 inputs"),
    ("raw-more", TWO, _mutate(good, lambda r: r.raw_input_contents.append(b"")),
     "raw_input_contents has 3 entries but the request has 2 inputs"),
    ("raw-and-typed", TWO, _mutate(good, lambda r: r.inputs[1].contents.int64_contents.extend([1] * 6)),
     "input 'ids': both raw_input_contents and typed contents given"),
    ("typed-count", TWO, _mutate(typed_two, lambda r: r.inputs[0].contents.fp32_contents.append(1.0)),
     "input 'x': expected 4 elements for shape [1,4] of FP32 in fp32_contents, got 5"),
    ("typed-absent", TWO, _mutate(typed_two, lambda r: r.inputs[1].ClearField("contents")),
     "input 'ids': expected 2 elements for shape [1,2] of INT64 in int64_contents, got 0"),
    ("typed-wrong-field", TWO, _mutate(typed_two, lambda r: r.inputs[0].contents.fp64_contents.extend([1.0])),
     "input 'x': datatype FP32 expects data in fp32_contents, got fp64_contents"),
    ("missing-input", TWO, _mutate(good, lambda r: (r.inputs.pop(), r.raw_input_contents.pop())),
     "missing input 'ids' for model 'm'; expected inputs: x, ids"),
    ("duplicate-input", TWO, _mutate(good, lambda r: add_raw(r, "x", "FP32", [2, 4], bytes(32))),
     "input 'x' is given more than once"),
    ("unknown-input", TWO, _mutate(good, lambda r: add_raw(r, "q", "FP32", [2, 4], bytes(32))),
     "unknown input 'q' for model 'm'; expected inputs: x, ids"),
    ("empty-input-name", TWO, _mutate(good, _set([("name", "")])), "unknown input '' for model 'm'"),
    ("unknown-output", TWO, _mutate(good, lambda r: r.outputs.add(name="w")),
     "unknown output 'w' requested from model 'm'; expected one of: y, z"),
    ("duplicate-output", TWO, _mutate(good, lambda r: (r.outputs.add(name="z"), r.outputs.add(name="z"))),
     "output 'z' is requested more than once"),
    ("shm-input", TWO,
     _mutate(good, lambda r: r.inputs[0].parameters["shared_memory_region"].__setattr__("string_param", "r")),
     "input 'x': shared-memory inputs are not supported"),
    ("classification-output", TWO,
     _mutate(good, lambda r: r.outputs.add(name="y").parameters["classification"].__setattr__("int64_param", 3)),
     "output 'y': classification outputs are not supported"),
    ("int8-over", ONE_OF["INT8"], _typed_v("INT8", "int_contents", [1, 300]),
     "input 'v': value 300 in int_contents is out of range for INT8 [-128, 127]"),
    ("int8-under", ONE_OF["INT8"], _typed_v("INT8", "int_contents", [-129]), "value -129 in int_contents"),
    ("int16-under", ONE_OF["INT16"], _typed_v("INT16", "int_contents", [-40000]), "out of range for INT16"),
    ("uint8-over", ONE_OF["UINT8"], _typed_v("UINT8", "uint_contents", [256]),
     "value 256 in uint_contents is out of range for UINT8 [0, 255]"),
    ("uint16-over", ONE_OF["UINT16"], _typed_v("UINT16", "uint_contents", [70000]), "out of range for UINT16"),
    ("fp16-typed", ONE_OF["FP16"], _typed_v("FP16", "fp32_contents", [1.0]),
     "input 'v': FP16 has no typed contents field; send its data in raw_input_contents"),
    ("bytes-prefix-overruns", ONE_OF["BYTES"], _raw_v("BYTES", [1, 1], b"\x09\x00\x00\x00abc"),
     "input 'v': BYTES element 0 declares 9 bytes but only 3 remain"),
    ("bytes-trailing", ONE_OF["BYTES"], _raw_v("BYTES", [1, 1], b"\x01\x00\x00\x00ab"),
     "input 'v': expected 1 BYTES elements, got 1 bytes after the last one"),
    ("bytes-too-few-elements", ONE_OF["BYTES"], _raw_v("BYTES", [1, 3], tensors.pack_bytes([b"abc", b"d"])),
     "input 'v': BYTES buffer of 12 bytes ends before element 2 of 3"),
    ("bytes-shorter-than-prefixes", ONE_OF["BYTES"], _raw_v("BYTES", [1, 1000], b"\x00" * 8),
     "input 'v': expected 1000 BYTES elements (at least 4000 bytes"),
    ("bool-not-0-or-1", ONE_OF["BOOL"], _raw_v("BOOL", [1, 2], b"\x01\x02"),
     "input 'v': BOOL elements must be bytes 0 or 1"),
    ("no-inputs", TWO, Request, "missing input 'x', 'ids' for model 'm'"),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_request(case):
    _, spec, build, message = case
    request = build()
    with pytest.raises(InvalidArgument) as caught:
        decode_request(request, spec)
    assert caught.value.code == "INVALID_ARGUMENT"
    assert message in caught.value.message


def test_malformed_table_is_large_and_good_request_still_decodes():
    assert len(MALFORMED) >= 25
    wire, names = decode_request(good(), TWO)
    assert [w.shape for w in wire] == [(2, 4), (2, 3)] and names == ["y", "z"]
    wire, _ = decode_request(typed_two(), TWO)
    assert tensors.to_array("FP32", wire[0].shape, wire[0].data).tolist() == [[1.0] * 4]



# --- the fast path ------------------------------------------------------------------------------
# `decode_request` tries `codec._decode_fast` first, which never raises; whatever it does not take goes
# to `decode_checked` (every check, in order). Both must give the same tensors and the same error.


def _outcome(decode, request, spec, raw=None):
    try:
        wire, names = decode(request, spec, raw)
    except InvalidArgument as exc:
        return ("error", exc.code, exc.message)
    return ("ok", [(w.name, w.datatype, w.shape, [type(d) for d in w.shape], bytes(w.data)) for w in wire], names)


def _fast(request, spec, raw=None) -> bool:
    raw = list(request.raw_input_contents) if raw is None else raw
    return codec._decode_fast(request, codec.RequestPlan(spec), raw) is not None


def _views(request) -> tuple[Request, list[memoryview]]:
    """The request as `request_wire` hands over a large one: raw contents as views, out of the message."""
    raw = [memoryview(bytes(r)) for r in request.raw_input_contents]
    request.ClearField("raw_input_contents")
    return request, raw


TINY = make_spec([("x", "FP32", (16,))], [("y", "FP32", (16,))], max_batch_size=256, name="tiny")
MULTI = make_spec([("a", "FP16", (4, 2)), ("s", "BYTES", (-1,)), ("ids", "INT64", (-1,)), ("on", "BOOL", (2,))],
                  [("y", "FP32", (4,)), ("z", "INT64", (-1,))], max_batch_size=16)
WIDE = make_spec([("h", "BF16", (3,)), ("u", "UINT8", (2, 2)), ("d", "FP64", (1,))], max_batch_size=4)
NO_BATCH = make_spec([("x", "INT32", (2, -1)), ("t", "BYTES", (2,))], max_batch_size=0)
VARIABLE = make_spec([("v", "INT64", (-1, -1))], max_batch_size=4)


def _tiny(batch=1, nbytes=None, shape=None) -> Request:
    request = Request(model_name="tiny", id="t")
    data = np.arange(16 * batch, dtype="<f4").tobytes()
    add_raw(request, "x", "FP32", [batch, 16] if shape is None else shape, data if nbytes is None else data[:nbytes])
    return request


def _multi(batch=2, elements=None, ids_shape=None, on=None, bytes_shape=None) -> Request:
    request = Request(id="multi")
    add_raw(request, "a", "FP16", [batch, 4, 2], np.linspace(-2, 2, batch * 8).astype("<f2").tobytes())
    elements = [b"xyz"[: i % 4] for i in range(batch * 3)] if elements is None else elements
    add_raw(request, "s", "BYTES", bytes_shape or [batch, len(elements) // batch], tensors.pack_bytes(elements))
    ids_shape = ids_shape or [batch, 3]
    add_raw(request, "ids", "INT64", ids_shape, np.arange(int(np.prod(ids_shape)), dtype="<i8").tobytes())
    add_raw(request, "on", "BOOL", [batch, 2], bytes([1, 0] * batch) if on is None else on)
    return request


def _wide(batch=3) -> Request:
    request = Request()
    add_raw(request, "h", "BF16", [batch, 3], np.arange(batch * 3, dtype="<u2").tobytes())
    add_raw(request, "u", "UINT8", [batch, 2, 2], bytes(range(batch * 4)))
    add_raw(request, "d", "FP64", [batch, 1], np.arange(batch, dtype="<f8").tobytes())
    return request


def _no_batch(cols=3, t=(b"a", b"bc")) -> Request:
    request = Request()
    add_raw(request, "x", "INT32", [2, cols], np.arange(2 * cols, dtype="<i4").tobytes())
    add_raw(request, "t", "BYTES", [2], tensors.pack_bytes(list(t)))
    return request


VALID_FAST = [
    ("tiny-batch-1", TINY, _tiny),
    ("tiny-batch-256", TINY, lambda: _tiny(256)),
    ("multi-fp16-bytes-int64-bool", MULTI, _multi),
    ("multi-batch-1", MULTI, lambda: _multi(1)),
    ("multi-bytes-same-lengths-numpy", MULTI, lambda: _multi(2, elements=[b"ab"] * 200)),
    ("multi-bytes-mixed-lengths-many", MULTI, lambda: _multi(2, elements=[b"q" * (i % 7) for i in range(130)])),
    ("multi-bytes-all-empty", MULTI, lambda: _multi(2, elements=[b""] * 4)),
    ("multi-outputs-requested", MULTI, _mutate(_multi, lambda r: (r.outputs.add(name="z"), r.outputs.add(name="y")))),
    ("bf16-uint8-fp64", WIDE, _wide),
    ("no-batch-dim", NO_BATCH, _no_batch),
    ("variable-dims", VARIABLE, _raw_v("INT64", [4, 2, 3], bytes(192))),
]


@pytest.mark.parametrize("views", [False, True], ids=["bytes", "views"])
@pytest.mark.parametrize("case", VALID_FAST, ids=[c[0] for c in VALID_FAST])
def test_fast_path_takes_common_requests_with_the_full_paths_result(case, views):
    _, spec, build = case
    request, raw = _views(build()) if views else (build(), None)
    assert _fast(request, spec, raw)
    fast = _outcome(decode_request, request, spec, raw)
    assert fast[0] == "ok"
    assert fast == _outcome(decode_checked, request, spec, raw)
    assert all(kinds == [int] * len(kinds) for *_, kinds, _ in fast[1])


def _reversed(request: Request) -> Request:
    inputs, raw = list(request.inputs)[::-1], list(request.raw_input_contents)[::-1]
    request.ClearField("inputs")
    request.ClearField("raw_input_contents")
    request.inputs.extend(inputs)
    request.raw_input_contents.extend(raw)
    return request


VALID_DECLINED = [  # valid, but not the fast path's: decoded by the full path, as before
    ("inputs-out-of-config-order", TWO, lambda: _reversed(good())),
    ("batch-zero", TWO, lambda: good((0, 4), (0, 3))),
    ("tiny-batch-zero", TINY, lambda: _tiny(0)),
    ("typed-contents", TWO, typed_two),
    ("zero-elements-no-batch", NO_BATCH, lambda: _no_batch(0)),
    ("other-input-parameter", TINY,
     _mutate(_tiny, lambda r: r.inputs[0].parameters["x"].__setattr__("int64_param", 1))),
]


@pytest.mark.parametrize("case", VALID_DECLINED, ids=[c[0] for c in VALID_DECLINED])
def test_requests_the_fast_path_declines_decode_as_before(case):
    _, spec, build = case
    request = build()
    assert not _fast(request, spec)
    outcome = _outcome(decode_request, request, spec)
    assert outcome[0] == "ok" and outcome == _outcome(decode_checked, request, spec)


def _extend_raw(request: Request, index: int, extra: bytes) -> None:
    request.raw_input_contents[index] = request.raw_input_contents[index] + extra


INVALID = [(c[0], c[1], c[2]) for c in MALFORMED] + [
    ("tiny-byte-count", TINY, lambda: _tiny(1, nbytes=60)),
    ("tiny-negative-batch", TINY, lambda: _tiny(1, shape=[-1, 16])),
    ("tiny-batch-over-max", TINY, lambda: _tiny(257)),
    ("tiny-rank", TINY, lambda: _tiny(1, shape=[16])),
    ("tiny-shm", TINY, _mutate(_tiny, lambda r: r.inputs[0].parameters["shared_memory_region"]
                               .__setattr__("string_param", "r"))),
    ("tiny-fp16", TINY, _mutate(_tiny, _set([("datatype", "FP16")]))),
    ("tiny-unknown-output", TINY, _mutate(_tiny, lambda r: r.outputs.add(name="nope"))),
    ("multi-bytes-prefix-overrun", MULTI, _mutate(_multi, lambda r: r.raw_input_contents.__setitem__(
        1, b"\x09\x00\x00\x00abc" + bytes(20)))),
    ("multi-bytes-trailing", MULTI, _mutate(_multi, lambda r: _extend_raw(r, 1, b"!"))),
    ("multi-bytes-many-trailing", MULTI, _mutate(lambda: _multi(2, elements=[b"ab"] * 200),
                                                 lambda r: _extend_raw(r, 1, b"!"))),
    ("multi-bytes-too-few", MULTI, lambda: _multi(2, elements=[b"a"] * 4, bytes_shape=[2, 3])),
    ("multi-bytes-huge-count", MULTI, lambda: _multi(2, bytes_shape=[2, 2**61])),
    ("multi-bool-2", MULTI, lambda: _multi(2, on=bytes([1, 0, 2, 0]))),
    ("multi-batch-mismatch", MULTI, lambda: _multi(2, ids_shape=[3, 2])),
    ("multi-two-negative-dims", MULTI, _mutate(_multi, lambda r: (  # [-2,-3]: 6 elements, the bytes match
        r.inputs[2].shape.__setitem__(0, -2), r.inputs[2].shape.__setitem__(1, -3)))),
    ("multi-wrong-fixed-dim", MULTI, _mutate(_multi, lambda r: r.inputs[0].shape.__setitem__(2, 1))),
    ("multi-typed-and-raw", MULTI, _mutate(_multi, lambda r: r.inputs[2].contents.int64_contents.extend([1] * 6))),
    ("variable-negative-pairs", VARIABLE, _raw_v("INT64", [-2, -3, 1], bytes(48))),
    ("variable-negative-dims", VARIABLE, _raw_v("INT64", [1, -3, -2], bytes(48))),
    ("variable-batch-over-max", VARIABLE, _raw_v("INT64", [5, 1, 1], bytes(40))),
    ("wide-short-bf16", WIDE, _mutate(_wide, lambda r: r.raw_input_contents.__setitem__(0, bytes(17)))),
    ("no-batch-wrong-fixed-dim", NO_BATCH, _mutate(_no_batch, lambda r: r.inputs[0].shape.__setitem__(0, 3))),
    ("no-batch-batch-dim-given", NO_BATCH, _mutate(_no_batch, lambda r: r.inputs[1].shape.insert(0, 1))),
    ("config-dim-below-minus-one", make_spec([("x", "FP32", (-2,))]), _raw_v("FP32", [1, 2], bytes(8))),
]


@pytest.mark.parametrize("views", [False, True], ids=["bytes", "views"])
@pytest.mark.parametrize("case", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_requests_get_the_full_paths_error(case, views):
    _, spec, build = case
    request, raw = _views(build()) if views else (build(), None)
    fast = _outcome(decode_request, request, spec, raw)
    assert fast[0] == "error", fast
    assert fast == _outcome(decode_checked, request, spec, raw)


def _random_request(draw, spec) -> Request:
    """Inputs close to `spec`'s: each dim, datatype, name and byte count right most of the time."""
    request = Request()
    batch = draw(st.integers(-1, 5))
    for cfg in spec.inputs:
        if draw(st.integers(0, 9)) == 0:
            continue  # missing input
        shape = ([batch] if spec.max_batch_size > 0 else []) + [
            d if d >= 0 and draw(st.integers(0, 9)) else draw(st.integers(-2, 4)) for d in cfg.dims]
        if draw(st.integers(0, 9)) == 0:
            shape = shape[:-1] if draw(st.booleans()) else [*shape, 1]
        datatype = cfg.datatype if draw(st.integers(0, 9)) else draw(st.sampled_from(ALL_TYPES))
        count = abs(int(np.prod(shape)))  # negative dims in pairs: bytes that match their product
        if cfg.datatype == "BYTES":
            data = tensors.pack_bytes(draw(st.lists(st.binary(max_size=3), min_size=count, max_size=count)))
        elif cfg.datatype == "BOOL":
            data = bytes(draw(st.lists(st.sampled_from([0, 1, 1, 0, 2]), min_size=count, max_size=count)))
        else:
            data = bytes(count * numpy_dtype(cfg.datatype).itemsize)
        if draw(st.integers(0, 9)) == 0:
            data = data[:-1] if data and draw(st.booleans()) else data + b"\x00"
        add_raw(request, cfg.name if draw(st.integers(0, 19)) else "other", datatype, shape, data)
    return _reversed(request) if draw(st.integers(0, 4)) == 0 else request


@settings(max_examples=400, deadline=None)
@given(st.data(), st.sampled_from([TINY, MULTI, WIDE, NO_BATCH, TWO, VARIABLE]))
def test_fast_and_full_path_agree_on_random_requests(data, spec):
    request = _random_request(data.draw, spec)
    assert _outcome(decode_request, request, spec) == _outcome(decode_checked, request, spec)


def test_plans_are_kept_per_spec_object_and_bounded():
    plans = codec.RequestPlans(limit=8)
    plan = plans.get(TINY)
    assert plans.get(TINY) is plan and plan.spec is TINY
    twin = make_spec([("x", "FP32", (16,))], [("y", "FP32", (16,))], max_batch_size=256, name="tiny")
    assert twin == TINY and plans.get(twin) is not plans.get(TINY)  # a reload's spec: its own plan
    for size in range(1, 30):
        spec = make_spec([("x", "FP32", (size,))])
        assert plans.get(spec).spec is spec
        assert len(plans) <= 8
    assert plans.get(make_spec([("x", "FP32", (-2,))])).inputs is None  # never the fast path's

"""Every KServe datatype through the real server and back, bit for bit, in raw and typed form.

The repository is built here: `identity` has one Identity per datatype (in_<DT> [N,3] -> out_<DT>), so
whatever the server returns must equal what was sent. FP16 has no typed `contents` field and a request
is either all raw or all typed, so typed requests go to `identity_typed`, the same model without FP16.

BF16 is left out of both: ONNX Runtime's CPU Identity kernel does accept tensor(bfloat16), but its
Python binding cannot feed or return bfloat16 from numpy (neither uint16 words nor ml_dtypes.bfloat16
are accepted), so the onnxruntime backend refuses BF16 tensors at load time; `identity_bf16` checks that
this refusal is reported rather than crashing anything.

BYTES values are checked in their own tests (ONNX Runtime's Python binding takes UTF-8 strings only, so
the backend decodes BYTES elements and rejects non-UTF-8 data with INVALID_ARGUMENT).
"""

from __future__ import annotations

import struct
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.server import start

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}
DATATYPES = list(ONNX_TYPES)
TYPED_FIELDS = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
NON_BYTES = [dt for dt in DATATYPES if dt != "BYTES"]
MAX_BATCH = 8
TIMEOUT_S = 30
Request = service_pb2.ModelInferRequest
Tensor = service_pb2.ModelInferRequest.InferInputTensor


def _write_model(repo: Path, name: str, datatypes: list[str], onnx_types: dict[str, int]) -> None:
    nodes = [helper.make_node("Identity", [f"in_{dt}"], [f"out_{dt}"]) for dt in datatypes]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(f"in_{dt}", onnx_types[dt], ["N", 3]) for dt in datatypes],
        [helper.make_tensor_value_info(f"out_{dt}", onnx_types[dt], ["N", 3]) for dt in datatypes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    (repo / name / "1").mkdir(parents=True)
    onnx.save(model, str(repo / name / "1" / "model.onnx"))

    def tensors(kind: str, prefix: str) -> str:
        config_type = lambda dt: "TYPE_STRING" if dt == "BYTES" else f"TYPE_{dt}"  # noqa: E731
        return f"{kind} [\n" + ",\n".join(
            f'  {{ name: "{prefix}_{dt}" data_type: {config_type(dt)} dims: [ 3 ] }}' for dt in datatypes) + "\n]\n"

    (repo / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {MAX_BATCH}\n'
        + tensors("input", "in") + tensors("output", "out") + "instance_group [ { kind: KIND_CPU } ]\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("datatypes")
    _write_model(repo, "identity", DATATYPES, ONNX_TYPES)
    _write_model(repo, "identity_typed", [dt for dt in DATATYPES if dt in TYPED_FIELDS], ONNX_TYPES)
    _write_model(repo, "identity_bf16", ["BF16"], {"BF16": TensorProto.BFLOAT16})
    _write_model(repo, "identity_fixed", NON_BYTES, ONNX_TYPES)  # no BYTES: the worker's direct lane serves it
    with start(repo) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return grpcclient.InferenceServerClient(server.url)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _values(datatype: str, batch: int, seed: int) -> np.ndarray:
    """[batch,3] of `datatype`: the type's edge values first (min, max, zero, NaN, inf, ...), then random."""
    rng = np.random.default_rng(seed)
    count = batch * 3
    if datatype == "BYTES":
        # UTF-8 only: ONNX Runtime's Python binding carries strings as str (see test_bytes_not_utf8_...)
        edge = ["", "héllo wörld", "日本語 €", "a\x00b", "x" * 1000, "\x00", "plain ascii"]
        rand = ["".join(rng.choice(list("az é日€\x00\n"), int(n))) for n in rng.integers(0, 12, count)]
        return np.array([e.encode() for e in (edge + rand)[:count]], dtype=np.object_).reshape(batch, 3)
    if datatype == "BOOL":
        edge = np.array([True, False, True])
        return np.concatenate([edge, rng.integers(0, 2, count).astype(bool)])[:count].reshape(batch, 3)
    dtype = np.dtype(grpcclient.triton_to_np_dtype(datatype))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        edge = np.array([info.min, info.max, 0, 1, info.max // 2 + 1], dtype=dtype)
        rand = rng.integers(info.min, info.max, count, dtype=dtype, endpoint=True)
    else:
        info = np.finfo(dtype)
        edge = np.array([np.nan, -np.inf, np.inf, -0.0, info.max, info.min, info.smallest_subnormal,
                         info.tiny, info.eps], dtype=dtype)
        rand = rng.standard_normal(count).astype(dtype)
    return np.concatenate([edge, rand])[:count].reshape(batch, 3)


def _mismatches(sent: dict[str, np.ndarray], got: dict[str, np.ndarray | None]) -> list[str]:
    """Names (with what differs) of outputs not exactly equal to their input, bit for bit."""
    bad = []
    for dt, want in sent.items():
        out = got[dt]
        if out is None or out.shape != want.shape or out.dtype != want.dtype:
            bad.append(f"{dt}: got {None if out is None else (out.dtype, out.shape)}, want {want.dtype, want.shape}")
        elif dt == "BYTES" and out.tolist() != want.tolist():
            bad.append(f"{dt}: {out.tolist()} != {want.tolist()}")
        elif dt != "BYTES" and out.tobytes() != want.tobytes():
            bad.append(f"{dt}: {out!r} != {want!r}")
    return bad


def _only(values: dict[str, np.ndarray], datatypes: list[str]) -> dict[str, np.ndarray]:
    return {dt: values[dt] for dt in datatypes if dt in values}


def _raw_inputs(values: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    inputs = []
    for dt, array in values.items():
        inp = grpcclient.InferInput(f"in_{dt}", list(array.shape), dt)
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    return inputs


@pytest.mark.parametrize("batch", [1, 3, MAX_BATCH])
def test_raw_roundtrip_every_datatype(client, batch):
    sent = {dt: _values(dt, batch, seed=batch) for dt in DATATYPES}
    result = client.infer("identity", _raw_inputs(sent))
    assert [o.name for o in result.get_response().outputs] == [f"out_{dt}" for dt in DATATYPES]
    assert [o.datatype for o in result.get_response().outputs] == DATATYPES
    assert _mismatches(_only(sent, NON_BYTES), {dt: result.as_numpy(f"out_{dt}") for dt in NON_BYTES}) == []
    assert result.as_numpy("out_BYTES").shape == (batch, 3)


@pytest.mark.parametrize("batch", [1, 3])
def test_raw_roundtrip_every_fixed_size_datatype_also_through_the_direct_lane(client, batch):
    """A model of fixed-size tensors only: the first requests of a batch size take the worker's general
    path (until its engine's run time is known to be short), the ones after them the direct lane (raw bytes
    straight into the pool); all come back bit for bit."""
    for seed in range(12):
        sent = {dt: _values(dt, batch, seed=seed) for dt in NON_BYTES}
        result = client.infer("identity_fixed", _raw_inputs(sent))
        assert _mismatches(sent, {dt: result.as_numpy(f"out_{dt}") for dt in NON_BYTES}) == []


def test_empty_batch_every_datatype(client):
    sent = {dt: _values(dt, 1, seed=0)[:0] for dt in DATATYPES}
    result = client.infer("identity", _raw_inputs(sent))
    for dt in DATATYPES:
        assert result.as_numpy(f"out_{dt}").shape == (0, 3), dt


def _typed_request(values: dict[str, np.ndarray]) -> Request:
    inputs = []
    for dt, array in values.items():
        tensor = Tensor(name=f"in_{dt}", datatype=dt, shape=list(array.shape))
        getattr(tensor.contents, TYPED_FIELDS[dt]).extend(array.ravel().tolist())
        inputs.append(tensor)
    return Request(model_name="identity_typed", inputs=inputs)


@pytest.mark.parametrize("batch", [1, MAX_BATCH])
def test_typed_contents_every_datatype(stub, batch):
    sent = {dt: _values(dt, batch, seed=10 + batch) for dt in TYPED_FIELDS}
    response = stub.ModelInfer(_typed_request(sent), timeout=TIMEOUT_S)
    assert len(response.raw_output_contents) == len(TYPED_FIELDS)  # answered in raw form
    result = grpcclient.InferResult(response)
    typed = [dt for dt in NON_BYTES if dt in TYPED_FIELDS]
    assert _mismatches(_only(sent, typed), {dt: result.as_numpy(f"out_{dt}") for dt in typed}) == []
    assert result.as_numpy("out_BYTES").shape == (batch, 3)


@pytest.mark.parametrize("wanted", [["FP16"], ["FP16", "BOOL"], ["UINT64", "BYTES", "INT8", "FP64"]])
def test_requested_output_subset(client, wanted):
    sent = {dt: _values(dt, 2, seed=7) for dt in DATATYPES}
    outputs = [grpcclient.InferRequestedOutput(f"out_{dt}") for dt in wanted]
    result = client.infer("identity", _raw_inputs(sent), outputs=outputs)
    response = result.get_response()
    assert sorted(o.name for o in response.outputs) == sorted(f"out_{dt}" for dt in wanted)
    assert len(response.raw_output_contents) == len(wanted)
    checked = [dt for dt in wanted if dt != "BYTES"]
    assert _mismatches(_only(sent, checked), {dt: result.as_numpy(f"out_{dt}") for dt in checked}) == []


def _raw_request(replace: str, data: bytes, datatype: str | None = None) -> Request:
    """A raw request on `identity` (batch 1) whose in_<replace> carries `data` (and `datatype`)."""
    sent = {dt: _values(dt, 1, seed=3) for dt in DATATYPES}
    request = Request(model_name="identity")
    for dt, array in sent.items():
        request.inputs.add(name=f"in_{dt}", datatype=datatype if dt == replace and datatype else dt, shape=[1, 3])
        if dt == replace:
            request.raw_input_contents.append(data)
        elif dt == "BYTES":
            request.raw_input_contents.append(b"".join(struct.pack("<I", len(e)) + e for e in array.ravel()))
        else:
            request.raw_input_contents.append(array.tobytes())
    return request


def _bytes_elements(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _typed_with(dt: str, values: list) -> Request:
    request = _typed_request({d: _values(d, 1, seed=4) for d in TYPED_FIELDS})
    tensor = next(t for t in request.inputs if t.name == f"in_{dt}")
    field = getattr(tensor.contents, TYPED_FIELDS[dt])
    del field[:]
    field.extend(values)
    return request


MALFORMED = [
    ("bytes-length-past-end", lambda: _raw_request("BYTES", _bytes_elements(b"a", b"b") + struct.pack("<I", 9) + b"c"),
     "input 'in_BYTES': BYTES element 2 declares 9 bytes but only 1 remain"),
    ("bytes-trailing-garbage", lambda: _raw_request("BYTES", _bytes_elements(b"a", b"", b"c") + b"z"),
     "expected 3 BYTES elements, got 1 bytes after the last one"),
    ("bytes-too-short-for-prefixes", lambda: _raw_request("BYTES", struct.pack("<I", 0) * 2),
     "at least 12 bytes of 4-byte length prefixes"),
    ("bytes-truncated-prefix", lambda: _raw_request("BYTES", _bytes_elements(b"0123456789") + b"\x01\x00"),
     "ends before element 1 of 3"),
    ("bytes-huge-length", lambda: _raw_request("BYTES", struct.pack("<I", 0xFFFFFFFF) + b"\0" * 12),
     "declares 4294967295 bytes"),
    ("bool-byte-not-0-or-1", lambda: _raw_request("BOOL", b"\x01\x02\x00"), "BOOL elements must be bytes 0 or 1"),
    ("bool-byte-count", lambda: _raw_request("BOOL", b"\x01\x00"), "expected 3 bytes for shape [1,3] of BOOL"),
    ("bf16-for-fp16", lambda: _raw_request("FP16", b"\0" * 6, datatype="BF16"),
     "input 'in_FP16': expected datatype FP16, got BF16"),
    ("uint64-byte-count", lambda: _raw_request("UINT64", b"\0" * 23), "expected 24 bytes for shape [1,3] of UINT64"),
    ("typed-int8-out-of-range", lambda: _typed_with("INT8", [1, 300, 2]),
     "input 'in_INT8': value 300 in int_contents is out of range for INT8 [-128, 127]"),
    ("typed-int16-below-range", lambda: _typed_with("INT16", [-40000, 0, 0]), "out of range for INT16"),
    ("typed-uint8-out-of-range", lambda: _typed_with("UINT8", [256, 0, 0]), "out of range for UINT8 [0, 255]"),
    ("typed-uint16-out-of-range", lambda: _typed_with("UINT16", [0, 0, 70000]), "out of range for UINT16"),
    ("typed-bytes-count", lambda: _typed_with("BYTES", [b"a", b"b"]),
     "expected 3 elements for shape [1,3] of BYTES in bytes_contents, got 2"),
    ("typed-bool-count", lambda: _typed_with("BOOL", [True] * 4), "expected 3 elements"),
]


@pytest.mark.parametrize(("build", "message"), [pytest.param(*c[1:], id=c[0]) for c in MALFORMED])
def test_malformed_datatype_payload_is_invalid_argument(stub, build, message):
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(build(), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert message in info.value.details()


def test_bf16_model_is_refused_at_load_and_the_rest_keep_serving(server, client):
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["identity"].state == "READY" and index["identity_typed"].state == "READY"
    assert index["identity_bf16"].state != "READY" and "BF16" in index["identity_bf16"].reason
    assert not client.is_model_ready("identity_bf16")
    pids = {p.pid for p in server.workers()}
    sent = {dt: _values(dt, 2, seed=99) for dt in DATATYPES}
    result = client.infer("identity", _raw_inputs(sent))
    assert _mismatches(_only(sent, NON_BYTES), {dt: result.as_numpy(f"out_{dt}") for dt in NON_BYTES}) == []
    assert {p.pid for p in server.workers()} == pids and server.proc.poll() is None


@pytest.mark.parametrize("batch", [1, MAX_BATCH])
def test_bytes_raw_roundtrip(client, batch):
    sent = {dt: _values(dt, batch, seed=20 + batch) for dt in DATATYPES}
    result = client.infer("identity", _raw_inputs(sent), outputs=[grpcclient.InferRequestedOutput("out_BYTES")])
    assert _mismatches(_only(sent, ["BYTES"]), {"BYTES": result.as_numpy("out_BYTES")}) == []


def test_bytes_typed_roundtrip(stub):
    sent = {dt: _values(dt, 3, seed=30) for dt in TYPED_FIELDS}
    result = grpcclient.InferResult(stub.ModelInfer(_typed_request(sent), timeout=TIMEOUT_S))
    assert _mismatches(_only(sent, ["BYTES"]), {"BYTES": result.as_numpy("out_BYTES")}) == []


def test_bytes_not_utf8_is_returned_exactly_or_rejected(stub):
    # ONNX Runtime's Python API carries strings as UTF-8 str, so an ONNX Runtime model may refuse
    # non-UTF-8 elements; what it must never do is answer with different bytes.
    elements = [b"\xff\xfe", b"ok", b"\x80"]
    request = _raw_request("BYTES", _bytes_elements(*elements))
    request.outputs.add(name="out_BYTES")
    try:
        response = stub.ModelInfer(request, timeout=TIMEOUT_S)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "in_BYTES" in exc.details(), exc.details()
        return
    assert grpcclient.InferResult(response).as_numpy("out_BYTES").ravel().tolist() == elements

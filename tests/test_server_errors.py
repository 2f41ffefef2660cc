"""Malformed requests through the real wire: each gets its status code and a message naming the problem.

Requests are built by hand with tritonclient's generated protocol (not InferInput), so the corpus can
send what a well-behaved client never would. After the corpus every model still answers and no server
or worker process was replaced: nothing a client sends may crash anything.
"""

from __future__ import annotations

import struct
import time
import urllib.request
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.reference import make_inputs, reference_outputs
from tests.server import start

Request = service_pb2.ModelInferRequest
Tensor = service_pb2.ModelInferRequest.InferInputTensor
Contents = service_pb2.InferTensorContents
Output = service_pb2.ModelInferRequest.InferRequestedOutputTensor
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
TIMEOUT_S = 30
DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.float16): "FP16"}


def _f32(count: int) -> bytes:
    return np.arange(count, dtype=np.float32).tobytes()


def _x(shape: list[int], datatype: str = "FP32", **contents: object) -> Tensor:
    """Input 'x' (tiny's); typed contents when keyword fields are given."""
    return Tensor(name="x", datatype=datatype, shape=shape, contents=Contents(**contents) if contents else None)


def _tiny(*inputs: Tensor, raw: list[bytes] | None = None, outputs: tuple[str, ...] = (),
          model: str = "tiny", version: str = "") -> Request:
    """A request; raw defaults to one correctly sized FP32 buffer per input of shape [b,16]."""
    if raw is None:
        raw = [_f32(int(np.prod(t.shape))) for t in inputs]
    return Request(model_name=model, model_version=version, inputs=inputs, raw_input_contents=raw,
                   outputs=[Output(name=n) for n in outputs])


def _good_tiny(batch: int = 2) -> Request:
    return _tiny(_x([batch, 16]))


def _mixed(ids_shape: list[int], scale_shape: list[int], *, scale_type: str = "FP16",
           raw: list[bytes] | None = None) -> Request:
    ids = Tensor(name="ids", datatype="INT64", shape=ids_shape)
    scale = Tensor(name="scale", datatype=scale_type, shape=scale_shape)
    if raw is None:
        raw = [np.zeros(ids_shape, np.int64).tobytes(), np.zeros(scale_shape, np.float16).tobytes()]
    return Request(model_name="mixed", inputs=[ids, scale], raw_input_contents=raw)


def _shm_input() -> Request:
    request = _good_tiny(1)
    request.inputs[0].parameters["shared_memory_region"].string_param = "region0"
    return request


def _classification_output() -> Request:
    request = _tiny(_x([1, 16]), outputs=("y",))
    request.outputs[0].parameters["classification"].int64_param = 3
    return request


# (id, request builder, expected code, expected message substring)
CORPUS: list[tuple[str, Callable[[], Request], grpc.StatusCode, str]] = [
    # model and version
    ("unknown-model", lambda: _tiny(_x([1, 16]), model="nope-model"), NOT_FOUND, "unknown model 'nope-model'"),
    ("empty-model-name", lambda: _tiny(_x([1, 16]), model=""), NOT_FOUND, "unknown model ''"),
    ("unknown-version", lambda: _tiny(_x([1, 16]), version="2"), NOT_FOUND, "no version '2'"),
    ("non-numeric-version", lambda: _tiny(_x([1, 16]), version="latest"), NOT_FOUND, "no version 'latest'"),
    # datatypes
    ("wrong-datatype", lambda: _tiny(_x([1, 16], "FP64"), raw=[b"\0" * 128]), INVALID,
     "input 'x': expected datatype FP32, got FP64"),
    ("unknown-datatype", lambda: _tiny(_x([1, 16], "FLOAT32")), INVALID, "unknown datatype 'FLOAT32'; expected FP32"),
    ("lowercase-datatype", lambda: _tiny(_x([1, 16], "fp32")), INVALID, "unknown datatype 'fp32'"),
    ("empty-datatype", lambda: _tiny(_x([1, 16], "")), INVALID, "unknown datatype ''"),
    ("bytes-datatype-for-fp32", lambda: _tiny(_x([1, 16], "BYTES"), raw=[struct.pack("<I", 0) * 16]), INVALID,
     "expected datatype FP32, got BYTES"),
    ("mixed-scale-as-fp32", lambda: _mixed([1, 8], [1, 4], scale_type="FP32"), INVALID,
     "input 'scale': expected datatype FP16, got FP32"),
    # shapes
    ("rank-too-low", lambda: _tiny(_x([16])), INVALID, "input 'x': expected 2 dims (shape [-1,16]), got 1"),
    ("rank-too-high", lambda: _tiny(_x([1, 16, 1])), INVALID, "expected 2 dims (shape [-1,16]), got 3"),
    ("rank-zero", lambda: _tiny(_x([]), raw=[b""]), INVALID, "expected 2 dims"),
    ("wrong-non-batch-dim", lambda: _tiny(_x([1, 15])), INVALID, "expected shape [-1,16] (dim 1 = 16), got [1,15]"),
    ("negative-batch-dim", lambda: _tiny(_x([-1, 16]), raw=[_f32(16)]), INVALID, "negative dim"),
    ("negative-non-batch-dim", lambda: _tiny(_x([1, -16]), raw=[_f32(16)]), INVALID, "negative dim"),
    ("batch-over-max", lambda: _tiny(_x([257, 16])), INVALID, "batch size 257 exceeds max_batch_size 256"),
    ("mlp-batch-over-max", lambda: _tiny(Tensor(name="x", datatype="FP32", shape=[65, 1024]), raw=[b""],
                                         model="mlp"), INVALID, "exceeds max_batch_size 64"),
    ("huge-shape-product", lambda: _tiny(_x([2**40, 2**40]), raw=[_f32(16)]), INVALID, "max_batch_size 256"),
    ("int64-max-batch", lambda: _tiny(_x([2**63 - 1, 16]), raw=[_f32(16)]), INVALID, "max_batch_size 256"),
    ("huge-typed-shape", lambda: _tiny(_x([2**40, 2**40], fp32_contents=[1.0]), raw=[]), INVALID, "max_batch_size 256"),
    ("mixed-batch-sizes-differ", lambda: _mixed([2, 8], [3, 4]), INVALID,
     "input 'scale': batch size 3 differs from 2 of input 'ids'"),
    ("mixed-batch-over-max", lambda: _mixed([33, 8], [33, 4]), INVALID, "exceeds max_batch_size 32"),
    # raw byte counts
    ("bytes-too-small", lambda: _tiny(_x([2, 16]), raw=[_f32(32)[:-1]]), INVALID,
     "input 'x': expected 128 bytes for shape [2,16] of FP32, got 127"),
    ("bytes-too-large", lambda: _tiny(_x([2, 16]), raw=[_f32(32) + b"\0"]), INVALID, "expected 128 bytes"),
    ("bytes-empty", lambda: _tiny(_x([1, 16]), raw=[b""]), INVALID,
     "expected 64 bytes for shape [1,16] of FP32, got 0"),
    ("full-batch-tiny-data", lambda: _tiny(_x([256, 16]), raw=[_f32(16)]), INVALID, "expected 16384 bytes"),
    ("mixed-fp16-bytes-wrong", lambda: _mixed([1, 8], [1, 4], raw=[b"\0" * 64, b"\0" * 16]), INVALID,
     "input 'scale': expected 8 bytes for shape [1,4] of FP16, got 16"),
    ("raw-count-too-many", lambda: _tiny(_x([1, 16]), raw=[_f32(16), _f32(16)]), INVALID,
     "raw_input_contents has 2 entries but the request has 1 inputs"),
    ("raw-count-too-few", lambda: _mixed([1, 8], [1, 4], raw=[b"\0" * 64]), INVALID,
     "raw_input_contents has 1 entries but the request has 2 inputs"),
    # typed contents
    ("raw-and-typed", lambda: _tiny(_x([1, 16], fp32_contents=[0.0] * 16)), INVALID,
     "input 'x': both raw_input_contents and typed contents given"),
    ("typed-wrong-field-fp64", lambda: _tiny(_x([1, 16], fp64_contents=[0.0] * 16), raw=[]), INVALID,
     "input 'x': datatype FP32 expects data in fp32_contents, got fp64_contents"),
    ("typed-wrong-field-int", lambda: _tiny(_x([1, 16], int_contents=[0] * 16), raw=[]), INVALID,
     "expects data in fp32_contents, got int_contents"),
    ("typed-two-fields", lambda: _tiny(_x([1, 16], fp32_contents=[0.0] * 16, bytes_contents=[b"a"]), raw=[]),
     INVALID, "got bytes_contents"),
    ("typed-count-too-few", lambda: _tiny(_x([1, 16], fp32_contents=[0.0] * 15), raw=[]), INVALID,
     "input 'x': expected 16 elements for shape [1,16] of FP32 in fp32_contents, got 15"),
    ("typed-count-too-many", lambda: _tiny(_x([1, 16], fp32_contents=[0.0] * 17), raw=[]), INVALID,
     "expected 16 elements"),
    ("no-data-at-all", lambda: _tiny(_x([1, 16]), raw=[]), INVALID, "expected 16 elements for shape [1,16]"),
    ("fp16-typed-fp32-field", lambda: Request(model_name="mixed", inputs=[
        Tensor(name="ids", datatype="INT64", shape=[1, 8], contents=Contents(int64_contents=[1] * 8)),
        Tensor(name="scale", datatype="FP16", shape=[1, 4], contents=Contents(fp32_contents=[1.0] * 4))]),
     INVALID, "input 'scale': FP16 has no typed contents field; send its data in raw_input_contents"),
    ("fp16-typed-no-contents", lambda: Request(model_name="mixed", inputs=[
        Tensor(name="ids", datatype="INT64", shape=[1, 8], contents=Contents(int64_contents=[1] * 8)),
        Tensor(name="scale", datatype="FP16", shape=[1, 4])]),
     INVALID, "FP16 has no typed contents field"),
    ("int64-typed-int32-field", lambda: Request(model_name="mixed", inputs=[
        Tensor(name="ids", datatype="INT64", shape=[1, 8], contents=Contents(int_contents=[1] * 8)),
        Tensor(name="scale", datatype="FP16", shape=[1, 4])]),
     INVALID, "input 'ids': datatype INT64 expects data in int64_contents, got int_contents"),
    # names
    ("missing-input", lambda: _tiny(), INVALID, "missing input 'x' for model 'tiny'"),
    ("mixed-missing-scale", lambda: Request(model_name="mixed", inputs=[Tensor(name="ids", datatype="INT64",
                                                                               shape=[1, 8])],
                                            raw_input_contents=[b"\0" * 64]),
     INVALID, "missing input 'scale' for model 'mixed'"),
    ("duplicate-input", lambda: _tiny(_x([1, 16]), _x([1, 16])), INVALID, "input 'x' is given more than once"),
    ("unknown-input", lambda: _tiny(_x([1, 16]), Tensor(name="z", datatype="FP32", shape=[1, 16])), INVALID,
     "unknown input 'z' for model 'tiny'; expected inputs: x"),
    ("empty-input-name", lambda: _tiny(Tensor(name="", datatype="FP32", shape=[1, 16])), INVALID,
     "unknown input ''"),
    ("unknown-output", lambda: _tiny(_x([1, 16]), outputs=("nope",)), INVALID,
     "unknown output 'nope' requested from model 'tiny'; expected one of: y"),
    ("duplicate-output", lambda: _tiny(_x([1, 16]), outputs=("y", "y")), INVALID,
     "output 'y' is requested more than once"),
    ("shared-memory-input", _shm_input, INVALID, "shared-memory inputs are not supported"),
    ("classification-output", _classification_output, INVALID, "classification outputs are not supported"),
]


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def before(server):
    """Server and worker pids and the log position before the corpus, for the checks after it."""
    return {"pids": {server.proc.pid, *(p.pid for p in server.workers())}, "log": len(server.lines)}


@pytest.mark.parametrize(("build", "code", "message"), [pytest.param(*case[1:], id=case[0]) for case in CORPUS])
def test_malformed_request(stub, before, build, code, message):
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(build(), timeout=TIMEOUT_S)
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details()
    assert time.monotonic() - started < 5, "a rejected request must not allocate or wait for the worker"


def test_corpus_is_large_and_unique():
    assert len(CORPUS) >= 30
    assert len({case[0] for case in CORPUS}) == len(CORPUS)


def _good(model: str, arrays: dict[str, np.ndarray]) -> Request:
    return Request(model_name=model, inputs=[Tensor(name=n, datatype=DTYPES[a.dtype], shape=a.shape)
                                             for n, a in arrays.items()],
                   raw_input_contents=[a.tobytes() for a in arrays.values()])


def test_after_corpus_every_model_serves_and_nothing_restarted(server, stub, before, example_repo):
    for model in ("tiny", "mlp", "mixed", "convnet"):
        arrays = make_inputs(model, 3, seed=5)
        response = stub.ModelInfer(_good(model, arrays), timeout=TIMEOUT_S)
        expected = reference_outputs(model, example_repo / model / "1" / "model.onnx", arrays)
        assert [o.name for o in response.outputs] == list(expected)
        for out, data in zip(response.outputs, response.raw_output_contents):
            want = expected[out.name]
            got = np.frombuffer(data, want.dtype).reshape(tuple(out.shape))
            np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=1e-3, atol=1e-3)
    assert len(before["pids"]) >= 5, "the server and one worker per model"
    assert {server.proc.pid, *(p.pid for p in server.workers())} == before["pids"]
    assert server.proc.poll() is None
    log = "".join(server.lines[before["log"]:])
    assert "Traceback" not in log and "unexpected error" not in log, log
    # metric labels come only from configured models, never from a requested name
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert "nope-model" not in text


def test_metadata_and_config_of_unknown_model_are_not_found(stub):
    for call, request in ((stub.ModelMetadata, service_pb2.ModelMetadataRequest(name="nope-model")),
                          (stub.ModelConfig, service_pb2.ModelConfigRequest(name="nope-model")),
                          (stub.ModelStatistics, service_pb2.ModelStatisticsRequest(name="nope-model")),
                          (stub.ModelMetadata, service_pb2.ModelMetadataRequest(name="tiny", version="9")),
                          (stub.ModelConfig, service_pb2.ModelConfigRequest(name="tiny", version="9"))):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=TIMEOUT_S)
        assert info.value.code() == NOT_FOUND, (request, info.value.details())
        assert "nope-model" in info.value.details() or "no version '9'" in info.value.details()


def test_repository_load_and_unload_need_explicit_mode(stub):
    for call, request in ((stub.RepositoryModelLoad, service_pb2.RepositoryModelLoadRequest(model_name="tiny")),
                          (stub.RepositoryModelUnload, service_pb2.RepositoryModelUnloadRequest(model_name="tiny"))):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--model-control-mode" in info.value.details()
    assert stub.ModelReady(service_pb2.ModelReadyRequest(name="tiny"), timeout=TIMEOUT_S).ready


def test_request_over_max_message_size_is_resource_exhausted(example_repo):
    # Only tiny is loaded: the limit is a frontend setting, the other models add nothing but start time.
    with start(example_repo, ["--max-request-bytes", "100000", "--model-control-mode", "explicit",
                              "--load-model", "tiny"]) as small, grpc.insecure_channel(small.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        big = _tiny(_x([3200, 16]))  # 204,800 bytes of data
        assert big.ByteSize() > 200_000
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(big, timeout=TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        response = stub.ModelInfer(_good_tiny(4), timeout=TIMEOUT_S)
        y = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(4, 16)
        assert y.shape == (4, 16) and np.isfinite(y).all()
        assert small.proc.poll() is None

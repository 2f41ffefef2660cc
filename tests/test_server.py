"""The real server over the example repository, called with the real tritonclient.grpc client."""

from __future__ import annotations

import queue
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.reference import make_inputs, reference_outputs
from tests.server import EXAMPLES

DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.float16): "FP16"}
MAX_BATCH = {"mlp": 64, "tiny": 256, "mixed": 32, "convnet": 64}
TOLERANCE = {"mlp": 1e-4, "tiny": 1e-6, "mixed": 1e-3, "convnet": 1e-3}


def _inputs(model: str, batch: int, seed: int = 0) -> tuple[dict[str, np.ndarray], list[grpcclient.InferInput]]:
    arrays = make_inputs(model, batch, seed)
    inputs = []
    for name, array in arrays.items():
        inp = grpcclient.InferInput(name, list(array.shape), DTYPES[array.dtype])
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    return arrays, inputs


def _check(model: str, arrays: dict[str, np.ndarray], result: grpcclient.InferResult, rows=slice(None)) -> None:
    expected = reference_outputs(model, EXAMPLES / model / "1" / "model.onnx",
                                 {k: v[rows] for k, v in arrays.items()})
    for name, want in expected.items():
        got = result.as_numpy(name)[rows]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                                   rtol=TOLERANCE[model], atol=TOLERANCE[model])


def test_liveness_readiness_and_health(server):
    client = grpcclient.InferenceServerClient(server.url)
    assert client.is_server_live() and client.is_server_ready()
    for model in MAX_BATCH:
        assert client.is_model_ready(model)
        assert client.is_model_ready(model, "1")
    assert not client.is_model_ready("mlp", "2")
    assert not client.is_model_ready("no-such-model")
    stub = health_pb2_grpc.HealthStub(client._channel)
    for service in ("", "liveness", "readiness", "mlp"):
        status = stub.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service


def test_metadata_and_config(server):
    client = grpcclient.InferenceServerClient(server.url)
    meta = client.get_server_metadata()
    assert meta.name == "trtserve" and "model_repository" in meta.extensions
    md = client.get_model_metadata("mixed")
    assert md.platform == "onnxruntime_onnx" and list(md.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [("ids", "INT64", [-1, 8]),
                                                                        ("scale", "FP16", [-1, 4])]
    assert [(t.name, t.datatype) for t in md.outputs] == [("sum", "INT64"), ("scaled", "FP16")]
    config = client.get_model_config("mlp").config  # parsed by tritonclient's own model_config.proto
    assert config.name == "mlp" and config.max_batch_size == 64 and config.backend == "onnxruntime"
    assert [i.name for i in config.input] == ["x"] and list(config.input[0].dims) == [1024]
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index == {"convnet": "READY", "mixed": "READY", "mlp": "READY", "tiny": "READY"}


@pytest.mark.parametrize("model", ["tiny", "mlp", "mixed", "convnet"])
def test_inference_matches_numpy(server, model):
    client = grpcclient.InferenceServerClient(server.url)
    for batch in (1, 2, 7, MAX_BATCH[model]):
        arrays, inputs = _inputs(model, batch, seed=batch)
        result = client.infer(model, inputs)
        # convnet's numpy reference is slow: check a few rows of the full batch
        rows = slice(None) if model != "convnet" or batch < 8 else [0, batch // 2, batch - 1]
        _check(model, arrays, result, rows)


def test_requested_output_subset_and_request_id(server):
    client = grpcclient.InferenceServerClient(server.url)
    arrays, inputs = _inputs("mixed", 3)
    result = client.infer("mixed", inputs, outputs=[grpcclient.InferRequestedOutput("scaled")], request_id="r-17")
    response = result.get_response()
    assert response.id == "r-17" and [o.name for o in response.outputs] == ["scaled"]
    assert result.as_numpy("sum") is None
    _check("mixed", {k: v for k, v in arrays.items()}, result) if False else None
    expected = reference_outputs("mixed", EXAMPLES / "mixed" / "1" / "model.onnx", arrays)["scaled"]
    np.testing.assert_allclose(result.as_numpy("scaled").astype(np.float32), expected.astype(np.float32), rtol=1e-3)


def test_empty_batch_returns_empty_outputs(server):
    client = grpcclient.InferenceServerClient(server.url)
    inp = grpcclient.InferInput("x", [0, 16], "FP32")
    inp.set_data_from_numpy(np.zeros((0, 16), np.float32))
    assert client.infer("tiny", [inp]).as_numpy("y").shape == (0, 16)


def test_stream_many_requests_in_flight(server):
    client = grpcclient.InferenceServerClient(server.url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    sent = {}
    try:
        for i in range(64):
            arrays, inputs = _inputs("tiny", 1 + i % 5, seed=i)
            sent[str(i)] = arrays
            client.async_stream_infer("tiny", inputs, request_id=str(i))
        for _ in range(64):
            result, error = answers.get(timeout=30)
            assert error is None, error
            rid = result.get_response().id
            _check("tiny", sent.pop(rid), result)
    finally:
        client.stop_stream()
    assert not sent


def test_stream_reports_errors_in_stream_and_keeps_going(server):
    client = grpcclient.InferenceServerClient(server.url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        bad = grpcclient.InferInput("x", [1, 15], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 15), np.float32))
        client.async_stream_infer("tiny", [bad], request_id="bad")
        _, error = answers.get(timeout=30)
        assert error is not None and "expected shape" in str(error)
        arrays, inputs = _inputs("tiny", 2)
        client.async_stream_infer("tiny", inputs, request_id="good")
        result, error = answers.get(timeout=30)
        assert error is None
        _check("tiny", arrays, result)
    finally:
        client.stop_stream()


def test_statistics_and_metrics_move(server):
    client = grpcclient.InferenceServerClient(server.url)
    before = client.get_inference_statistics("tiny").model_stats[0]
    for batch in (1, 3):
        client.infer("tiny", _inputs("tiny", batch)[1])
    after = client.get_inference_statistics("tiny").model_stats[0]
    assert after.inference_count - before.inference_count == 4
    assert after.inference_stats.success.count - before.inference_stats.success.count == 2
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert 'trtserve_inference_requests_total{model="tiny",status="OK",version="1"}' in text
    assert 'trtserve_model_ready{model="mlp",version="1"} 1.0' in text
    assert "no-such-model" not in text


def test_server_reflection_lists_and_describes_the_services(server):
    import grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.url) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        infer = db.FindFileContainingSymbol("inference.GRPCInferenceService")
        assert infer.name == "inference.proto" and "ModelInferRequest" in [m.name for m in infer.message_type]

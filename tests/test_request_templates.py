"""Request heads checked once: a request whose head passed before for the same model spec needs only its
byte counts compared, and gets exactly the inputs `decode_request` would give it; everything else goes
back to `decode_request`, which names what is wrong."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from service.errors import InvalidArgument
from service.frontend import codec
from service.frontend.request_wire import parse_infer_request
from service.frontend.templates import RequestTemplates
from service.proto import inference_pb2 as pb
from service.repository import ModelSpec, TensorSpec
from tests.reference import make_inputs, reference_outputs
from tests.server import EXAMPLES, start

Tensor = pb.ModelInferRequest.InferInputTensor


def _spec(*inputs: tuple[str, str, tuple[int, ...]]) -> ModelSpec:
    return ModelSpec(name="m", version=1, versions=(1,), model_path=Path("/nonexistent/model.onnx"), max_batch_size=8,
                     inputs=tuple(TensorSpec(n, d, s) for n, d, s in inputs),
                     outputs=(TensorSpec("y", "FP32", (4,)),), backend="onnxruntime", use_gpu=False, config=None)


TWO = _spec(("a", "FP32", (4,)), ("b", "INT64", (2,)))


def _wire(inputs: list[tuple[str, str, list[int], bytes]], request_id: str = "1", **fields: object) -> bytes:
    request = pb.ModelInferRequest(model_name="m", id=request_id, **fields)
    for name, datatype, shape, data in inputs:
        request.inputs.append(Tensor(name=name, datatype=datatype, shape=shape))
        request.raw_input_contents.append(data)
    return request.SerializeToString()


def _two(rows: int, seed: int, request_id: str = "1") -> bytes:
    rng = np.random.default_rng(seed)
    return _wire([("a", "FP32", [rows, 4], rng.standard_normal((rows, 4), dtype=np.float32).tobytes()),
                  ("b", "INT64", [rows, 2], rng.integers(0, 9, (rows, 2)).tobytes())], request_id)


def _learned(templates: RequestTemplates, spec: ModelSpec, data: bytes) -> None:
    """The first request of its head: decoded the long way (and its head kept when it may be)."""
    parsed = parse_infer_request(data)
    assert templates.lookup(parsed, spec) is None
    templates.decode(parsed, codec.RequestPlan(spec))


def test_a_head_seen_before_decodes_to_what_decode_request_gives():
    templates = RequestTemplates()
    _learned(templates, TWO, _two(3, seed=1))
    assert len(templates) == 1
    data = _two(3, seed=2, request_id="other id")
    parsed = parse_infer_request(data)
    inputs, outputs = templates.lookup(parsed, TWO)
    want_inputs, want_outputs = codec.decode_request(parsed.message, TWO, parsed.raw)
    assert outputs == want_outputs == ["y"]
    assert [(t.name, t.datatype, t.shape, bytes(t.data)) for t in inputs] == \
        [(t.name, t.datatype, t.shape, bytes(t.data)) for t in want_inputs]
    assert all(t.data.obj is data for t in inputs)  # this request's bytes, not the first one's
    assert templates.lookup(parse_infer_request(_two(2, seed=3)), TWO) is None  # another head


def test_what_a_template_cannot_judge_goes_back_to_decode_request():
    templates = RequestTemplates()
    _learned(templates, TWO, _two(3, seed=1))
    short = _wire([("a", "FP32", [3, 4], bytes(48)), ("b", "INT64", [3, 2], bytes(47))])
    parsed = parse_infer_request(short)
    assert templates.lookup(parsed, TWO) is None
    with pytest.raises(InvalidArgument, match="input 'b': expected 48 bytes"):
        templates.decode(parsed, codec.RequestPlan(TWO))
    same = parse_infer_request(_two(3, seed=4))
    assert templates.lookup(same, dataclasses.replace(TWO)) is None  # a reload's new spec
    same.whole()
    assert templates.lookup(same, TWO) is None  # raw contents handed to the message


@pytest.mark.parametrize("case", ["BOOL input", "BYTES input", "typed contents", "inputs out of order",
                                  "large head"])
def test_only_heads_that_decide_every_check_but_the_byte_counts_are_kept(case):
    spec, data = TWO, _two(1, seed=0)
    if case == "BOOL input":
        spec = _spec(("a", "FP32", (4,)), ("b", "BOOL", (2,)))
        data = _wire([("a", "FP32", [1, 4], bytes(16)), ("b", "BOOL", [1, 2], b"\x00\x01")])
    elif case == "BYTES input":
        spec = _spec(("a", "BYTES", (1,)))
        data = _wire([("a", "BYTES", [1, 1], b"\x01\x00\x00\x00z")])
    elif case == "typed contents":
        request = pb.ModelInferRequest(model_name="m", inputs=[
            Tensor(name="a", datatype="FP32", shape=[1, 4], contents=pb.InferTensorContents(fp32_contents=[1] * 4)),
            Tensor(name="b", datatype="INT64", shape=[1, 2], contents=pb.InferTensorContents(int64_contents=[1] * 2))])
        data = request.SerializeToString()
    elif case == "inputs out of order":
        data = _wire([("b", "INT64", [1, 2], bytes(16)), ("a", "FP32", [1, 4], bytes(16))])
    else:
        request = pb.ModelInferRequest.FromString(data)
        request.parameters["note"].string_param = "x" * 5000
        data = request.SerializeToString()
    templates = RequestTemplates()
    _learned(templates, spec, data)  # decode_request accepts each of them
    assert len(templates) == 0


def test_the_templates_kept_are_bounded():
    templates = RequestTemplates(limit=2)
    for rows in (1, 2, 3, 4, 5):
        _learned(templates, TWO, _two(rows, seed=rows))
        assert 1 <= len(templates) <= 2


def test_through_the_server_a_known_head_with_wrong_bytes_is_refused_and_the_next_is_answered():
    model = EXAMPLES / "tiny" / "1" / "model.onnx"
    with start(EXAMPLES, ["--model-control-mode", "explicit", "--load-model", "tiny"]) as server, \
            grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def request(x: np.ndarray, data: bytes | None = None) -> service_pb2.ModelInferRequest:
            return service_pb2.ModelInferRequest(
                model_name="tiny", inputs=[service_pb2.ModelInferRequest.InferInputTensor(
                    name="x", datatype="FP32", shape=list(x.shape))],
                raw_input_contents=[x.tobytes() if data is None else data])

        for seed in range(3):  # the first one's head is kept, the next ones take it
            x = make_inputs("tiny", 2, seed=seed)["x"]
            got = np.frombuffer(stub.ModelInfer(request(x), timeout=30).raw_output_contents[0], np.float32)
            np.testing.assert_allclose(got.reshape(2, 16), reference_outputs("tiny", model, {"x": x})["y"],
                                       rtol=1e-6, atol=1e-6)
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request(x, x.tobytes()[:-4]), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "input 'x': expected 128 bytes" in err.value.details()

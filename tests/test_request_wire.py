"""ModelInferRequests are scanned, not parsed: tensor bytes stay views of the received message, the routing
strings and the id are read out, the rest (the head) parses into the message protobuf would have parsed,
and input that does not frame fails like protobuf's own parser."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from service.errors import InvalidArgument
from service.frontend.request_wire import parse_infer_request, service_handlers
from service.frontend.servicer import SERVICE
from service.proto import inference_pb2 as pb

LARGE = 1 << 16


def _request(raw_sizes: list[int], request_id: str = "req-7", seed: int = 0) -> pb.ModelInferRequest:
    rng = np.random.default_rng(seed)
    request = pb.ModelInferRequest(model_name="convnet", model_version="1", id=request_id)
    request.parameters["priority"].int64_param = 3
    request.parameters["tag"].string_param = "x" * 200
    for i, size in enumerate(raw_sizes):
        tensor = request.inputs.add(name=f"in{i}", datatype="UINT8", shape=[1, size])
        tensor.parameters["binary_data_size"].int64_param = size
        request.raw_input_contents.append(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    request.outputs.add(name="y")
    return request


@pytest.mark.parametrize("sizes", [[16], [], [LARGE], [300_000, 5, 0, 70_000], [LARGE * 3] * 3])
def test_raw_contents_stay_views_and_the_rest_parses_alike(sizes):
    original = _request(sizes)
    data = original.SerializeToString()
    parsed = parse_infer_request(data)
    assert parsed.raw is not None and [bytes(r) for r in parsed.raw] == list(original.raw_input_contents)
    assert all(r.obj is data for r in parsed.raw)  # views of the received bytes, not copies
    assert (parsed.model_name, parsed.model_version, parsed.id) == ("convnet", "1", "req-7")
    expected = pb.ModelInferRequest()
    expected.CopyFrom(original)
    del expected.raw_input_contents[:]
    assert parsed.message == expected
    assert parsed.whole() == original and parsed.raw is None


def test_the_head_is_what_requests_of_one_kind_share():
    """Same model, tensors and parameters: one head whatever the id and the tensor bytes; anything the
    model's checks look at changes it."""
    heads = {parse_infer_request(_request([16], request_id=i, seed=s).SerializeToString()).head
             for i, s in (("a", 1), ("b", 2), ("", 3))}
    assert len(heads) == 1
    head = heads.pop()
    assert b"convnet" in head and b"req-7" not in head
    other_shape = _request([16])
    other_shape.inputs[0].shape[1] = 8
    other_output = _request([16])
    other_output.outputs.add(name="z")
    for changed in (_request([17]), other_shape, other_output):
        assert parse_infer_request(changed.SerializeToString()).head != head


def test_absent_strings_read_as_empty_and_the_last_of_a_repeated_one_wins():
    parsed = parse_infer_request(b"")
    assert (parsed.model_name, parsed.model_version, parsed.id, parsed.raw) == ("", "", "", [])
    data = pb.ModelInferRequest(model_name="a", id="1").SerializeToString() + pb.ModelInferRequest(
        model_name="b", id="2").SerializeToString()  # concatenated messages merge: the last value wins
    parsed = parse_infer_request(data)
    assert (parsed.model_name, parsed.id) == ("b", "2") == (parsed.message.model_name, parsed.message.id)


@pytest.mark.parametrize("cut", [1, 7, 1000, LARGE // 2])
def test_truncated_requests_are_refused(cut):
    data = _request([LARGE * 2]).SerializeToString()
    with pytest.raises(DecodeError):
        parse_infer_request(data[:-cut])


def test_strings_that_are_not_utf8_are_refused():
    valid = pb.ModelInferRequest(id="x").SerializeToString()
    with pytest.raises(DecodeError, match="not valid UTF-8"):
        parse_infer_request(valid[:-1] + b"\xff")


def test_a_head_that_is_not_a_message_fails_when_read_as_invalid_argument():
    """The head is parsed only when a request needs it; a malformed one is then the client's error."""
    name = pb.ModelInferRequest(model_name="tiny").SerializeToString()
    parsed = parse_infer_request(name + b"\x2a\x03\xff\xff\xff")  # field 5 (inputs) holding garbage
    assert parsed.model_name == "tiny"
    with pytest.raises(InvalidArgument, match="malformed ModelInferRequest"):
        _ = parsed.message


def test_every_method_of_the_service_gets_a_handler_and_overrides_win():
    class Servicer:
        def __getattr__(self, name):
            return lambda *args: name

    marker = object()
    handler = service_handlers(Servicer(), SERVICE, {f"/{SERVICE}/ModelInfer": marker})
    methods = [m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods]
    assert len(methods) >= 12

    class Details:
        def __init__(self, method):
            self.method = method

    for name in methods:
        found = handler.service(Details(f"/{SERVICE}/{name}"))
        assert found is not None, name
        if name == "ModelInfer":
            assert found is marker
        else:
            behaviour = found.unary_unary or found.unary_stream or found.stream_unary or found.stream_stream
            assert behaviour() == name
    streaming = handler.service(Details(f"/{SERVICE}/ModelStreamInfer"))
    assert streaming.request_streaming and streaming.response_streaming

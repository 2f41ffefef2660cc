"""Large ModelInferRequests keep their tensor bytes as views of the received message; the result is
the message protobuf would have parsed, and truncated input fails like protobuf's own parser."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from service.frontend.request_wire import SCAN_FROM_BYTES, parse_infer_request, service_handlers
from service.frontend.servicer import SERVICE
from service.proto import inference_pb2 as pb


def _request(raw_sizes: list[int]) -> pb.ModelInferRequest:
    rng = np.random.default_rng(len(raw_sizes))
    request = pb.ModelInferRequest(model_name="convnet", model_version="1", id="req-7")
    request.parameters["priority"].int64_param = 3
    request.parameters["tag"].string_param = "x" * 200
    for i, size in enumerate(raw_sizes):
        tensor = request.inputs.add(name=f"in{i}", datatype="UINT8", shape=[1, size])
        tensor.parameters["binary_data_size"].int64_param = size
        request.raw_input_contents.append(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    request.outputs.add(name="y")
    return request


@pytest.mark.parametrize("sizes", [[SCAN_FROM_BYTES], [300_000, 5, 0, 70_000], [SCAN_FROM_BYTES * 3] * 3])
def test_a_large_request_keeps_its_raw_contents_as_views_and_the_rest_parses_alike(sizes):
    original = _request(sizes)
    data = original.SerializeToString()
    parsed = parse_infer_request(data)
    assert parsed.raw is not None and [bytes(r) for r in parsed.raw] == list(original.raw_input_contents)
    assert all(r.obj is data for r in parsed.raw)  # views of the received bytes, not copies
    expected = pb.ModelInferRequest()
    expected.CopyFrom(original)
    del expected.raw_input_contents[:]
    assert parsed.message == expected
    assert parsed.whole() == original and parsed.raw is None


def test_a_small_request_is_parsed_by_protobuf_whole():
    original = _request([16])
    parsed = parse_infer_request(original.SerializeToString())
    assert parsed.raw is None and parsed.message == original


@pytest.mark.parametrize("cut", [1, 7, 1000, SCAN_FROM_BYTES // 2])
def test_truncated_large_requests_are_refused(cut):
    data = _request([SCAN_FROM_BYTES * 2]).SerializeToString()
    with pytest.raises(DecodeError):
        parse_infer_request(data[:-cut])


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

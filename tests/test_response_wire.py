"""The answers `ResponseEncoder` writes are the very bytes protobuf serializes for the same message,
unary and streamed, for any id, output set, shape and payload; gRPC passes them through."""

from __future__ import annotations

from pathlib import Path

import hypothesis.strategies as st
from hypothesis import given, settings

from service.frontend.response_wire import ResponseEncoder, serialize, varint
from service.proto import inference_pb2 as pb
from service.repository import ModelRepository
from service.tensors import WireTensor

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"
SPEC = ModelRepository(EXAMPLES).load_spec("tiny")


def _reference(request_id: str, outputs: list[WireTensor], stream: bool) -> bytes:
    """What the servicer built before: the messages, serialized by protobuf."""
    meta = pb.ModelInferResponse.InferOutputTensor
    response = pb.ModelInferResponse(
        model_name=SPEC.name, model_version=str(SPEC.version), id=request_id,
        outputs=[meta(name=o.name, datatype=o.datatype, shape=o.shape) for o in outputs],
        raw_output_contents=[bytes(o.data) for o in outputs])
    return (pb.ModelStreamInferResponse(infer_response=response) if stream else response).SerializeToString()


tensors = st.builds(
    WireTensor,
    name=st.text(min_size=1, max_size=20),
    datatype=st.sampled_from(["FP32", "INT64", "BYTES", "BOOL", "FP16", "BF16"]),
    shape=st.lists(st.integers(min_value=0, max_value=2**40), max_size=5).map(tuple),
    data=st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(memoryview)),
)


@settings(max_examples=300, deadline=None)
@given(request_id=st.text(max_size=40), outputs=st.lists(tensors, max_size=4), stream=st.booleans())
def test_the_bytes_are_what_protobuf_serializes(request_id, outputs, stream):
    assert ResponseEncoder(SPEC).encode(request_id, outputs, stream) == _reference(request_id, outputs, stream)


def test_large_payloads_and_a_reused_encoder_match_too():
    encoder = ResponseEncoder(SPEC)
    big = WireTensor("y", "FP32", (4096, 16), bytes(range(256)) * 1024)  # 256 KiB: a 3-byte length
    for rows in (1, 2, 1, 4096):  # metadata kept per shape: a shape seen before comes from the cache
        outputs = [WireTensor("y", "FP32", (rows, 16), bytes(64 * rows)), big]
        for stream in (False, True):
            assert encoder.encode("r-1", outputs, stream) == _reference("r-1", outputs, stream)
    message = pb.ModelInferResponse.FromString(encoder.encode("", [big]))
    assert message.raw_output_contents[0] == big.data and list(message.outputs[0].shape) == [4096, 16]


def test_varint_and_the_serializer():
    assert [varint(n) for n in (0, 1, 127, 128, 300, 2**63)] == [
        b"\x00", b"\x01", b"\x7f", b"\x80\x01", b"\xac\x02", b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"]
    assert serialize(b"as is") == b"as is"
    assert serialize(pb.ModelStreamInferResponse(error_message="no")) == b"\x0a\x02no"

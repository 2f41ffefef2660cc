"""Parsing `ModelInferRequest`s without copying their tensor bytes, and the gRPC handlers that use it.

protobuf copies a bytes field twice on its way to numpy: once when the message is parsed, once more
each time the field is read. For a 512 KB request that is two of the frontend's four copies of the
data (py-spy on the H200: memcpy was a quarter of a frontend's samples). Large requests are scanned
here instead: `raw_input_contents` (field 7) become views of the received bytes, and protobuf parses
only the rest. Small requests take protobuf's own parser, which is faster for them.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from service.proto import inference_pb2 as pb

SCAN_FROM_BYTES = 1 << 16  # smaller requests: protobuf parses them whole
_RAW_INPUT_CONTENTS = 7


class InferRequest:
    """A parsed `ModelInferRequest`: the message, and its raw contents as views (None: in the message)."""

    __slots__ = ("message", "raw")

    def __init__(self, message: pb.ModelInferRequest, raw: list[memoryview] | None) -> None:
        self.message = message
        self.raw = raw

    def whole(self) -> pb.ModelInferRequest:
        """The message with its raw contents in it (to forward it unchanged)."""
        if self.raw is not None:
            self.message.raw_input_contents.extend(bytes(r) for r in self.raw)
            self.raw = None
        return self.message


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise DecodeError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def parse_infer_request(data: bytes) -> InferRequest:
    """A request from its wire bytes; large ones keep their raw contents as views of `data`."""
    if len(data) < SCAN_FROM_BYTES:
        return InferRequest(pb.ModelInferRequest.FromString(data), None)
    view = memoryview(data)
    raw: list[memoryview] = []
    rest: list[memoryview] = []
    pos, end = 0, len(data)
    while pos < end:
        start = pos
        key, pos = _varint(data, pos)
        wire_type = key & 7
        if wire_type == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise DecodeError("length-delimited field runs past the end of the message")
            if key >> 3 == _RAW_INPUT_CONTENTS:
                raw.append(view[pos:pos + length])
            pos += length
        elif wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            if pos > end:
                raise DecodeError("fixed-size field runs past the end of the message")
        else:
            raise DecodeError(f"unexpected wire type {wire_type}")
        if key >> 3 != _RAW_INPUT_CONTENTS:
            rest.append(view[start:pos])
    return InferRequest(pb.ModelInferRequest.FromString(b"".join(rest)), raw)


def service_handlers(servicer: Any, service: str,
                     overrides: dict[str, grpc.RpcMethodHandler]) -> grpc.GenericRpcHandler:
    """Every method of `service` (from its descriptor) served by `servicer`'s method of the same name,
    except those in `overrides` (full method name -> handler)."""
    descriptor = pb.DESCRIPTOR.pool.FindServiceByName(service)
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in descriptor.methods:
        full = f"/{service}/{method.name}"
        if full in overrides:
            handlers[method.name] = overrides[full]
            continue
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        kind = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(method.client_streaming,
                                                                      method.server_streaming)]
        handlers[method.name] = kind(getattr(servicer, method.name), request_deserializer=request.FromString,
                                     response_serializer=response.SerializeToString)
    return grpc.method_handlers_generic_handler(service, handlers)

"""Reading `ModelInferRequest`s: their tensor bytes as views, the rest kept as bytes and parsed only when needed.

protobuf copies a bytes field twice on its way to numpy: once when the message is parsed, once more
each time the field is read. For a 512 KB request that is two of the frontend's four copies of the
data (py-spy on the H200: memcpy was a quarter of a frontend's samples). So the request's top-level
fields are scanned here instead: `raw_input_contents` (field 7) become views of the received bytes,
`model_name`, `model_version` and `id` (fields 1-3) plain strings, and everything else (the inputs'
names, datatypes and shapes, the requested outputs, parameters) stays bytes: the request's `head`.
Requests of one client to one model differ only in their id and their tensor bytes, so their heads
are equal, and the servicer checks a head against the model once (`templates.RequestTemplates`); the
message is parsed from the head only when a request needs it (`InferRequest.message`).
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from service.errors import InvalidArgument
from service.proto import inference_pb2 as pb

# Keys (field number << 3 | wire type 2) of the fields read out of the head.
_MODEL_NAME_KEY, _MODEL_VERSION_KEY, _ID_KEY, _RAW_INPUT_CONTENTS_KEY = 0x0A, 0x12, 0x1A, 0x3A


class InferRequest:
    """A scanned `ModelInferRequest`: its routing strings, its raw contents as views (None once handed to
    the message by `whole`), and its `head`: the wire bytes of every field but `id` and the raw contents."""

    __slots__ = ("_id_field", "_message", "head", "id", "model_name", "model_version", "raw")

    def __init__(self, head: bytes, model_name: str, model_version: str, request_id: str, id_field: bytes,
                 raw: list[memoryview]) -> None:
        self.head = head
        self.model_name = model_name
        self.model_version = model_version
        self.id = request_id
        self._id_field = id_field
        self.raw: list[memoryview] | None = raw
        self._message: pb.ModelInferRequest | None = None

    @property
    def message(self) -> pb.ModelInferRequest:
        """The message without its raw contents, parsed on first use; InvalidArgument when the head is not
        a valid ModelInferRequest."""
        if self._message is None:
            try:
                self._message = pb.ModelInferRequest.FromString(self.head + self._id_field)
            except DecodeError as exc:
                raise InvalidArgument(f"malformed ModelInferRequest: {exc}") from None
        return self._message

    def whole(self) -> pb.ModelInferRequest:
        """The message with its raw contents in it (to forward it unchanged)."""
        message = self.message
        if self.raw is not None:
            message.raw_input_contents.extend(bytes(r) for r in self.raw)
            self.raw = None
        return message


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
    """A request from its wire bytes (gRPC's request deserializer); DecodeError when its top-level fields
    do not frame (truncated input, as protobuf's own parser would refuse it) or a string is not UTF-8."""
    view = memoryview(data)
    raw: list[memoryview] = []
    head: list[bytes] = []
    name = version = request_id = b""
    id_field = b""
    pos, end = 0, len(data)
    while pos < end:
        start = pos
        key = data[pos]
        if key < 0x80:  # every field of ModelInferRequest has a one-byte key
            pos += 1
        else:
            key, pos = _varint(data, pos)
        if key & 7 == 2:  # length-delimited: every field of ModelInferRequest
            if pos < end and data[pos] < 0x80:
                length = data[pos]
                pos += 1
            else:
                length, pos = _varint(data, pos)
            stop = pos + length
            if stop > end:
                raise DecodeError("length-delimited field runs past the end of the message")
            if key == _RAW_INPUT_CONTENTS_KEY:
                raw.append(view[pos:stop])
            elif key == _ID_KEY:
                request_id, id_field = data[pos:stop], data[start:stop]
            else:
                if key == _MODEL_NAME_KEY:
                    name = data[pos:stop]
                elif key == _MODEL_VERSION_KEY:
                    version = data[pos:stop]
                head.append(data[start:stop])
            pos = stop
            continue
        wire_type = key & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            if pos > end:
                raise DecodeError("fixed-size field runs past the end of the message")
        else:
            raise DecodeError(f"unexpected wire type {wire_type}")
        head.append(data[start:pos])
    try:
        return InferRequest(b"".join(head), name.decode(), version.decode(), request_id.decode(), id_field, raw)
    except UnicodeDecodeError:
        raise DecodeError("model_name, model_version or id is not valid UTF-8") from None


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

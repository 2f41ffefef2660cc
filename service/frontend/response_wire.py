"""`ModelInferResponse` bytes written straight in protobuf's wire format, without building messages.

Building a `ModelInferResponse` (and for a stream, a `ModelStreamInferResponse` around it) and serializing
it cost ~10 µs per `tiny` answer, a tenth of the frontend's own Python per request. An answer's fields
are few and fixed: model name and version, the request id, one metadata entry and one raw content per
output. So the bytes are joined here from a per-model head, the metadata of the outputs (kept per set of
names, datatypes and shapes: the batch size changes the shape, little else does) and the outputs' data,
in field-number order, which makes them the very bytes protobuf's own serializer writes (the tests compare
them). gRPC sends them as they are (`serialize`).
"""

from __future__ import annotations

from service.repository import ModelSpec
from service.tensors import WireTensor, nbytes

# Field keys (field number << 3 | wire type 2, length-delimited) of the fields written here.
_MODEL_NAME, _MODEL_VERSION, _ID, _OUTPUTS, _RAW_OUTPUT_CONTENTS = b"\x0a", b"\x12", b"\x1a", b"\x2a", b"\x32"
_TENSOR_NAME, _TENSOR_DATATYPE, _TENSOR_SHAPE = b"\x0a", b"\x12", b"\x1a"
_STREAM_INFER_RESPONSE = b"\x12"  # ModelStreamInferResponse.infer_response
_META_CACHE_LIMIT = 1024


_ONE_BYTE_VARINTS = tuple(bytes((n,)) for n in range(0x80))


def varint(n: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative integer."""
    if n < 0x80:
        return _ONE_BYTE_VARINTS[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(key: bytes, payload: bytes) -> bytes:
    return key + varint(len(payload)) + payload


class ResponseEncoder:
    """The answers of one model version, as serialized `ModelInferResponse`s (or stream responses)."""

    def __init__(self, spec: ModelSpec) -> None:
        self._head = _field(_MODEL_NAME, spec.name.encode()) + _field(_MODEL_VERSION, str(spec.version).encode())
        self._meta: dict[tuple[tuple[str, str, tuple[int, ...]], ...], bytes] = {}

    def encode(self, request_id: str, outputs: list[WireTensor], stream: bool = False) -> bytes:
        """The response to a request with id `request_id`: `outputs` in this order. With `stream`, a
        `ModelStreamInferResponse` holding it."""
        meta = self._outputs_meta(outputs)
        parts = [_STREAM_INFER_RESPONSE, b"", self._head] if stream else [self._head]
        size = len(self._head) + len(meta)  # of the ModelInferResponse, for the stream's length prefix
        if request_id:
            rid = request_id.encode()
            length = varint(len(rid))
            parts += (_ID, length, rid)
            size += 1 + len(length) + len(rid)
        parts.append(meta)
        for out in outputs:
            n = nbytes(out.data)
            length = varint(n)
            parts += (_RAW_OUTPUT_CONTENTS, length, out.data)
            size += 1 + len(length) + n
        if stream:
            parts[1] = varint(size)
        return b"".join(parts)

    def _outputs_meta(self, outputs: list[WireTensor]) -> bytes:
        key = tuple([(out.name, out.datatype, tuple(out.shape)) for out in outputs])
        meta = self._meta.get(key)
        if meta is None:
            if len(self._meta) >= _META_CACHE_LIMIT:
                self._meta.clear()
            meta = self._meta[key] = b"".join(
                _field(_OUTPUTS, _field(_TENSOR_NAME, name.encode()) + _field(_TENSOR_DATATYPE, datatype.encode())
                       + (_field(_TENSOR_SHAPE, b"".join(map(varint, shape))) if shape else b""))
                for name, datatype, shape in key)
        return meta


def serialize(message: bytes | object) -> bytes:
    """gRPC's response serializer: encoded answers go out as they are, messages (errors in a stream) are
    serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()  # type: ignore[attr-defined]

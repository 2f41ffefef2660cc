"""Messages between the parent and a model worker: a small JSON header, then optional inline bytes.

Nothing is pickled: a frame is `<u32 header length><JSON header><payload>`. Tensor data normally lives
in the shared-memory arena and the header only names offsets; outputs whose size could not be known in
advance travel inline in the payload.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass
from typing import Any

_LEN = struct.Struct("<I")
_CONN_LEN = struct.Struct("!i")  # multiprocessing.Connection's own length prefix
_CONN_LONG = struct.Struct("!Q")  # ... after a prefix of -1, for frames of 2 GiB and more

# Operation names (parent -> worker)
INFER = "infer"
PING = "ping"
CANCEL = "cancel"
STOP = "stop"
# Operation names (worker -> parent)
READY = "ready"
FAILED = "failed"
RESULT = "result"
ERROR = "error"
PONG = "pong"
STATS = "stats"


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's raw bytes are: in the arena at `offset`, or inline at `offset` in the payload."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    inline: bool = False

    def to_json(self) -> list[Any]:
        return [self.name, self.datatype, list(self.shape), self.offset, self.nbytes, self.inline]

    @staticmethod
    def from_json(item: list[Any]) -> TensorRef:
        name, datatype, shape, offset, nbytes, inline = item
        return TensorRef(str(name), str(datatype), tuple(int(d) for d in shape), int(offset), int(nbytes),
                         bool(inline))


def encode(header: dict[str, Any], payload: bytes | memoryview | None = None) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    parts = [_LEN.pack(len(head)), head]
    if payload is not None:
        parts.append(payload)
    return b"".join(parts)


def decode(frame: bytes) -> tuple[dict[str, Any], memoryview]:
    """The header dict and a view of the payload (empty when there is none)."""
    (n,) = _LEN.unpack_from(frame, 0)
    view = memoryview(frame)
    header = json.loads(view[_LEN.size:_LEN.size + n].tobytes())
    return header, view[_LEN.size + n:]


def framed(header: dict[str, Any], payload: bytes | memoryview | None = None) -> bytes:
    """A frame with the length prefix `multiprocessing.Connection.recv_bytes` reads, for writing to the
    worker's socket from the event loop without blocking."""
    body = encode(header, payload)
    return _CONN_LEN.pack(len(body)) + body


async def read_framed(reader: asyncio.StreamReader) -> bytes:
    """One frame written by `Connection.send_bytes` (IncompleteReadError at end of stream)."""
    (n,) = _CONN_LEN.unpack(await reader.readexactly(_CONN_LEN.size))
    if n == -1:
        (n,) = _CONN_LONG.unpack(await reader.readexactly(_CONN_LONG.size))
    return await reader.readexactly(n)


def split_framed(buffer: bytearray) -> list[bytes]:
    """The complete frames at the start of `buffer` (bytes read from a socket as they came), removed from
    it; a frame cut off at the end stays for the next read."""
    frames, pos = [], 0
    while len(buffer) - pos >= _CONN_LEN.size:
        (n,) = _CONN_LEN.unpack_from(buffer, pos)
        head = _CONN_LEN.size
        if n == -1:
            if len(buffer) - pos < head + _CONN_LONG.size:
                break
            (n,) = _CONN_LONG.unpack_from(buffer, pos + head)
            head += _CONN_LONG.size
        if len(buffer) - pos < head + n:
            break
        frames.append(bytes(buffer[pos + head:pos + head + n]))
        pos += head + n
    del buffer[:pos]
    return frames

"""Messages between a frontend and a model worker: two binary hot frames, JSON for everything else.

Every frame travels behind the length prefix of `multiprocessing.Connection` (`framed`, `read_framed`,
`split_framed`); its first byte says what it is. The two frames of every request, INFER (frontend ->
worker) and RESULT (worker -> frontend), have a fixed binary layout (`FrameCodec`, one per model):
tensors are named by their index in the model's spec, which both sides hold, and carry the spec's
datatype. Every other message (ping, pong, cancel, stop, ready, failed, error, stats, and the frontend
processes' own) is rare: a JSON object, a newline, then an optional payload. A JSON frame starts with
"{", which no binary frame does. Nothing is pickled. Tensor data normally lives in the shared-memory arena
and a frame only names offsets; outputs whose size could not be known in advance travel inline.

Binary layouts, network byte order (so the length prefix packs with them in one call):
  INFER   op=1 B, id Q, timeout_s d (NaN: none), out_offset Q, out_nbytes Q, inputs H, outputs H,
          then per output its index H, then per input: index H, ndim B, dims ndim*q, offset Q, nbytes Q
  RESULT  op=2 B, id Q, outputs H, then per output: index H, inline ?, ndim B, dims ndim*q, offset Q,
          nbytes Q; then the inline payload (an inline output's offset is into it)
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.repository import ModelSpec

_CONN_LEN = struct.Struct("!i")  # multiprocessing.Connection's own length prefix
_CONN_LONG = struct.Struct("!Q")  # ... after a prefix of -1, for frames of 2 GiB and more
_MAX_SHORT = 0x7FFFFFFF

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

OP_INFER = 1  # first byte of a binary INFER frame
OP_RESULT = 2  # ... of a binary RESULT frame
_JSON_START = ord("{")

_INFER_HEAD = struct.Struct("!BQdQQHH")
_RESULT_HEAD = struct.Struct("!BQH")
_INPUT_HEAD = struct.Struct("!HB")
_OUTPUT_HEAD = struct.Struct("!H?B")
_NO_TIMEOUT = math.nan
_MAX_LAYOUTS = 64  # cached frame layouts per codec (a model's requests use one or a few)

# (name, datatype, shape, offset in the arena, nbytes): an input as the frontend places it
TensorPlace = tuple[str, str, tuple[int, ...], int, int]
# (index in spec.inputs, shape, offset in the arena, nbytes)
InputSlot = tuple[int, tuple[int, ...], int, int]
# (index in spec.outputs, shape, offset in the arena or the inline payload, nbytes, inline)
OutputSlot = tuple[int, tuple[int, ...], int, int, bool]


class FrameError(ValueError):
    """A frame that does not follow its layout; `request_id` when it could still be read from it."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass(slots=True)
class InferRequest:
    """A decoded INFER frame: inputs in the frontend's arena, where the outputs go, the queue timeout."""

    id: int
    timeout_s: float | None
    inputs: list[InputSlot]
    outputs: list[int]  # indices into spec.outputs, in the order the client asked for them
    out_offset: int
    out_nbytes: int


def is_infer(frame: bytes) -> bool:
    """Whether a received frame (length prefix split off) is a binary INFER."""
    return frame[:1] == b"\x01"


def is_result(frame: bytes) -> bool:
    """Whether a received frame (length prefix split off) is a binary RESULT."""
    return frame[:1] == b"\x02"


class FrameCodec:
    """Encodes and decodes the INFER and RESULT frames of one model, with its spec's tables built once."""

    def __init__(self, spec: ModelSpec) -> None:
        self.batched = spec.max_batch_size > 0
        batch = 1 if self.batched else 0
        self.spec = spec
        self.inputs = spec.inputs
        self.outputs = spec.outputs
        self.output_datatypes = tuple(t.datatype for t in spec.outputs)
        self._input_ranks = tuple(len(t.dims) + batch for t in spec.inputs)
        # name -> (index, datatype, rank): what the frontend's tensors are checked against
        self._input_info = {
            t.name: (i, t.datatype, rank) for i, (t, rank) in enumerate(zip(spec.inputs, self._input_ranks))
        }
        self._output_names = [t.name for t in spec.outputs]
        self._output_index = {t.name: i for i, t in enumerate(spec.outputs)}
        self._all_outputs = tuple(range(len(spec.outputs)))
        self._infer_layouts: dict[tuple[int, ...], struct.Struct] = {}
        self._ordered_bodies: dict[int, struct.Struct] = {}  # outputs + every input in spec order, per output count
        self._result_layouts: dict[tuple[int, ...], struct.Struct] = {}
        self._tails: dict[int, struct.Struct] = {}

    # -- INFER -------------------------------------------------------------------------------
    def encode_infer(
        self,
        request_id: int,
        inputs: Sequence[TensorPlace],
        output_names: Sequence[str],
        out_offset: int,
        out_nbytes: int,
        timeout_s: float | None,
    ) -> bytes:
        """The framed INFER of a request whose inputs lie in the arena where `inputs` say; ValueError for
        an input the spec does not have (or of another datatype or rank) or an unknown output."""
        if output_names == self._output_names:
            outputs: Sequence[int] = self._all_outputs
        else:
            try:
                outputs = [self._output_index[name] for name in output_names]
            except KeyError as exc:
                raise ValueError(f"model '{self.spec.name}' has no output {exc}") from None
        values: list[Any] = [
            0,
            OP_INFER,
            request_id,
            _NO_TIMEOUT if timeout_s is None else timeout_s,
            out_offset,
            out_nbytes,
            len(inputs),
            len(outputs),
            *outputs,
        ]
        order = []
        for name, datatype, shape, offset, nbytes in inputs:
            info = self._input_info.get(name)
            if info is None or datatype != info[1] or len(shape) != info[2]:
                raise ValueError(
                    f"input '{name}' ({datatype}, rank {len(shape)}) is not one of model '{self.spec.name}'"
                )
            values += (info[0], info[2], *shape, offset, nbytes)
            order.append(info[0])
        key = (len(outputs), *order)
        layout = self._infer_layouts.get(key)
        if layout is None:
            layout = self._layout(
                self._infer_layouts,
                key,
                "!i"
                + _INFER_HEAD.format[1:]
                + "H" * len(outputs)
                + "".join(f"HB{self._input_ranks[i]}qQQ" for i in order),
            )
        values[0] = layout.size - _CONN_LEN.size
        return layout.pack(*values)

    def decode_infer(self, frame: bytes) -> InferRequest:
        """The request in an INFER frame (without its length prefix); FrameError, naming the request
        when its id could be read, for anything that does not fit the layout or the spec."""
        size = len(frame)
        if size < _INFER_HEAD.size or frame[0] != OP_INFER:
            raise FrameError(f"not an INFER frame ({size} bytes)")
        _, request_id, timeout, out_offset, out_nbytes, n_in, n_out = _INFER_HEAD.unpack_from(frame)
        decoded = self._ordered_infer(frame, n_in, n_out) or self._any_infer(frame, request_id, n_in, n_out)
        outputs, inputs = decoded
        if outputs and max(outputs) >= len(self.outputs):
            raise FrameError(
                f"INFER frame of request {request_id}: output index {max(outputs)} out of range", request_id
            )
        return InferRequest(
            request_id, None if timeout != timeout else timeout, inputs, outputs, out_offset, out_nbytes
        )

    def _ordered_infer(self, frame: bytes, n_in: int, n_out: int) -> tuple[list[int], list[InputSlot]] | None:
        """Outputs and inputs of a frame with every input in spec order (as the frontend sends them), in
        one unpack; None for any other frame."""
        if n_in != len(self.inputs) or n_out > len(self.outputs):
            return None
        body = self._ordered_bodies.get(n_out)
        if body is None:
            body = self._ordered_bodies[n_out] = struct.Struct(
                "!" + "H" * n_out + "".join(f"HB{rank}qQQ" for rank in self._input_ranks)
            )
        if len(frame) != _INFER_HEAD.size + body.size:
            return None
        values = body.unpack_from(frame, _INFER_HEAD.size)
        inputs: list[InputSlot] = []
        pos = n_out
        for index, rank in enumerate(self._input_ranks):
            if values[pos] != index or values[pos + 1] != rank:
                return None
            dims = pos + 2
            inputs.append((index, values[dims : dims + rank], values[dims + rank], values[dims + rank + 1]))
            pos = dims + rank + 2
        return list(values[:n_out]), inputs

    def _any_infer(self, frame: bytes, request_id: int, n_in: int, n_out: int) -> tuple[list[int], list[InputSlot]]:
        """Outputs and inputs of any INFER frame, each input read on its own; FrameError for a frame
        that ends early or late or does not name each of the model's inputs once, at its rank."""
        size, pos = len(frame), _INFER_HEAD.size
        try:
            outputs = list(struct.unpack_from(f"!{n_out}H", frame, pos))
            pos += 2 * n_out
            inputs: list[InputSlot] = []
            for _ in range(n_in):
                index, ndim = _INPUT_HEAD.unpack_from(frame, pos)
                pos += _INPUT_HEAD.size
                tail = self._tail(ndim)
                values = tail.unpack_from(frame, pos)
                pos += tail.size
                inputs.append((index, values[:ndim], values[ndim], values[ndim + 1]))
        except struct.error:
            raise FrameError(f"INFER frame of request {request_id} ends early ({size} bytes)", request_id) from None
        problem = ""
        if pos != size:
            problem = f"{size - pos} bytes after the last input"
        elif len(inputs) != len(self.inputs):
            problem = f"{len(inputs)} inputs, the model has {len(self.inputs)}"
        elif sorted(index for index, *_ in inputs) != list(range(len(self.inputs))):
            problem = "an input index out of range or repeated"
        else:
            for index, shape, _, _ in inputs:
                if len(shape) != self._input_ranks[index]:
                    problem = (
                        f"input '{self.inputs[index].name}' has rank {len(shape)}, expected {self._input_ranks[index]}"
                    )
                    break
        if problem:
            raise FrameError(f"INFER frame of request {request_id}: {problem}", request_id)
        return outputs, inputs

    # -- RESULT ------------------------------------------------------------------------------
    def encode_result(self, request_id: int, outputs: Sequence[OutputSlot], payload: bytes | None = None) -> bytes:
        """The framed RESULT of a request: where each output is, then the inline outputs' bytes."""
        values: list[Any] = [0, OP_RESULT, request_id, len(outputs)]
        key = []
        for index, shape, offset, nbytes, inline in outputs:
            values += (index, inline, len(shape), *shape, offset, nbytes)
            key.append(len(shape))
        layout = self._result_layouts.get(layout_key := tuple(key))
        if layout is None:
            layout = self._layout(
                self._result_layouts, layout_key, "!i" + _RESULT_HEAD.format[1:] + "".join(f"H?B{n}qQQ" for n in key)
            )
        body = layout.size - _CONN_LEN.size + (len(payload) if payload else 0)
        if body <= _MAX_SHORT:
            values[0] = body
            head = layout.pack(*values)
            return head + payload if payload else head
        head = layout.pack(*values)[_CONN_LEN.size :]
        return _prefix(body) + head + payload  # type: ignore[operator]

    def decode_result(self, frame: bytes) -> tuple[int, list[OutputSlot], memoryview]:
        """The request id, the outputs and a view of the inline payload of a RESULT frame (without its
        length prefix); FrameError when it does not fit the layout or the spec."""
        size = len(frame)
        if size < _RESULT_HEAD.size or frame[0] != OP_RESULT:
            raise FrameError(f"not a RESULT frame ({size} bytes)")
        _, request_id, count = _RESULT_HEAD.unpack_from(frame)
        pos = _RESULT_HEAD.size
        outputs: list[OutputSlot] = []
        try:
            for _ in range(count):
                index, inline, ndim = _OUTPUT_HEAD.unpack_from(frame, pos)
                pos += _OUTPUT_HEAD.size
                tail = self._tail(ndim)
                values = tail.unpack_from(frame, pos)
                pos += tail.size
                outputs.append((index, values[:ndim], values[ndim], values[ndim + 1], inline))
        except struct.error:
            raise FrameError(f"RESULT frame of request {request_id} ends early ({size} bytes)", request_id) from None
        payload = memoryview(frame)[pos:]
        for index, _, offset, nbytes, inline in outputs:
            if index >= len(self.outputs) or (inline and offset + nbytes > len(payload)):
                raise FrameError(f"RESULT frame of request {request_id}: output {index} out of range", request_id)
        return request_id, outputs, payload

    # -- layouts -----------------------------------------------------------------------------
    def _tail(self, ndim: int) -> struct.Struct:
        """dims, offset and nbytes of a tensor of rank `ndim`."""
        tail = self._tails.get(ndim)
        if tail is None:
            tail = self._tails[ndim] = struct.Struct(f"!{ndim}qQQ")  # ndim is one byte: at most 256 entries
        return tail

    @staticmethod
    def _layout(cache: dict[tuple[int, ...], struct.Struct], key: tuple[int, ...], fmt: str) -> struct.Struct:
        layout = struct.Struct(fmt)
        if len(cache) < _MAX_LAYOUTS:
            cache[key] = layout
        return layout


# -- JSON frames -------------------------------------------------------------------------------
def encode(header: dict[str, Any], payload: bytes | memoryview | None = None) -> bytes:
    """A JSON frame: the header (no newline in it: json.dumps escapes them), a newline, the payload."""
    head = json.dumps(header, separators=(",", ":")).encode() + b"\n"
    return head + payload if payload is not None else head


def decode(frame: bytes) -> tuple[dict[str, Any], memoryview]:
    """The header dict and a view of the payload (empty when there is none) of a JSON frame; FrameError
    for anything else."""
    if not frame or frame[0] != _JSON_START:
        raise FrameError(f"not a JSON frame (first byte {frame[:1]!r})")
    end = frame.find(b"\n")
    if end < 0:
        raise FrameError("JSON frame without the end of its header")
    try:
        header = json.loads(frame[:end])
    except ValueError as exc:
        raise FrameError(f"JSON frame with a malformed header: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError("JSON frame whose header is not an object")
    return header, memoryview(frame)[end + 1 :]


def framed(header: dict[str, Any], payload: bytes | memoryview | None = None) -> bytes:
    """A JSON frame with the length prefix `multiprocessing.Connection.recv_bytes` reads, for writing to
    the worker's socket from the event loop without blocking."""
    body = encode(header, payload)
    return _prefix(len(body)) + body


def _prefix(n: int) -> bytes:
    return _CONN_LEN.pack(n) if n <= _MAX_SHORT else _CONN_LEN.pack(-1) + _CONN_LONG.pack(n)


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
        frames.append(bytes(buffer[pos + head : pos + head + n]))
        pos += head + n
    del buffer[:pos]
    return frames

"""One connection to a model worker, plus the shared-memory arena its requests travel in.

The parent holds one link per worker (the pipe it spawned the worker with); every extra frontend
process holds its own (a Unix socket the worker listens on, and an arena that frontend created).
A link sends requests, matches answers to them by id, and owns the arena blocks of its requests:
each block is freed once the answer was read, or when the link dies, also when the caller gave up
(cancelled) while the worker was still writing into it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service import tensors
from service.datatypes import element_size
from service.errors import ResourceExhausted, ServeError, Unavailable
from service.repository import ModelSpec
from service.tensors import WireTensor
from service.workers import protocol
from service.workers.shm import Arena

log = logging.getLogger("trtserve.supervisor")


@dataclass
class _Pending:
    future: asyncio.Future[tuple[list[protocol.OutputSlot], memoryview]]  # a RESULT's outputs and payload
    offset: int
    nbytes: int
    abandoned: bool = False


class WorkerLink(asyncio.Protocol):
    """Requests to one worker over one stream socket (`connect`); frames that are not answers go to
    `on_frame`. It is the connection's asyncio protocol: frames are taken apart as the bytes arrive,
    with no reader task or per-read future."""

    def __init__(self, spec: ModelSpec, arena: Arena, *, shm_wait_s: float, max_inflight: int,
                 on_frame: Callable[[dict[str, Any], memoryview], None] = lambda header, payload: None) -> None:
        self.spec = spec
        self.arena = arena
        self._codec = protocol.FrameCodec(spec)
        self._batched = spec.max_batch_size > 0
        # Arena room per row for each output whose size is known up front; the rest travels inline.
        self._row_bytes = {out.name: element_size(out.datatype) * math.prod(out.dims) for out in spec.outputs
                           if out.datatype != "BYTES" and all(d > 0 for d in out.dims)}
        self._transport: asyncio.Transport | None = None  # set once connected; None again once closed
        self._inbox = bytearray()  # bytes of a frame not complete yet
        self._shm_wait_s = shm_wait_s
        self._max_inflight = max_inflight
        self._on_frame = on_frame
        self._pending: dict[int, _Pending] = {}
        self._outbox: list[bytes] = []  # request frames of this event-loop turn, written together
        self._ids = itertools.count(1)
        self.inflight = 0
        self.closed = asyncio.get_running_loop().create_future()  # set when the stream ended or was closed

    async def connect(self, *, sock: socket.socket | None = None, path: str | None = None) -> None:
        """Open the stream: over a connected `sock` (the parent's end of its pipe) or to the Unix socket
        at `path` (OSError when nobody listens there)."""
        await asyncio.get_running_loop().create_unix_connection(lambda: self, path, sock=sock)

    @property
    def alive(self) -> bool:
        return self._transport is not None

    def send(self, header: dict[str, Any]) -> None:
        """Write a control frame (in order with the requests); a dead link drops it (whoever watches the
        worker reports its exit)."""
        if self._transport is not None:
            self._queue(protocol.framed(header))

    def close(self, err: ServeError) -> None:
        """Stop reading, close the stream and fail every pending request with `err` (idempotent)."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._fail_pending(err)
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail_pending(self, err: ServeError) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            self._settle(p, error=err)

    def _settle(self, p: _Pending, answer: tuple[list[protocol.OutputSlot], memoryview] | None = None,
                error: ServeError | None = None) -> None:
        """Hand a request its answer (or error); free its block instead when its caller gave up."""
        if p.abandoned:
            self.arena.free(p.offset, p.nbytes)
        elif not p.future.done():
            if error is not None:
                p.future.set_exception(error)
            else:
                p.future.set_result(answer)

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        inbox = self._inbox
        inbox += data
        try:
            for frame in protocol.split_framed(inbox):
                self._dispatch(frame)
        except protocol.FrameError as exc:  # out of step with the worker: nothing it sends can be trusted now
            log.error("model %s: malformed frame from the worker: %s", self.spec.name, exc)
            self.close(Unavailable(f"model '{self.spec.name}': malformed frame from the worker"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(Unavailable(f"model '{self.spec.name}': worker connection closed"))

    def _dispatch(self, frame: bytes) -> None:
        """A RESULT or ERROR settles its request; any other frame goes to `on_frame`."""
        if protocol.is_result(frame):
            request_id, slots, payload = self._codec.decode_result(frame)
            if (p := self._pending.pop(request_id, None)) is not None:
                self._settle(p, answer=(slots, payload))
            return
        header, payload = protocol.decode(frame)
        if header.get("op") != protocol.ERROR:
            self._on_frame(header, payload)
        elif (p := self._pending.pop(int(header.get("id", -1)), None)) is not None:
            self._settle(p, error=ServeError.from_wire(header["error"]))

    # -- requests ----------------------------------------------------------------------------
    async def infer(self, inputs: list[WireTensor], output_names: list[str],
                    timeout_s: float | None = None) -> list[WireTensor]:
        """Run one request in the worker. `timeout_s` (the client's deadline) bounds its time in the queue."""
        if self._transport is None:
            raise Unavailable(f"model '{self.spec.name}' is not ready")
        if self.inflight >= self._max_inflight:
            raise ResourceExhausted(f"model '{self.spec.name}' has {self.inflight} requests in flight, the limit "
                                    "(--max-inflight-per-model); retry later")
        self.inflight += 1
        try:
            return await self._infer(inputs, output_names, timeout_s)
        finally:
            self.inflight -= 1

    async def _infer(self, inputs: list[WireTensor], output_names: list[str],
                     timeout_s: float | None) -> list[WireTensor]:
        arena = self.arena
        sizes = [tensors.nbytes(t.data) for t in inputs]
        rows = inputs[0].shape[0] if self._batched and inputs else 1
        out_bytes = rows * sum(map(self._row_bytes.get, output_names, itertools.repeat(0)))
        nbytes = sum(sizes) + out_bytes
        offset = arena.try_alloc(nbytes)
        if offset is None:  # full (or too large: alloc says so); a coroutine only then
            offset = await arena.alloc(nbytes, self._shm_wait_s)
        owned = True  # False once the block is handed to the worker's answer (cancelled caller)
        request_id = next(self._ids)
        try:
            places, cursor = [], offset
            for t, n in zip(inputs, sizes):
                arena.buf[cursor:cursor + n] = t.data
                places.append((t.name, t.datatype, t.shape, cursor, n))
                cursor += n
            if self._transport is None:  # died while we waited for shared memory
                raise Unavailable(f"model '{self.spec.name}' is not ready")
            frame = self._codec.encode_infer(request_id, places, output_names, cursor, out_bytes, timeout_s)
            pending = _Pending(asyncio.get_running_loop().create_future(), offset, nbytes)
            self._pending[request_id] = pending
            self._queue(frame)
            try:
                slots, payload = await pending.future
            except asyncio.CancelledError:
                if self._pending.get(request_id) is pending:
                    pending.abandoned = True  # the worker may still write into the block
                    owned = False
                    self.send({"op": protocol.CANCEL, "id": request_id})
                raise
            specs, buf = self._codec.outputs, arena.buf
            return [WireTensor(specs[index].name, specs[index].datatype, shape,
                               bytes((payload if inline else buf)[start:start + n]))
                    for index, shape, start, n, inline in slots]
        finally:
            if owned:
                arena.free(offset, nbytes)

    def _queue(self, frame: bytes) -> None:
        """Write `frame` at the end of this event-loop turn, with the other requests of the turn: one
        write (and one wake-up of the worker) for all of them."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(frame)

    def _flush(self) -> None:
        frames, self._outbox = self._outbox, []
        if self._transport is not None:
            self._transport.write(b"".join(frames))  # a dying link fails the pending requests itself

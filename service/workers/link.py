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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.datatypes import element_size
from service.errors import ResourceExhausted, ServeError, Unavailable
from service.repository import ModelSpec
from service.tensors import WireTensor
from service.workers import protocol
from service.workers.shm import Arena


@dataclass
class _Pending:
    future: asyncio.Future[tuple[dict[str, Any], memoryview]]
    offset: int
    nbytes: int
    abandoned: bool = False


class WorkerLink:
    """Requests to one worker over one stream; frames that are not answers go to `on_frame`."""

    def __init__(self, spec: ModelSpec, arena: Arena, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 *, shm_wait_s: float, max_inflight: int,
                 on_frame: Callable[[dict[str, Any], memoryview], None] = lambda header, payload: None) -> None:
        self.spec = spec
        self.arena = arena
        self._writer: asyncio.StreamWriter | None = writer
        self._shm_wait_s = shm_wait_s
        self._max_inflight = max_inflight
        self._on_frame = on_frame
        self._pending: dict[int, _Pending] = {}
        self._outbox: list[bytes] = []  # request frames of this event-loop turn, written together
        self._ids = itertools.count(1)
        self.inflight = 0
        self.closed = asyncio.get_running_loop().create_future()  # set when the stream ended or was closed
        self._reader_task = asyncio.get_running_loop().create_task(self._read_frames(reader))

    @property
    def alive(self) -> bool:
        return self._writer is not None

    def send(self, header: dict[str, Any]) -> None:
        """Write a control frame (in order with the requests); a dead link drops it (whoever watches the
        worker reports its exit)."""
        if self._writer is not None:
            self._queue(protocol.framed(header))

    def close(self, err: ServeError) -> None:
        """Stop reading, close the stream and fail every pending request with `err` (idempotent)."""
        if self._writer is not None:
            if self._reader_task is not asyncio.current_task():
                self._reader_task.cancel()
            self._writer.close()
            self._writer = None
        self._fail_pending(err)
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail_pending(self, err: ServeError) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            self._settle(p, error=err)

    def _settle(self, p: _Pending, answer: tuple[dict[str, Any], memoryview] | None = None,
                error: ServeError | None = None) -> None:
        """Hand a request its answer (or error); free its block instead when its caller gave up."""
        if p.abandoned:
            self.arena.free(p.offset, p.nbytes)
        elif not p.future.done():
            if error is not None:
                p.future.set_exception(error)
            else:
                p.future.set_result(answer)

    async def _read_frames(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                self._dispatch(*protocol.decode(await protocol.read_framed(reader)))
        except (asyncio.IncompleteReadError, ConnectionError):
            self.close(Unavailable(f"model '{self.spec.name}': worker connection closed"))

    def _dispatch(self, header: dict[str, Any], payload: memoryview) -> None:
        op = header.get("op")
        if op != protocol.RESULT and op != protocol.ERROR:
            self._on_frame(header, payload)
        elif (p := self._pending.pop(int(header.get("id", -1)), None)) is not None:
            self._settle(p, answer=(header, payload))

    # -- requests ----------------------------------------------------------------------------
    async def infer(self, inputs: list[WireTensor], output_names: list[str],
                    timeout_s: float | None = None) -> list[WireTensor]:
        """Run one request in the worker. `timeout_s` (the client's deadline) bounds its time in the queue."""
        if self._writer is None:
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
        in_bytes = sum(_nbytes(t.data) for t in inputs)
        out_bytes = self._output_bytes(inputs, output_names)
        nbytes = in_bytes + out_bytes
        offset = await arena.alloc(nbytes, self._shm_wait_s)
        owned = True  # False once the block is handed to the worker's answer (cancelled caller)
        request_id = next(self._ids)
        try:
            refs, cursor = [], offset
            for t in inputs:
                n = _nbytes(t.data)
                arena.buf[cursor:cursor + n] = t.data
                refs.append(protocol.TensorRef(t.name, t.datatype, tuple(t.shape), cursor, n).to_json())
                cursor += n
            if self._writer is None:  # died while we waited for shared memory
                raise Unavailable(f"model '{self.spec.name}' is not ready")
            pending = _Pending(asyncio.get_running_loop().create_future(), offset, nbytes)
            self._pending[request_id] = pending
            self._queue(protocol.framed({"op": protocol.INFER, "id": request_id, "inputs": refs,
                                         "outputs": output_names, "out_offset": cursor,
                                         "out_nbytes": out_bytes, "timeout_s": timeout_s}))
            try:
                header, payload = await pending.future
            except asyncio.CancelledError:
                if self._pending.get(request_id) is pending:
                    pending.abandoned = True  # the worker may still write into the block
                    owned = False
                    self.send({"op": protocol.CANCEL, "id": request_id})
                raise
            if header["op"] == protocol.ERROR:
                raise ServeError.from_wire(header["error"])
            outputs = []
            for item in header["outputs"]:
                ref = protocol.TensorRef.from_json(item)
                src = payload if ref.inline else arena.buf
                outputs.append(WireTensor(ref.name, ref.datatype, ref.shape,
                                          bytes(src[ref.offset:ref.offset + ref.nbytes])))
            return outputs
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
        try:
            if self._writer is not None:
                self._writer.write(b"".join(frames))
        except (OSError, RuntimeError):
            pass  # the link is dying: its reader fails the pending requests

    def _output_bytes(self, inputs: list[WireTensor], output_names: list[str]) -> int:
        """Room for outputs whose size is known up front; the rest travels inline."""
        rows = inputs[0].shape[0] if self.spec.max_batch_size > 0 and inputs else 1
        total = 0
        for out in self.spec.outputs:
            if out.name in output_names and out.datatype != "BYTES" and all(d > 0 for d in out.dims):
                n = rows * element_size(out.datatype)
                for d in out.dims:
                    n *= d
                total += n
        return total


def _nbytes(data: bytes | memoryview) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)

"""A frontend's link to a worker: frames of one event-loop turn written together, in order; answers
matched to their requests; shared memory waited for only when the arena is full.

The "worker" here is the other end of a real socket pair, read with the worker's own frame splitting:
requests sent in one turn arrive whole and in order, and a control frame (ping, cancel, stop) sent in
the same turn as a request comes after it. (Writing them together saves system calls and worker
wake-ups: measured in bench.overhead, not asserted here.) Answered by hand with the worker's frames,
each request gets its own outputs (from the arena or inline) or error; a request that finds the arena
full waits for a block to be freed; a frame the link cannot read fails what is pending.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from service.errors import InvalidArgument, ResourceExhausted, Unavailable
from service.repository import ModelRepository
from service.tensors import WireTensor
from service.workers import protocol
from service.workers.link import WorkerLink
from service.workers.shm import Arena

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"


def _request() -> list[WireTensor]:
    return [WireTensor("x", "FP32", (1, 16), bytes(64))]


TINY = ModelRepository(EXAMPLES).load_spec("tiny")


def _header(frame: bytes) -> dict:
    """What a frame says, as a dict: a binary INFER as its op and id."""
    if protocol.is_infer(frame):
        return {"op": protocol.INFER, "id": protocol.FrameCodec(TINY).decode_infer(frame).id}
    return protocol.decode(frame)[0]


def _frames(sock: socket.socket) -> list[dict]:
    """The frames of one read of `sock` (it must hold at least one)."""
    sock.settimeout(5)
    return [_header(frame) for frame in protocol.split_framed(bytearray(sock.recv(1 << 20)))]


def _sent(calls: Callable[[WorkerLink], Awaitable[list[asyncio.Future]]]) -> list[dict]:
    """Run `calls` (they return the requests they started) on a link whose worker end is a plain socket;
    the frames that reached it (one read)."""

    async def scenario() -> list[dict]:
        arena = Arena(1 << 16)
        ours, worker = socket.socketpair()
        try:
            link = WorkerLink(TINY, arena, shm_wait_s=1.0, max_inflight=64)
            await link.connect(sock=ours)
            started = await calls(link)
            await asyncio.sleep(0.05)  # whatever was queued is written; nobody answers
            frames = await asyncio.to_thread(_frames, worker)
            link.close(Unavailable("test over"))  # fails the requests still waiting
            await asyncio.gather(*started, return_exceptions=True)
            return frames
        finally:
            worker.close()
            arena.close()

    return asyncio.run(scenario())


def test_requests_of_one_turn_reach_the_worker_whole_and_in_order():
    async def five(link: WorkerLink) -> list[asyncio.Future]:
        return [asyncio.ensure_future(link.infer(_request(), ["y"])) for _ in range(5)]

    frames = _sent(five)
    assert [f["op"] for f in frames] == [protocol.INFER] * 5, frames
    assert [f["id"] for f in frames] == sorted(f["id"] for f in frames)


def test_a_control_frame_sent_in_the_same_turn_follows_the_request_queued_before_it():
    async def request_then_ping(link: WorkerLink) -> list[asyncio.Future]:
        call = asyncio.ensure_future(link.infer(_request(), ["y"]))
        await asyncio.sleep(0)  # the request is queued for the end of this turn, not written yet...
        link.send({"op": protocol.PING, "id": 7})  # ...so a frame written at once would overtake it
        return [call]

    frames = _sent(request_then_ping)
    assert [f["op"] for f in frames] == [protocol.INFER, protocol.PING], frames


async def _linked(arena_bytes: int) -> tuple[WorkerLink, Arena, asyncio.StreamReader, asyncio.StreamWriter]:
    """A link on an arena of `arena_bytes` and the worker's end of its stream."""
    arena = Arena(arena_bytes)
    ours, theirs = socket.socketpair()
    link = WorkerLink(TINY, arena, shm_wait_s=5.0, max_inflight=64)
    await link.connect(sock=ours)
    worker_reader, worker_writer = await asyncio.open_connection(sock=theirs)
    return link, arena, worker_reader, worker_writer


async def _closed(link: WorkerLink, arena: Arena, worker_writer: asyncio.StreamWriter) -> None:
    link.close(Unavailable("test over"))
    worker_writer.close()
    await asyncio.sleep(0)
    assert arena.used == 0  # every block was freed
    arena.close()


def _row(value: float) -> bytes:
    return np.full((1, 16), value, dtype=np.float32).tobytes()


def test_each_request_gets_its_outputs_from_the_arena_or_inline_or_its_error():
    async def scenario() -> list:
        link, arena, reader, writer = await _linked(1 << 16)
        calls = [
            asyncio.ensure_future(link.infer([WireTensor("x", "FP32", (1, 16), _row(k))], ["y"], timeout_s=k))
            for k in (1, 2, 3)
        ]
        codec = protocol.FrameCodec(TINY)
        requests = [codec.decode_infer(await protocol.read_framed(reader)) for _ in calls]
        assert [r.timeout_s for r in requests] == [1, 2, 3]
        first, second, third = requests
        ((_, _, offset, nbytes),) = first.inputs
        assert bytes(arena.buf[offset : offset + nbytes]) == _row(1)  # the input, where the frame says
        # answered out of order: the third fails, the second comes inline, the first in the arena
        writer.write(
            protocol.framed(
                {"op": protocol.ERROR, "id": third.id, "error": InvalidArgument("input 'x': no good").to_wire()}
            )
        )
        writer.write(codec.encode_result(second.id, [(0, (1, 16), 0, 64, True)], _row(20)))
        arena.buf[first.out_offset : first.out_offset + 64] = _row(10)
        writer.write(codec.encode_result(first.id, [(0, (1, 16), first.out_offset, 64, False)]))
        results = await asyncio.gather(*calls, return_exceptions=True)
        await _closed(link, arena, writer)
        return results

    first, second, third = asyncio.run(scenario())
    assert first == [WireTensor("y", "FP32", (1, 16), _row(10))]
    assert second == [WireTensor("y", "FP32", (1, 16), _row(20))]
    assert isinstance(third, InvalidArgument) and third.message == "input 'x': no good"


def test_a_request_waits_for_shared_memory_only_while_the_arena_is_full():
    async def scenario() -> None:
        link, arena, reader, writer = await _linked(256)  # room for two tiny requests (64 in, 64 out)
        codec = protocol.FrameCodec(TINY)
        with pytest.raises(ResourceExhausted, match="arena holds 256"):
            await link.infer([WireTensor("x", "FP32", (5, 16), bytes(320))], ["y"])
        calls = [
            asyncio.ensure_future(link.infer([WireTensor("x", "FP32", (1, 16), _row(k))], ["y"])) for k in range(3)
        ]
        sent = [codec.decode_infer(await protocol.read_framed(reader)) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert arena.used == 256 and not any(call.done() for call in calls)  # the third waits...
        writer.write(codec.encode_result(sent[0].id, [(0, (1, 16), sent[0].out_offset, 64, False)]))
        third = codec.decode_infer(await asyncio.wait_for(protocol.read_framed(reader), 5))  # ...until one is freed
        assert third.inputs[0][2] == sent[0].inputs[0][2]  # in the block the first request left
        for request in (sent[1], third):
            writer.write(codec.encode_result(request.id, [(0, (1, 16), request.out_offset, 64, False)]))
        assert all(len(out) == 1 for out in await asyncio.gather(*calls))
        await _closed(link, arena, writer)

    asyncio.run(scenario())


def _pending_call_ended_by(worker_end: Callable[[protocol.InferRequest, asyncio.StreamWriter], None]) -> BaseException:
    """What a request in flight fails with when the worker's end does `worker_end` once it read the request;
    the link must be closed by then."""
    async def scenario() -> BaseException:
        link, arena, reader, writer = await _linked(1 << 16)
        call = asyncio.ensure_future(link.infer([WireTensor("x", "FP32", (1, 16), _row(1))], ["y"]))
        worker_end(protocol.FrameCodec(TINY).decode_infer(await protocol.read_framed(reader)), writer)
        (error,) = await asyncio.gather(call, return_exceptions=True)
        assert link.closed.done() and not link.alive
        await _closed(link, arena, writer)
        return error

    return asyncio.run(scenario())


def test_a_frame_the_link_cannot_read_fails_what_is_pending():
    error = _pending_call_ended_by(  # a RESULT cut short
        lambda request, writer: writer.write(struct.pack("!iBQ", 9, protocol.OP_RESULT, request.id)))
    assert isinstance(error, Unavailable) and "malformed frame from the worker" in error.message


def test_answers_cut_anywhere_by_the_stream_are_put_back_together():
    async def scenario() -> list:
        link, arena, reader, writer = await _linked(1 << 16)
        codec = protocol.FrameCodec(TINY)
        calls = [asyncio.ensure_future(link.infer([WireTensor("x", "FP32", (1, 16), _row(k))], ["y"]))
                 for k in (1, 2)]
        first, second = [codec.decode_infer(await protocol.read_framed(reader)) for _ in calls]
        # both answers inline, in one byte string handed over 7 bytes at a time: frames split across
        # reads, and a read that ends one frame and starts the next
        data = (codec.encode_result(second.id, [(0, (1, 16), 0, 64, True)], _row(20))
                + codec.encode_result(first.id, [(0, (1, 16), 0, 64, True)], _row(10)))
        for start in range(0, len(data), 7):
            writer.write(data[start:start + 7])
            await writer.drain()
            await asyncio.sleep(0.001)
        results = await asyncio.wait_for(asyncio.gather(*calls), 5)
        await _closed(link, arena, writer)
        return results

    first, second = asyncio.run(scenario())
    assert first == [WireTensor("y", "FP32", (1, 16), _row(10))]
    assert second == [WireTensor("y", "FP32", (1, 16), _row(20))]


def test_the_worker_closing_its_end_fails_what_is_pending():
    error = _pending_call_ended_by(lambda request, writer: writer.close())
    assert isinstance(error, Unavailable) and "worker connection closed" in error.message

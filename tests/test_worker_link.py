"""A frontend's link to a worker writes the frames of one event-loop turn together, in order.

The "worker" here is the other end of a real socket pair, read with the worker's own frame splitting:
requests sent in one turn arrive whole and in order, and a control frame (ping, cancel, stop) sent in
the same turn as a request comes after it. (Writing them together saves system calls and worker
wake-ups: measured in bench.overhead, not asserted here.)
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from service.errors import Unavailable
from service.repository import ModelRepository
from service.tensors import WireTensor
from service.workers import protocol
from service.workers.link import WorkerLink
from service.workers.shm import Arena

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"


def _request() -> list[WireTensor]:
    return [WireTensor("x", "FP32", (1, 16), bytes(64))]


def _frames(sock: socket.socket) -> list[dict]:
    """The frames of one read of `sock` (it must hold at least one)."""
    sock.settimeout(5)
    return [protocol.decode(frame)[0] for frame in protocol.split_framed(bytearray(sock.recv(1 << 20)))]


def _sent(calls: Callable[[WorkerLink], Awaitable[list[asyncio.Future]]]) -> list[dict]:
    """Run `calls` (they return the requests they started) on a link whose worker end is a plain socket;
    the frames that reached it (one read)."""
    async def scenario() -> list[dict]:
        arena = Arena(1 << 16)
        ours, worker = socket.socketpair()
        try:
            reader, writer = await asyncio.open_connection(sock=ours)
            link = WorkerLink(ModelRepository(EXAMPLES).load_spec("tiny"), arena, reader, writer,
                              shm_wait_s=1.0, max_inflight=64)
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

"""A frontend's link to a worker writes the frames of one event-loop turn together, in order.

The "worker" here is the other end of a real socket pair, read with the worker's own frame splitting:
requests sent in one turn arrive whole and in order, and a cancellation sent in the same turn as its
request comes after it. (Writing them together saves system calls and worker wake-ups: measured in
bench.overhead, not asserted here.)
"""

from __future__ import annotations

import asyncio
import socket
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


async def _linked(arena: Arena) -> tuple[WorkerLink, socket.socket]:
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    spec = ModelRepository(EXAMPLES).load_spec("tiny")
    return WorkerLink(spec, arena, reader, writer, shm_wait_s=1.0, max_inflight=64), theirs


def _frames(sock: socket.socket) -> list[dict]:
    """The frames of one read of `sock` (it must hold at least one)."""
    sock.settimeout(5)
    return [protocol.decode(frame)[0] for frame in protocol.split_framed(bytearray(sock.recv(1 << 20)))]


def test_requests_of_one_turn_reach_the_worker_whole_and_in_order():
    async def scenario() -> list[dict]:
        arena = Arena(1 << 16)
        link, worker = await _linked(arena)
        try:
            calls = [asyncio.ensure_future(link.infer(_request(), ["y"])) for _ in range(5)]
            await asyncio.sleep(0.05)  # every call wrote its request; nobody answers
            frames = await asyncio.to_thread(_frames, worker)
            for call in calls:
                call.cancel()
            await asyncio.sleep(0.05)
            link.close(Unavailable("test over"))
            return frames
        finally:
            worker.close()
            arena.close()

    frames = asyncio.run(scenario())
    assert [f["op"] for f in frames] == [protocol.INFER] * 5, frames
    assert [f["id"] for f in frames] == sorted(f["id"] for f in frames)


def test_a_cancellation_in_the_same_turn_follows_its_request():
    async def scenario() -> list[dict]:
        arena = Arena(1 << 16)
        link, worker = await _linked(arena)
        try:
            call = asyncio.ensure_future(link.infer(_request(), ["y"]))
            await asyncio.sleep(0)  # the request is queued for the end of this turn...
            call.cancel()  # ...and cancelled before it was written
            await asyncio.sleep(0.05)
            frames = await asyncio.to_thread(_frames, worker)
            link.close(Unavailable("test over"))
            return frames
        finally:
            worker.close()
            arena.close()

    frames = asyncio.run(scenario())
    assert [f["op"] for f in frames] == [protocol.INFER, protocol.CANCEL], frames
    assert frames[0]["id"] == frames[1]["id"]

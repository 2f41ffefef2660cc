"""The worker's frontend connections over real sockets and shared memory: framing across reads, a new
frontend's hello with requests right behind it, departures, the parent's EOF, wake-ups and coalesced
answers."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from service.repository import ModelRepository
from service.workers import protocol
from service.workers.connections import Connections
from service.workers.shm import Arena


@pytest.fixture
def setup():
    arena = Arena(1 << 16)
    extra_arena = Arena(1 << 16)
    parent, child = socket.socketpair()
    folder = tempfile.TemporaryDirectory()
    path = str(Path(folder.name) / "w.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    conns = Connections(child, arena.name, listener)
    yield conns, parent, path, extra_arena
    parent.close()
    arena.close()
    extra_arena.close()
    folder.cleanup()


TINY = ModelRepository(Path(__file__).resolve().parent.parent / "examples" / "models").load_spec("tiny")


def _header(frame: bytes) -> dict:
    """What a frame says, as a dict: a binary INFER as its op and id."""
    if protocol.is_infer(frame):
        return {"op": protocol.INFER, "id": protocol.FrameCodec(TINY).decode_infer(frame).id}
    return protocol.decode(frame)[0]


def _infer(request_id: int) -> bytes:
    return protocol.FrameCodec(TINY).encode_infer(request_id, [("x", "FP32", (1, 16), 0, 64)], ["y"], 64, 64, None)


def _received(conns: Connections, want: int, timeout_s: float = 5.0) -> list:
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got += [(channel, _header(frame)) for channel, frame in conns.receive(0.05)]
    return got


def test_frames_split_over_many_reads_arrive_whole_and_in_order(setup):
    conns, parent, _, _ = setup
    data = b"".join(protocol.framed({"op": "ping", "id": i, "pad": "x" * 300}) for i in range(50))

    def write() -> None:  # 7-byte pieces: frames and length prefixes cut anywhere (a thread: they fill
        for i in range(0, len(data), 7):  # the socket's buffer long before the frames do)
            parent.sendall(data[i:i + 7])

    writer = threading.Thread(target=write)
    writer.start()
    got = _received(conns, 50, timeout_s=30)
    writer.join(30)
    assert [header["id"] for _, header in got] == list(range(50))
    assert {channel for channel, _ in got} == {conns.primary}


def test_a_new_frontend_is_served_from_its_hello_on_even_with_requests_in_the_same_read(setup):
    conns, _, path, extra_arena = setup
    frontend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    frontend.connect(path)
    frontend.sendall(protocol.framed({"op": "hello", "arena": extra_arena.name}) + _infer(1) + _infer(2))
    got = _received(conns, 2)
    assert [(header["op"], header["id"]) for _, header in got] == [(protocol.INFER, 1), (protocol.INFER, 2)]
    channel = got[0][0]
    assert not channel.primary and conns.opened == [channel]
    extra_arena.buf[:5] = b"hello"
    assert bytes(channel.buf[:5]) == b"hello"  # the frontend's own arena, mapped in the worker
    codec = protocol.FrameCodec(TINY)
    channel.send_frame(codec.encode_result(1, [(0, (1, 16), 64, 64, False)]))
    channel.send({"op": "error", "id": 2, "error": {"code": "INTERNAL", "message": "no"}})
    conns.flush()  # both answers in one write
    frontend.settimeout(5)
    data, answers = bytearray(), []
    while len(answers) < 2:
        data += frontend.recv(4096)
        answers += protocol.split_framed(data)
    assert codec.decode_result(answers[0])[0] == 1 and protocol.decode(answers[1])[0]["id"] == 2
    frontend.close()
    deadline = time.monotonic() + 5
    while channel not in conns.closed and time.monotonic() < deadline:
        list(conns.receive(0.05))
    assert conns.closed == [channel] and channel.closed


def test_a_frontend_with_a_bad_hello_is_refused_and_others_are_served(setup):
    conns, parent, path, _ = setup
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bad.connect(path)
    bad.sendall(protocol.framed({"op": "hello", "arena": "trtserve-no-such-arena"}))
    parent.sendall(protocol.framed({"op": "ping", "id": 9}))
    got = _received(conns, 1)
    assert [header["id"] for _, header in got] == [9]
    bad.settimeout(0.05)
    closed, deadline = False, time.monotonic() + 5
    while not closed and time.monotonic() < deadline:
        list(conns.receive(0.05))
        try:
            closed = bad.recv(1) == b""  # closed by the worker
        except TimeoutError:
            pass
    assert closed and conns.opened == []


def test_wake_ends_a_wait_at_once_and_the_parents_eof_ends_the_worker(setup):
    conns, parent, _, _ = setup
    threading.Timer(0.1, conns.wake).start()
    started = time.monotonic()
    assert list(conns.receive(10)) == []
    assert time.monotonic() - started < 5
    parent.close()
    with pytest.raises(EOFError):
        for _ in range(100):
            list(conns.receive(0.05))


def test_answers_larger_than_the_socket_buffer_arrive_whole_while_the_frontend_reads_slowly(setup):
    """`flush` writes without blocking while the socket takes the data and waits (blocking) for the rest
    only when its buffer is full: several MB of answers arrive whole and in order, and the socket is left
    non-blocking for the next `receive`."""
    conns, parent, _, _ = setup
    frames = [protocol.framed({"op": "pong", "id": i}, bytes([i % 251]) * 300_000) for i in range(12)]
    for frame in frames:
        conns.primary.send_frame(frame)
    received = bytearray()

    def read_slowly() -> None:
        while len(received) < sum(map(len, frames)):
            time.sleep(0.002)
            received.extend(parent.recv(32_768))

    reader = threading.Thread(target=read_slowly)
    reader.start()
    conns.flush()
    reader.join(30)
    assert bytes(received) == b"".join(frames)
    assert conns.primary.sock.getblocking() is False
    parent.sendall(protocol.framed({"op": "ping", "id": 99}))
    assert [header["id"] for _, header in _received(conns, 1)] == [99]


def test_an_abandoned_frontend_is_closed_at_the_next_flush_and_the_parent_still_answered(setup):
    conns, parent, path, extra_arena = setup
    frontend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    frontend.connect(path)
    frontend.sendall(protocol.framed({"op": "hello", "arena": extra_arena.name}) + _infer(1))
    ((channel, _),) = _received(conns, 1)
    channel.send({"op": "error", "id": 1, "error": {"code": "INTERNAL", "message": "dropped with it"}})
    channel.abandon()
    conns.primary.send({"op": protocol.PONG, "id": 3})
    conns.flush()
    assert conns.closed == [channel]
    frontend.settimeout(5)
    assert frontend.recv(4096) == b""  # closed by the worker, nothing written to it after abandon
    parent.settimeout(5)
    assert protocol.split_framed(bytearray(parent.recv(4096))) == [protocol.encode({"op": protocol.PONG, "id": 3})]
    conns.flush()  # the dropped frontend is gone from what is flushed
    assert conns.closed == [channel]

"""The frames between a frontend and a worker: binary INFER and RESULT, JSON for the rest.

Round trips through `FrameCodec` for several ranks, datatypes and timeouts; every truncation and a set of
garblings of a binary frame give a FrameError (naming the request when its id is readable); JSON control
frames still decode, beside binary ones in one stream. Then the worker's side on a real channel, arena
and batcher: a good INFER is queued with views of the arena, a malformed one is answered with an error
to its request, a frame that names no request drops an extra frontend (never the parent's pipe), and
`reply` (service/workers/batches.py) writes outputs into the arena or inline as room allows.
"""

from __future__ import annotations

import contextlib
import math
import socket
import struct
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from service import tensors
from service.batching import BatcherSettings, DynamicBatcher
from service.errors import ServeError
from service.proto import model_config_pb2
from service.repository import ModelRepository, ModelSpec, TensorSpec
from service.workers import protocol
from service.workers.connections import Channel
from service.workers.shm import Arena, attach
from service.metrics import WorkerStats
from service.workers.runtime import Item, ModelRuntime
from service.workers.batches import finish, reply
from service.workers.worker import WorkerOptions, _dispatch, _take_batch
from tests.reference import reference_outputs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"


def _spec(max_batch_size: int, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> ModelSpec:
    return ModelSpec(
        name="m",
        version=1,
        versions=(1,),
        model_path=Path("m.onnx"),
        max_batch_size=max_batch_size,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        backend="onnxruntime",
        use_gpu=False,
        config=model_config_pb2.ModelConfig(name="m", max_batch_size=max_batch_size),
    )


def _body(frame: bytes) -> bytes:
    """A framed frame as the receiving side gets it (length prefix split off)."""
    (body,) = protocol.split_framed(bytearray(frame))
    return body


TINY = ModelRepository(EXAMPLES).load_spec("tiny")
MIXED = ModelRepository(EXAMPLES).load_spec("mixed")
SCALARS = _spec(
    0,
    [TensorSpec("s", "FP64", ()), TensorSpec("t", "BYTES", (-1,))],
    [TensorSpec("o", "INT32", ()), TensorSpec("text", "BYTES", (-1,))],
)
RANK4 = _spec(8, [TensorSpec("img", "UINT8", (3, -1, -1))], [TensorSpec("feat", "BF16", (2, 2, 5))])

INFER_CASES = [  # spec, inputs as the frontend places them, outputs asked for, timeout
    (TINY, [("x", "FP32", (1, 16), 128, 64)], ["y"], None),
    (TINY, [("x", "FP32", (256, 16), 0, 16384)], ["y"], 2.5),
    (MIXED, [("ids", "INT64", (3, 8), 64, 192), ("scale", "FP16", (3, 4), 256, 24)], ["sum", "scaled"], 0.001),
    (MIXED, [("scale", "FP16", (1, 4), 0, 8), ("ids", "INT64", (1, 8), 64, 64)], ["scaled"], None),  # any order
    (MIXED, [("ids", "INT64", (0, 8), 0, 0), ("scale", "FP16", (0, 4), 0, 0)], [], -1.0),
    (SCALARS, [("s", "FP64", (), 0, 8), ("t", "BYTES", (3,), 64, 19)], ["text", "o"], 30.0),
    (RANK4, [("img", "UINT8", (2, 3, 2**33, 1), 2**40, 3 * 2**35)], ["feat"], None),  # 64-bit dims and offsets
]


@pytest.mark.parametrize(("spec", "inputs", "outputs", "timeout_s"), INFER_CASES)
def test_infer_round_trip(spec, inputs, outputs, timeout_s):
    codec = protocol.FrameCodec(spec)
    frame = codec.encode_infer(77, inputs, outputs, 4096, 100, timeout_s)
    assert frame[4] == protocol.OP_INFER and protocol.is_infer(_body(frame)) and not protocol.is_result(_body(frame))
    request = protocol.FrameCodec(spec).decode_infer(_body(frame))  # the worker's own codec
    names = [t.name for t in spec.inputs]
    assert request.id == 77 and request.timeout_s == timeout_s
    assert (request.out_offset, request.out_nbytes) == (4096, 100)
    assert [spec.outputs[i].name for i in request.outputs] == outputs
    assert [(names[i], shape, offset, n) for i, shape, offset, n in request.inputs] == [
        (name, shape, offset, n) for name, _, shape, offset, n in inputs
    ]


RESULT_CASES = [  # spec, outputs (index, shape, offset, nbytes, inline), inline payload
    (TINY, [(0, (1, 16), 192, 64, False)], None),
    (MIXED, [(1, (2, 4), 0, 16, True), (0, (2, 1), 512, 16, False)], bytes(range(16))),
    (SCALARS, [(0, (), 8, 4, False), (1, (2,), 0, 13, True)], b"\x05\x00\x00\x00hello\x00\x00\x00\x00"),
    (RANK4, [(0, (0, 2, 2, 5), 0, 0, False)], None),
]


@pytest.mark.parametrize(("spec", "outputs", "payload"), RESULT_CASES)
def test_result_round_trip(spec, outputs, payload):
    frame = protocol.FrameCodec(spec).encode_result(9, outputs, payload)
    assert protocol.is_result(_body(frame)) and not protocol.is_infer(_body(frame))
    request_id, decoded, view = protocol.FrameCodec(spec).decode_result(_body(frame))
    assert request_id == 9 and decoded == outputs
    assert bytes(view) == (payload or b"")


def test_encoding_rejects_what_the_spec_does_not_have():
    codec = protocol.FrameCodec(MIXED)
    good = [("ids", "INT64", (1, 8), 0, 64), ("scale", "FP16", (1, 4), 64, 8)]
    for bad in ([("nope", "INT64", (1, 8), 0, 64)], [("ids", "INT32", (1, 8), 0, 32)], [("ids", "INT64", (8,), 0, 64)]):
        with pytest.raises(ValueError, match="is not one of model 'mixed'"):
            codec.encode_infer(1, bad, ["sum"], 0, 0, None)
    with pytest.raises(ValueError, match="has no output 'nope'"):
        codec.encode_infer(1, good, ["nope"], 0, 0, None)


def _infer_body(spec: ModelSpec = MIXED, request_id: int = 5) -> bytes:
    inputs = [("ids", "INT64", (2, 8), 0, 128), ("scale", "FP16", (2, 4), 128, 16)]
    return _body(protocol.FrameCodec(spec).encode_infer(request_id, inputs, ["sum", "scaled"], 192, 32, 1.0))


def test_every_truncation_of_a_binary_frame_is_a_clear_error():
    codec = protocol.FrameCodec(MIXED)
    body = _infer_body()
    head = struct.calcsize("!BQdQQHH")
    for cut in range(len(body)):
        with pytest.raises(protocol.FrameError) as caught:
            codec.decode_infer(body[:cut])
        if cut < head:  # the id itself is cut: nothing names the request
            assert caught.value.request_id is None and "not an INFER frame" in str(caught.value)
        else:
            assert caught.value.request_id == 5 and "request 5" in str(caught.value), (cut, caught.value)
    result = _body(codec.encode_result(6, [(1, (2, 4), 0, 16, True)], bytes(16)))
    for cut in range(len(result) - 16):  # the header cut anywhere (a shorter payload is caught below)
        with pytest.raises(protocol.FrameError):
            codec.decode_result(result[:cut])
    with pytest.raises(protocol.FrameError, match="output 1 out of range"):
        codec.decode_result(result[:-1])  # the inline output runs past the payload


def _garbled(body: bytes, offset: int, fmt: str, value: int) -> bytes:
    data = bytearray(body)
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


HEAD = struct.calcsize("!BQdQQHH")
FIRST_INPUT = HEAD + 2 * 2  # after the two output indices

GARBLED = [  # what was changed, the frame, what the error says
    ("output index", lambda b: _garbled(b, HEAD, "!H", 7), "output index 7 out of range"),
    ("input index", lambda b: _garbled(b, FIRST_INPUT, "!H", 9), "out of range or repeated"),
    ("repeated input", lambda b: _garbled(b, FIRST_INPUT, "!H", 1), "out of range or repeated"),
    ("input count", lambda b: _garbled(b, HEAD - 4, "!H", 1), "after the last input"),
    ("too many inputs", lambda b: _garbled(b, HEAD - 4, "!H", 3), "ends early"),
    ("rank", lambda b: _garbled(b, FIRST_INPUT + 2, "!B", 1), "after the last input"),
    ("trailing bytes", lambda b: b + b"\0", "1 bytes after the last input"),
]


@pytest.mark.parametrize(("what", "garble", "message"), GARBLED, ids=[g[0] for g in GARBLED])
def test_a_garbled_infer_frame_is_an_error_naming_its_request(what, garble, message):
    with pytest.raises(protocol.FrameError, match=message) as caught:
        protocol.FrameCodec(MIXED).decode_infer(garble(_infer_body()))
    assert caught.value.request_id == 5


def test_a_wrong_rank_that_still_fits_the_frame_is_named():
    spec = _spec(0, [TensorSpec("a", "FP32", (2, 2)), TensorSpec("b", "FP32", (4,))], [TensorSpec("y", "FP32", (4,))])
    codec = protocol.FrameCodec(spec)
    inputs = [("a", "FP32", (2, 2), 0, 16), ("b", "FP32", (4,), 16, 16)]
    body = bytearray(_body(codec.encode_infer(3, inputs, ["y"], 32, 16, None)))
    first = HEAD + 2
    # "a" as rank 1 and "b" as rank 2: the same bytes, two ranks that are not the spec's
    struct.pack_into("!HB", body, first, 0, 1)
    struct.pack_into("!HB", body, first + 3 + 8 * 1 + 16, 1, 2)
    with pytest.raises(protocol.FrameError, match="input 'a' has rank 1, expected 2"):
        codec.decode_infer(bytes(body))


def test_json_control_frames_still_decode_beside_binary_ones():
    codec = protocol.FrameCodec(TINY)
    stream = bytearray(
        protocol.framed({"op": protocol.PING, "id": 3})
        + codec.encode_infer(4, [("x", "FP32", (1, 16), 0, 64)], ["y"], 64, 64, None)
        + protocol.framed({"op": protocol.ERROR, "id": 4, "error": {"code": "INTERNAL", "message": "a\nb"}})
        + protocol.framed({"op": "route", "socket": "/tmp/s"}, b"payload\n{with newline")
        + codec.encode_result(4, [(0, (1, 16), 64, 64, False)])
    )
    frames = protocol.split_framed(stream)
    assert [f[0] for f in frames] == [ord("{"), protocol.OP_INFER, ord("{"), ord("{"), protocol.OP_RESULT]
    assert protocol.decode(frames[0]) == ({"op": "ping", "id": 3}, memoryview(b""))
    assert protocol.decode(frames[2])[0]["error"]["message"] == "a\nb"
    header, payload = protocol.decode(frames[3])
    assert header == {"op": "route", "socket": "/tmp/s"} and bytes(payload) == b"payload\n{with newline"
    assert codec.decode_infer(frames[1]).id == 4 and codec.decode_result(frames[4])[0] == 4


@pytest.mark.parametrize("frame", [b"", b"\x01abc", b'{"op": "ping"', b'{"op": \n', b"[1, 2]\n", b"\xff{}\n"])
def test_a_frame_that_is_no_json_header_is_a_frame_error(frame):
    with pytest.raises(protocol.FrameError):
        protocol.decode(frame)


# -- the worker's side ----------------------------------------------------------------------------
@pytest.fixture
def frontend() -> Iterator[SimpleNamespace]:
    """A frontend as the worker sees it: its arena (mapped in the worker too), its channel, the socket end
    the worker's answers reach."""
    arena = Arena(1 << 16)
    ours, theirs = socket.socketpair()
    ends = SimpleNamespace(arena=arena, sock=ours, shm=attach(arena.name), channels=[])

    def channel(primary: bool = False) -> Channel:
        ends.channels.append(Channel(theirs, ends.shm, primary=primary))
        return ends.channels[-1]

    ends.channel = channel
    yield ends
    for c in ends.channels:
        c.buf = None
    with contextlib.suppress(BufferError):  # a view the test kept; the name is removed regardless
        ends.shm.close()
    ours.close()
    theirs.close()
    arena.close()


def _answers(ends: SimpleNamespace, channel: Channel) -> list[bytes]:
    """The frames the worker queued on `channel`, written and read back."""
    channel._flush()
    ends.sock.settimeout(5)
    return protocol.split_framed(bytearray(ends.sock.recv(1 << 20)))


def _runtime(spec: ModelSpec) -> SimpleNamespace:
    """What `_dispatch` asks of the runtime: for a request of no rows, the empty outputs."""
    return SimpleNamespace(
        empty_outputs=lambda: {
            t.name: np.empty((0, *t.dims), dtype=tensors.numpy_dtype(t.datatype)) for t in spec.outputs
        },
    )


def _receive(channel: Channel, frame: bytes, spec: ModelSpec = TINY) -> DynamicBatcher:
    batcher = DynamicBatcher(BatcherSettings(model=spec.name, max_batch_size=spec.max_batch_size))
    _dispatch(channel, _body(frame), protocol.FrameCodec(spec), _runtime(spec), batcher, running=[], pongs=[])
    return batcher


def test_the_worker_queues_an_infer_with_views_of_the_frontends_arena(frontend):
    data = np.arange(32, dtype=np.float32).reshape(2, 16)
    frontend.arena.buf[256:384] = data.tobytes()
    channel = frontend.channel()
    frame = protocol.FrameCodec(TINY).encode_infer(11, [("x", "FP32", (2, 16), 256, 128)], ["y"], 384, 128, 30.0)
    before = time.monotonic()
    batcher = _receive(channel, frame)
    (queued,) = batcher.next_batch(timeout=0).requests
    job = queued.payload
    assert (job.id, job.rows, job.channel) == (11, 2, channel)
    assert np.array_equal(job.inputs["x"], data)
    frontend.arena.buf[256:260] = np.float32(-1).tobytes()
    assert job.inputs["x"][0, 0] == -1  # a view of the arena, not a copy
    assert before + 30 <= queued.deadline <= time.monotonic() + 30
    job.inputs = {}


@pytest.mark.parametrize("primary", [False, True])
def test_a_malformed_infer_is_answered_with_an_error_to_its_request(frontend, primary):
    channel = frontend.channel(primary)
    codec = protocol.FrameCodec(TINY)
    frame = bytearray(codec.encode_infer(12, [("x", "FP32", (1, 16), 0, 64)], ["y"], 64, 64, None))
    frame += b"\0"  # a byte too many: still an INFER of request 12, but not one that fits the layout
    struct.pack_into("!i", frame, 0, len(frame) - 4)
    batcher = _receive(channel, bytes(frame))
    assert batcher.queued_requests == 0 and not channel.closed
    (answer,) = _answers(frontend, channel)
    header, _ = protocol.decode(answer)
    err = ServeError.from_wire(header["error"])
    assert header["id"] == 12 and err.code == "INTERNAL"
    assert "malformed request from the frontend" in err.message and "request 12" in err.message


def test_an_input_outside_the_arena_is_an_error_to_its_request(frontend):
    channel = frontend.channel()
    size = frontend.shm.size
    frame = protocol.FrameCodec(TINY).encode_infer(13, [("x", "FP32", (1, 16), size - 32, 64)], ["y"], 0, 64, None)
    assert _receive(channel, frame).queued_requests == 0
    frame = protocol.FrameCodec(TINY).encode_infer(14, [("x", "FP32", (1, 16), 0, 64)], ["y"], size - 32, 64, None)
    assert _receive(channel, frame).queued_requests == 0
    answers = [protocol.decode(a)[0] for a in _answers(frontend, channel)]
    assert [(a["id"], a["error"]["code"]) for a in answers] == [(13, "INVALID_ARGUMENT"), (14, "INTERNAL")]
    assert "expected 64 bytes" in answers[0]["error"]["message"]
    assert "outside its" in answers[1]["error"]["message"]


UNATTRIBUTABLE = [
    b"\x00\x00\x00\x03\x01\x00\x00",  # an INFER cut before its id
    protocol.framed({"op": "cancel"}),  # a cancel naming no request
    protocol.framed({"op": "ping", "id": "x"}),
    b"\x00\x00\x00\x05junk\n",
    b"\x00\x00\x00\x01\x02",  # a RESULT: frontends never send one
]


@pytest.mark.parametrize("frame", UNATTRIBUTABLE)
def test_a_frame_naming_no_request_drops_an_extra_frontend_but_not_the_parent(frontend, frame):
    extra = frontend.channel(primary=False)
    assert _receive(extra, frame).queued_requests == 0
    assert extra.closed  # Connections.flush closes it; its requests fail on the frontend's side
    parent = frontend.channel(primary=True)
    assert _receive(parent, frame).queued_requests == 0
    assert not parent.closed
    # the parent's pipe still serves requests after it
    ok = protocol.FrameCodec(TINY).encode_infer(1, [("x", "FP32", (1, 16), 0, 64)], ["y"], 64, 64, None)
    assert _receive(parent, ok).queued_requests == 1


def test_a_request_of_no_rows_is_answered_at_once_with_empty_outputs(frontend):
    channel = frontend.channel()
    frame = protocol.FrameCodec(TINY).encode_infer(15, [("x", "FP32", (0, 16), 0, 0)], ["y"], 0, 0, None)
    assert _receive(channel, frame).queued_requests == 0
    (answer,) = _answers(frontend, channel)
    assert protocol.FrameCodec(TINY).decode_result(answer)[:2] == (15, [(0, (0, 16), 0, 0, False)])


@pytest.fixture(scope="module")
def tiny_runtime() -> Iterator[ModelRuntime]:
    runtime = ModelRuntime(TINY, WorkerOptions(intra_op_threads=1), WorkerStats())
    runtime.run([Item(1, {"x": np.zeros((1, 16), np.float32)})])  # a run timed: short batches are known
    yield runtime
    runtime.close()


@pytest.fixture()
def short_runs(tiny_runtime, monkeypatch) -> ModelRuntime:
    """tiny_runtime, its runs expected well under INLINE_BELOW_S whatever the machine did while they were
    timed (the estimate weighs one or two real runs; a busy machine can stretch one past 0.5 ms)."""
    real = tiny_runtime.expected_seconds
    monkeypatch.setattr(tiny_runtime, "expected_seconds", lambda rows: None if real(rows) is None else 1e-5)
    return tiny_runtime


def test_a_short_unbatched_request_at_an_idle_worker_is_answered_on_arrival(frontend, short_runs):
    """`tiny` has no dynamic batching: a request that finds nothing running and nobody queued runs and is
    answered while its frame is handled (no queue, no loop turn); otherwise it queues behind the others,
    in order, and so do one that no live engine can take yet and one whose deadline has passed (the queue
    answers it DEADLINE_EXCEEDED)."""
    codec, stats = protocol.FrameCodec(TINY), short_runs.stats
    x = np.random.default_rng(3).standard_normal((1, 16), dtype=np.float32)
    frontend.arena.buf[0:64] = x.tobytes()
    channel = frontend.channel()
    batcher = DynamicBatcher(BatcherSettings.for_model(TINY.config))
    assert not batcher.settings.batching
    stats.drain()

    def infer(request_id: int, running: list, timeout_s: float | None = None, rows: int = 1) -> None:
        frame = codec.encode_infer(request_id, [("x", "FP32", (rows, 16), 0, 64 * rows)], ["y"], 256, 64 * rows,
                                   timeout_s)
        _dispatch(channel, _body(frame), codec, short_runs, batcher, running=running, pongs=[])

    infer(31, running=[])
    assert batcher.queued_requests == 0
    (answer,) = _answers(frontend, channel)
    request_id, slots, _ = codec.decode_result(answer)
    assert request_id == 31 and slots == [(0, (1, 16), 256, 64, False)]
    y = np.frombuffer(frontend.arena.buf[256:320], np.float32).reshape(1, 16)
    np.testing.assert_allclose(y, reference_outputs("tiny", TINY.model_path, {"x": x})["y"], rtol=1e-6)
    del y  # a view of the arena, which the fixture closes
    assert stats.drain()["exec"]["requests"] == 1

    infer(32, running=[], rows=2)  # larger than the live engine: it waits for a build, as a queued batch
    infer(33, running=[object()])  # a batch runs: the request waits for it
    infer(34, running=[])  # nothing runs, but 32 and 33 are queued: 34 goes behind them
    infer(35, running=[], timeout_s=0.0)  # to be answered DEADLINE_EXCEEDED by the queue, not run
    assert [r.payload.id for r in batcher._queue] == [32, 33, 34, 35]
    assert [r.payload.id for r in batcher.next_batch(timeout=0).expired] == [35]
    for queued in batcher._queue:
        queued.payload.inputs = {}


def test_a_queued_request_run_inline_is_answered_in_its_turn_and_the_next_one_runs_on_arrival(frontend,
                                                                                               short_runs):
    """A request that queued (a batch was running when it arrived) and then runs inline on the loop's thread
    is answered in the same turn: it does not stay in `running`, where it would send the next request
    through the queue too (and under steady load every one after it)."""
    codec, stats = protocol.FrameCodec(TINY), short_runs.stats
    xs = np.random.default_rng(5).standard_normal((2, 1, 16), dtype=np.float32)
    frontend.arena.buf[0:128] = xs.tobytes()
    channel = frontend.channel()
    batcher = DynamicBatcher(BatcherSettings.for_model(TINY.config))
    running: deque = deque()
    finished: list = []

    def infer(request_id: int, at: int, busy: bool = False) -> None:
        frame = codec.encode_infer(request_id, [("x", "FP32", (1, 16), at, 64)], ["y"], 256 + at, 64, None)
        _dispatch(channel, _body(frame), codec, short_runs, batcher, running=[object()] if busy else running,
                  pongs=[])

    infer(41, at=0, busy=True)
    assert batcher.queued_requests == 1
    engine = ThreadPoolExecutor(max_workers=1)
    try:
        _take_batch(engine, short_runs, batcher, SimpleNamespace(wake=lambda: None), running, finished)
    finally:
        engine.shutdown()
    assert not running and len(finished) == 1 and finished[0].inline, "run inline, to be answered this turn"
    finish(finished.pop(), codec, stats)
    infer(42, at=64)
    assert batcher.queued_requests == 0, "the worker is idle: 42 ran on arrival"
    answers = [codec.decode_result(frame) for frame in _answers(frontend, channel)]
    assert [(request_id, slots) for request_id, slots, _ in answers] == [
        (41, [(0, (1, 16), 256, 64, False)]), (42, [(0, (1, 16), 320, 64, False)])]
    y = np.frombuffer(frontend.arena.buf[256:384], np.float32).reshape(2, 1, 16)
    for k in range(2):
        np.testing.assert_allclose(y[k], reference_outputs("tiny", TINY.model_path, {"x": xs[k]})["y"], rtol=1e-6)
    del y  # a view of the arena, which the fixture closes


def _request(spec: ModelSpec, outputs: list[str], out_offset: int, out_nbytes: int) -> protocol.InferRequest:
    codec = protocol.FrameCodec(spec)
    return protocol.InferRequest(21, None, [], [codec._output_index[n] for n in outputs], out_offset, out_nbytes)


def test_reply_writes_what_fits_into_the_arena_and_the_rest_inline(frontend):
    channel = frontend.channel()
    total = np.array([[36]], dtype=np.int64)
    scaled = np.array([[0.5, 1.0, 1.5, 2.0]], dtype=np.float16)
    request = _request(MIXED, ["sum", "scaled"], 1024, 8)
    reply(protocol.FrameCodec(MIXED), channel, request, {"sum": total, "scaled": scaled})
    (answer,) = _answers(frontend, channel)
    request_id, slots, payload = protocol.FrameCodec(MIXED).decode_result(answer)
    assert request_id == 21 and slots == [(0, (1, 1), 1024, 8, False), (1, (1, 4), 0, 8, True)]
    assert bytes(frontend.arena.buf[1024:1032]) == total.tobytes()
    assert bytes(payload) == scaled.tobytes()


def test_reply_sends_bytes_outputs_inline(frontend):
    channel = frontend.channel()
    text = np.array([b"hello", b"", "wörld".encode()], dtype=object)
    reply(protocol.FrameCodec(SCALARS), channel, _request(SCALARS, ["text", "o"], 0, 4),
           {"o": np.int32(7), "text": text})
    (answer,) = _answers(frontend, channel)
    _, slots, payload = protocol.FrameCodec(SCALARS).decode_result(answer)
    assert slots == [(1, (3,), 0, len(payload), True), (0, (), 0, 4, False)]
    assert tensors.to_array("BYTES", (3,), payload).tolist() == text.tolist()
    assert np.frombuffer(frontend.arena.buf[0:4], dtype=np.int32)[0] == 7


def test_the_timeout_travels_as_a_double_and_none_as_nan():
    codec = protocol.FrameCodec(TINY)
    inputs = [("x", "FP32", (1, 16), 0, 64)]
    for timeout_s in (None, 0.0, 1e-6, 3600.5, math.inf):
        assert codec.decode_infer(_body(codec.encode_infer(1, inputs, ["y"], 64, 64, timeout_s))).timeout_s == timeout_s


def test_outputs_of_a_batch_handed_to_the_engine_thread_survive_the_next_batch(tiny_runtime):
    """`_execute` (the engine thread's run) copies a batch's outputs out of the pool once, so the batch
    can be answered while the next one runs in the same buffers."""
    from service.workers.batches import _execute

    rng = np.random.default_rng(11)
    first = [Item(1, {"x": rng.standard_normal((1, 16), dtype=np.float32)}) for _ in range(3)]
    second = [Item(2, {"x": rng.standard_normal((2, 16), dtype=np.float32)}) for _ in range(2)]
    tiny_runtime.run([Item(4, {"x": np.zeros((4, 16), np.float32)})])  # the pool holds 4 rows: no growth below
    _execute(tiny_runtime, tiny_runtime.prepare(first))
    kept = [item.outputs["y"].copy() for item in first]
    _execute(tiny_runtime, tiny_runtime.prepare(second))  # the same pool rows, other values
    for item, before in zip(first, kept):
        np.testing.assert_array_equal(item.outputs["y"], before)
    for item in first + second:
        expected = reference_outputs("tiny", TINY.model_path, item.inputs)["y"]
        np.testing.assert_allclose(item.outputs["y"], expected, rtol=1e-6)

"""A batch in the worker, from the queue to its answers.

The worker's loop (`worker.py`) takes a due batch from the queue and `launch`es it: gathered into the
runtime's pool, then run inline when it is short and nothing else runs, or handed to the engine thread,
which wakes the loop when it is done. Until the engine thread starts a handed-over batch its requests can
still be cancelled and expire (`Running`). When it is done, the loop answers each request (`finish`): its
outputs copied into the request's block of its frontend's arena, or its error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service import tensors
from service.batching import QueuedRequest
from service.errors import Cancelled, DeadlineExceeded, InternalError, ServeError
from service.metrics import WorkerStats
from service.workers import protocol
from service.workers.connections import Channel, Connections
from service.workers.runtime import Item, ModelRuntime, Prepared

log = logging.getLogger("trtserve.worker")
INLINE_BELOW_S = 0.0005  # batches expected to run shorter than this run on the receiving thread
TAKE_WAIT_S = 0.002  # longest the loop waits for an idle engine thread to take the batch handed to it


@dataclass
class Job:
    """One request as the worker holds it: the frontend's INFER, its input views, where to answer."""

    request: protocol.InferRequest
    rows: int
    inputs: dict[str, np.ndarray]
    channel: Channel

    @property
    def id(self) -> int:
        return self.request.id


@dataclass
class Running:
    """A batch handed to the engine thread (or run inline on this one: `inline`). Until the engine thread
    starts it, its requests can still be cancelled (`cancel`) and expire (`deadlines`)."""

    jobs: list[Job]
    items: list[Item]
    deadlines: list[float | None]
    future: Future[list[Any]] | Settled | None = None  # set by `launch`
    inline: bool = False
    started: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    taken: threading.Event = field(default_factory=threading.Event)  # set by `start`

    def cancel(self, match: Callable[[Job], bool]) -> None:
        """Fail the matching requests as cancelled, unless the batch started (they are answered with it)."""
        with self.lock:
            if not self.started:
                for job, item in zip(self.jobs, self.items):
                    if match(job):
                        item.error = Cancelled("request cancelled while queued")

    def start(self) -> bool:
        """On the engine thread, as the batch starts: fail the requests whose deadline passed; whether any
        request is still wanted."""
        with self.lock:
            self.started = True
        self.taken.set()
        now = time.monotonic()
        for item, deadline in zip(self.items, self.deadlines):
            if item.error is None and deadline is not None and deadline <= now:
                item.error = DeadlineExceeded("deadline passed while the request was queued")
        return any(item.error is None for item in self.items)


def launch(engine: ThreadPoolExecutor, runtime: ModelRuntime, requests: tuple[QueuedRequest, ...],
           conns: Connections, inline_ok: bool) -> Running:
    """Gather a batch into the pool here and hand it to the engine thread, which wakes the loop when it
    is done. With `inline_ok` (nothing else runs), a batch expected to take under INLINE_BELOW_S runs on
    this thread instead (a thread hand-off costs more than receiving pauses); a longer one is handed to
    the idle engine thread, and this thread waits (up to TAKE_WAIT_S) until it took it. Otherwise the
    engine thread would wait for the GIL while this one answers the previous batch, for up to the
    interpreter's 5 ms switch interval: with 32 clients on 16 cores the engine ran 92% of the time
    without the wait and 96% with it (3 alternating rounds, bench/results/gpu/runs/24)."""
    jobs: list[Job] = [r.payload for r in requests]
    started = time.monotonic()
    items = [Item(job.rows, job.inputs, queued_s=started - r.enqueued_at) for job, r in zip(jobs, requests)]
    batch = Running(jobs, items, [r.deadline for r in requests])
    try:
        prepared = runtime.prepare(items)
        expected = runtime.expected_seconds(sum(job.rows for job in jobs)) if inline_ok else None
        if expected is not None and expected < INLINE_BELOW_S:
            batch.inline = True  # nothing can cancel or expire it between here and the run
            batch.future = Settled(_execute(runtime, prepared))
            return batch
    except Exception as exc:  # answered as the engine thread's failures are
        batch.inline = True
        batch.future = Settled(error=exc)
        return batch
    batch.future = engine.submit(_run_when_wanted, runtime, batch, prepared)
    batch.future.add_done_callback(lambda _: conns.wake())
    if inline_ok:
        batch.taken.wait(TAKE_WAIT_S)
    return batch


class Settled:
    """A batch run inline: the part of a finished Future the loop reads, without a Future's lock and
    condition (a `tiny` request costs the worker little more than those)."""

    __slots__ = ("_error", "_result")

    def __init__(self, result: list[Any] | None = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error

    def done(self) -> bool:
        return True

    def result(self) -> list[Any]:
        if self._error is not None:
            raise self._error
        return self._result or []


def _run_when_wanted(runtime: ModelRuntime, batch: Running, prepared: Prepared) -> list[Any]:
    """On the engine thread: run the batch unless every request was cancelled or expired before it
    started (otherwise their rows run with it, being in the pool, and they are answered with their error)."""
    return _execute(runtime, prepared) if batch.start() else []


def _execute(runtime: ModelRuntime, prepared: Prepared) -> list[Any]:
    """Run a prepared batch with its outputs copied out of the pool (one copy per output, not per
    request), so that the next batch can run before this one is answered."""
    return runtime.execute(prepared, detach=True)


def finish(running: Running, codec: protocol.FrameCodec, stats: WorkerStats) -> None:
    """Answer every request of a finished batch (outputs, or the batch's error) and record it."""
    try:
        executions = running.future.result()
    except Exception as exc:  # an engine failure fails this batch, not the worker
        fail(running.jobs, running.items, exc)
        return
    answer(running.jobs, running.items, executions, codec, stats)


def fail(jobs: list[Job], items: list[Item], exc: Exception) -> None:
    """Answer the requests of a batch that failed with its error (those cancelled or expired before the
    start with their own)."""
    error = failure(exc, len(jobs))
    for job, item in zip(jobs, items):
        job.channel.error(job.id, item.error or error)


def failure(exc: Exception, requests: int) -> ServeError:
    """What the requests of a failed batch are answered with: a ServeError as it is, anything else
    logged and reported as INTERNAL."""
    if isinstance(exc, ServeError):
        return exc
    log.error("batch of %d requests failed", requests, exc_info=exc)
    return InternalError(f"inference failed: {type(exc).__name__}: {exc}")


def answer(jobs: list[Job], items: list[Item], executions: list[Any], codec: protocol.FrameCodec,
            stats: WorkerStats) -> None:
    """Answer the requests of a batch that ran (outputs, or a request's own error) and record it."""
    t0 = time.perf_counter()
    for job, item in zip(jobs, items):
        if item.error is not None:
            job.channel.error(job.id, item.error)
        else:
            reply(codec, job.channel, job.request, item.outputs)
        job.inputs = {}  # drop views of the frontend's block once answered
    reply_s = (time.perf_counter() - t0) / max(len(executions), 1)
    for ex in executions:
        stats.record_exec(ex.rows, [i.queued_s for i in ex.items], ex.input_s, ex.infer_s, ex.output_s + reply_s)


def reply(codec: protocol.FrameCodec, channel: Channel, request: protocol.InferRequest,
           outputs: dict[str, np.ndarray]) -> None:
    """Copy the requested outputs into the request's block (what does not fit travels inline) and answer."""
    buf = channel.buf
    specs, datatypes = codec.outputs, codec.output_datatypes  # built once per model, not per reply
    offset, end = request.out_offset, request.out_offset + request.out_nbytes
    slots: list[protocol.OutputSlot] = []
    inline: list[bytes] = []
    inline_size, cursor = 0, offset
    try:
        for index in request.outputs:
            name = specs[index].name
            array = outputs[name]
            raw = memoryview(tensors.to_raw(array, datatypes[index], name=name)).cast("B")
            n = raw.nbytes
            if cursor + n <= end:
                buf[cursor:cursor + n] = raw
                slots.append((index, array.shape, cursor, n, False))
                cursor += n
            else:
                slots.append((index, array.shape, inline_size, n, True))
                inline.append(bytes(raw))
                inline_size += n
    except ServeError as exc:
        channel.error(request.id, exc)
        return
    channel.send_frame(codec.encode_result(request.id, slots, b"".join(inline) if inline else None))

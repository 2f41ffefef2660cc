"""The model worker process: receives requests from the frontends, batches and runs them, answers.

One thread (`_serve`) receives frames from every frontend connection, queues requests in the dynamic
batcher, hands due batches to the engine thread (short ones it runs itself; a batch's life from there
to its answers is `service/workers/batches.py`) and answers, heartbeats included, so a stuck batch shows
as missing heartbeats. A short request of a model without dynamic batching that finds the worker idle is
run and answered as it arrives (`_runs_now`), where it can through the runtime's direct lane
(`service/workers/direct.py`: straight into the pool and a bound engine). The parent's pipe is the
primary connection (control, heartbeats, stats); extra frontend processes connect through the listening
socket the parent gave, each naming its own shared-memory arena first. When the parent dies its pipe
closes and the worker exits: no orphans.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from service import tensors
from service.batching import BatcherSettings, DynamicBatcher, QueuedRequest
from service.engines.policy import EnginePolicy
from service.errors import Cancelled, DeadlineExceeded, InternalError, ServeError
from service.metrics import WorkerStats
from service.repository import ModelSpec
from service.workers import protocol
from service.workers.batches import INLINE_BELOW_S, Job, Running, answer, fail, failure, finish, launch, reply
from service.workers.connections import Channel, Connections
from service.workers.runtime import Item, ModelRuntime

log = logging.getLogger("trtserve.worker")
STATS_INTERVAL_S = 0.1
PIPELINE_DEPTH = 2  # batches the engine thread holds: the one it runs and the full one after it
FLUSH_AFTER_S = 0.001  # longest an answer waits while the loop keeps finding work


@dataclass(frozen=True)
class WorkerOptions:
    """Server settings a worker needs; passed once at spawn."""

    intra_op_threads: int = 0
    intra_op_spinning: bool = False
    engine_cache_dir: Path | None = None
    log_level: str = "INFO"
    default_policy: EnginePolicy = field(default_factory=EnginePolicy)


def main(spec: ModelSpec, options: WorkerOptions, conn: Connection, arena_name: str,
         listener: socket.socket | None = None) -> None:
    """Entry point of the spawned process."""
    # The parent handles Ctrl-C and SIGTERM (also when sent to the whole process group) and stops its
    # workers itself, after in-flight requests finished; a dead parent closes the pipe, which ends us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=options.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s worker[{spec.name}] %(message)s")
    pipe = socket.socket(fileno=os.dup(conn.fileno()))
    conn.close()
    conns = Connections(pipe, arena_name, listener)
    stats = WorkerStats()
    try:
        runtime = ModelRuntime(spec, options, stats)
        batcher = DynamicBatcher(BatcherSettings.for_model(spec.config))
    except ServeError as exc:
        conns.primary.send({"op": protocol.FAILED, "error": exc.to_wire()})
        conns.flush()
        return
    except Exception as exc:  # a backend failing to load must reach the parent as a message
        log.exception("model failed to load")
        conns.primary.send({"op": protocol.FAILED,
                            "error": InternalError(f"{type(exc).__name__}: {exc}").to_wire()})
        conns.flush()
        return
    conns.primary.send({"op": protocol.READY, "pid": os.getpid()})
    conns.flush()
    runtime.register_shared(conns.primary.buf)
    try:
        _serve(runtime, batcher, conns, stats)
    except EOFError:
        os._exit(0)  # the parent is gone; nobody is left to answer
    finally:
        runtime.close()


def _serve(runtime: ModelRuntime, batcher: DynamicBatcher, conns: Connections, stats: WorkerStats) -> None:
    """The worker's loop: receive requests (also while a batch runs: a full queue is refused at once, a
    cancelled request leaves the queue), gather due batches into the pool and hand them to the engine
    thread, answer each batch while the next one runs, report. While the engine thread runs a batch, a
    full batch already waiting is gathered (on a GPU: uploaded into the pool's other input set) and
    handed over too (`_may_start`), so the engine starts it the moment the last one ends instead of
    after a round trip through this loop. Pings are answered when a batch finished or nothing runs, so
    a stuck batch shows as missing heartbeats."""
    engine = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
    running: deque[Running] = deque()  # oldest first; the engine thread runs them in this order
    pongs: list[int] = []
    last_stats, last_flush, wait = 0.0, 0.0, 0.0
    codec = protocol.FrameCodec(runtime.spec)  # the model's INFER/RESULT layouts, for every frontend
    try:
        while True:
            for channel, frame in conns.receive(wait):
                _dispatch(channel, frame, codec, runtime, batcher, running, pongs)
            finished: list[Running] = []
            while running and running[0].future.done():
                finished.append(running.popleft())
            if finished or not running:
                for pong in pongs:
                    conns.primary.send({"op": protocol.PONG, "id": pong})
                pongs.clear()
            if conns.opened or conns.closed:
                _pin(runtime, conns, idle=not running)
            if not running:
                if batcher.closed and not batcher.queued_requests:
                    for done in finished:
                        finish(done, codec, stats)
                    break
            if batcher.queued_requests and _may_start(running, batcher, runtime):
                _take_batch(engine, runtime, batcher, conns, running, finished)
            for done in finished:  # answered while the engine runs the next batch
                finish(done, codec, stats)
            now = time.monotonic()
            if now - last_stats >= STATS_INTERVAL_S:
                runtime.refresh_gauges()
                if report := stats.drain():
                    conns.primary.send({"op": protocol.STATS, "stats": report})
                last_stats = now
            until_stats = max(0.0, last_stats + STATS_INTERVAL_S - now)
            if not running:
                wait = batcher.wait_hint(until_stats) if batcher.queued_requests or batcher.closed else until_stats
            else:  # the engine thread wakes the loop when its batch is done
                wait = 0.0 if running[0].future.done() else until_stats
            # Answers go out when the loop is about to sleep (a burst of requests answered in one write
            # per frontend), or after FLUSH_AFTER_S of back-to-back work at the latest.
            if wait > 0 or now - last_flush >= FLUSH_AFTER_S:
                conns.flush()
                last_flush = now
    finally:
        engine.shutdown(wait=True)
        conns.flush()


def _take_batch(engine: ThreadPoolExecutor, runtime: ModelRuntime, batcher: DynamicBatcher, conns: Connections,
                running: deque[Running], finished: list[Running]) -> None:
    """Take the due batch from the queue (its expired requests answered DEADLINE_EXCEEDED) and start it:
    handed to the engine thread it joins `running`; run inline it joins `finished`, answered in this turn
    of the loop. (Left in `running`, it would send requests arriving meanwhile through the queue instead of
    running them on arrival, and under steady load every one after it: with the worker slowed down by a
    profiler, half of the streamed `tiny` requests at 8 clients took that detour.)"""
    batch = batcher.next_batch(timeout=0)
    for req in batch.expired:
        req.payload.channel.error(req.payload.id, DeadlineExceeded("deadline passed while the request was queued"))
    if batch.requests:
        started = launch(engine, runtime, batch.requests, conns, inline_ok=not running)
        (finished if started.inline else running).append(started)


def _may_start(running: deque[Running], batcher: DynamicBatcher, runtime: ModelRuntime) -> bool:
    """Whether to take a batch now: when nothing runs, or when the engine thread runs fewer than
    PIPELINE_DEPTH batches, the next batch cannot grow by waiting (a full one is queued, or the model runs
    requests one by one), the runtime can prepare it meanwhile (`can_overlap`), and it is expected to be
    long (a short one runs inline as soon as nothing else runs: cheaper than a hand-off)."""
    if not running:
        return True
    if len(running) >= PIPELINE_DEPTH:
        return False
    settings = batcher.settings
    if settings.batching and batcher.queued_rows < settings.max_batch_size:
        return False
    if not settings.batching and not batcher.queued_requests:
        return False
    expected = runtime.expected_seconds(max(settings.max_batch_size, 1))
    return expected is not None and expected >= INLINE_BELOW_S and runtime.can_overlap()


def _pin(runtime: ModelRuntime, conns: Connections, idle: bool) -> None:
    """Pin the arenas of frontends that connected; unpin those of frontends that left only when `idle`
    (no batch runs, so no copy from them can be in flight)."""
    for channel in conns.opened:
        runtime.register_shared(channel.buf)
    conns.opened.clear()
    if idle:
        for channel in conns.closed:
            runtime.unregister_shared(channel.buf)
        conns.closed.clear()


def _dispatch(channel: Channel, frame: bytes, codec: protocol.FrameCodec, runtime: ModelRuntime,
              batcher: DynamicBatcher, running: deque[Running], pongs: list[int]) -> None:
    """One frame from a frontend: a request to queue, a cancellation, or (from the parent) a ping or the stop.
    A malformed request is answered with an error; a frame that names no request drops its frontend."""
    if protocol.is_infer(frame):
        try:
            request = codec.decode_infer(frame)
        except protocol.FrameError as exc:
            if exc.request_id is None:
                _unattributable(channel, str(exc))
            else:
                channel.error(exc.request_id, InternalError(f"malformed request from the frontend: {exc}"))
            return
        _submit(channel, request, codec, runtime, batcher, running)
        return
    try:
        header, _ = protocol.decode(frame)
        op = header.get("op")
        request_id = int(header["id"]) if op == protocol.CANCEL or op == protocol.PING else 0
    except (protocol.FrameError, KeyError, TypeError, ValueError) as exc:
        _unattributable(channel, f"{type(exc).__name__}: {exc}")
        return
    if op == protocol.CANCEL:
        for req in batcher.cancel(lambda r: r.payload.id == request_id and r.payload.channel is channel):
            channel.error(req.payload.id, Cancelled("request cancelled while queued"))
        for batch in running:  # or handed to the engine thread, not started yet
            batch.cancel(lambda job: job.id == request_id and job.channel is channel)
    elif op == protocol.PING and channel.primary:
        pongs.append(request_id)
    elif op == protocol.STOP and channel.primary:
        batcher.close(drain=True)  # what was accepted still runs and is answered


def _unattributable(channel: Channel, problem: str) -> None:
    """A frame that names no request: an extra frontend sending it is dropped; the parent's pipe is kept
    (dropping it would end the worker for every frontend) and the frame ignored."""
    log.error("malformed frame from %s: %s", "the parent" if channel.primary else "a frontend", problem)
    channel.abandon()


def _submit(channel: Channel, request: protocol.InferRequest, codec: protocol.FrameCodec, runtime: ModelRuntime,
            batcher: DynamicBatcher, running: deque[Running]) -> None:
    try:
        buf, spec_inputs = channel.buf, codec.inputs
        if request.out_offset + request.out_nbytes > buf.nbytes:
            raise InternalError(f"malformed request from the frontend: output room {request.out_offset}+"
                                f"{request.out_nbytes} is outside its {buf.nbytes}-byte arena")
        rows = request.inputs[0][1][0] if codec.batched and request.inputs else 1
        timeout = request.timeout_s
        runs_now = rows > 0 and not running and _runs_now(batcher, runtime, rows, timeout)
        if runs_now and runtime.direct is not None and _run_direct(channel, request, rows, codec, runtime):
            return
        inputs = {}
        for index, shape, offset, nbytes in request.inputs:
            t = spec_inputs[index]
            inputs[t.name] = tensors.to_array(t.datatype, shape, buf[offset:offset + nbytes], name=t.name)
        job = Job(request, rows, inputs, channel)
        if rows == 0:  # an empty batch needs no engine
            reply(codec, channel, request, runtime.empty_outputs())
            return
        if runs_now:
            _run_now(job, codec, runtime)
            return
        deadline = time.monotonic() + timeout if timeout is not None else None
        batcher.submit(QueuedRequest(rows=rows, deadline=deadline, payload=job))
    except ServeError as exc:
        channel.error(request.id, exc)


def _runs_now(batcher: DynamicBatcher, runtime: ModelRuntime, rows: int, timeout: float | None) -> bool:
    """Whether a request that arrives while nothing runs is run and answered on arrival: when its model
    runs requests one by one (no dynamic batching, so nothing would join it), nobody is queued before it,
    its deadline has not passed, and it is expected to be short (as batches run inline). What it skips is
    the queue, the batch objects and a turn of the loop, most of what a small request costs the worker."""
    if batcher.settings.batching or batcher.queued_requests or batcher.closed:
        return False
    if timeout is not None and timeout <= 0:
        return False  # expired: the queue answers DEADLINE_EXCEEDED
    expected = runtime.expected_seconds(rows)  # None also when no live engine can take the rows
    return expected is not None and expected < INLINE_BELOW_S


def _run_direct(channel: Channel, request: protocol.InferRequest, rows: int, codec: protocol.FrameCodec,
                runtime: ModelRuntime) -> bool:
    """Run a request that runs now through the runtime's direct lane and answer it; False, with nothing
    done, when the lane does not take it."""
    try:
        done = runtime.direct.run(channel.buf, request.inputs, rows)
    except Exception as exc:  # answered as a failed batch is
        channel.error(request.id, failure(exc, 1))
        return True
    if done is None:
        return False
    outputs, input_s, infer_s = done
    replying = time.perf_counter()
    reply(codec, channel, request, outputs)
    runtime.stats.record_exec(rows, (0.0,), input_s, infer_s, time.perf_counter() - replying)
    return True


def _run_now(job: Job, codec: protocol.FrameCodec, runtime: ModelRuntime) -> None:
    """Run one request by itself and answer it (see `_runs_now`)."""
    item = Item(job.rows, job.inputs)
    try:
        executions = runtime.run([item])
    except Exception as exc:  # answered as a failed batch is
        fail([job], [item], exc)
        return
    answer([job], [item], executions, codec, runtime.stats)

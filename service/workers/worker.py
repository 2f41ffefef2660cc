"""The model worker process: receives requests from the frontends, batches and runs them, answers.

One thread does it all (`_serve`): it receives frames from every frontend connection, queues requests
in the dynamic batcher, runs the batches that are due and answers, heartbeats included, so a stuck
compute loop shows as missing heartbeats. The parent's pipe is the primary connection (control,
heartbeats, stats); extra frontend processes connect through the listening socket the parent gave,
each naming its own shared-memory arena first. When the parent dies its pipe closes and the worker
exits: no orphans.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from service import tensors
from service.batching import BatcherSettings, DynamicBatcher, QueuedRequest
from service.engines.policy import EnginePolicy
from service.errors import Cancelled, DeadlineExceeded, InternalError, ServeError
from service.metrics import WorkerStats
from service.repository import ModelSpec
from service.workers import protocol
from service.workers.connections import Channel, Connections
from service.workers.runtime import Item, ModelRuntime

log = logging.getLogger("trtserve.worker")
STATS_INTERVAL_S = 0.1
INLINE_BELOW_S = 0.0005  # batches expected to run shorter than this run on the receiving thread


@dataclass(frozen=True)
class WorkerOptions:
    """Server settings a worker needs; passed once at spawn."""

    intra_op_threads: int = 0
    intra_op_spinning: bool = False
    engine_cache_dir: Path | None = None
    log_level: str = "INFO"
    default_policy: EnginePolicy = field(default_factory=EnginePolicy)


@dataclass
class _Job:
    """One request as the worker holds it: the frontend's header, its input views, where to answer."""

    id: int
    header: dict[str, Any]
    rows: int
    inputs: dict[str, np.ndarray]
    channel: Channel


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
    cancelled request leaves the queue), hand due batches to the engine thread one at a time, answer a
    batch while the next one runs, report. Pings are answered between batches, so a stuck batch shows
    as missing heartbeats."""
    engine = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
    running: _Running | None = None
    pongs: list[int] = []
    last_stats, wait = 0.0, 0.0
    batched = runtime.spec.max_batch_size > 0
    try:
        while True:
            for channel, frame in conns.receive(wait):
                _dispatch(channel, frame, runtime, batcher, batched, pongs)
            finished = None
            if running is not None and running.future.done():
                finished, running = running, None
                _detach_outputs(finished)
            if running is None:
                for pong in pongs:
                    conns.primary.send({"op": protocol.PONG, "id": pong})
                pongs.clear()
                _pin(runtime, conns)
                if batcher.closed and not batcher.queued_requests:
                    if finished is not None:
                        _finish(finished, runtime.spec, stats)
                    break
                batch = batcher.next_batch(timeout=0)
                for req in batch.expired:
                    req.payload.channel.error(req.payload.id,
                                              DeadlineExceeded("deadline passed while the request was queued"))
                if batch.requests:
                    running = _start(engine, runtime, batch.requests, conns)
            if finished is not None:  # answered while the engine runs the next batch
                _finish(finished, runtime.spec, stats)
            now = time.monotonic()
            if now - last_stats >= STATS_INTERVAL_S:
                runtime.refresh_gauges()
                if report := stats.drain():
                    conns.primary.send({"op": protocol.STATS, "stats": report})
                last_stats = now
            conns.flush()
            until_stats = max(0.0, last_stats + STATS_INTERVAL_S - now)
            if running is None:
                wait = batcher.wait_hint(until_stats)
            else:  # ran inline: answer it after one look at the sockets
                wait = 0.0 if running.future.done() else until_stats
    finally:
        engine.shutdown(wait=True)
        conns.flush()


def _pin(runtime: ModelRuntime, conns: Connections) -> None:
    """Pin the arenas of frontends that connected, unpin those of frontends that left (between batches:
    no copy from them can be in flight)."""
    for channel in conns.opened:
        runtime.register_shared(channel.buf)
    conns.opened.clear()
    for channel in conns.closed:
        runtime.unregister_shared(channel.buf)
    conns.closed.clear()


def _dispatch(channel: Channel, frame: bytes, runtime: ModelRuntime, batcher: DynamicBatcher,
              batched: bool, pongs: list[int]) -> None:
    """One frame from a frontend: a request to queue, a cancellation, or (from the parent) a ping or the stop."""
    header, _ = protocol.decode(frame)
    op = header.get("op")
    if op == protocol.INFER:
        _submit(channel, header, runtime, batcher, batched)
    elif op == protocol.CANCEL:
        request_id = int(header["id"])
        for req in batcher.cancel(lambda r: r.payload.id == request_id and r.payload.channel is channel):
            channel.error(req.payload.id, Cancelled("request cancelled while queued"))
    elif op == protocol.PING and channel.primary:
        pongs.append(int(header["id"]))
    elif op == protocol.STOP and channel.primary:
        batcher.close(drain=True)  # what was accepted still runs and is answered


def _submit(channel: Channel, header: dict[str, Any], runtime: ModelRuntime, batcher: DynamicBatcher,
            batched: bool) -> None:
    request_id = int(header["id"])
    try:
        refs = [protocol.TensorRef.from_json(item) for item in header["inputs"]]
        buf = channel.buf
        inputs = {r.name: tensors.to_array(r.datatype, r.shape, buf[r.offset:r.offset + r.nbytes], name=r.name)
                  for r in refs}
        rows = refs[0].shape[0] if batched and refs else 1
        job = _Job(request_id, header, rows, inputs, channel)
        if rows == 0:  # an empty batch needs no engine
            _reply(runtime.spec, job, runtime.empty_outputs())
            return
        timeout = header.get("timeout_s")
        deadline = time.monotonic() + float(timeout) if timeout is not None else None
        batcher.submit(QueuedRequest(rows=rows, deadline=deadline, payload=job))
    except ServeError as exc:
        channel.error(request_id, exc)


@dataclass
class _Running:
    """The batch the engine thread is running."""

    jobs: list[_Job]
    items: list[Item]
    future: Future[list[Any]]


def _start(engine: ThreadPoolExecutor, runtime: ModelRuntime, requests: tuple[QueuedRequest, ...],
           conns: Connections) -> _Running:
    """Hand a batch to the engine thread, which wakes the loop when it is done; a batch expected to take
    under INLINE_BELOW_S runs on this thread instead (a thread hand-off costs more than receiving
    pauses)."""
    jobs: list[_Job] = [r.payload for r in requests]
    started = time.monotonic()
    items = [Item(job.rows, job.inputs, queued_s=started - r.enqueued_at) for job, r in zip(jobs, requests)]
    expected = runtime.expected_seconds(sum(job.rows for job in jobs))
    if expected is not None and expected < INLINE_BELOW_S:
        future: Future[list[Any]] = Future()
        try:
            future.set_result(runtime.run(items))
        except Exception as exc:  # answered as the engine thread's failures are
            future.set_exception(exc)
        return _Running(jobs, items, future)
    future = engine.submit(runtime.run, items)
    future.add_done_callback(lambda _: conns.wake())
    return _Running(jobs, items, future)


def _detach_outputs(running: _Running) -> None:
    """Copy a finished batch's outputs out of the pool (they are views of it) so that the next batch
    can run before this one is answered."""
    if running.future.exception() is not None:
        return
    for item in running.items:
        item.outputs = {name: array.copy() if array.base is not None else array
                        for name, array in item.outputs.items()}


def _finish(running: _Running, spec: ModelSpec, stats: WorkerStats) -> None:
    """Answer every request of a finished batch (outputs, or the batch's error) and record it."""
    jobs, items = running.jobs, running.items
    try:
        executions = running.future.result()
    except ServeError as exc:
        for job in jobs:
            job.channel.error(job.id, exc)
        return
    except Exception as exc:  # an engine failure fails this batch, not the worker
        log.error("batch of %d requests failed", len(jobs), exc_info=exc)
        for job in jobs:
            job.channel.error(job.id, InternalError(f"inference failed: {type(exc).__name__}: {exc}"))
        return
    t0 = time.perf_counter()
    for job, item in zip(jobs, items):
        if item.error is not None:
            job.channel.error(job.id, item.error)
        else:
            _reply(spec, job, item.outputs)
        job.inputs = {}  # drop views of the frontend's block once answered
    reply_s = (time.perf_counter() - t0) / max(len(executions), 1)
    for ex in executions:
        stats.record_exec(ex.rows, [i.queued_s for i in ex.items], ex.input_s, ex.infer_s, ex.output_s + reply_s)


def _reply(spec: ModelSpec, job: _Job, outputs: dict[str, np.ndarray]) -> None:
    """Copy the requested outputs into the request's block (what does not fit travels inline) and answer."""
    channel, buf = job.channel, job.channel.buf
    datatypes = {t.name: t.datatype for t in spec.outputs}
    offset, room = job.header["out_offset"], job.header["out_nbytes"]
    refs: list[list[Any]] = []
    inline: list[bytes] = []
    inline_size, cursor = 0, offset
    try:
        for name in job.header["outputs"]:
            array = outputs[name]
            raw = memoryview(tensors.to_raw(array, datatypes[name], name=name)).cast("B")
            n = raw.nbytes
            if cursor + n <= offset + room:
                buf[cursor:cursor + n] = raw
                refs.append(protocol.TensorRef(name, datatypes[name], tuple(array.shape), cursor, n).to_json())
                cursor += n
            else:
                refs.append(protocol.TensorRef(name, datatypes[name], tuple(array.shape), inline_size, n,
                                               inline=True).to_json())
                inline.append(bytes(raw))
                inline_size += n
    except ServeError as exc:
        channel.error(job.id, exc)
        return
    channel.send({"op": protocol.RESULT, "id": job.id, "outputs": refs}, b"".join(inline) if inline else None)

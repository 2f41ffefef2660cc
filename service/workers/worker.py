"""The model worker process: receives requests from the frontends, batches and runs them, answers.

Threads: a receiver per frontend connection that reads its frames and queues requests in the dynamic
batcher, and the compute loop (the main thread) that executes batches and sends every answer,
heartbeats included, so a stuck compute loop shows as missing heartbeats. The parent's pipe is the
primary connection (control, heartbeats, stats); extra frontend processes connect through the
listening socket the parent gave, each naming its own shared-memory arena first. When the parent
dies its pipe closes and the worker exits: no orphans.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
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
from service.workers.runtime import Item, ModelRuntime
from service.workers.shm import attach

log = logging.getLogger("trtserve.worker")
STATS_INTERVAL_S = 0.1


@dataclass(frozen=True)
class WorkerOptions:
    """Server settings a worker needs; passed once at spawn."""

    intra_op_threads: int = 0
    intra_op_spinning: bool = False
    engine_cache_dir: Path | None = None
    log_level: str = "INFO"
    default_policy: EnginePolicy = field(default_factory=EnginePolicy)


class _Channel:
    """One frontend's connection and its shared-memory arena; written from several threads."""

    def __init__(self, conn: Connection, shm: SharedMemory, primary: bool) -> None:
        self.conn = conn
        self.shm = shm  # referenced for as long as requests may hold views of its buffer
        self.buf = shm.buf
        self.primary = primary
        self._lock = threading.Lock()

    def send(self, header: dict[str, Any], payload: bytes | None = None) -> None:
        frame = protocol.encode(header, payload)
        with self._lock:
            try:
                self.conn.send_bytes(frame)
            except OSError:
                if self.primary:
                    raise
                # An extra frontend went away; its requests have nobody left to answer.

    def error(self, request_id: int, exc: ServeError) -> None:
        self.send({"op": protocol.ERROR, "id": request_id, "error": exc.to_wire()})


@dataclass
class _Job:
    """One request as the worker holds it: the frontend's header, its input views, where to answer."""

    id: int
    header: dict[str, Any]
    rows: int
    inputs: dict[str, np.ndarray]
    channel: _Channel


def main(spec: ModelSpec, options: WorkerOptions, conn: Connection, arena_name: str,
         listener: socket.socket | None = None) -> None:
    """Entry point of the spawned process."""
    # The parent handles Ctrl-C and SIGTERM (also when sent to the whole process group) and stops its
    # workers itself, after in-flight requests finished; a dead parent closes the pipe, which ends us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=options.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s worker[{spec.name}] %(message)s")
    channel = _Channel(conn, attach(arena_name), primary=True)
    stats = WorkerStats()
    try:
        runtime = ModelRuntime(spec, options, stats)
        batcher = DynamicBatcher(BatcherSettings.for_model(spec.config))
    except ServeError as exc:
        channel.send({"op": protocol.FAILED, "error": exc.to_wire()})
        return
    except Exception as exc:  # a backend failing to load must reach the parent as a message
        log.exception("model failed to load")
        channel.send({"op": protocol.FAILED, "error": InternalError(f"{type(exc).__name__}: {exc}").to_wire()})
        return
    channel.send({"op": protocol.READY, "pid": os.getpid()})
    pings: queue.SimpleQueue[int] = queue.SimpleQueue()
    closed: queue.SimpleQueue[_Channel] = queue.SimpleQueue()
    runtime.register_shared(channel.buf)
    threading.Thread(target=_Receiver(channel, runtime, batcher, pings).run, name="receiver", daemon=True).start()
    if listener is not None:
        threading.Thread(target=_accept, args=(listener, runtime, batcher, closed), name="accept",
                         daemon=True).start()
    try:
        _compute_loop(runtime, batcher, channel, pings, stats, closed)
    finally:
        runtime.close()


def _accept(listener: socket.socket, runtime: ModelRuntime, batcher: DynamicBatcher,
            closed: queue.SimpleQueue[_Channel]) -> None:
    """Serve every extra frontend that connects: its first frame names its arena."""
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=_serve_connection, args=(Connection(sock.detach()), runtime, batcher, closed),
                         name="receiver", daemon=True).start()


def _serve_connection(conn: Connection, runtime: ModelRuntime, batcher: DynamicBatcher,
                      closed: queue.SimpleQueue[_Channel]) -> None:
    try:
        header, _ = protocol.decode(conn.recv_bytes())
        shm = attach(str(header["arena"]))
    except (EOFError, OSError, KeyError, ValueError) as exc:
        log.warning("frontend connection refused: %s", exc)
        conn.close()
        return
    channel = _Channel(conn, shm, primary=False)
    runtime.register_shared(channel.buf)
    _Receiver(channel, runtime, batcher, None).run()
    closed.put(channel)  # its arena is unpinned by the compute loop, between batches


class _Receiver:
    """Reads one connection's frames and turns them into queued requests, cancellations and (from the
    parent only) pings and the stop."""

    def __init__(self, channel: _Channel, runtime: ModelRuntime, batcher: DynamicBatcher,
                 pings: queue.SimpleQueue[int] | None) -> None:
        self.channel, self.runtime, self.batcher, self.pings = channel, runtime, batcher, pings
        self.buf = channel.buf
        self.batched = runtime.spec.max_batch_size > 0

    def run(self) -> None:
        while True:
            try:
                header, _ = protocol.decode(self.channel.conn.recv_bytes())
            except (EOFError, OSError):
                if self.channel.primary:
                    os._exit(0)  # the parent is gone; nobody is left to answer
                self.channel.conn.close()  # an extra frontend left; its queued requests answer into the void
                return
            op = header.get("op")
            if op == protocol.STOP and self.channel.primary:
                self.batcher.close()
                return
            if op == protocol.PING and self.pings is not None:
                self.pings.put(int(header["id"]))
                self.batcher.poke()
            elif op == protocol.CANCEL:
                cancelled = self.batcher.cancel(
                    lambda r, i=int(header["id"]): r.payload.id == i and r.payload.channel is self.channel)
                for req in cancelled:
                    self.channel.error(req.payload.id, Cancelled("request cancelled while queued"))
            elif op == protocol.INFER:
                self._infer(header)

    def _infer(self, header: dict[str, Any]) -> None:
        request_id = int(header["id"])
        try:
            refs = [protocol.TensorRef.from_json(item) for item in header["inputs"]]
            inputs = {r.name: tensors.to_array(r.datatype, r.shape, self.buf[r.offset:r.offset + r.nbytes],
                                               name=r.name) for r in refs}
            rows = refs[0].shape[0] if self.batched and refs else 1
            job = _Job(request_id, header, rows, inputs, self.channel)
            if rows == 0:  # an empty batch needs no engine
                _reply(self.runtime.spec, job, self.runtime.empty_outputs())
                return
            timeout = header.get("timeout_s")
            deadline = time.monotonic() + float(timeout) if timeout is not None else None
            self.batcher.submit(QueuedRequest(rows=rows, deadline=deadline, payload=job))
        except ServeError as exc:
            self.channel.error(request_id, exc)


def _compute_loop(runtime: ModelRuntime, batcher: DynamicBatcher, channel: _Channel,
                  pings: queue.SimpleQueue[int], stats: WorkerStats, closed: queue.SimpleQueue[_Channel]) -> None:
    last_stats = 0.0
    while not batcher.closed or batcher.queued_requests:
        batch = batcher.next_batch(timeout=STATS_INTERVAL_S)
        while not closed.empty():
            runtime.unregister_shared(closed.get().buf)
        while not pings.empty():
            channel.send({"op": protocol.PONG, "id": pings.get()})
        for req in batch.expired:
            req.payload.channel.error(req.payload.id, DeadlineExceeded("deadline passed while the request was queued"))
        if batch.requests:
            _execute(runtime, batch.requests, stats)
        now = time.monotonic()
        if now - last_stats >= STATS_INTERVAL_S:
            runtime.refresh_gauges()
            if report := stats.drain():
                channel.send({"op": protocol.STATS, "stats": report})
            last_stats = now


def _execute(runtime: ModelRuntime, requests: tuple[QueuedRequest, ...], stats: WorkerStats) -> None:
    jobs: list[_Job] = [r.payload for r in requests]
    started = time.monotonic()
    items = [Item(job.rows, job.inputs, queued_s=started - r.enqueued_at) for job, r in zip(jobs, requests)]
    try:
        executions = runtime.run(items)
    except ServeError as exc:
        for job in jobs:
            job.channel.error(job.id, exc)
        return
    except Exception as exc:  # an engine failure fails this batch, not the worker
        log.exception("batch of %d requests failed", len(jobs))
        for job in jobs:
            job.channel.error(job.id, InternalError(f"inference failed: {type(exc).__name__}: {exc}"))
        return
    t0 = time.perf_counter()
    for job, item in zip(jobs, items):
        if item.error is not None:
            job.channel.error(job.id, item.error)
        else:
            _reply(runtime.spec, job, item.outputs)
        job.inputs = {}  # drop views of the parent's block once answered
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

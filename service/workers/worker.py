"""The model worker process: receives requests from the parent, runs them, answers.

Two threads: a receiver that reads frames from the parent's pipe and queues work, and the compute loop
(the main thread) that runs it and sends every answer, heartbeats included, so a stuck compute loop shows
as missing heartbeats. When the parent dies the pipe closes and the worker exits: no orphans.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from service import tensors
from service.errors import InternalError, ServeError
from service.repository import ModelSpec
from service.workers import protocol
from service.workers.runtime import ModelRuntime
from service.workers.shm import attach

log = logging.getLogger("trtserve.worker")


@dataclass(frozen=True)
class WorkerOptions:
    """Server settings a worker needs; passed once at spawn."""

    intra_op_threads: int = 0
    engine_cache_dir: Path | None = None
    log_level: str = "INFO"


@dataclass
class _Job:
    id: int
    header: dict[str, Any]


def main(spec: ModelSpec, options: WorkerOptions, conn: Connection, arena_name: str) -> None:
    """Entry point of the spawned process."""
    # The parent handles Ctrl-C and SIGTERM (also when sent to the whole process group) and stops its
    # workers itself, after in-flight requests finished; a dead parent closes the pipe, which ends us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=options.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s worker[{spec.name}] %(message)s")
    shm = attach(arena_name)
    try:
        runtime = ModelRuntime(spec, options)
    except ServeError as exc:
        protocol.send(conn, {"op": protocol.FAILED, "error": exc.to_wire()})
        return
    except Exception as exc:  # a backend failing to load must reach the parent as a message
        log.exception("model failed to load")
        protocol.send(conn, {"op": protocol.FAILED, "error": InternalError(f"{type(exc).__name__}: {exc}").to_wire()})
        return
    protocol.send(conn, {"op": protocol.READY, "pid": os.getpid()})
    jobs: queue.Queue[_Job | None] = queue.Queue()
    threading.Thread(target=_receive, args=(conn, jobs), name="receiver", daemon=True).start()
    try:
        _compute_loop(runtime, conn, shm.buf, jobs)
    finally:
        runtime.close()
        shm.close()


def _receive(conn: Connection, jobs: queue.Queue[_Job | None]) -> None:
    while True:
        try:
            header, _ = protocol.recv(conn)
        except (EOFError, OSError):
            os._exit(0)  # the parent is gone; nobody is left to answer
        op = header.get("op")
        if op == protocol.STOP:
            jobs.put(None)
            return
        jobs.put(_Job(int(header.get("id", 0)), header))


def _compute_loop(runtime: ModelRuntime, conn: Connection, buf: memoryview, jobs: queue.Queue[_Job | None]) -> None:
    while (job := jobs.get()) is not None:
        op = job.header.get("op")
        if op == protocol.PING:
            protocol.send(conn, {"op": protocol.PONG, "id": job.id})
        elif op == protocol.INFER:
            _infer(runtime, conn, buf, job)


def _infer(runtime: ModelRuntime, conn: Connection, buf: memoryview, job: _Job) -> None:
    header = job.header
    started = time.perf_counter()
    try:
        refs = [protocol.TensorRef.from_json(item) for item in header["inputs"]]
        inputs = {
            ref.name: tensors.to_array(ref.datatype, ref.shape, buf[ref.offset:ref.offset + ref.nbytes])
            for ref in refs
        }
        outputs = runtime.execute(inputs, header["outputs"])
        out_refs, payload = _write_outputs(runtime.spec, outputs, buf, header["out_offset"], header["out_nbytes"])
    except ServeError as exc:
        protocol.send(conn, {"op": protocol.ERROR, "id": job.id, "error": exc.to_wire()})
        return
    except Exception as exc:  # an engine failure fails this request, not the worker
        log.exception("inference failed")
        err = InternalError(f"inference failed: {type(exc).__name__}: {exc}")
        protocol.send(conn, {"op": protocol.ERROR, "id": job.id, "error": err.to_wire()})
        return
    finally:
        inputs = None  # drop views of the parent's block before answering
    protocol.send(conn, {"op": protocol.RESULT, "id": job.id, "outputs": [r.to_json() for r in out_refs],
                         "compute_s": time.perf_counter() - started}, payload)


def _write_outputs(spec: ModelSpec, outputs: dict[str, np.ndarray], buf: memoryview, offset: int,
                   room: int) -> tuple[list[protocol.TensorRef], bytes | None]:
    """Copy outputs into the request's block; what does not fit travels inline."""
    datatypes = {t.name: t.datatype for t in spec.outputs}
    refs: list[protocol.TensorRef] = []
    inline: list[bytes] = []
    inline_size = 0
    cursor = offset
    for name, array in outputs.items():
        raw = memoryview(tensors.to_raw(array, datatypes[name])).cast("B")
        n = raw.nbytes
        if cursor + n <= offset + room:
            buf[cursor:cursor + n] = raw
            refs.append(protocol.TensorRef(name, datatypes[name], tuple(array.shape), cursor, n))
            cursor += n
        else:
            refs.append(protocol.TensorRef(name, datatypes[name], tuple(array.shape), inline_size, n, inline=True))
            inline.append(bytes(raw))
            inline_size += n
    return refs, (b"".join(inline) if inline else None)

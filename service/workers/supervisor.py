"""The parent's handle on one model worker: spawn with a ready handshake, send requests, supervise.

A worker death fails that worker's in-flight requests at once with UNAVAILABLE, marks the model not
ready and respawns the worker with exponential backoff. Every shared-memory block a request took is
returned, also when the caller gave up (cancelled) while the worker was still writing into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from service.datatypes import element_size
from service.errors import ConfigError, ResourceExhausted, ServeError, Unavailable
from service.repository import ModelSpec
from service.tensors import WireTensor
from service.workers import protocol, worker
from service.workers.shm import Arena

log = logging.getLogger("trtserve.supervisor")


@dataclass(frozen=True)
class SupervisorSettings:
    """How workers are started and restarted."""

    shm_bytes: int = 64 << 20
    start_timeout_s: float = 120.0
    shm_wait_s: float = 10.0
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 30.0
    heartbeat_interval_s: float = 2.0
    hang_timeout_s: float = 120.0  # no heartbeat answer for this long: the worker is killed and respawned
    max_inflight: int = 1024  # requests per model held at once; beyond it RESOURCE_EXHAUSTED at once


@dataclass
class _Pending:
    future: asyncio.Future[tuple[dict[str, Any], memoryview]]
    offset: int
    nbytes: int
    abandoned: bool = False


class WorkerHandle:
    """One model's worker process, seen from the event loop of the parent."""

    def __init__(self, spec: ModelSpec, options: worker.WorkerOptions, settings: SupervisorSettings,
                 on_ready_change: Callable[[str, bool], None] = lambda name, ready: None,
                 on_stats: Callable[[str, dict[str, Any]], None] = lambda name, stats: None,
                 on_restart: Callable[[str], None] = lambda name: None) -> None:
        self.spec = spec
        self._options = options
        self._settings = settings
        self._on_ready_change = on_ready_change
        self._on_stats = on_stats
        self._on_restart = on_restart
        self._ctx = multiprocessing.get_context("spawn")
        self._arena: Arena | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._handshake: asyncio.Future[dict[str, Any]] | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._heartbeat: asyncio.Task[None] | None = None
        self._last_pong = 0.0
        self._inflight = 0
        self.ready = False
        self.restarts = 0
        self.pid: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Spawn the worker and wait until its engine is loaded; raises if it fails to load."""
        if self._arena is None:
            self._arena = Arena(self._settings.shm_bytes)
        loop = asyncio.get_running_loop()
        parent_sock, child_sock = socket.socketpair()
        try:
            # The parent's end lives on the event loop: writes are buffered, never blocking the loop. It is
            # opened before the spawn so that no await lies between spawning the worker and registering it
            # below: a cancel there (stop() during a respawn) left a worker unknown to this handle, whose
            # process handle (two pipe fds) was never closed.
            reader, writer = await asyncio.open_unix_connection(sock=parent_sock)
        except BaseException:
            child_sock.close()
            raise
        child_conn = Connection(child_sock.detach())  # the worker keeps the blocking Connection API
        process = self._ctx.Process(
            target=worker.main, args=(self.spec, self._options, child_conn, self._arena.name),
            name=f"trtserve-worker-{self.spec.name}", daemon=True,
        )
        self._handshake = loop.create_future()
        process.start()
        child_conn.close()
        self._process, self.pid, self._writer = process, process.pid, writer
        self._reader_task = loop.create_task(self._read_frames(reader))
        self._started_at = time.monotonic()
        loop.add_reader(process.sentinel, self._on_exit, process)
        try:
            async with asyncio.timeout(self._settings.start_timeout_s):
                hello = await self._handshake
        except TimeoutError:
            await self._kill()
            raise Unavailable(f"model '{self.spec.name}': worker did not become ready within "
                              f"{self._settings.start_timeout_s:.0f}s") from None
        except ServeError:
            await self._kill()
            raise
        log.info("model %s version %d ready in worker pid %s", self.spec.name, self.spec.version, hello.get("pid"))
        self._last_pong = time.monotonic()
        self._heartbeat = loop.create_task(self._watch(process))
        self._set_ready(True)

    async def _watch(self, process: multiprocessing.process.BaseProcess) -> None:
        """Heartbeats, answered by the worker's compute loop: a worker silent for too long is killed
        (its exit then fails its requests and respawns it, like any crash)."""
        ids = itertools.count(1)
        while process is self._process and process.is_alive():
            await asyncio.sleep(self._settings.heartbeat_interval_s)
            silent = time.monotonic() - self._last_pong
            if silent > self._settings.hang_timeout_s:
                log.error("model %s: worker pid %s answered no heartbeat for %.0fs; killing it",
                          self.spec.name, process.pid, silent)
                process.kill()
                return
            self._send_quietly({"op": protocol.PING, "id": next(ids)})

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the worker (graceful, then SIGKILL) and remove its shared memory."""
        self._stopping = True
        for task in (self._restart_task, self._heartbeat):
            if task is not None:
                task.cancel()
        self._set_ready(False)
        process = self._process
        try:
            if process is not None and process.is_alive():
                self._send_quietly({"op": protocol.STOP})
                await asyncio.get_running_loop().run_in_executor(None, process.join, timeout_s)
        finally:  # a cancelled caller (a client's deadline on unload) cuts only the graceful wait short
            await self._kill()
            if process is not None:
                # The exit handler may have run while this join was reaping the child and so seen no exit
                # code yet; close the handle here too, or its pipe fds wait for garbage collection.
                with contextlib.suppress(ValueError):  # ValueError: the exit handler closed it already
                    process.join()
                    process.close()
            if self._arena is not None:
                self._arena.close()
                self._arena = None

    async def _kill(self) -> None:
        process = self._process
        if process is None:
            return
        if process.is_alive():
            process.kill()
        await asyncio.get_running_loop().run_in_executor(None, process.join, 5)
        self._detach(process)
        self._fail_pending(Unavailable(f"model '{self.spec.name}' worker stopped"))

    def _detach(self, process: multiprocessing.process.BaseProcess) -> None:
        """Stop watching an exited (or killed) worker, close our end of its pipe and its process handle."""
        try:
            asyncio.get_running_loop().remove_reader(process.sentinel)
        except ValueError:
            return  # already detached and closed
        if process is self._process:
            self._reader_task.cancel()
            self._writer.close()
            self._writer = None
            self._process = None
        if process.exitcode is not None:
            process.close()  # releases its pipe fds now rather than at garbage collection

    def _on_exit(self, process: multiprocessing.process.BaseProcess) -> None:
        process.join(1)  # the sentinel fired: the process has exited, reaping it is immediate
        code, pid = process.exitcode, process.pid
        self._detach(process)
        err = Unavailable(f"model '{self.spec.name}': worker exited (code {code}); restarting")
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(Unavailable(f"model '{self.spec.name}': worker exited (code {code}) "
                                                      "while loading"))
        self._fail_pending(err)
        if self._stopping or not self.ready:
            return
        log.error("model %s: worker pid %s exited with code %s", self.spec.name, pid, code)
        self._set_ready(False)
        self._restart_task = asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        delay = self._settings.restart_backoff_s
        if time.monotonic() - self._started_at < 60:
            delay = min(delay * 2 ** min(self.restarts, 16), self._settings.restart_backoff_max_s)
        else:
            self.restarts = 0
        while not self._stopping:
            await asyncio.sleep(delay)
            self.restarts += 1
            self._on_restart(self.spec.name)
            try:
                await self.start()
                return
            except ServeError as exc:
                log.error("model %s: restart failed: %s", self.spec.name, exc.message)
                delay = min(delay * 2, self._settings.restart_backoff_max_s)

    def _set_ready(self, ready: bool) -> None:
        if ready != self.ready:
            self.ready = ready
            self._on_ready_change(self.spec.name, ready)

    def _fail_pending(self, err: ServeError) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if p.abandoned:
                self._arena.free(p.offset, p.nbytes)
            elif not p.future.done():
                p.future.set_exception(err)

    # -- messages ----------------------------------------------------------------------------
    async def _read_frames(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                self._dispatch(*protocol.decode(await protocol.read_framed(reader)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the sentinel reports the exit

    def _dispatch(self, header: dict[str, Any], payload: memoryview) -> None:
        op = header.get("op")
        if op == protocol.READY or op == protocol.FAILED:
            if self._handshake is not None and not self._handshake.done():
                if op == protocol.READY:
                    self._handshake.set_result(header)
                else:
                    err = ServeError.from_wire(header["error"])
                    self._handshake.set_exception(ConfigError(err.message) if err.code == "INVALID_ARGUMENT" else err)
        elif op == protocol.PONG:
            self._last_pong = time.monotonic()
        elif op == protocol.STATS:
            self._on_stats(self.spec.name, header)
        elif (p := self._pending.pop(int(header.get("id", -1)), None)) is not None:
            if p.abandoned:
                self._arena.free(p.offset, p.nbytes)
            elif not p.future.done():
                p.future.set_result((header, payload))

    # -- requests ----------------------------------------------------------------------------
    async def infer(self, inputs: list[WireTensor], output_names: list[str],
                    timeout_s: float | None = None) -> list[WireTensor]:
        """Run one request in the worker. `timeout_s` (the client's deadline) bounds its time in the queue."""
        if not self.ready or self._writer is None:
            raise Unavailable(f"model '{self.spec.name}' is not ready")
        if self._inflight >= self._settings.max_inflight:
            raise ResourceExhausted(f"model '{self.spec.name}' has {self._inflight} requests in flight, the limit "
                                    "(--max-inflight-per-model); retry later")
        self._inflight += 1
        try:
            return await self._infer(inputs, output_names, timeout_s)
        finally:
            self._inflight -= 1

    async def _infer(self, inputs: list[WireTensor], output_names: list[str],
                     timeout_s: float | None) -> list[WireTensor]:
        arena = self._arena
        in_bytes = sum(_nbytes(t.data) for t in inputs)
        out_bytes = self._output_bytes(inputs, output_names)
        nbytes = in_bytes + out_bytes
        offset = await arena.alloc(nbytes, self._settings.shm_wait_s)
        owned = True  # False once the block is handed to the worker's answer (cancelled caller)
        request_id = next(self._ids)
        try:
            refs, cursor = [], offset
            for t in inputs:
                n = _nbytes(t.data)
                arena.buf[cursor:cursor + n] = t.data
                refs.append(protocol.TensorRef(t.name, t.datatype, tuple(t.shape), cursor, n).to_json())
                cursor += n
            if not self.ready or self._writer is None:  # died while we waited for shared memory
                raise Unavailable(f"model '{self.spec.name}' is not ready")
            pending = _Pending(asyncio.get_running_loop().create_future(), offset, nbytes)
            self._pending[request_id] = pending
            self._writer.write(protocol.framed({"op": protocol.INFER, "id": request_id, "inputs": refs,
                                                "outputs": output_names, "out_offset": cursor,
                                                "out_nbytes": out_bytes, "timeout_s": timeout_s}))
            try:
                header, payload = await pending.future
            except asyncio.CancelledError:
                if self._pending.get(request_id) is pending:
                    pending.abandoned = True  # the worker may still write into the block
                    owned = False
                    self._send_quietly({"op": protocol.CANCEL, "id": request_id})
                raise
            if header["op"] == protocol.ERROR:
                raise ServeError.from_wire(header["error"])
            outputs = []
            for item in header["outputs"]:
                ref = protocol.TensorRef.from_json(item)
                src = payload if ref.inline else arena.buf
                outputs.append(WireTensor(ref.name, ref.datatype, ref.shape,
                                          bytes(src[ref.offset:ref.offset + ref.nbytes])))
            return outputs
        finally:
            if owned:
                arena.free(offset, nbytes)

    def _send_quietly(self, header: dict[str, Any]) -> None:
        try:
            if self._writer is not None:
                self._writer.write(protocol.framed(header))
        except (OSError, RuntimeError):
            pass  # the worker is gone; its exit fails what is pending

    def _output_bytes(self, inputs: list[WireTensor], output_names: list[str]) -> int:
        """Room for outputs whose size is known up front; the rest travels inline."""
        rows = inputs[0].shape[0] if self.spec.max_batch_size > 0 and inputs else 1
        total = 0
        for out in self.spec.outputs:
            if out.name in output_names and out.datatype != "BYTES" and all(d > 0 for d in out.dims):
                n = rows * element_size(out.datatype)
                for d in out.dims:
                    n *= d
                total += n
        return total


def _nbytes(data: bytes | memoryview) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)

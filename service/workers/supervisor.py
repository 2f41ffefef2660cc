"""The parent's handle on one model worker: spawn with a ready handshake, send requests, supervise.

A worker death fails that worker's in-flight requests at once with UNAVAILABLE (the link does), marks
the model not ready and respawns the worker with exponential backoff. With extra frontend processes,
each spawn also gets a listening Unix socket in `socket_dir` through which they reach the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from service.errors import ConfigError, ServeError, Unavailable
from service.repository import ModelSpec
from service.tensors import WireTensor
from service.workers import protocol, worker
from service.workers.link import WorkerLink
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


def _join(process: multiprocessing.process.BaseProcess, timeout_s: float) -> None:
    """Wait (in a thread) for the worker to exit. The exit handler on the event loop may have reaped and
    closed the process handle before this thread got to run: then it has exited, and the wait is over."""
    with contextlib.suppress(ValueError):  # "process object is closed"
        process.join(timeout_s)


class WorkerHandle:
    """One model's worker process, seen from the event loop of the parent."""

    def __init__(self, spec: ModelSpec, options: worker.WorkerOptions, settings: SupervisorSettings,
                 on_ready_change: Callable[[str, bool], None] = lambda name, ready: None,
                 on_stats: Callable[[str, dict[str, Any]], None] = lambda name, stats: None,
                 on_restart: Callable[[str], None] = lambda name: None,
                 socket_dir: Path | None = None) -> None:
        self.spec = spec
        self._options = options
        self._settings = settings
        self._on_ready_change = on_ready_change
        self._on_stats = on_stats
        self._on_restart = on_restart
        self._ctx = multiprocessing.get_context("spawn")
        self._arena: Arena | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._link: WorkerLink | None = None
        self._socket_dir = socket_dir
        self.socket_path: Path | None = None  # where extra frontend processes reach the running worker
        self._handshake: asyncio.Future[dict[str, Any]] | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._heartbeat: asyncio.Task[None] | None = None
        self._last_pong = 0.0
        self.ready = False
        self.restarts = 0
        self.pid: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Spawn the worker and wait until its engine is loaded; raises if it fails to load."""
        if self._arena is None:
            self._arena = Arena(self._settings.shm_bytes)
        loop = asyncio.get_running_loop()
        listener, path = self._listen()
        parent_sock, child_sock = socket.socketpair()
        try:
            # The parent's end lives on the event loop: writes are buffered, never blocking the loop. It is
            # opened before the spawn so that no await lies between spawning the worker and registering it
            # below: a cancel there (stop() during a respawn) left a worker unknown to this handle, whose
            # process handle (two pipe fds) was never closed.
            link = WorkerLink(self.spec, self._arena, shm_wait_s=self._settings.shm_wait_s,
                              max_inflight=self._settings.max_inflight, on_frame=self._control_frame)
            await link.connect(sock=parent_sock)
        except BaseException:
            child_sock.close()
            if listener is not None:
                listener.close()
            raise
        child_conn = Connection(child_sock.detach())  # the worker keeps the blocking Connection API
        process = self._ctx.Process(
            target=worker.main, args=(self.spec, self._options, child_conn, self._arena.name, listener),
            name=f"trtserve-worker-{self.spec.name}", daemon=True,
        )
        self._handshake = loop.create_future()
        try:
            process.start()
        finally:
            child_conn.close()
            if listener is not None:
                listener.close()
        self._process, self.pid, self.socket_path = process, process.pid, path
        self._link = link
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
            self._link.send({"op": protocol.PING, "id": next(ids)})

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
                self._link.send({"op": protocol.STOP})
                await asyncio.get_running_loop().run_in_executor(None, _join, process, timeout_s)
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
        await asyncio.get_running_loop().run_in_executor(None, _join, process, 5)
        self._detach(process, Unavailable(f"model '{self.spec.name}' worker stopped"))

    def _detach(self, process: multiprocessing.process.BaseProcess, err: ServeError) -> None:
        """Stop watching an exited (or killed) worker, close our end of its pipe (failing what is pending
        with `err`), its listening socket's path and its process handle."""
        try:
            asyncio.get_running_loop().remove_reader(process.sentinel)
        except ValueError:
            return  # already detached and closed
        if process is self._process:
            self._link.close(err)
            self._process = None
            if self.socket_path is not None:
                self.socket_path.unlink(missing_ok=True)
                self.socket_path = None
        if process.exitcode is not None:
            process.close()  # releases its pipe fds now rather than at garbage collection

    def _on_exit(self, process: multiprocessing.process.BaseProcess) -> None:
        process.join(1)  # the sentinel fired: the process has exited, reaping it is immediate
        code, pid = process.exitcode, process.pid
        self._detach(process, Unavailable(f"model '{self.spec.name}': worker exited (code {code}); restarting"))
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(Unavailable(f"model '{self.spec.name}': worker exited (code {code}) "
                                                      "while loading"))
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

    # -- messages ----------------------------------------------------------------------------
    def _control_frame(self, header: dict[str, Any], payload: memoryview) -> None:
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

    # -- requests ----------------------------------------------------------------------------
    async def infer(self, inputs: list[WireTensor], output_names: list[str],
                    timeout_s: float | None = None) -> list[WireTensor]:
        """Run one request in the worker. `timeout_s` (the client's deadline) bounds its time in the queue."""
        if not self.ready or self._link is None:
            raise Unavailable(f"model '{self.spec.name}' is not ready")
        return await self._link.infer(inputs, output_names, timeout_s)

    def _listen(self) -> tuple[socket.socket | None, Path | None]:
        """A listening Unix socket for extra frontend processes (none when there are none)."""
        if self._socket_dir is None:
            return None, None
        # Unique per spawn (a replaced worker may still drain on its own); short: Unix socket paths
        # are limited to 107 bytes, model names are not.
        path = self._socket_dir / f"worker-{uuid.uuid4().hex[:16]}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        return listener, path

"""The parent's side of the extra frontend processes (`--frontend-processes N` starts N-1 of them).

One Python process parses gRPC messages on about one core: ~3,500 requests/s on the H200 machine,
whatever the model (bench/results/gpu/analysis.md). Extra frontends bind the same port (SO_REUSEPORT:
the kernel spreads connections over the processes) and talk to the workers directly. The parent
spawns them, tells each where every ready worker listens (a route), applies the request metrics they
report, and respawns one that dies (its shared memory removed, its pending count taken back).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import pickle
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.frontend import replica
from service.metrics import ServerMetrics
from service.repository import ModelSpec
from service.settings import ServerSettings
from service.workers import protocol
from service.workers.shm import remove_segments_of

log = logging.getLogger("trtserve.frontend")
START_TIMEOUT_S = 60.0
ACK_TIMEOUT_S = 5.0
RESPAWN_DELAY_S = 1.0

Routes = dict[str, tuple[ModelSpec, Path]]  # model name -> (spec, the worker's socket path)


@dataclass(eq=False)
class _Replica:
    index: int
    process: multiprocessing.process.BaseProcess
    writer: asyncio.StreamWriter
    ready: asyncio.Future[None]
    exited: asyncio.Future[None]
    reader: asyncio.Task[None] | None = None
    sent: dict[str, Path] = field(default_factory=dict)  # the routes it was given
    pending: dict[tuple[str, str], int] = field(default_factory=dict)  # requests in flight it reported
    acks: dict[int, asyncio.Future[None]] = field(default_factory=dict)

    def send(self, header: dict[str, Any], payload: bytes | None = None) -> None:
        with contextlib.suppress(OSError, RuntimeError):  # a dead replica's exit is handled by its sentinel
            self.writer.write(protocol.framed(header, payload))


class FrontendReplicas:
    """Spawns and supervises the extra frontend processes and keeps their routes current."""

    def __init__(self, settings: ServerSettings, grpc_port: int, internal_address: str, metrics: ServerMetrics,
                 shm_wait_s: float) -> None:
        self._settings = settings
        self._port = grpc_port
        self._internal = internal_address
        self._metrics = metrics
        self._shm_wait_s = shm_wait_s
        self._ctx = multiprocessing.get_context("spawn")
        self._replicas: list[_Replica] = []
        self._routes: Routes = {}
        self._seq = itertools.count(1)
        self._stopping = False
        self._respawns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Start every extra frontend and wait until each serves the port."""
        await asyncio.gather(*(self._spawn(i) for i in range(1, self._settings.frontend_processes)))

    async def publish(self, routes: Routes) -> None:
        """Give every frontend the current routes; returns once each applied them (or after a timeout),
        so a worker that was replaced can be stopped without a frontend still sending to it."""
        self._routes = dict(routes)
        acks = [self._sync(r) for r in self._replicas if r.ready.done()]
        if acks:
            await asyncio.wait(acks, timeout=ACK_TIMEOUT_S)

    def _sync(self, rep: _Replica) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        for name in [n for n in rep.sent if n not in self._routes]:
            del rep.sent[name]
            rep.send({"op": "unroute", "model": name})
        for name, (spec, path) in self._routes.items():
            if rep.sent.get(name) != path:
                rep.sent[name] = path
                rep.send({"op": "route", "model": name, "socket": str(path)}, pickle.dumps(spec))
        seq = next(self._seq)
        ack = rep.acks[seq] = loop.create_future()
        rep.send({"op": "sync", "seq": seq})
        return ack

    async def _spawn(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        parent_sock, child_sock = socket.socketpair()
        try:
            reader, writer = await asyncio.open_unix_connection(sock=parent_sock)
            process = self._ctx.Process(
                target=replica.main, name=f"trtserve-frontend-{index}", daemon=True,
                args=(self._settings, self._port, self._internal, child_sock, index, self._shm_wait_s))
            process.start()
        finally:
            child_sock.close()
        rep = _Replica(index, process, writer, loop.create_future(), loop.create_future())
        rep.reader = loop.create_task(self._read(rep, reader))
        self._replicas.append(rep)
        loop.add_reader(process.sentinel, self._on_exit, rep)
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await rep.ready
        except TimeoutError:
            process.kill()
            raise OSError(f"frontend process {index} did not start serving within {START_TIMEOUT_S:.0f}s") from None
        self._sync(rep)
        log.info("frontend process %d serving (pid %d)", index, process.pid)

    async def _read(self, rep: _Replica, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                header, _ = protocol.decode(await protocol.read_framed(reader))
                op = header.get("op")
                if op == "requests":
                    self._apply(rep, header)
                elif op == "ack" and (ack := rep.acks.pop(int(header["seq"]), None)) is not None:
                    ack.set_result(None)
                elif op == "ready" and not rep.ready.done():
                    rep.ready.set_result(None)

    def _apply(self, rep: _Replica, report: dict[str, Any]) -> None:
        for model, version, status, seconds, rows in report["records"]:
            self._metrics.observe_request(model, version, status, float(seconds), int(rows))
        for model, version, delta in report["pending"]:
            self._metrics.add_pending(model, version, int(delta))
            rep.pending[(model, version)] = rep.pending.get((model, version), 0) + int(delta)

    def _on_exit(self, rep: _Replica) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(rep.process.sentinel)
        rep.process.join(1)
        code, pid = rep.process.exitcode, rep.process.pid
        rep.process.close()
        rep.reader.cancel()
        rep.writer.close()
        self._replicas.remove(rep)
        for (model, version), n in rep.pending.items():  # its requests in flight died with it
            if n:
                self._metrics.add_pending(model, version, -n)
        for ack in rep.acks.values():
            if not ack.done():
                ack.set_result(None)
        if not rep.ready.done():
            rep.ready.set_exception(OSError(f"frontend process {rep.index} exited (code {code}) while starting"))
        removed = remove_segments_of(pid)
        rep.exited.set_result(None)
        if self._stopping:
            return
        log.error("frontend process %d (pid %d) exited with code %s (%d shared-memory segments removed); "
                  "restarting", rep.index, pid, code, removed)
        task = loop.create_task(self._respawn(rep.index))
        self._respawns.add(task)
        task.add_done_callback(self._respawns.discard)

    async def _respawn(self, index: int) -> None:
        while not self._stopping:
            await asyncio.sleep(RESPAWN_DELAY_S)
            try:
                await self._spawn(index)
                return
            except OSError as exc:
                log.error("frontend process %d: restart failed: %s", index, exc)

    async def stop(self, grace_s: float) -> None:
        """Stop every extra frontend: each stops taking calls and lets in-flight ones finish within `grace_s`."""
        self._stopping = True
        for task in self._respawns:
            task.cancel()
        replicas = list(self._replicas)
        for rep in replicas:
            rep.send({"op": "stop", "grace_s": grace_s})
        if replicas:
            await asyncio.wait([r.exited for r in replicas], timeout=grace_s + 5)
        for rep in replicas:
            if not rep.exited.done():
                log.error("frontend process %d did not stop in time; killing it", rep.index)
                rep.process.kill()
                await asyncio.wait([rep.exited], timeout=5)

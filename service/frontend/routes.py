"""What an extra frontend process knows of the models: a route to each ready worker, and the
request metrics it owes the parent.

The parent pushes a route (model spec, the worker's socket path) whenever a worker becomes ready
and withdraws it on unload. A route connects lazily, with its own shared-memory arena, and keeps
serving requests already sent when a newer route replaces it (a reload): the old worker drains.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from service.errors import Unavailable
from service.repository import ModelSpec
from service.tensors import WireTensor
from service.workers.link import WorkerLink
from service.workers.shm import Arena


class Route:
    """One worker of one model as seen from an extra frontend; owns its connection and arena."""

    def __init__(self, spec: ModelSpec, socket_path: Path, table: RouteTable) -> None:
        self.spec = spec
        self.socket_path = socket_path
        self._table = table
        self._link: WorkerLink | None = None
        self._connecting: asyncio.Task[WorkerLink] | None = None
        self._arena: Arena | None = None

    async def infer(self, inputs: list[WireTensor], output_names: list[str],
                    timeout_s: float | None = None) -> list[WireTensor]:
        """Run a request on this route's worker; once more on a newer route if this one's worker was
        replaced (a reload stopping the old worker refuses what it had not queued yet)."""
        try:
            return await (await self._connected()).infer(inputs, output_names, timeout_s)
        except Unavailable:
            newer = self._table.route(self.spec.name)
            if newer is None or newer is self:
                raise
            return await (await newer._connected()).infer(inputs, output_names, timeout_s)

    async def _connected(self) -> WorkerLink:
        if self._link is not None:
            if not self._link.alive:
                raise Unavailable(f"model '{self.spec.name}' is not ready (worker restarting)")
            return self._link
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> WorkerLink:
        table = self._table
        arena = Arena(table.shm_bytes)
        link = WorkerLink(self.spec, arena, shm_wait_s=table.shm_wait_s, max_inflight=table.max_inflight)
        try:
            await link.connect(path=str(self.socket_path))
        except OSError as exc:
            arena.close()
            self._connecting = None  # the next request tries again
            raise Unavailable(f"model '{self.spec.name}' is not reachable: {exc}") from None
        link.send({"op": "hello", "arena": arena.name})  # the first frame: the worker attaches the arena
        self._arena, self._link = arena, link
        return link

    async def retire(self) -> None:
        """Let requests in flight finish (the worker answers them, or its exit fails them), then free
        the arena."""
        if self._connecting is not None:
            try:
                await self._connecting
            except Unavailable:
                pass
        if self._link is not None:
            await self._link.closed
        if self._arena is not None:
            self._arena.close()

    def close(self) -> None:
        """Drop the connection now (the process is stopping) and remove the arena."""
        if self._link is not None:
            self._link.close(Unavailable(f"model '{self.spec.name}': frontend stopping"))
        if self._arena is not None:
            self._arena.close()


class RouteTable:
    """The routes of one extra frontend, by model name."""

    def __init__(self, shm_bytes: int, shm_wait_s: float, max_inflight: int) -> None:
        self.shm_bytes, self.shm_wait_s, self.max_inflight = shm_bytes, shm_wait_s, max_inflight
        self._routes: dict[str, Route] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    def route(self, name: str, version: str = "") -> Route | None:
        """The current route of `name` (and `version`, when given), or None: the parent answers then."""
        route = self._routes.get(name)
        if route is None or (version and version != str(route.spec.version)):
            return None
        return route

    def get(self, name: str, version: str = "") -> Route:
        route = self.route(name, version)
        if route is None:
            raise Unavailable(f"model '{name}' has no route in this frontend")
        return route

    def set(self, spec: ModelSpec, socket_path: Path) -> None:
        """Install the route to a newly ready worker; the previous one drains in the background."""
        old = self._routes.get(spec.name)
        if old is not None and old.socket_path == socket_path:
            return
        self._routes[spec.name] = Route(spec, socket_path, self)
        if old is not None:
            self._retire(old)

    def remove(self, name: str) -> None:
        if (old := self._routes.pop(name, None)) is not None:
            self._retire(old)

    def _retire(self, route: Route) -> None:
        task = asyncio.get_running_loop().create_task(route.retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def close(self) -> None:
        for task in self._retiring:
            task.cancel()
        for route in self._routes.values():
            route.close()
        self._routes.clear()


class RequestRecorder:
    """Collects the per-request metric events of an extra frontend until they are sent to the parent."""

    def __init__(self) -> None:
        self._records: list[list[Any]] = []
        self._pending: dict[tuple[str, str], int] = {}

    def observe_request(self, model: str, version: int | str, status: str, seconds: float, rows: int) -> None:
        self._records.append([model, str(version), status, seconds, rows])

    def add_pending(self, model: str, version: int | str, delta: int) -> None:
        key = (model, str(version))
        self._pending[key] = self._pending.get(key, 0) + delta

    def drain(self) -> dict[str, Any] | None:
        """The events since the last drain as one report (None when there are none)."""
        pending = [[m, v, d] for (m, v), d in self._pending.items() if d]
        if not self._records and not pending:
            return None
        report = {"op": "requests", "records": self._records, "pending": pending}
        self._records, self._pending = [], {}
        return report

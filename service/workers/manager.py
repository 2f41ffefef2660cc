"""Which models are loaded, in which worker, and in what state (the model lifecycle)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from service.errors import FailedPrecondition, NotFound, ServeError, Unavailable
from service.metrics import ServerMetrics
from service.repository import ModelRepository, ModelSpec
from service.workers.supervisor import SupervisorSettings, WorkerHandle
from service.workers.worker import WorkerOptions

log = logging.getLogger("trtserve.models")


@dataclass
class ModelState:
    """What RepositoryIndex reports for one model."""

    name: str
    version: str
    state: str  # READY, LOADING, UNAVAILABLE, UNLOADING
    reason: str = ""


class ModelManager:
    """Loads and unloads models, each into its own supervised worker process."""

    def __init__(self, repository: ModelRepository, options: WorkerOptions, settings: SupervisorSettings,
                 metrics: ServerMetrics, on_ready_change: Callable[[], None] = lambda: None,
                 socket_dir: Path | None = None,
                 on_routes_change: Callable[[], Awaitable[None]] | None = None) -> None:
        """`socket_dir`: where workers listen for extra frontend processes (None: there are none);
        `on_routes_change` is awaited when a worker replaces another or is unloaded, before the old one stops."""
        self.repository = repository
        self._options = options
        self._settings = settings
        self._metrics = metrics
        self._on_ready_change = on_ready_change
        self._socket_dir = socket_dir
        self._on_routes_change = on_routes_change
        self._workers: dict[str, WorkerHandle] = {}
        self._states: dict[str, ModelState] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def load(self, name: str) -> None:
        """Load (or reload) a model; the old worker keeps serving until the new one is ready."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            try:
                spec = self.repository.load_spec(name)
            except ServeError as exc:
                if name not in self._workers:  # a loaded version keeps serving when a reload fails
                    self._states[name] = ModelState(name, "", "UNAVAILABLE", exc.message)
                raise
            self._states[name] = ModelState(name, str(spec.version), "LOADING")
            self._metrics.register_model(spec.name, spec.version)
            handle = WorkerHandle(
                spec, self._options, self._settings,
                on_ready_change=lambda _, ready, s=spec: self._ready_changed(s, ready),
                on_stats=lambda _, report, s=spec: self._metrics.apply_worker_stats(s.name, s.version,
                                                                                   report["stats"]),
                on_restart=lambda _: self._metrics.worker_restarted(name),
                socket_dir=self._socket_dir,
            )
            try:
                await handle.start()
            except (ServeError, asyncio.CancelledError) as exc:
                # Failed, or the caller gave up (a client's deadline cancels this task): stop the worker,
                # which would otherwise keep loading unknown to us, with its pipes and shared memory.
                await handle.stop()
                if name in self._workers:
                    self._states[name] = ModelState(name, str(self._workers[name].spec.version), "READY")
                else:
                    reason = exc.message if isinstance(exc, ServeError) else "load cancelled"
                    self._states[name] = ModelState(name, str(spec.version), "UNAVAILABLE", reason)
                raise
            old = self._workers.get(name)
            self._workers[name] = handle
            self._states[name] = ModelState(name, str(spec.version), "READY")
            await self._routes_changed()
            if old is not None:
                await old.stop()
                if old.spec.version != spec.version:
                    self._metrics.forget_model(name, old.spec.version)
            self._on_ready_change()

    async def unload(self, name: str) -> None:
        """Stop a model's worker; NotFound when it is not loaded."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            handle = self._workers.pop(name, None)
            if handle is None:
                raise NotFound(f"model '{name}' is not loaded")
            self._states[name] = ModelState(name, str(handle.spec.version), "UNLOADING")
            try:
                await self._routes_changed()
                await handle.stop()
            finally:  # a cancelled caller (its deadline) still ends with the worker stopped: say so
                self._metrics.forget_model(name)
                self._states[name] = ModelState(name, str(handle.spec.version), "UNAVAILABLE", "unloaded")
                self._on_ready_change()

    def get(self, name: str, version: str = "") -> WorkerHandle:
        """The worker serving `name` (and `version`, when given); NotFound or Unavailable otherwise."""
        handle = self._workers.get(name)
        if handle is None:
            state = self._states.get(name)
            if state is not None and state.state == "LOADING":
                raise Unavailable(f"model '{name}' is loading")
            raise NotFound(f"model '{name}' is not loaded" if name in self._states
                           else f"unknown model '{name}'")
        if version and version != str(handle.spec.version):
            raise NotFound(f"model '{name}' has no version '{version}' loaded; "
                           f"loaded version: {handle.spec.version}")
        return handle

    def spec(self, name: str, version: str = "") -> ModelSpec:
        return self.get(name, version).spec

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            return self.get(name, version).ready
        except ServeError:
            return False

    def all_ready(self) -> bool:
        return all(h.ready for h in self._workers.values())

    def loaded(self) -> list[WorkerHandle]:
        return list(self._workers.values())

    @property
    def shm_wait_s(self) -> float:
        return self._settings.shm_wait_s

    def routes(self) -> dict[str, tuple[ModelSpec, Path]]:
        """Where extra frontend processes reach each ready worker: model name -> (spec, socket path)."""
        return {name: (h.spec, h.socket_path) for name, h in self._workers.items()
                if h.ready and h.socket_path is not None}

    async def _routes_changed(self) -> None:
        if self._on_routes_change is not None:
            await self._on_routes_change()

    def index(self, ready_only: bool = False) -> list[ModelState]:
        """Every model in the repository with its state, as RepositoryIndex reports it."""
        names = sorted(set(self.repository.model_names()) | set(self._states))
        states = []
        for name in names:
            state = self._states.get(name, ModelState(name, "", "UNAVAILABLE", "not loaded"))
            handle = self._workers.get(name)
            if handle is not None and not handle.ready and state.state == "READY":
                state = ModelState(name, state.version, "UNAVAILABLE", "worker restarting")
            if not ready_only or state.state == "READY":
                states.append(state)
        return states

    def _ready_changed(self, spec: ModelSpec, ready: bool) -> None:
        self._metrics.set_ready(spec.name, spec.version, ready)
        self._on_ready_change()

    async def close(self) -> None:
        """Stop every worker (in parallel) and remove their shared memory."""
        handles, self._workers = list(self._workers.values()), {}
        await asyncio.gather(*(h.stop() for h in handles), return_exceptions=True)


def require_explicit(mode: str) -> None:
    """Repository load/unload RPCs are only allowed in explicit model control mode."""
    if mode != "explicit":
        raise FailedPrecondition(
            f"model control mode is '{mode}': load and unload are disabled; "
            "start the server with --model-control-mode explicit"
        )

"""Assembles and runs the server: gRPC (inference, health, reflection), metrics HTTP, model workers.

Shutdown order on SIGTERM/SIGINT: report NOT_SERVING, stop taking new RPCs, let in-flight ones
finish within the grace period, then stop the workers and remove their shared memory; exit code 0.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from service.cpus import default_intra_op_threads
from service.engines.policy import EnginePolicy
from service.errors import ServeError
from service.frontend.errors import ErrorInterceptor
from service.frontend.health import Health
from service.frontend.ports import bind_public_port, grpc_options
from service.frontend.replicas import FrontendReplicas
from service.frontend.request_wire import service_handlers
from service.frontend.servicer import SERVICE, InferenceServicer
from service.memory.heap import keep_freed_heap
from service.metrics import MetricsEndpoint, ServerMetrics, start_http_server
from service.proto import inference_pb2
from service.proto._pool import POOL
from service.repository import ModelRepository
from service.settings import ServerSettings
from service.workers.manager import ModelManager
from service.workers.supervisor import SupervisorSettings
from service.workers.worker import WorkerOptions

log = logging.getLogger("trtserve")


@dataclass
class RunningServer:
    """A started server: the bound ports and what `shutdown` stops."""

    grpc_port: int
    metrics_port: int | None
    server: grpc.aio.Server
    manager: ModelManager
    health: Health
    metrics: ServerMetrics
    metrics_endpoint: MetricsEndpoint | None
    settings: ServerSettings
    replicas: FrontendReplicas | None = None  # the extra frontend processes, if any
    socket_dir: Path | None = None  # their internal sockets and the workers'

    async def shutdown(self) -> None:
        await self.health.shutdown()
        grace = self.settings.shutdown_grace_seconds
        await asyncio.gather(self.server.stop(grace), *([self.replicas.stop(grace)] if self.replicas else []))
        await self.manager.close()
        if self.metrics_endpoint is not None:
            await asyncio.to_thread(self.metrics_endpoint.stop)
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


async def start(settings: ServerSettings) -> RunningServer:
    """Bind the ports, start serving health at once, then load the models."""
    loop = asyncio.get_running_loop()
    metrics = ServerMetrics()
    health = Health()

    updates: set[asyncio.Task[None]] = set()  # health updates in flight (kept so they are not collected)
    replicas: FrontendReplicas | None = None
    # Private (0700) directory for the sockets between processes: the parent's internal gRPC port that
    # extra frontends forward to, and each worker's listening socket.
    socket_dir = Path(tempfile.mkdtemp(prefix="trtserve-sockets-")) if settings.frontend_processes > 1 else None

    async def publish_routes() -> None:
        if replicas is not None:
            await replicas.publish(manager.routes())

    def ready_changed() -> None:
        for coro in (health.update({h.spec.name: h.ready for h in manager.loaded()}), publish_routes()):
            task = loop.create_task(coro)
            updates.add(task)
            task.add_done_callback(updates.discard)

    intra_op_threads = settings.intra_op_threads or default_intra_op_threads()
    if intra_op_threads != settings.intra_op_threads:
        log.info("ONNX Runtime CPU threads per model: %d, the CPUs this server may use (CPU affinity, cgroup "
                 "limit); --intra-op-threads sets another number", intra_op_threads)
    manager = ModelManager(
        ModelRepository(settings.model_repository),
        WorkerOptions(intra_op_threads=intra_op_threads, intra_op_spinning=settings.intra_op_spinning,
                      engine_cache_dir=settings.engine_cache_dir,
                      log_level=settings.log_level,
                      default_policy=EnginePolicy(mode=settings.engine_mode, bucket=settings.engine_bucket,
                                                  rebuild=settings.engine_rebuild)),
        SupervisorSettings(shm_bytes=settings.shm_bytes_per_model,
                           start_timeout_s=settings.worker_start_timeout_seconds,
                           hang_timeout_s=settings.worker_hang_timeout_seconds,
                           heartbeat_interval_s=min(2.0, settings.worker_hang_timeout_seconds / 4),
                           max_inflight=settings.max_inflight_per_model),
        metrics, on_ready_change=ready_changed, socket_dir=socket_dir, on_routes_change=publish_routes,
    )
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=grpc_options(settings))
    servicer = InferenceServicer(manager, metrics, health, settings)
    server.add_generic_rpc_handlers([service_handlers(servicer, SERVICE, servicer.handlers())])
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    _enable_reflection(server)
    grpc_port = bind_public_port(server, settings, settings.grpc_port)
    internal_address = f"unix:{socket_dir / 'frontend.sock'}" if socket_dir else ""
    if socket_dir is not None:
        server.add_insecure_port(internal_address)
    await server.start()
    endpoint = None
    if settings.metrics_port >= 0:
        endpoint = start_http_server(settings.metrics_port, settings.host, metrics.registry)
    log.info("trtserve listening: grpc%s %s:%d, metrics %s", "+tls" if settings.tls_cert else "", settings.host,
             grpc_port,
             f"{settings.host}:{endpoint.port}" if endpoint else "off")
    await health.update({})
    running = RunningServer(grpc_port, endpoint.port if endpoint else None, server, manager, health, metrics,
                            endpoint, settings, None, socket_dir)
    if socket_dir is not None:
        replicas = running.replicas = FrontendReplicas(settings, grpc_port, internal_address, metrics,
                                                       manager.shm_wait_s)
        try:
            await replicas.start()
        except OSError:
            await running.shutdown()  # the ones that started, the port, the socket directory
            raise
    await _load_initial_models(running)
    return running


async def _load_initial_models(running: RunningServer) -> None:
    settings, manager = running.settings, running.manager
    if settings.model_control_mode == "none":
        names = manager.repository.model_names()
    else:
        names = list(settings.load_models)

    async def load(name: str) -> None:
        try:
            await manager.load(name)
        except ServeError as exc:
            log.error("model %s failed to load: %s", name, exc.message)

    await asyncio.gather(*(load(n) for n in names))
    await running.health.update({h.spec.name: h.ready for h in manager.loaded()})
    log.info("models ready: %s", ", ".join(sorted(h.spec.name for h in manager.loaded() if h.ready)) or "none")


def _enable_reflection(server: grpc.aio.Server) -> None:
    # Reflection answers from trtserve's private descriptor pool; add the health and reflection files to it.
    for file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        try:
            POOL.FindFileByName(file.name)
        except KeyError:
            POOL.AddSerializedFile(file.serialized_pb)
    names = (inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=POOL)


async def _run(settings: ServerSettings) -> int:
    running = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining in-flight requests for up to %.0fs", settings.shutdown_grace_seconds)
    await running.shutdown()
    log.info("stopped")
    return 0


def serve(settings: ServerSettings) -> int:
    """Run the server until SIGTERM or SIGINT; returns the process exit code."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    keep_freed_heap(settings.heap_keep_bytes)
    return asyncio.run(_run(settings))

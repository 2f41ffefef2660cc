"""grpc.health.v1 statuses: `liveness` while the process runs, `readiness` (and "") when every model is ready."""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

LIVENESS = "liveness"
READINESS = "readiness"


class Health:
    """Keeps the standard health service in step with model readiness and shutdown."""

    def __init__(self) -> None:
        self.servicer = health_aio.HealthServicer()
        self.shutting_down = False

    async def update(self, models_ready: dict[str, bool]) -> None:
        """Publish per-model statuses (service name = model name) and the server-wide ones."""
        await self.servicer.set(LIVENESS, SERVING)
        for name, ready in models_ready.items():
            await self.servicer.set(name, SERVING if ready and not self.shutting_down else NOT_SERVING)
        ready = not self.shutting_down and all(models_ready.values())
        for service in ("", READINESS):
            await self.servicer.set(service, SERVING if ready else NOT_SERVING)

    async def shutdown(self) -> None:
        """Report NOT_SERVING everywhere but liveness, so load balancers drain this replica."""
        self.shutting_down = True
        for service in ("", READINESS):
            await self.servicer.set(service, NOT_SERVING)

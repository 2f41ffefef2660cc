"""Docker HEALTHCHECK for trtserve: exit 0 when grpc.health.v1 reports the server SERVING, 1 otherwise.

Kubernetes ignores HEALTHCHECK and uses its native gRPC probes (deploy/k8s); this covers `docker run`
and Compose. Usage: `python healthcheck.py [service]` (default `readiness`; `liveness` also works).
The port comes from TRTSERVE_GRPC_PORT (default 8001), as for the server itself.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 4.0


def check(target: str, service: str, timeout: float = TIMEOUT_S) -> bool:
    """True when the health service at `target` answers SERVING for `service`."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            print(f"health check of {service!r} at {target} failed: {err.code().name}", file=sys.stderr)
            return False
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{service!r} at {target} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
              file=sys.stderr)
        return False
    return True


def main(argv: list[str]) -> int:
    service = argv[1] if len(argv) > 1 else "readiness"
    target = f"127.0.0.1:{os.environ.get('TRTSERVE_GRPC_PORT', '8001')}"
    return 0 if check(target, service) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))

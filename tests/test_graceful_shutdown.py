"""SIGTERM drains: in-flight requests finish, new ones are refused, the process exits 0 and cleans up."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.server import alive, metric_value, separate_client, shm_segments, start, wait_until

IN_FLIGHT = 20


@pytest.mark.parametrize("frontends", [1, 3])
def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(example_repo, frontends):
    server = start(example_repo, ["--shutdown-grace-seconds", "90", "--frontend-processes", str(frontends)])
    extra = list(server.frontend_pids().values())
    children = [p.pid for p in server.workers()] + extra
    clients = [separate_client(server.url) for _ in range(4)]  # connections spread over the processes
    client = clients[0]
    x = np.random.default_rng(0).standard_normal((8, 16, 32, 32), dtype=np.float32)
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    expected = client.infer("convnet", [inp]).as_numpy("y")

    results: list[object] = []
    done = threading.Condition()

    def callback(result, error) -> None:
        with done:
            results.append(error if error is not None else result.as_numpy("y"))
            done.notify_all()

    for i in range(IN_FLIGHT):
        clients[i % len(clients)].async_infer("convnet", [inp], callback, client_timeout=120)
    time.sleep(0.5)  # let every request reach the server (a busy machine can take longer: checked below)
    wait_until(lambda: metric_value(server, "trtserve_pending_requests", model="convnet", version="1")
               + len(results) >= IN_FLIGHT, 30, "every request to reach the server")
    with done:
        finished_before = len(results)
    assert finished_before < IN_FLIGHT, "requests finished too fast to test draining; use a heavier batch"
    started = time.monotonic()
    server.proc.send_signal(15)

    # The server says NOT_SERVING to health checks and refuses new calls while it drains.
    channel = grpc.insecure_channel(server.url)
    health = health_pb2_grpc.HealthStub(channel)
    refused = None
    deadline = time.monotonic() + 10
    while refused is None and time.monotonic() < deadline:
        try:
            status = health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=2).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                grpcclient.InferenceServerClient(server.url).infer("tiny", _tiny(), client_timeout=5)
        except Exception as exc:  # the refusal is what we wait for
            refused = exc
    channel.close()
    assert isinstance(refused, (InferenceServerException, grpc.RpcError)), refused

    assert server.proc.wait(100) == 0
    assert time.monotonic() - started < 90
    with done:
        done.wait_for(lambda: len(results) == IN_FLIGHT, timeout=10)
    errors = [r for r in results if not isinstance(r, np.ndarray)]
    assert not errors, errors[:3]
    for y in results:
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    assert not any(alive(p) for p in children)
    for pid in (server.proc.pid, *extra):
        assert shm_segments(pid) == []


def _tiny() -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("x", [1, 16], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 16), np.float32))
    return [inp]

"""Several frontend processes on one port (`--frontend-processes 3`): each serves requests over its own
connections to the workers, the parent answers everything else and counts every request, and a
frontend or worker that dies is replaced without losing more than its own in-flight requests."""

from __future__ import annotations

import os
import re
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.server import ServerProcess, metric_value, separate_client, wait_for_metric

pytestmark = pytest.mark.timeout(240)
FRONTENDS = 3

def _tiny(client: grpcclient.InferenceServerClient, value: float) -> float:
    inp = grpcclient.InferInput("x", [1, 16], "FP32")
    inp.set_data_from_numpy(np.full((1, 16), value, np.float32))
    return float(client.infer("tiny", [inp]).as_numpy("y")[0, 0])


def _processes_holding_connections(server: ServerProcess) -> set[int]:
    """Pids of server processes with an established connection on the gRPC port."""
    return {pid for pid in (server.proc.pid, *server.frontend_pids().values())
            for conn in psutil.Process(pid).net_connections(kind="tcp")
            if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == server.grpc_port}


def _processes_holding_clients(server: ServerProcess, clients: list) -> set[int]:
    """The same, once each of `clients` has its connection (they open lazily)."""
    for client in clients:
        assert client.is_server_live()
    return _processes_holding_connections(server)


def _socket_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("trtserve-sockets-*"))


@pytest.fixture(scope="module")
def multi(example_repo) -> ServerProcess:
    dirs_before = _socket_dirs()
    server = ServerProcess(example_repo, "--model-control-mode", "explicit", "--load-model", "tiny",
                           "--frontend-processes", str(FRONTENDS))
    assert _socket_dirs() - dirs_before, "no private socket directory was made"
    yield server
    frontends = list(server.frontend_pids().values())
    assert server.stop() == 0
    for pid in (server.proc.pid, *frontends):
        assert not list(Path("/dev/shm").glob(f"trtserve-{pid}-*")), f"shared memory of {pid} left behind"
    assert _socket_dirs() <= dirs_before  # the sockets' directory is removed


def test_every_frontend_process_serves_and_the_parent_counts_every_request(multi: ServerProcess):
    assert sorted(multi.frontend_pids()) == list(range(1, FRONTENDS))
    before = metric_value(multi, "trtserve_inference_requests_total", model="tiny", version="1", status="OK")
    clients = [separate_client(multi.url) for _ in range(16)]  # one connection each
    try:
        holding = _processes_holding_clients(multi, clients)
        assert len(holding) >= 2, f"16 connections all landed in {holding}"

        def run(i: int) -> list[float]:
            return [_tiny(clients[i], i + k) for k in range(25)]

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(run, range(16)))
        bias = results[0][0]  # tiny is y = x + c
        for i, values in enumerate(results):
            assert values == pytest.approx([bias + i + k for k in range(25)], abs=1e-5)
        # streaming, through whichever process the stream's connection landed in
        answers: list = []
        done = threading.Event()
        clients[1].start_stream(lambda result, error: (answers.append((result, error)),
                                                       len(answers) == 10 and done.set()))
        inp = grpcclient.InferInput("x", [1, 16], "FP32")
        inp.set_data_from_numpy(np.ones((1, 16), np.float32))
        for k in range(10):
            clients[1].async_stream_infer("tiny", [inp], request_id=str(k))
        assert done.wait(30)
        clients[1].stop_stream()
        assert [e for _, e in answers] == [None] * 10
        assert sorted(r.get_response().id for r, _ in answers) == sorted(str(k) for k in range(10))
        # every frontend's requests reach the parent's metrics and statistics (reported every 100 ms)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            after = metric_value(multi, "trtserve_inference_requests_total", model="tiny", version="1", status="OK")
            if after - before >= 410:
                break
            time.sleep(0.1)
        assert after - before == 16 * 25 + 10
        stats = clients[0].get_inference_statistics("tiny", as_json=True)["model_stats"][0]
        assert int(stats["inference_stats"]["success"]["count"]) >= 410
        assert metric_value(multi, "trtserve_pending_requests", model="tiny", version="1") == 0
    finally:
        for client in clients:
            client.close()


def test_every_rpc_is_answered_the_same_by_every_frontend(multi: ServerProcess):
    clients = [separate_client(multi.url) for _ in range(12)]
    try:
        assert len(_processes_holding_clients(multi, clients)) >= 2
        clients[0].load_model("mlp")
        for client in clients:
            assert client.is_server_ready() and client.is_model_ready("mlp")
            assert client.get_model_metadata("mlp").name == "mlp"
            assert client.get_model_config("mlp").config.max_batch_size > 0
            assert {m.name for m in client.get_model_repository_index().models} >= {"tiny", "mlp", "convnet"}
            x = grpcclient.InferInput("x", [2, 1024], "FP32")
            x.set_data_from_numpy(np.zeros((2, 1024), np.float32))
            assert client.infer("mlp", [x]).as_numpy("y").shape[0] == 2
            with pytest.raises(InferenceServerException, match="unknown model 'nope'") as err:
                client.infer("nope", [x])
            assert err.value.status() == "StatusCode.NOT_FOUND"
            with pytest.raises(InferenceServerException, match="no version '7'") as err:
                client.infer("mlp", [x], model_version="7")
            bad = grpcclient.InferInput("x", [2, 3], "FP32")
            bad.set_data_from_numpy(np.zeros((2, 3), np.float32))
            with pytest.raises(InferenceServerException, match="'x'") as err:
                client.infer("mlp", [bad])
            assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        clients[5].unload_model("mlp")
        for client in clients:
            assert not client.is_model_ready("mlp")
            with pytest.raises(InferenceServerException, match="not loaded") as err:
                client.infer("mlp", [x])
            assert err.value.status() == "StatusCode.NOT_FOUND"
    finally:
        for client in clients:
            client.close()


def test_streaming_rpcs_are_forwarded_to_the_parent_from_every_frontend(multi: ServerProcess):
    """Health Watch (one request, a stream of answers) and reflection (streams both ways) go through
    the extra frontends' forwarding: each of 12 connections gets the parent's answers."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(multi.url, options=options) for _ in range(12)]
    try:
        for channel in channels:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="tiny"),
                                                               timeout=10)
            assert next(iter(watch)).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            services = ProtoReflectionDescriptorDatabase(channel).get_services()
            assert "inference.GRPCInferenceService" in services and "grpc.health.v1.Health" in services
        holding = _processes_holding_connections(multi)
        assert len(holding) >= 2, holding
    finally:
        for channel in channels:
            channel.close()


def test_a_reload_under_load_loses_no_request(multi: ServerProcess):
    stop = threading.Event()
    errors: list[str] = []
    counts = [0] * 8

    def load(i: int) -> None:
        client = separate_client(multi.url)
        while not stop.is_set():
            try:
                _tiny(client, i)
                counts[i] += 1
            except InferenceServerException as exc:
                errors.append(str(exc))
        client.close()

    threads = [threading.Thread(target=load, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    control = separate_client(multi.url)
    old_pid = multi.worker_pid("tiny")
    for _ in range(2):
        time.sleep(1)
        control.load_model("tiny")  # a reload: new worker, routes switched, the old one drains and stops
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join(30)
    control.close()
    assert multi.worker_pid("tiny") != old_pid
    assert errors == []
    assert all(c > 0 for c in counts), counts


def test_a_killed_frontend_process_is_replaced_and_its_memory_removed(example_repo):
    server = ServerProcess(example_repo, "--model-control-mode", "explicit", "--load-model", "tiny",
                           "--frontend-processes", "2")
    try:
        old = server.frontend_pids()[1]
        clients: list = []
        while old not in _processes_holding_connections(server):  # the kernel spreads connections at random
            assert len(clients) < 64, "no connection reached frontend process 1"
            clients += [separate_client(server.url) for _ in range(8)]
            for i, client in enumerate(clients):
                _tiny(client, i)  # every connection used once: the killed process holds some arenas
        assert list(Path("/dev/shm").glob(f"trtserve-{old}-*")), "the frontend process mapped no arena"
        os.kill(old, signal.SIGKILL)
        server.wait_for(re.compile(rf"frontend process 1 serving \(pid (?!{old}\b)\d+\)"), 30)
        new = server.frontend_pids()[1]
        assert psutil.pid_exists(new) and not psutil.pid_exists(old)
        assert not list(Path("/dev/shm").glob(f"trtserve-{old}-*"))
        for client in clients:
            client.close()
        fresh = [separate_client(server.url) for _ in range(8)]
        bias = _tiny(fresh[0], 0)
        assert [_tiny(c, 3) for c in fresh] == pytest.approx([bias + 3] * 8)
        assert new in _processes_holding_clients(server, fresh) or len(_processes_holding_clients(server, fresh)) == 1
        for client in fresh:
            client.close()
        wait_for_metric(server, "trtserve_pending_requests", 0, model="tiny", version="1")
    finally:
        assert server.stop() == 0
    assert not [p for p in Path("/dev/shm").iterdir() if p.name.startswith(f"trtserve-{new}-")]


def test_a_killed_worker_fails_fast_in_every_frontend_and_comes_back(multi: ServerProcess):
    clients = [separate_client(multi.url) for _ in range(8)]
    try:
        bias = _tiny(clients[0], 0)
        os.kill(multi.worker_pid("tiny"), signal.SIGKILL)
        codes = set()
        deadline = time.monotonic() + 30
        recovered = False
        while time.monotonic() < deadline and not recovered:
            recovered = True
            for client in clients:
                try:
                    assert _tiny(client, 1) == pytest.approx(bias + 1)
                except InferenceServerException as exc:
                    codes.add(exc.status())
                    recovered = False
            time.sleep(0.05)
        assert recovered, "the model did not come back in every frontend within 30 s"
        assert codes <= {"StatusCode.UNAVAILABLE"}
    finally:
        for client in clients:
            client.close()

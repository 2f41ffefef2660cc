"""The dynamic batcher through the real server under concurrent tritonclient.grpc clients.

A tmp repository holds `add` (y = x + c, x FP32 [N,16], dynamic batching with a 20 ms window), the
same model without `dynamic_batching` (`add_plain`), and two copies of the example `convnet` model
(about 1 s for 32 rows on one ONNX Runtime thread; the 32-row engine is built at warm-up) that keep
a worker busy while the queue fills: `slow_q2` (max_queue_size 2) and `slow_timeout` (default queue
timeout 100 ms). Every request carries distinct inputs, so a row returned to the wrong request shows as a
wrong value. Timing assertions compare with the blocking batch's own duration, not wall-clock
constants, so a loaded machine slows both sides alike.
"""

from __future__ import annotations

import shutil
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.server import ServerProcess, start, wait_for_metric, wait_until

C = (np.arange(16, dtype=np.float32) * np.float32(0.5) - np.float32(3.0)).astype(np.float32)
CLIENTS = 32

ADD_IO = """
input [ { name: "x" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 16 ] } ]
instance_group [ { kind: KIND_CPU } ]
"""
CONVNET_IO = """
input [ { name: "x" data_type: TYPE_FP32 dims: [ 16, 32, 32 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 10 ] } ]
instance_group [ { kind: KIND_CPU } ]
engine_policy { warmup_batch_sizes: [ 32 ] }
"""
CONFIGS = {
    "add": ("add", 32, ADD_IO + "dynamic_batching { max_queue_delay_microseconds: 20000 }"),
    "add_plain": ("add", 32, ADD_IO),
    # host pool pages of 4096 bytes: 16384 bytes hold 128 rows of x and of y; a 1 s window merges
    # requests sent together
    "add_capped": ("add", 256, ADD_IO + "dynamic_batching { max_queue_delay_microseconds: 1000000 }\n"
                   "engine_policy { max_pool_bytes: 16384 }"),
    "slow_q2": ("convnet", 64, CONVNET_IO + "dynamic_batching { default_queue_policy { max_queue_size: 2 } }"),
    "slow_timeout": ("convnet", 64, CONVNET_IO
                     + "dynamic_batching { default_queue_policy { default_timeout_microseconds: 100000 } }"),
}


def add_model() -> onnx.ModelProto:
    """y = x + C for x FP32 [N,16]: cheap, and each output row is checkable against its own input row."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        initializer=[numpy_helper.from_array(C, "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def write_repo(root: Path, example_repo: Path) -> Path:
    for name, (kind, max_batch, body) in CONFIGS.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch}\n{body}\n')
        target = root / name / "1" / "model.onnx"
        if kind == "add":
            onnx.save(add_model(), str(target))
        else:
            shutil.copyfile(example_repo / "convnet" / "1" / "model.onnx", target)  # no symlinks out
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, example_repo) -> Iterator[ServerProcess]:
    repo = write_repo(tmp_path_factory.mktemp("batching-repo"), example_repo)
    # One ONNX Runtime thread per model: the busy convnet batch then lasts about as long on a many-core
    # machine as on 2 cores, and leaves a core to the clients.
    with start(repo, ["--intra-op-threads", "1"]) as proc:
        client = grpcclient.InferenceServerClient(proc.url)
        assert all(client.is_model_ready(m) for m in CONFIGS), "".join(proc.lines)
        yield proc


# -- helpers -----------------------------------------------------------------------------------------

def infer(client: grpcclient.InferenceServerClient, model: str, x: np.ndarray,
          **kwargs: Any) -> np.ndarray:
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], **kwargs).as_numpy("y")


def distinct_rows(request: int, rows: int) -> np.ndarray:
    """Inputs no other request shares: row r of request k starts at k * 1000 + r."""
    base = np.float32(request * 1000) + np.arange(rows, dtype=np.float32)[:, None]
    return (base + np.arange(16, dtype=np.float32) / np.float32(64)).astype(np.float32)


def stats(client: grpcclient.InferenceServerClient, model: str) -> Any:
    return client.get_inference_statistics(model).model_stats[0]


def scrape(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def batch_hist(server: ServerProcess, model: str) -> tuple[float, float]:
    """(sum, count) of the executed batch size histogram of `model`."""
    samples = scrape(server)
    key = (("model", model), ("version", "1"))
    return samples[("trtserve_batch_size_sum", key)], samples[("trtserve_batch_size_count", key)]


def run_clients(url: str, jobs: list[Callable[[grpcclient.InferenceServerClient], Any]],
                clients: int = CLIENTS) -> list[Any]:
    """Run `jobs` from `clients` threads (one client each), all started together; results in job order."""
    local = threading.local()
    barrier = threading.Barrier(min(clients, len(jobs)))

    def run(job: Callable[[grpcclient.InferenceServerClient], Any]) -> Any:
        if not hasattr(local, "client"):
            local.client = grpcclient.InferenceServerClient(url)
            barrier.wait(timeout=30)
        return job(local.client)

    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(run, jobs))


def attempt(fn: Callable[[], Any]) -> tuple[str, float, str]:
    """(status, seconds, message) of one call: status 'OK' or the gRPC status name."""
    t0 = time.monotonic()
    try:
        fn()
        return "OK", time.monotonic() - t0, ""
    except InferenceServerException as exc:
        return str(exc.status()).removeprefix("StatusCode."), time.monotonic() - t0, exc.message() or ""


def in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(attempt(fn)))
    thread.start()
    return thread, box


# -- batching ----------------------------------------------------------------------------------------

def _load(server: ServerProcess, model: str, requests_per_client: int) -> tuple[int, float, float]:
    """32 clients each sending batch-1 requests with distinct inputs; returns (requests, exec delta,
    batch-size sum delta) once the worker's stats for all of them arrived."""
    client = grpcclient.InferenceServerClient(server.url)
    before = stats(client, model)
    sum0, count0 = batch_hist(server, model)
    total = CLIENTS * requests_per_client

    def job(k: int) -> Callable[[grpcclient.InferenceServerClient], None]:
        def call(c: grpcclient.InferenceServerClient) -> None:
            x = distinct_rows(k, 1)
            np.testing.assert_array_equal(infer(c, model, x), x + C)
        return call

    run_clients(server.url, [job(k) for k in range(total)])
    seen: list[tuple[float, float, Any]] = []

    def arrived() -> bool:
        # Until the worker's last report is applied, the scrape may trail ModelStatistics or vice versa.
        seen[:] = [(*batch_hist(server, model), stats(client, model))]
        hist_sum, hist_count, after = seen[0]
        return hist_sum - sum0 == total and after.execution_count - before.execution_count == hist_count - count0

    wait_until(arrived)
    hist_sum, hist_count, after = seen[0]
    assert after.inference_count - before.inference_count == total
    return total, hist_count - count0, hist_sum - sum0


def test_concurrent_batch1_requests_are_batched_and_rows_go_back_to_their_request(server):
    requests, executions, rows = _load(server, "add", requests_per_client=6)
    assert rows == requests
    assert executions < requests, f"{requests} requests ran as {executions} executions: nothing was batched"
    assert rows / executions > 1.5, f"mean executed batch {rows / executions:.2f}"


def test_without_dynamic_batching_every_request_is_one_execution(server):
    requests, executions, rows = _load(server, "add_plain", requests_per_client=3)
    assert executions == requests == rows


def test_mixed_request_sizes_get_their_own_rows_back(server):
    sizes = [1 + (k * 5) % 8 for k in range(96)]  # 1..8 rows, interleaved

    def job(k: int) -> Callable[[grpcclient.InferenceServerClient], tuple[int, np.ndarray, np.ndarray]]:
        def call(c: grpcclient.InferenceServerClient) -> tuple[int, np.ndarray, np.ndarray]:
            x = distinct_rows(k, sizes[k])
            return k, x, infer(c, "add", x)
        return call

    for k, x, y in run_clients(server.url, [job(k) for k in range(len(sizes))], clients=16):
        assert y.shape == (sizes[k], 16), f"request {k} sent {sizes[k]} rows, got {y.shape}"
        np.testing.assert_array_equal(y, x + C)


def _together(server: ServerProcess, model: str, sizes: list[int]) -> list[tuple[str, np.ndarray | None]]:
    """Send one request per size at the same moment; (status, output or None) per request."""
    def job(k: int) -> Callable[[grpcclient.InferenceServerClient], tuple[str, np.ndarray | None]]:
        def call(c: grpcclient.InferenceServerClient) -> tuple[str, np.ndarray | None]:
            box: list[np.ndarray] = []
            status, _, message = attempt(lambda: box.append(infer(c, model, distinct_rows(k, sizes[k]))))
            return status, box[0] if box else message
        return call

    return run_clients(server.url, [job(k) for k in range(len(sizes))], clients=len(sizes))


def test_merged_batch_over_the_pool_cap_still_returns_each_request_its_own_rows(server):
    # 100 + 100 rows merge within the window (200 <= max_batch_size) but the pool holds 128 rows, so
    # the worker falls back to running each request alone: both must still get their own rows.
    results = _together(server, "add_capped", [100, 100])
    for k, (status, y) in enumerate(results):
        assert status == "OK", y
        np.testing.assert_array_equal(y, distinct_rows(k, 100) + C, err_msg=f"request {k} got other rows")


def test_request_over_the_pool_cap_fails_alone_and_its_batch_mate_succeeds(server):
    (big, message), (small, y) = _together(server, "add_capped", [150, 10])
    assert big == "RESOURCE_EXHAUSTED" and "max_pool_bytes" in message, (big, message)
    assert small == "OK"
    np.testing.assert_array_equal(y, distinct_rows(1, 10) + C)


# -- queue bound and deadlines -----------------------------------------------------------------------

def _busy(server: ServerProcess, model: str) -> tuple[threading.Thread, list[Any]]:
    """Keep `model`'s worker busy with a 32-row convnet batch; returns once the worker has it.

    Whether or not it already left the queue, it is ahead of everything the test sends next, and a
    32-row batch (the model's max is 64) is never merged with requests that come later.
    """
    client = grpcclient.InferenceServerClient(server.url)
    x = np.random.default_rng(0).standard_normal((32, 16, 32, 32), dtype=np.float32)
    thread, box = in_background(lambda: infer(client, model, x))
    wait_for_metric(server, "trtserve_pending_requests", 1, model=model, version="1")  # sent to the worker
    assert thread.is_alive(), "the blocking batch finished before the test could use it"
    return thread, box


def _done(thread: threading.Thread, box: list[Any]) -> float:
    """Wait for the blocking batch; its duration (it must have succeeded)."""
    thread.join(60)
    assert box and box[0][0] == "OK", box
    return box[0][1]


def _settled(client: grpcclient.InferenceServerClient, model: str, before: Any) -> Any:
    """ModelStatistics once the blocking batch's execution reached the parent, plus one more stats
    interval in which a wrongly executed request would also report."""
    wait_until(lambda: stats(client, model).execution_count > before.execution_count)
    time.sleep(0.3)
    return stats(client, model)


ONE = np.zeros((1, 16, 32, 32), dtype=np.float32)


def test_full_queue_answers_resource_exhausted_at_once_and_server_keeps_serving(server):
    thread, blocker = _busy(server, "slow_q2")
    results = run_clients(server.url, [lambda c: attempt(lambda: infer(c, "slow_q2", ONE))] * 12, clients=12)
    blocker_s = _done(thread, blocker)
    statuses = [r[0] for r in results]
    assert set(statuses) <= {"OK", "RESOURCE_EXHAUSTED"}, statuses
    assert statuses.count("RESOURCE_EXHAUSTED") >= 6 and "OK" in statuses, statuses
    for status, seconds, message in results:
        if status == "RESOURCE_EXHAUSTED":
            assert "slow_q2" in message and "queue is full" in message and "max_queue_size" in message
            assert seconds < blocker_s / 2, f"rejection took {seconds:.3f}s (busy batch {blocker_s:.2f}s)"
    client = grpcclient.InferenceServerClient(server.url)
    assert infer(client, "slow_q2", ONE).shape == (1, 10)
    np.testing.assert_array_equal(infer(client, "add", distinct_rows(7, 3)), distinct_rows(7, 3) + C)


def test_queue_timeout_fails_with_deadline_exceeded_without_running(server):
    client = grpcclient.InferenceServerClient(server.url)
    before = stats(client, "slow_timeout")
    thread, blocker = _busy(server, "slow_timeout")
    status, _, message = attempt(lambda: infer(client, "slow_timeout", ONE))
    _done(thread, blocker)
    assert status == "DEADLINE_EXCEEDED", (status, message)
    assert "queued" in message
    after = _settled(client, "slow_timeout", before)
    assert after.inference_count - before.inference_count == 32  # the blocking batch only
    assert after.execution_count - before.execution_count == 1
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert infer(client, "slow_timeout", ONE).shape == (1, 10)  # an idle queue still serves


def test_client_deadline_passing_while_queued_is_not_executed(server):
    client = grpcclient.InferenceServerClient(server.url)
    before = stats(client, "slow_q2")
    thread, blocker = _busy(server, "slow_q2")
    status, seconds, _ = attempt(lambda: infer(client, "slow_q2", ONE, client_timeout=0.2))
    blocker_s = _done(thread, blocker)
    assert status == "DEADLINE_EXCEEDED" and seconds < blocker_s, (status, seconds, blocker_s)
    after = _settled(client, "slow_q2", before)
    assert after.inference_count - before.inference_count == 32
    assert after.execution_count - before.execution_count == 1
    # the server notices the cancelled RPC on its own time; then it counts as exactly one failure
    wait_until(lambda: stats(client, "slow_q2").inference_stats.fail.count == before.inference_stats.fail.count + 1)
    assert infer(client, "slow_q2", ONE).shape == (1, 10)


# -- ordering ----------------------------------------------------------------------------------------

def test_sequential_requests_of_one_client_come_back_in_order(server):
    client = grpcclient.InferenceServerClient(server.url)
    for k in range(20):
        x = distinct_rows(k, 1 + k % 4)
        np.testing.assert_array_equal(infer(client, "add", x), x + C)


def test_stream_returns_every_request_id_once_with_its_own_rows(server):
    client = grpcclient.InferenceServerClient(server.url)
    n = 200
    got: dict[str, list[np.ndarray]] = {}
    errors: list[Any] = []
    done = threading.Event()
    lock = threading.Lock()

    def callback(result: Any, error: Any) -> None:
        with lock:
            if error is not None:
                errors.append(error)
            else:
                got.setdefault(result.get_response().id, []).append(result.as_numpy("y"))
            if len(errors) + sum(len(v) for v in got.values()) == n:
                done.set()

    client.start_stream(callback=callback)
    try:
        for k in range(n):
            x = distinct_rows(k, 1 + k % 3)
            inp = grpcclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            client.async_stream_infer("add", [inp], request_id=str(k))
        assert done.wait(30), f"{sum(len(v) for v in got.values())} of {n} responses"
    finally:
        client.stop_stream()
    assert not errors, errors[:3]
    assert sorted(got, key=int) == [str(k) for k in range(n)]
    for key, outputs in got.items():
        k = int(key)
        assert len(outputs) == 1, f"id {key} answered {len(outputs)} times"
        np.testing.assert_array_equal(outputs[0], distinct_rows(k, 1 + k % 3) + C)

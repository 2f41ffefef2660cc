"""Real traffic through the real server, then `/metrics` and ModelStatistics checked against it.

Every metric name the Grafana dashboard and the Prometheus rules use must be in the scrape with the
labels they rely on, and each must have moved by exactly what the traffic implies. The repository
(tmp) holds `add` (y = x + c, dynamic batching, max_batch_size 256 and a buffer pool cap of 128
rows, so that a larger request within max_batch_size is RESOURCE_EXHAUSTED), `spare` (no traffic;
its worker is killed at the end to see the restart counter move) and `capped` (`add` with a 1 s
window, for merged batches over the cap).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from service.metrics import MEMORY_KINDS, PHASES, SPECS
from tests.server import ServerProcess, start
from tests.test_batching_e2e import ADD_IO, C, _together, add_model, distinct_rows
from tests.test_dashboard import LABEL_VALUES, NAME, TARGET_LABELS, dashboard_exprs, family_of, rules_exprs

PAGE = 4096  # the host allocator hands out whole pages
CAP_ROWS = 128  # 128 rows of 64 bytes = 2 pages per buffer, input and output
CAP_BYTES = 2 * (CAP_ROWS * 16 * 4 // PAGE) * PAGE
MAX_BATCH = 256
OK_SIZES = (1, 2, 3, 4, 8, 16, 5, 1)  # sequential, so every one is its own executed batch
CONCURRENT = 16  # batch-1 requests sent together (batched by the worker)
MODELS = ("add", "spare", "capped")

Sample = tuple[str, dict[str, str], float]


def write_repo(root: Path) -> Path:
    import onnx

    for name, extra in (("add", f"dynamic_batching {{ max_queue_delay_microseconds: 5000 }}\n"
                                f"engine_policy {{ max_pool_bytes: {CAP_BYTES} }}"),
                        ("spare", ""),
                        ("capped", f"dynamic_batching {{ max_queue_delay_microseconds: 1000000 }}\n"
                                   f"engine_policy {{ max_pool_bytes: {CAP_BYTES} }}")):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {MAX_BATCH}\n{ADD_IO}{extra}\n')
        onnx.save(add_model(), str(root / name / "1" / "model.onnx"))
    return root


def scrape(server: ServerProcess) -> list[Sample]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return [(s.name, dict(s.labels), s.value) for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name.startswith("trtserve_") and not s.name.endswith("_created")]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The one sample of `name` with exactly these labels (KeyError when there is none)."""
    found = [v for n, ls, v in samples if n == name and ls == labels]
    if len(found) != 1:
        raise KeyError(f"{name}{labels}: {len(found)} samples")
    return found[0]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include these."""
    return sum(v for n, ls, v in samples if n == name and labels.items() <= ls.items())


def wait_for(server: ServerProcess, check: Callable[[list[Sample]], bool], timeout_s: float = 15.0) -> list[Sample]:
    """Worker stats reach the parent every 0.1 s: scrape until `check` holds, then return that scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(server)
        if check(samples):
            return samples
        assert time.monotonic() < deadline, "metrics never settled"
        time.sleep(0.05)


@dataclass
class Traffic:
    ok_requests: int
    ok_rows: int
    errors: dict[str, int]
    samples: list[Sample]
    stats: Any  # tritonclient's ModelStatistics of `add`, read right after `samples`


def _status(fn: Callable[[], Any]) -> str:
    try:
        fn()
        return "OK"
    except InferenceServerException as exc:
        return str(exc.status()).removeprefix("StatusCode.")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    with start(write_repo(tmp_path_factory.mktemp("metrics-repo"))) as proc:
        yield proc


@pytest.fixture(scope="module")
def traffic(server) -> Traffic:
    client = grpcclient.InferenceServerClient(server.url)

    def send(x: np.ndarray, model: str = "add", version: str = "") -> np.ndarray:
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(model, [inp], model_version=version).as_numpy("y")

    for k, rows in enumerate(OK_SIZES):
        x = distinct_rows(k, rows)
        np.testing.assert_array_equal(send(x), x + C)
    results: list[str] = []
    threads = [threading.Thread(target=lambda k=k: results.append(_status(lambda: send(distinct_rows(k, 1)))))
               for k in range(CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == ["OK"] * CONCURRENT
    errors = {
        "INVALID_ARGUMENT": [_status(lambda: send(np.zeros((1, 15), np.float32))),  # wrong shape
                             _status(lambda: send(np.zeros((MAX_BATCH + 1, 16), np.float32)))],  # over max_batch_size
        "RESOURCE_EXHAUSTED": [_status(lambda: send(np.zeros((CAP_ROWS + 72, 16), np.float32)))],  # pool cap
        "NOT_FOUND": [_status(lambda: send(np.zeros((1, 16), np.float32), model="no_such_model")),
                      _status(lambda: send(np.zeros((1, 16), np.float32), version="7"))],
    }
    for status, got in errors.items():
        assert got == [status] * len(got), (status, got)
    ok_requests, ok_rows = len(OK_SIZES) + CONCURRENT, sum(OK_SIZES) + CONCURRENT

    def settled(s: list[Sample]) -> bool:
        # A scrape is not atomic across metrics: one taken while a worker report is being applied may
        # show the batch histogram updated and the exec counter not yet. Wait for the last report.
        return (total(s, "trtserve_batch_size_sum", model="add") == ok_rows
                and total(s, "trtserve_queue_duration_seconds_count", model="add") == ok_requests
                and total(s, "trtserve_inference_exec_count_total", model="add")
                == total(s, "trtserve_compute_duration_seconds_count", model="add", phase="output")
                == total(s, "trtserve_batch_size_count", model="add")
                and total(s, "trtserve_engine_max_batch_size", model="add") >= max(OK_SIZES))

    samples = wait_for(server, settled)
    return Traffic(ok_requests, ok_rows, {k: len(v) for k, v in errors.items()}, samples,
                   client.get_inference_statistics("add").model_stats[0])


# -- names and labels --------------------------------------------------------------------------------

def _used_series() -> set[str]:
    return {s for expr in dashboard_exprs() + rules_exprs() for s in NAME.findall(expr)}


def test_dashboard_and_rules_metrics_are_all_scraped_with_their_labels(traffic):
    scraped: dict[str, list[dict[str, str]]] = {}
    for name, labels, _ in traffic.samples:
        scraped.setdefault(name, []).append(labels)
    used = _used_series()
    assert len(used) >= 15, sorted(used)
    for series in sorted(used):
        metric, suffix = family_of(series)
        want = set(SPECS[metric][1]) | ({"le"} if suffix == "_bucket" else set())
        assert not want & TARGET_LABELS  # pod, job... come from the scrape config, never from the server
        of_add = [ls for ls in scraped.get(series, []) if ls["model"] == "add"]
        assert of_add, f"{series} (used by the dashboard or rules) is missing for model add"
        for labels in of_add:
            assert set(labels) == want, (series, labels)
            for label, allowed in LABEL_VALUES.items():
                assert labels.get(label, next(iter(allowed))) in allowed, (series, labels)


def test_series_exist_for_every_configured_model_and_nothing_else(traffic):
    models = {ls["model"] for _, ls, _ in traffic.samples}
    assert models == set(MODELS)
    assert not any("no_such_model" in str(ls) for _, ls, _ in traffic.samples)
    assert {ls["version"] for _, ls, _ in traffic.samples if "version" in ls} == {"1"}  # not the asked-for 7
    s = traffic.samples
    for model in MODELS:
        assert value(s, "trtserve_model_ready", model=model, version="1") == 1
        assert value(s, "trtserve_worker_restarts_total", model=model) == 0
        assert value(s, "trtserve_pending_requests", model=model, version="1") == 0
        for kind in MEMORY_KINDS:
            value(s, "trtserve_buffer_pool_bytes", model=model, memory=kind)
    assert value(s, "trtserve_inference_requests_total", model="spare", version="1", status="OK") == 0
    assert value(s, "trtserve_batch_size_count", model="spare", version="1") == 0


# -- movement ----------------------------------------------------------------------------------------

def test_request_counters_move_by_status_and_rows(traffic):
    s, v = traffic.samples, {"model": "add", "version": "1"}
    assert value(s, "trtserve_inference_requests_total", **v, status="OK") == traffic.ok_requests
    assert value(s, "trtserve_inference_requests_total", **v, status="INVALID_ARGUMENT") == 2
    assert value(s, "trtserve_inference_requests_total", **v, status="RESOURCE_EXHAUSTED") == 1
    assert total(s, "trtserve_inference_requests_total", model="add") == traffic.ok_requests + 3  # no NOT_FOUND
    assert value(s, "trtserve_inference_count_total", **v) == traffic.ok_rows
    assert value(s, "trtserve_request_duration_seconds_count", **v) == traffic.ok_requests  # OK only
    assert value(s, "trtserve_request_duration_seconds_bucket", **v, le="+Inf") == traffic.ok_requests
    assert value(s, "trtserve_request_duration_seconds_sum", **v) > 0
    assert value(s, "trtserve_pending_requests", **v) == 0


def test_execution_histograms_agree_with_each_other(traffic):
    s, v = traffic.samples, {"model": "add", "version": "1"}
    execs = value(s, "trtserve_inference_exec_count_total", **v)
    assert value(s, "trtserve_batch_size_count", **v) == execs
    assert value(s, "trtserve_batch_size_sum", **v) == traffic.ok_rows
    # the sequential requests ran alone; the concurrent batch-1 ones were (at least partly) merged
    assert len(OK_SIZES) < execs < traffic.ok_requests
    assert value(s, "trtserve_batch_size_bucket", **v, le="16.0") == execs  # 16 concurrent batch-1 requests at most
    assert value(s, "trtserve_batch_size_bucket", **v, le="1.0") >= 2
    for phase in PHASES:
        assert value(s, "trtserve_compute_duration_seconds_count", **v, phase=phase) == execs
    assert value(s, "trtserve_compute_duration_seconds_sum", **v, phase="infer") > 0
    # one queue time per executed request
    assert value(s, "trtserve_queue_duration_seconds_count", **v) == traffic.ok_requests
    assert value(s, "trtserve_queue_duration_seconds_bucket", **v, le="+Inf") == traffic.ok_requests


def test_engine_and_pool_gauges(traffic):
    s = traffic.samples
    builds = total(s, "trtserve_engine_builds_total", model="add")
    reasons = {ls["reason"] for n, ls, _ in s if n == "trtserve_engine_builds_total" and ls["model"] == "add"}
    assert builds >= 2 and "first" in reasons, reasons  # 1 row first, then larger batches grew it
    assert value(s, "trtserve_engine_build_duration_seconds_count", model="add") == builds
    assert value(s, "trtserve_engines_live", model="add") >= 1
    assert value(s, "trtserve_engine_max_batch_size", model="add") == max(OK_SIZES)  # POW2 of 16
    assert value(s, "trtserve_engine_device_memory_bytes", model="add") == 0  # onnxruntime on the CPU
    cap = CAP_BYTES
    assert value(s, "trtserve_buffer_pool_cap_bytes", model="add") == cap
    assert 0 < value(s, "trtserve_buffer_pool_bytes", model="add", memory="host") <= cap
    assert value(s, "trtserve_buffer_pool_bytes", model="add", memory="device") == 0
    assert value(s, "trtserve_buffer_pool_bytes", model="add", memory="pinned") == 0
    assert value(s, "trtserve_buffer_pool_grows_total", model="add") >= 1
    assert value(s, "trtserve_buffer_pool_cap_bytes", model="spare") == 0


def test_model_statistics_agree_with_prometheus(traffic):
    s, v, st = traffic.samples, {"model": "add", "version": "1"}, traffic.stats
    assert st.name == "add" and st.version == "1" and st.last_inference > 0
    assert st.inference_count == value(s, "trtserve_inference_count_total", **v) == traffic.ok_rows
    assert st.execution_count == value(s, "trtserve_inference_exec_count_total", **v)
    stats = st.inference_stats
    assert stats.success.count == value(s, "trtserve_inference_requests_total", **v, status="OK")
    assert stats.fail.count == sum(traffic.errors[k] for k in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"))
    assert stats.queue.count == value(s, "trtserve_queue_duration_seconds_count", **v)
    assert abs(stats.queue.ns / 1e9 - value(s, "trtserve_queue_duration_seconds_sum", **v)) < 1e-3
    for phase in PHASES:
        assert getattr(stats, "compute_" + phase).count == traffic.ok_requests  # per request, as Triton
    by_size = {b.batch_size: b.compute_infer.count for b in st.batch_stats}
    assert sum(by_size.values()) == st.execution_count
    assert sum(size * n for size, n in by_size.items()) == value(s, "trtserve_batch_size_sum", **v)
    infer_ns = sum(b.compute_infer.ns for b in st.batch_stats)
    assert abs(infer_ns / 1e9 - value(s, "trtserve_compute_duration_seconds_sum", **v, phase="infer")) < 1e-3


def test_worker_restart_moves_restarts_and_readiness(server, traffic):
    victim = server.worker_pid("spare")
    os.kill(victim, signal.SIGKILL)
    server.wait_for(re.compile(rf"model spare version 1 ready in worker pid (?!{victim}\b)\d+"), 30)
    s = wait_for(server, lambda s: value(s, "trtserve_model_ready", model="spare", version="1") == 1
                 and value(s, "trtserve_worker_restarts_total", model="spare") == 1)
    assert value(s, "trtserve_worker_restarts_total", model="add") == 0
    client = grpcclient.InferenceServerClient(server.url)
    inp = grpcclient.InferInput("x", [2, 16], "FP32")
    inp.set_data_from_numpy(distinct_rows(3, 2))
    np.testing.assert_array_equal(client.infer("spare", [inp]).as_numpy("y"), distinct_rows(3, 2) + C)


def test_fallback_runs_are_counted_as_the_executions_they_were(server, traffic):
    v = {"model": "capped", "version": "1"}
    s0 = scrape(server)
    # 100 + 100 rows merge (1 s window) but the pool holds 128 rows: two executions of 100 rows each
    assert [r[0] for r in _together(server, "capped", [100, 100])] == ["OK", "OK"]
    s1 = wait_for(server, lambda s: value(s, "trtserve_queue_duration_seconds_count", **v) == 2)
    assert value(s1, "trtserve_inference_count_total", **v) - value(s0, "trtserve_inference_count_total", **v) == 200
    assert value(s1, "trtserve_inference_exec_count_total", **v) == 2
    assert value(s1, "trtserve_batch_size_bucket", **v, le="128.0") == 2
    assert value(s1, "trtserve_batch_size_sum", **v) == 200
    # 150 + 10 rows: the 150-row request fails on the cap, only the 10-row one executes
    assert [r[0] for r in _together(server, "capped", [150, 10])] == ["RESOURCE_EXHAUSTED", "OK"]
    # the count is the parent's own; the worker's stats for the execution follow within its next report
    s2 = wait_for(server, lambda s: value(s, "trtserve_inference_count_total", **v) == 210
                  and value(s, "trtserve_batch_size_sum", **v) >= 210)
    assert value(s2, "trtserve_batch_size_sum", **v) == 210
    assert value(s2, "trtserve_inference_exec_count_total", **v) == 3

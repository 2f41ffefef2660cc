"""ServerMetrics: worker stats deltas, the label guard, HTTP exposition and the ModelStatistics numbers."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
from google.protobuf import json_format
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import LATENCY_BUCKETS, SPECS, ServerMetrics, WorkerStats, series_names, start_http_server
from service.proto import inference_pb2


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def value(m: ServerMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def model_labels(m: ServerMetrics) -> set[str]:
    return {s.labels["model"] for fam in m.registry.collect() for s in fam.samples if "model" in s.labels}


@pytest.fixture
def m() -> ServerMetrics:
    metrics = ServerMetrics(clock=FakeClock())
    metrics.register_model("mlp", 1)
    return metrics


def test_registered_model_series_start_at_zero(m: ServerMetrics) -> None:
    assert value(m, "trtserve_inference_count_total", model="mlp", version="1") == 0
    assert value(m, "trtserve_inference_requests_total", model="mlp", version="1", status="OK") == 0
    assert value(m, "trtserve_model_ready", model="mlp", version="1") == 0
    for kind in ("device", "pinned", "host"):
        assert value(m, "trtserve_buffer_pool_bytes", model="mlp", memory=kind) == 0
    assert value(m, "trtserve_worker_restarts_total", model="mlp") == 0


def test_every_spec_is_exposed_under_its_series_names(m: ServerMetrics) -> None:
    m.apply_worker_stats("mlp", 1, {"builds": [{"reason": "first", "seconds": 0.2}]})
    exposed = {s.name for fam in m.registry.collect() for s in fam.samples}
    for name in SPECS:
        assert set(series_names(name)) <= exposed, name
    assert series_names("batch_size") == ("trtserve_batch_size_bucket", "trtserve_batch_size_sum",
                                          "trtserve_batch_size_count")
    assert series_names("worker_restarts") == ("trtserve_worker_restarts_total",)


def test_observe_request_counts_status_rows_and_duration(m: ServerMetrics) -> None:
    assert m.observe_request("mlp", 1, "OK", 0.02, rows=8)
    assert m.observe_request("mlp", "1", "OK", 0.04, rows=2)
    assert m.observe_request("mlp", 1, "INVALID_ARGUMENT", 0.001, rows=3)
    assert value(m, "trtserve_inference_requests_total", model="mlp", version="1", status="OK") == 2
    assert value(m, "trtserve_inference_requests_total", model="mlp", version="1",
                 status="INVALID_ARGUMENT") == 1
    assert value(m, "trtserve_inference_count_total", model="mlp", version="1") == 10  # OK rows only
    # latency histogram holds successful requests only
    assert value(m, "trtserve_request_duration_seconds_count", model="mlp", version="1") == 2
    assert value(m, "trtserve_request_duration_seconds_sum", model="mlp", version="1") == pytest.approx(0.06)
    assert value(m, "trtserve_request_duration_seconds_bucket", model="mlp", version="1", le="0.025") == 1


def test_request_series_expose_what_prometheus_clients_own_counter_and_histogram_would() -> None:
    """The request metrics are plain numbers turned into families at scrape time (`metrics/requests.py`);
    a scrape must read exactly as prometheus_client's Counter and Histogram with the same observations."""
    ours = ServerMetrics(clock=FakeClock())
    ours.register_model("mlp", 1)
    theirs = CollectorRegistry()
    requests = Counter("trtserve_inference_requests", SPECS["inference_requests"][2], ["model", "version", "status"],
                       registry=theirs)
    rows = Counter("trtserve_inference_count", SPECS["inference_count"][2], ["model", "version"], registry=theirs)
    duration = Histogram("trtserve_request_duration_seconds", SPECS["request_duration_seconds"][2],
                         ["model", "version"], buckets=LATENCY_BUCKETS, registry=theirs)
    requests.labels("mlp", "1", "OK"), rows.labels("mlp", "1"), duration.labels("mlp", "1")  # series at zero
    observed = [("OK", 0.0005, 1), ("OK", 0.02, 8), ("UNAVAILABLE", 0.1, 1), ("OK", 100.0, 2),
                ("CANCELLED", 0.3, 4), ("OK", 0.0001, 3), ("UNAVAILABLE", 0.2, 1)]  # on a bound, above all, below
    for status, seconds, n in observed:
        assert ours.observe_request("mlp", 1, status, seconds, rows=n)
        requests.labels("mlp", "1", status).inc()
        if status == "OK":
            rows.labels("mlp", "1").inc(n)
            duration.labels("mlp", "1").observe(seconds)

    def exposition(registry: CollectorRegistry) -> tuple[set[str], set[str]]:
        """The scrape's lines of the three families: without `_created` lines, and `_created` series
        without their timestamps."""
        lines = [line for line in generate_latest(registry).decode().splitlines()
                 if any(name in line for name in ("inference_requests", "inference_count",
                                                  "request_duration_seconds"))]
        created = {line.rsplit(" ", 1)[0] for line in lines if "_created{" in line}
        return {line for line in lines if "_created" not in line}, created

    assert exposition(ours.registry) == exposition(theirs)
    assert len(exposition(theirs)[1]) == 5  # OK, UNAVAILABLE, CANCELLED, rows, duration


def test_unknown_model_or_version_never_creates_labels(m: ServerMetrics) -> None:
    assert not m.known("nope") and not m.known("mlp", 2) and m.known("mlp") and m.known("mlp", "1")
    assert not m.observe_request("nope", 1, "NOT_FOUND", 0.001, rows=1)
    assert not m.observe_request("mlp", 7, "NOT_FOUND", 0.001, rows=1)
    assert not m.apply_worker_stats("nope", 1, {"engines_live": 1, "builds": [{"reason": "x", "seconds": 1}]})
    m.add_pending("nope", 1, 1)
    m.set_ready("nope", 1, True)
    m.worker_restarted("nope")
    assert model_labels(m) == {"mlp"}
    versions = {s.labels.get("version") for fam in m.registry.collect() for s in fam.samples}
    assert "7" not in versions
    with pytest.raises(KeyError):
        m.statistics("nope", 1)


def test_worker_stats_deltas_accumulate_and_gauges_overwrite(m: ServerMetrics) -> None:
    w = WorkerStats()
    w.record_exec(3, [0.001, 0.003], input_s=0.0001, infer_s=0.002, output_s=0.0003)
    w.record_exec(8, [0.002], input_s=0.0002, infer_s=0.004, output_s=0.0001)
    w.record_build("first", 0.4)
    w.record_build("grow", 1.5)
    w.set_engines(live=2, max_batch_size=8, device_bytes=1 << 20)
    w.set_pool({"host": 4096, "pinned": 0, "device": 0}, cap_bytes=1 << 16)
    w.record_pool_grow()
    report = json.loads(json.dumps(w.drain()))  # what crosses the process boundary
    assert m.apply_worker_stats("mlp", 1, report)
    assert w.drain() == {}  # drained: the next report carries only new deltas

    w.record_exec(1, [0.0005], input_s=0.0, infer_s=0.001, output_s=0.0)
    w.record_build("grow", 2.0)
    w.record_pool_grow(2)
    w.set_engines(live=1, max_batch_size=16, device_bytes=2 << 20)
    w.set_pool({"host": 8192}, cap_bytes=1 << 16)
    assert m.apply_worker_stats("mlp", 1, json.loads(json.dumps(w.drain())))

    mv = {"model": "mlp", "version": "1"}
    assert value(m, "trtserve_inference_exec_count_total", **mv) == 3
    assert value(m, "trtserve_batch_size_count", **mv) == 3
    assert value(m, "trtserve_batch_size_sum", **mv) == 12
    assert value(m, "trtserve_batch_size_bucket", le="1.0", **mv) == 1
    assert value(m, "trtserve_batch_size_bucket", le="2.0", **mv) == 1
    assert value(m, "trtserve_batch_size_bucket", le="4.0", **mv) == 2   # the 3-row batch
    assert value(m, "trtserve_batch_size_bucket", le="8.0", **mv) == 3
    assert value(m, "trtserve_batch_size_bucket", le="1024.0", **mv) == 3
    assert value(m, "trtserve_queue_duration_seconds_count", **mv) == 4  # one per request
    assert value(m, "trtserve_queue_duration_seconds_sum", **mv) == pytest.approx(0.0065)
    assert value(m, "trtserve_compute_duration_seconds_count", phase="infer", **mv) == 3
    assert value(m, "trtserve_compute_duration_seconds_sum", phase="infer", **mv) == pytest.approx(0.007)
    assert value(m, "trtserve_engine_builds_total", model="mlp", reason="first") == 1
    assert value(m, "trtserve_engine_builds_total", model="mlp", reason="grow") == 2
    assert value(m, "trtserve_engine_build_duration_seconds_count", model="mlp") == 3
    assert value(m, "trtserve_engine_build_duration_seconds_sum", model="mlp") == pytest.approx(3.9)
    assert value(m, "trtserve_engines_live", model="mlp") == 1
    assert value(m, "trtserve_engine_max_batch_size", model="mlp") == 16
    assert value(m, "trtserve_engine_device_memory_bytes", model="mlp") == 2 << 20
    assert value(m, "trtserve_buffer_pool_bytes", model="mlp", memory="host") == 8192
    assert value(m, "trtserve_buffer_pool_cap_bytes", model="mlp") == 1 << 16
    assert value(m, "trtserve_buffer_pool_grows_total", model="mlp") == 3


def _executed(rows: int, queue_s: list[float], **extra: object) -> dict:
    """A worker report of one executed batch (JSON round trip), with `extra` keys set on it."""
    w = WorkerStats()
    w.record_exec(rows, queue_s, input_s=0.0001, infer_s=0.002, output_s=0.0001)
    return {**json.loads(json.dumps(w.drain())), **extra}


@pytest.mark.parametrize("bad", [
    _executed(2, [0.1], engines_lve=1),                                              # unknown key
    _executed(2, [0.1], builds=[{"reason": "Grow Up!", "seconds": 1}]),
    _executed(2, [0.1], pool_bytes={"gpu": 1}),
    {"exec": [{"rows": 2, "queue_s": [0.1]}]},                                       # one entry per batch
    {"exec": {"rows": 2}},
    {"engines_live": True},
    {"pool_grows": -1},
])
def test_malformed_stats_raise_and_change_nothing(m: ServerMetrics, bad: dict) -> None:
    before = generate_latest(m.registry)
    with pytest.raises(ValueError, match="malformed worker stats"):
        m.apply_worker_stats("mlp", 1, bad)
    assert generate_latest(m.registry) == before
    assert m.statistics("mlp", 1)["execution_count"] == 0


def test_pending_ready_and_restart(m: ServerMetrics) -> None:
    m.add_pending("mlp", 1, 1)
    m.add_pending("mlp", 1, 1)
    m.add_pending("mlp", 1, -1)
    assert value(m, "trtserve_pending_requests", model="mlp", version="1") == 1
    m.set_ready("mlp", 1, True)
    assert value(m, "trtserve_model_ready", model="mlp", version="1") == 1
    m.apply_worker_stats("mlp", 1, {"engines_live": 1, "engine_max_batch_size": 4,
                                    "pool_bytes": {"host": 100, "device": 50}})
    m.worker_restarted("mlp")
    assert value(m, "trtserve_worker_restarts_total", model="mlp") == 1
    # the dead worker's engines and buffers are gone
    assert value(m, "trtserve_engines_live", model="mlp") == 0
    assert value(m, "trtserve_engine_max_batch_size", model="mlp") == 0
    assert value(m, "trtserve_buffer_pool_bytes", model="mlp", memory="host") == 0
    assert value(m, "trtserve_buffer_pool_bytes", model="mlp", memory="device") == 0


def test_forget_model_removes_its_series(m: ServerMetrics) -> None:
    m.register_model("mlp", 2)
    m.register_model("other", 1)
    for v in (1, 2):
        m.observe_request("mlp", v, "UNAVAILABLE", 0.1, rows=1)
    m.apply_worker_stats("mlp", 2, {"builds": [{"reason": "warmup", "seconds": 0.1}]})
    m.forget_model("mlp", 1)
    assert m.known("mlp", 2) and not m.known("mlp", 1)
    versions = {s.labels.get("version") for fam in m.registry.collect() for s in fam.samples
                if s.labels.get("model") == "mlp"}
    assert versions == {None, "2"}  # per-model series stay while a version is left
    m.forget_model("mlp")
    assert model_labels(m) == {"other"} and not m.known("mlp")
    assert m.registered() == [("other", "1")]
    # re-registering starts from zero
    m.register_model("mlp", 1)
    assert value(m, "trtserve_engine_builds_total", model="mlp", reason="warmup") is None
    assert m.statistics("mlp", 1)["inference_stats"]["fail"] == {"count": 0, "ns": 0}


def test_statistics_match_triton_shape_and_numbers() -> None:
    clock = FakeClock(1000.0)
    m = ServerMetrics(clock=clock)
    m.register_model("mlp", 3)
    w = WorkerStats()
    w.record_exec(4, [0.001, 0.003], input_s=0.0001, infer_s=0.002, output_s=0.0003)
    w.record_exec(4, [0.002], input_s=0.0003, infer_s=0.004, output_s=0.0001)
    w.record_exec(1, [0.0], input_s=0.0, infer_s=0.001, output_s=0.0)
    m.apply_worker_stats("mlp", 3, json.loads(json.dumps(w.drain())))
    m.observe_request("mlp", 3, "OK", 0.010, rows=4)
    clock.t = 1002.5
    m.observe_request("mlp", 3, "OK", 0.020, rows=5)
    m.observe_request("mlp", 3, "DEADLINE_EXCEEDED", 0.5, rows=2)
    s = m.statistics("mlp", 3)
    assert s["name"] == "mlp" and s["version"] == "3"
    assert s["last_inference"] == 1_002_500  # ms since epoch of the last success
    assert s["inference_count"] == 9 and s["execution_count"] == 3
    st = s["inference_stats"]
    assert st["success"] == {"count": 2, "ns": 30_000_000}
    assert st["fail"] == {"count": 1, "ns": 500_000_000}
    assert st["queue"] == {"count": 4, "ns": 6_000_000}
    # each request is charged its batch's compute time (Triton's convention)
    assert st["compute_infer"] == {"count": 4, "ns": 2 * 2_000_000 + 4_000_000 + 1_000_000}
    assert st["compute_input"] == {"count": 4, "ns": 2 * 100_000 + 300_000}
    assert [b["batch_size"] for b in s["batch_stats"]] == [1, 4]
    b4 = s["batch_stats"][1]
    assert b4["compute_infer"] == {"count": 2, "ns": 6_000_000}
    assert b4["compute_output"] == {"count": 2, "ns": 400_000}
    # the lead turns it into the RPC message as is
    msg = json_format.ParseDict(s, inference_pb2.ModelStatistics())
    assert msg.inference_stats.compute_infer.ns == 9_000_000 and msg.batch_stats[1].batch_size == 4
    assert msg.last_inference == 1_002_500


def test_instances_do_not_share_state() -> None:
    a, b = ServerMetrics(), ServerMetrics()
    a.register_model("mlp", 1)
    b.register_model("mlp", 1)
    a.observe_request("mlp", 1, "OK", 0.1, rows=1)
    assert b.registry.get_sample_value("trtserve_inference_count_total", {"model": "mlp", "version": "1"}) == 0
    registry = CollectorRegistry()
    assert ServerMetrics(registry).registry is registry


def test_concurrent_updates_are_exact(m: ServerMetrics) -> None:
    report = {**_executed(2, [0.0]), "pool_grows": 1}

    def work() -> None:
        for _ in range(500):
            m.observe_request("mlp", 1, "OK", 0.001, rows=2)
            m.apply_worker_stats("mlp", 1, report)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = m.statistics("mlp", 1)
    assert s["inference_count"] == 8000 and s["execution_count"] == 4000
    assert value(m, "trtserve_buffer_pool_grows_total", model="mlp") == 4000


def test_http_exposition_on_an_ephemeral_port(m: ServerMetrics) -> None:
    m.observe_request("mlp", 1, "OK", 0.003, rows=5)
    m.apply_worker_stats("mlp", 1, {"pool_bytes": {"pinned": 1234}})
    endpoint = start_http_server(0, "127.0.0.1", m.registry)
    port, stop = endpoint
    assert port == endpoint.port > 0
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            body = resp.read().decode()
    finally:
        stop()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body) for s in fam.samples}
    assert samples[("trtserve_inference_count_total", (("model", "mlp"), ("version", "1")))] == 5
    assert samples[("trtserve_buffer_pool_bytes", (("memory", "pinned"), ("model", "mlp")))] == 1234
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)

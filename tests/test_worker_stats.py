"""Worker stats aggregated in the worker: the same /metrics text and ModelStatistics as one entry per batch.

The golden files under tests/golden/ were captured from the previous implementation (every executed batch
sent as its own entry and observed one by one in the parent) for EXECUTIONS in one report.
"""

from __future__ import annotations

import copy
import json
import math
import random
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from service.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, PHASES, ServerMetrics, WorkerStats

GOLDEN = Path(__file__).resolve().parent / "golden"
WORKER_FED = (
    "trtserve_inference_exec_count",
    "trtserve_queue_duration_seconds",
    "trtserve_compute_duration_seconds",
    "trtserve_batch_size",
)
# (rows, queue_s, input_s, infer_s, output_s): sizes on and between bucket bounds and past the last one,
# queue times on bounds (le is inclusive), zero and past the last latency bound; phases of several sizes.
EXECUTIONS = [
    (1, [0.0005], 0.00001, 0.0002, 0.00003),
    (1, [0.0], 0.0, 0.0, 0.0),
    (2, [0.0012, 0.0049], 0.00002, 0.0011, 0.00004),
    (3, [0.001, 0.0025, 0.003], 0.0001, 0.002, 0.0003),
    (4, [0.0101], 0.0005, 0.005, 0.0001),
    (8, [0.002, 0.0021, 0.0022, 0.0023], 0.0002, 0.004, 0.0001),
    (8, [0.05], 0.00123, 0.0456, 0.000789),
    (100, [0.26, 0.3, 0.49999, 0.5, 1.2], 0.0123, 0.345, 0.0067),
    (1024, [2.5, 7.7], 0.1, 1.0, 0.2),
    (2000, [61.0, 30.0, 0.0007], 0.2, 61.5, 0.03),
    (3, [0.000499], 0.00011, 0.0021, 0.00029),
    (1, [1e-06], 3e-06, 1.7e-05, 4e-06),
]


def report_of(executions: list[tuple[Any, ...]]) -> dict[str, Any]:
    """One worker report holding `executions`, as it crosses the process boundary (JSON)."""
    w = WorkerStats()
    for ex in executions:
        w.record_exec(*ex)
    return json.loads(json.dumps(w.drain()))


def metrics_after(*reports: dict[str, Any]) -> ServerMetrics:
    m = ServerMetrics(clock=lambda: 1000.0)
    m.register_model("mlp", 1)
    for report in reports:
        assert m.apply_worker_stats("mlp", 1, report)
    return m


def worker_fed_lines(m: ServerMetrics) -> list[str]:
    """The exposition lines of the worker-fed families, `_created` values (wall-clock times) masked."""
    out = []
    for line in generate_latest(m.registry).decode().splitlines():
        name = line.split()[2] if line.startswith("#") else line.split("{")[0]
        if name.startswith(WORKER_FED):
            if name.endswith("_created") and not line.startswith("#"):
                line = line.rsplit(" ", 1)[0] + " CREATED"
            out.append(line)
    return out


def assert_same_lines(got: list[str], expected: list[str]) -> None:
    """Equal line by line; a `_sum` value only to within 1e-9 (float additions in another order)."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if "_sum{" in e:
            (g_series, g_value), (e_series, e_value) = g.rsplit(" ", 1), e.rsplit(" ", 1)
            assert g_series == e_series and math.isclose(float(g_value), float(e_value), rel_tol=0, abs_tol=1e-9), g
        else:
            assert g == e


def assert_same_statistics(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got == expected  # integer counts and nanoseconds: exactly


def test_one_report_gives_the_per_batch_path_text_and_statistics() -> None:
    m = metrics_after(report_of(EXECUTIONS))
    expected = (GOLDEN / "worker_stats_metrics.txt").read_text().splitlines()
    assert worker_fed_lines(m) == expected  # exactly, sums included: same additions in the same order
    assert_same_statistics(m.statistics("mlp", 1), json.loads((GOLDEN / "worker_stats_statistics.json").read_text()))


@pytest.mark.parametrize("chunk", [1, 5])
def test_the_same_executions_over_several_reports_give_the_same_numbers(chunk: int) -> None:
    reports = [report_of(EXECUTIONS[i : i + chunk]) for i in range(0, len(EXECUTIONS), chunk)]
    m = metrics_after(*reports)
    assert_same_lines(worker_fed_lines(m), (GOLDEN / "worker_stats_metrics.txt").read_text().splitlines())
    assert_same_statistics(m.statistics("mlp", 1), json.loads((GOLDEN / "worker_stats_statistics.json").read_text()))


def test_report_size_and_apply_do_not_grow_with_executions() -> None:
    few = report_of(EXECUTIONS[:3] * 2)
    many = report_of(EXECUTIONS[:3] * 5000)
    assert len(json.dumps(many)) < len(json.dumps(few)) + 200  # only the numbers' digits grow
    m = metrics_after(many)
    mv = {"model": "mlp", "version": "1"}
    assert m.registry.get_sample_value("trtserve_inference_exec_count_total", mv) == 15000
    assert m.registry.get_sample_value("trtserve_batch_size_count", mv) == 15000
    assert m.registry.get_sample_value("trtserve_batch_size_bucket", {**mv, "le": "1.0"}) == 10000
    assert m.registry.get_sample_value("trtserve_queue_duration_seconds_count", mv) == 5000 * 4
    s = m.statistics("mlp", 1)
    assert s["execution_count"] == 15000 and s["inference_stats"]["queue"]["count"] == 20000
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in s["batch_stats"]] == [(1, 10000), (2, 5000)]
    # exactly what 5000 separate reports of the same three executions give
    assert s == metrics_after(*[report_of(EXECUTIONS[:3])] * 5000).statistics("mlp", 1)


def test_empty_reports_change_nothing() -> None:
    w = WorkerStats()
    assert w.drain() == {}
    w.set_engines(live=1, max_batch_size=4, device_bytes=0)
    assert "exec" not in w.drain()  # gauges only
    m = metrics_after()
    before = generate_latest(m.registry)
    assert m.apply_worker_stats("mlp", 1, {})
    assert m.apply_worker_stats("mlp", 1, json.loads(json.dumps(w.drain())))
    assert generate_latest(m.registry) == before
    assert m.statistics("mlp", 1)["execution_count"] == 0 and m.statistics("mlp", 1)["batch_stats"] == []


def test_unknown_model_is_validated_then_dropped() -> None:
    m = metrics_after()
    before = generate_latest(m.registry)
    assert not m.apply_worker_stats("nope", 1, report_of(EXECUTIONS))
    assert not m.apply_worker_stats("mlp", 2, report_of(EXECUTIONS))
    assert generate_latest(m.registry) == before
    with pytest.raises(ValueError, match="malformed worker stats"):
        m.apply_worker_stats("nope", 1, {"exec": {"count": 1}})


def _bad(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A valid report of EXECUTIONS with the item at `path` replaced (or removed when value is DELETE)."""
    report = copy.deepcopy(GOOD)
    *parents, last = path
    target = report
    for key in parents:
        target = target[key]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return report


DELETE = object()
GOOD = report_of(EXECUTIONS)
NEVER_SENT = [
    ({"exec": [{"rows": 2, "queue_s": [0.1]}]}, "one entry per batch (the previous format)"),
    ({"exec": {}}, "empty exec"),
    (_bad(("exec", "count"), 11), "count disagrees with the histograms"),
    (_bad(("exec", "count"), -1), "negative count"),
    (_bad(("exec", "count"), True), "bool count"),
    (_bad(("exec", "requests"), 24), "requests disagree with the queue histogram"),
    (_bad(("exec", "queue_ns"), 1.5), "float nanoseconds"),
    (_bad(("exec", "compute_ns"), [0, 0]), "a phase missing"),
    (_bad(("exec", "extra"), 1), "unknown exec key"),
    (_bad(("exec", "histograms"), DELETE), "no histograms"),
    (_bad(("exec", "histograms", "infer"), DELETE), "a phase histogram missing"),
    (_bad(("exec", "histograms", "gpu"), [[0] * 17, 0.0]), "unknown histogram"),
    (_bad(("exec", "histograms", "queue", 0), [1] * 16), "too few buckets"),
    (_bad(("exec", "histograms", "batch_size", 0), [1] * 13), "too many buckets"),
    (_bad(("exec", "histograms", "queue", 0, 3), -1), "negative bucket count"),
    (_bad(("exec", "histograms", "queue", 1), float("nan")), "NaN sum"),
    (_bad(("exec", "histograms", "queue", 1), -0.5), "negative sum"),
    (_bad(("exec", "histograms", "input", 1), "0.1"), "string sum"),
    (_bad(("exec", "batches", 0), [1, 3, 0, 0]), "batch entry too short"),
    (_bad(("exec", "batches", 0, 1), 2), "batch counts disagree with count"),
    (_bad(("exec", "batches", 1), [1, 0, 0, 0, 0]), "a batch size twice"),
    (_bad(("exec", "batches", 0, 0), 1.0), "float rows"),
    (_bad(("builds",), [{"reason": "Grow Up!", "seconds": 1}]), "a bad build next to good executions"),
    (_bad(("pool_grows",), -1), "a bad delta next to good executions"),
]


@pytest.mark.parametrize("bad", [b for b, _ in NEVER_SENT], ids=[why for _, why in NEVER_SENT])
def test_malformed_aggregated_reports_raise_and_change_nothing(bad: dict[str, Any]) -> None:
    m = metrics_after(report_of(EXECUTIONS[:4]))
    before, stats = generate_latest(m.registry), m.statistics("mlp", 1)
    with pytest.raises(ValueError, match="malformed worker stats"):
        m.apply_worker_stats("mlp", 1, bad)
    assert generate_latest(m.registry) == before
    assert m.statistics("mlp", 1) == stats
    assert m.apply_worker_stats("mlp", 1, GOOD)  # the good report it was made from is accepted


def _reference_registry(executions: list[tuple[Any, ...]]) -> CollectorRegistry:
    """prometheus_client's own Histograms, observed one value at a time, under the same names."""
    registry = CollectorRegistry()
    queue = Histogram(
        "trtserve_queue_duration_seconds",
        "Time a request waited in the batcher queue.",
        ["model", "version"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    compute = Histogram(
        "trtserve_compute_duration_seconds",
        "Per executed batch: input, infer, output.",
        ["model", "version", "phase"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    batch = Histogram(
        "trtserve_batch_size",
        "Executed batch sizes (rows).",
        ["model", "version"],
        buckets=BATCH_BUCKETS,
        registry=registry,
    )
    queue.labels("mlp", "1")
    for phase in PHASES:
        compute.labels("mlp", "1", phase)
    batch.labels("mlp", "1")
    for rows, queue_s, *phases in executions:
        batch.labels("mlp", "1").observe(rows)
        for q in queue_s:
            queue.labels("mlp", "1").observe(q)
        for phase, seconds in zip(PHASES, phases):
            compute.labels("mlp", "1", phase).observe(seconds)
    return registry


def _histogram_lines(text: bytes) -> list[str]:
    names = ("trtserve_batch_size", "trtserve_queue_duration_seconds", "trtserve_compute_duration_seconds")
    out = []
    for line in text.decode().splitlines():
        name = line.split()[2] if line.startswith(("# HELP", "# TYPE")) else line.split("{")[0]
        if name.startswith(names):
            out.append(line.rsplit(" ", 1)[0] + " CREATED" if "_created{" in line else line)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_exposition_matches_prometheus_client_histograms_in_both_formats(seed: int) -> None:
    rng = random.Random(seed)
    bounds = list(LATENCY_BUCKETS)

    def seconds() -> float:  # bounds themselves, and values between them and past the last
        return rng.choice(bounds) if rng.random() < 0.3 else rng.expovariate(1 / rng.choice(bounds))

    executions = [
        (
            rng.choice([1, 2, 3, 8, 9, 1024, 1025]),
            [seconds() for _ in range(rng.randint(0, 4))],
            seconds(),
            seconds(),
            seconds(),
        )
        for _ in range(300)
    ]
    m = metrics_after(report_of(executions))
    reference = _reference_registry(executions)
    for generate in (generate_latest, generate_openmetrics):
        got, expected = _histogram_lines(generate(m.registry)), _histogram_lines(generate(reference))
        assert got == expected, generate


def test_worker_fed_series_follow_model_registration() -> None:
    m = metrics_after(report_of(EXECUTIONS))
    mv = {"model": "mlp", "version": "1"}
    m.register_model("mlp", 2)
    assert m.registry.get_sample_value("trtserve_batch_size_count", {"model": "mlp", "version": "2"}) == 0
    assert (
        m.registry.get_sample_value(
            "trtserve_compute_duration_seconds_bucket",
            {"model": "mlp", "version": "2", "phase": "output", "le": "+Inf"},
        )
        == 0
    )
    m.forget_model("mlp", 1)
    assert m.registry.get_sample_value("trtserve_batch_size_count", mv) is None
    assert m.registry.get_sample_value("trtserve_queue_duration_seconds_sum", mv) is None
    m.register_model("mlp", 1)  # back from zero
    assert m.registry.get_sample_value("trtserve_batch_size_count", mv) == 0
    assert m.registry.get_sample_value("trtserve_compute_duration_seconds_sum", {**mv, "phase": "infer"}) == 0
    # the collector describes its names: a second metric of the same name is refused, a restricted scrape finds it
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Histogram("trtserve_batch_size", "again", ["model"], registry=m.registry)
    restricted = generate_latest(m.registry.restricted_registry(["trtserve_batch_size_count"])).decode()
    assert 'trtserve_batch_size_count{model="mlp",version="1"} 0.0' in restricted


def test_pending_is_read_at_scrape_time_and_exact_under_threads() -> None:
    m = metrics_after()
    mv = {"model": "mlp", "version": "1"}

    def work() -> None:
        for _ in range(2000):
            m.add_pending("mlp", 1, 1)
            m.add_pending("mlp", "1", -1)
        m.add_pending("mlp", 1, 1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.registry.get_sample_value("trtserve_pending_requests", mv) == 4
    m.add_pending("nope", 1, 1)
    m.add_pending("mlp", 7, 1)
    assert {
        s.labels["version"]
        for fam in m.registry.collect()
        for s in fam.samples
        if s.name == "trtserve_pending_requests"
    } == {"1"}
    m.forget_model("mlp")
    m.add_pending("mlp", 1, 1)  # forgotten: dropped
    m.register_model("mlp", 1)
    assert m.registry.get_sample_value("trtserve_pending_requests", mv) == 0

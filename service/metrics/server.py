"""Every trtserve metric, defined once; the parent process owns the Prometheus registry.

Workers never touch Prometheus: they send a stats report (schema and validation in
`service/metrics/report.py`, built by `service/metrics/worker_stats.py`) and the parent applies it with
`ServerMetrics.apply_worker_stats`, one step per series whatever the number of executed batches: the
worker-fed histograms are `AggregatedHistogram`s, which take bucket counts. Request-level numbers (status,
end-to-end duration, rows) are recorded by the parent itself with `observe_request`. Labels come only from
models registered with `register_model`; anything about an unknown model is dropped, so a client asking
for a made-up name can never create a series. The same numbers feed `statistics()`, the body of the
ModelStatistics RPC (tritonclient's `get_inference_statistics`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.metrics.histogram import AggregatedHistogram
from service.metrics.report import BATCH_BUCKETS, LATENCY_BUCKETS, MEMORY_KINDS, PHASES, validate
from service.metrics.requests import RequestFamilies

PREFIX = "trtserve_"
BUILD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_MV, _M = ("model", "version"), ("model",)

# name (without prefix; counters without _total) -> (kind, label names, help, buckets)
SPECS: dict[str, tuple[str, tuple[str, ...], str, tuple[float, ...]]] = {
    "inference_requests": ("counter", (*_MV, "status"), "Requests by gRPC status name.", ()),
    "inference_count": ("counter", _MV, "Inferences (rows) of successful requests.", ()),
    "inference_exec_count": ("counter", _MV, "Executed batches.", ()),
    "request_duration_seconds": ("histogram", _MV, "End-to-end duration of successful requests.", LATENCY_BUCKETS),
    "queue_duration_seconds": ("histogram", _MV, "Time a request waited in the batcher queue.", LATENCY_BUCKETS),
    "compute_duration_seconds": (
        "histogram",
        (*_MV, "phase"),
        "Per executed batch: input, infer, output.",
        LATENCY_BUCKETS,
    ),
    "batch_size": ("histogram", _MV, "Executed batch sizes (rows).", BATCH_BUCKETS),
    "pending_requests": ("gauge", _MV, "Requests sent to the worker and not answered yet.", ()),
    "engine_builds": ("counter", ("model", "reason"), "Engines built or loaded, by reason.", ()),
    "engine_build_duration_seconds": ("histogram", _M, "Time to build or load one engine.", BUILD_BUCKETS),
    "engines_live": ("gauge", _M, "Engines alive in the worker.", ()),
    "engine_max_batch_size": ("gauge", _M, "Largest capacity among live engines (0 = none).", ()),
    "engine_device_memory_bytes": ("gauge", _M, "Device memory held by live engines.", ()),
    "buffer_pool_bytes": ("gauge", ("model", "memory"), "Buffer pool bytes allocated, by memory kind.", ()),
    "buffer_pool_cap_bytes": ("gauge", _M, "Buffer pool cap over all memory kinds (0 = no cap).", ()),
    "buffer_pool_grows": ("counter", _M, "Buffer pool reallocations.", ()),
    "worker_restarts": ("counter", _M, "Model worker restarts.", ()),
    "model_ready": ("gauge", _MV, "1 when the model version serves requests.", ()),
}
# Fed with bucket counts from the workers' reports, not single observations.
_AGGREGATED = {"queue_duration_seconds", "compute_duration_seconds", "batch_size"}
# Counted per request as plain numbers (`requests.py`), not through prometheus_client's metric objects.
_PER_REQUEST = ("inference_requests", "inference_count", "request_duration_seconds")


def series_names(name: str) -> tuple[str, ...]:
    """The sample names a scrape shows for metric `name` (a SPECS key)."""
    kind = SPECS[name][0]
    full = PREFIX + name
    if kind == "counter":
        return (full + "_total",)
    if kind == "histogram":
        return (full + "_bucket", full + "_sum", full + "_count")
    return (full,)


class ServerMetrics:
    """Prometheus metrics plus the ModelStatistics accumulator, for configured models only."""

    def __init__(self, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        self._lock = threading.Lock()
        self._m: dict[str, Any] = {}
        for name, (kind, labels, doc, buckets) in SPECS.items():
            if name in _PER_REQUEST:
                continue
            if kind == "counter":
                self._m[name] = Counter(PREFIX + name, doc, labels, registry=self.registry)
            elif kind == "gauge":
                self._m[name] = Gauge(PREFIX + name, doc, labels, registry=self.registry)
            elif name in _AGGREGATED:
                self._m[name] = AggregatedHistogram(PREFIX + name, doc, labels, buckets, self.registry)
            else:
                self._m[name] = Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)
        self._versions: dict[str, set[str]] = {}
        self._series: dict[str, set[tuple[str, tuple[str, ...]]]] = {}
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._requests = RequestFamilies(PREFIX, {name: SPECS[name][2] for name in _PER_REQUEST},
                                         SPECS["request_duration_seconds"][3], self._lock, self.registry)

    # -- model registry (the label guard) --------------------------------------------------------------
    def register_model(self, name: str, version: int | str) -> None:
        """Allow labels for this model version and create its series at zero."""
        v = str(version)
        with self._lock:
            if v in self._versions.setdefault(name, set()):
                return
            first = not self._versions[name]
            self._versions[name].add(v)
            for metric in (
                "inference_exec_count",
                "queue_duration_seconds",
                "batch_size",
                "pending_requests",
                "model_ready",
            ):
                self._child(metric, name, v)
            series = self._requests.add(name, v)
            self._child("pending_requests", name, v).set_function(lambda: series.pending)
            for phase in PHASES:
                self._child("compute_duration_seconds", name, v, phase)
            if first:
                for metric in (
                    "engine_build_duration_seconds",
                    "engines_live",
                    "engine_max_batch_size",
                    "engine_device_memory_bytes",
                    "buffer_pool_cap_bytes",
                    "buffer_pool_grows",
                    "worker_restarts",
                ):
                    self._child(metric, name)
                for kind in MEMORY_KINDS:
                    self._child("buffer_pool_bytes", name, kind)

    def known(self, model: str, version: int | str | None = None) -> bool:
        """True when `model` (and `version`, if given) was registered."""
        versions = self._versions.get(model)
        return bool(versions) and (version is None or str(version) in versions)

    def forget_model(self, name: str, version: int | str | None = None) -> None:
        """Remove the series of one version (or of the whole model, with its per-model series)."""
        with self._lock:
            versions = self._versions.get(name, set())
            gone = set(versions) if version is None else versions & {str(version)}
            versions -= gone
            for v in gone:
                self._requests.series.pop((name, v), None)
            whole = not versions
            for metric, values in list(self._series.get(name, ())):
                per_version = SPECS[metric][1][:2] == _MV
                if whole or (per_version and values[1] in gone):
                    self._m[metric].remove(*values)
                    self._series[name].discard((metric, values))
                    self._children.pop((metric, values), None)
            if whole:
                self._versions.pop(name, None)
                self._series.pop(name, None)

    def _child(self, metric: str, model: str, *values: str) -> Any:
        # Cached: labels() costs a lock and a dict walk, and the request path calls this several times.
        key = (metric, (model, *values))
        child = self._children.get(key)
        if child is None:
            self._series.setdefault(model, set()).add(key)
            child = self._children[key] = self._m[metric].labels(*key[1])
        return child

    # -- parent-side events ----------------------------------------------------------------------------
    def observe_request(self, model: str, version: int | str, status: str, seconds: float, rows: int) -> bool:
        """One finished request; `status` is a grpc.StatusCode name. False when the model is unknown."""
        v = str(version)
        with self._lock:
            series = self._requests.series.get((model, v))
            if series is None:
                return False
            if status == "OK":
                series.ok(seconds, rows, int(self._clock() * 1000))
            else:
                series.fail(status, seconds)
            return True

    def add_pending(self, model: str, version: int | str, delta: int) -> None:
        """+1 when a request is handed to the worker, -1 when its answer (or failure) comes back."""
        series = self._requests.series.get((model, str(version)))
        if series is not None:  # registered; only the event loop's thread changes it, the gauge reads it
            series.pending += delta

    def set_ready(self, model: str, version: int | str, ready: bool) -> None:
        with self._lock:
            if self.known(model, version):
                self._child("model_ready", model, str(version)).set(1 if ready else 0)

    def worker_restarted(self, model: str) -> None:
        """Count a restart and zero the dead worker's engine and pool gauges (its memory is gone)."""
        with self._lock:
            if not self.known(model):
                return
            self._child("worker_restarts", model).inc()
            for metric in ("engines_live", "engine_max_batch_size", "engine_device_memory_bytes"):
                self._child(metric, model).set(0)
            for kind in MEMORY_KINDS:
                self._child("buffer_pool_bytes", model, kind).set(0)

    # -- worker stats ----------------------------------------------------------------------------------
    def apply_worker_stats(self, model: str, version: int | str, stats: dict[str, Any]) -> bool:
        """Apply one worker report (schema in `service/metrics/report.py`). Validates everything before
        changing anything; raises ValueError on a malformed report, returns False for an unknown model."""
        validate(stats)
        v = str(version)
        with self._lock:
            if not self.known(model, v):
                return False
            ex = stats.get("exec")
            if ex is not None:
                self._requests.series[(model, v)].stats.add_executions(ex)
                self._child("inference_exec_count", model, v).inc(ex["count"])
                histograms = ex["histograms"]
                self._child("batch_size", model, v).add(*histograms["batch_size"])
                self._child("queue_duration_seconds", model, v).add(*histograms["queue"])
                for phase in PHASES:
                    self._child("compute_duration_seconds", model, v, phase).add(*histograms[phase])
            for build in stats.get("builds", ()):
                self._child("engine_builds", model, build["reason"]).inc()
                self._child("engine_build_duration_seconds", model).observe(float(build["seconds"]))
            for key, metric in (
                ("engines_live", "engines_live"),
                ("engine_max_batch_size", "engine_max_batch_size"),
                ("engine_device_bytes", "engine_device_memory_bytes"),
                ("pool_cap_bytes", "buffer_pool_cap_bytes"),
            ):
                if key in stats:
                    self._child(metric, model).set(stats[key])
            for kind, nbytes in stats.get("pool_bytes", {}).items():
                self._child("buffer_pool_bytes", model, kind).set(nbytes)
            if stats.get("pool_grows"):
                self._child("buffer_pool_grows", model).inc(stats["pool_grows"])
            return True

    # -- ModelStatistics -------------------------------------------------------------------------------
    def registered(self) -> list[tuple[str, str]]:
        """(model, version) pairs, sorted: what a ModelStatistics request without a name returns."""
        with self._lock:
            return sorted(self._requests.series)

    def statistics(self, model: str, version: int | str) -> dict[str, Any]:
        """ModelStatistics as a dict in protobuf JSON field names (json_format.ParseDict takes it).
        Raises KeyError for a model version that is not registered."""
        with self._lock:
            return self._requests.series[(model, str(version))].stats.to_dict(model, str(version))

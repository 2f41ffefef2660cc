"""Every trtserve metric, defined once; the parent process owns the Prometheus registry.

Workers never touch Prometheus: they send plain JSON-serializable dicts (op `stats`, see
`service/workers/protocol.py`) and the parent applies them with `ServerMetrics.apply_worker_stats`.
Counters and histogram observations travel as DELTAS since the worker's previous report (so a worker
restart loses nothing already reported); gauges travel as current values. Every key is optional:

    {
      "exec": [                       # one entry per executed batch, in any order
        {"rows": 8,                   # executed batch size (sum of the requests' rows)
         "queue_s": [0.001, 0.002],   # queue time of each request in the batch (its length = requests)
         "input_s": 0.0001, "infer_s": 0.004, "output_s": 0.0002},   # the batch's compute phases
      ],
      "builds": [{"reason": "grow", "seconds": 1.2}],   # reason: first|grow|bucket|warmup|cache_hit|...
      "engines_live": 1,              # gauges: the worker's state right now
      "engine_max_batch_size": 8,     # largest live engine capacity (0 = none)
      "engine_device_bytes": 0,       # device memory held by live engines
      "pool_bytes": {"host": 123, "pinned": 0, "device": 0},
      "pool_cap_bytes": 0,            # max_pool_bytes, compared with the sum of pool_bytes; 0 = no cap
      "pool_grows": 1                 # delta: buffer pool reallocations
    }

`WorkerStats` builds exactly this dict on the worker side. Request-level numbers (status, end-to-end
duration, rows) are recorded by the parent itself with `observe_request`. Labels come only from models
registered with `register_model`; anything about an unknown model is dropped, so a client asking for
a made-up name can never create a series. The same numbers feed `statistics()`, the body of the
ModelStatistics RPC (tritonclient's `get_inference_statistics`).
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any, NamedTuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

PREFIX = "trtserve_"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)
BUILD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BATCH_BUCKETS = tuple(float(2 ** i) for i in range(11))  # 1, 2, 4, ..., 1024
PHASES = ("input", "infer", "output")
MEMORY_KINDS = ("device", "pinned", "host")
_MV, _M = ("model", "version"), ("model",)

# name (without prefix; counters without _total) -> (kind, label names, help, buckets)
SPECS: dict[str, tuple[str, tuple[str, ...], str, tuple[float, ...]]] = {
    "inference_requests": ("counter", (*_MV, "status"), "Requests by gRPC status name.", ()),
    "inference_count": ("counter", _MV, "Inferences (rows) of successful requests.", ()),
    "inference_exec_count": ("counter", _MV, "Executed batches.", ()),
    "request_duration_seconds": ("histogram", _MV, "End-to-end duration of successful requests.",
                                 LATENCY_BUCKETS),
    "queue_duration_seconds": ("histogram", _MV, "Time a request waited in the batcher queue.",
                               LATENCY_BUCKETS),
    "compute_duration_seconds": ("histogram", (*_MV, "phase"), "Per executed batch: input, infer, output.",
                                 LATENCY_BUCKETS),
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
_REASON = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_STATS_KEYS = {"exec", "builds", "engines_live", "engine_max_batch_size", "engine_device_bytes",
               "pool_bytes", "pool_cap_bytes", "pool_grows"}


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

    def __init__(self, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        self._lock = threading.Lock()
        self._m: dict[str, Any] = {}
        for name, (kind, labels, doc, buckets) in SPECS.items():
            if kind == "counter":
                self._m[name] = Counter(PREFIX + name, doc, labels, registry=self.registry)
            elif kind == "gauge":
                self._m[name] = Gauge(PREFIX + name, doc, labels, registry=self.registry)
            else:
                self._m[name] = Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)
        self._versions: dict[str, set[str]] = {}
        self._series: dict[str, set[tuple[str, tuple[str, ...]]]] = {}
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._stats: dict[tuple[str, str], _Stats] = {}

    # -- model registry (the label guard) --------------------------------------------------------------
    def register_model(self, name: str, version: int | str) -> None:
        """Allow labels for this model version and create its series at zero."""
        v = str(version)
        with self._lock:
            if v in self._versions.setdefault(name, set()):
                return
            first = not self._versions[name]
            self._versions[name].add(v)
            self._stats[(name, v)] = _Stats()
            for metric in ("inference_count", "inference_exec_count", "request_duration_seconds",
                           "queue_duration_seconds", "batch_size", "pending_requests", "model_ready"):
                self._child(metric, name, v)
            self._child("inference_requests", name, v, "OK")
            for phase in PHASES:
                self._child("compute_duration_seconds", name, v, phase)
            if first:
                for metric in ("engine_build_duration_seconds", "engines_live", "engine_max_batch_size",
                               "engine_device_memory_bytes", "buffer_pool_cap_bytes", "buffer_pool_grows",
                               "worker_restarts"):
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
                self._stats.pop((name, v), None)
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
    def observe_request(self, model: str, version: int | str, status: str, seconds: float,
                        rows: int) -> bool:
        """One finished request; `status` is a grpc.StatusCode name. False when the model is unknown."""
        v = str(version)
        with self._lock:
            if not self.known(model, v):
                return False
            self._child("inference_requests", model, v, status).inc()
            stats = self._stats[(model, v)]
            if status == "OK":
                self._child("request_duration_seconds", model, v).observe(seconds)
                self._child("inference_count", model, v).inc(rows)
                stats.inference_count += rows
                stats.last_inference_ms = int(self._clock() * 1000)
                stats.add("success", 1, seconds)
            else:
                stats.add("fail", 1, seconds)
            return True

    def add_pending(self, model: str, version: int | str, delta: int) -> None:
        """+1 when a request is handed to the worker, -1 when its answer (or failure) comes back."""
        with self._lock:
            if self.known(model, version):
                self._child("pending_requests", model, str(version)).inc(delta)

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
        """Apply one worker report (schema in the module docstring). Validates everything before
        changing anything; raises ValueError on a malformed report, returns False for an unknown model."""
        _validate(stats)
        v = str(version)
        with self._lock:
            if not self.known(model, v):
                return False
            acc = self._stats[(model, v)]
            executions = stats.get("exec", ())
            if executions:  # children looked up once per report: a report holds many executions
                exec_count = self._child("inference_exec_count", model, v)
                batch_size = self._child("batch_size", model, v)
                queue_duration = self._child("queue_duration_seconds", model, v)
                compute = {phase: self._child("compute_duration_seconds", model, v, phase) for phase in PHASES}
            for ex in executions:
                rows, queue = int(ex["rows"]), [float(q) for q in ex.get("queue_s", ())]
                exec_count.inc()
                batch_size.observe(rows)
                for q in queue:
                    queue_duration.observe(q)
                acc.execution_count += 1
                acc.add("queue", len(queue), sum(queue))
                batch = acc.batches.setdefault(rows, {p: [0, 0] for p in PHASES})
                for phase in PHASES:
                    seconds = float(ex.get(phase + "_s", 0.0))
                    compute[phase].observe(seconds)
                    # Triton attributes a batch's compute time to each request in it.
                    acc.add("compute_" + phase, len(queue), seconds * len(queue))
                    batch[phase][0] += 1
                    batch[phase][1] += round(seconds * 1e9)
            for build in stats.get("builds", ()):
                self._child("engine_builds", model, build["reason"]).inc()
                self._child("engine_build_duration_seconds", model).observe(float(build["seconds"]))
            for key, metric in (("engines_live", "engines_live"),
                                ("engine_max_batch_size", "engine_max_batch_size"),
                                ("engine_device_bytes", "engine_device_memory_bytes"),
                                ("pool_cap_bytes", "buffer_pool_cap_bytes")):
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
            return sorted(self._stats)

    def statistics(self, model: str, version: int | str) -> dict[str, Any]:
        """ModelStatistics as a dict in protobuf JSON field names (json_format.ParseDict takes it).
        Raises KeyError for a model version that is not registered."""
        with self._lock:
            return self._stats[(model, str(version))].to_dict(model, str(version))


class _Stats:
    """Cumulative numbers for one model version, in Triton's ModelStatistics shape."""

    DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")

    def __init__(self) -> None:
        self.durations = {k: [0, 0] for k in self.DURATIONS}  # [count, ns]
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, dict[str, list[int]]] = {}

    def add(self, key: str, count: int, seconds: float) -> None:
        self.durations[key][0] += count
        self.durations[key][1] += round(seconds * 1e9)

    def to_dict(self, model: str, version: str) -> dict[str, Any]:
        def dur(pair: list[int]) -> dict[str, int]:
            return {"count": pair[0], "ns": pair[1]}

        return {
            "name": model, "version": version, "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count, "execution_count": self.execution_count,
            "inference_stats": {k: dur(v) for k, v in self.durations.items()},
            "batch_stats": [{"batch_size": b, **{"compute_" + p: dur(phases[p]) for p in PHASES}}
                            for b, phases in sorted(self.batches.items())],
        }


def _validate(stats: dict[str, Any]) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"malformed worker stats: {what}")

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0

    need(isinstance(stats, dict), "not a dict")
    need(not set(stats) - _STATS_KEYS, f"unknown keys {sorted(set(stats) - _STATS_KEYS)}")
    need(all(isinstance(stats.get(k, []), list) for k in ("exec", "builds")), "exec and builds must be lists")
    for ex in stats.get("exec", ()):
        need(isinstance(ex, dict) and isinstance(ex.get("rows"), int) and number(ex["rows"]),
             f"exec entry {ex!r} needs integer rows >= 0")
        need(not set(ex) - {"rows", "queue_s", "input_s", "infer_s", "output_s"}, f"exec keys {sorted(ex)}")
        need(all(number(x) for x in ex.get("queue_s", [])), "queue_s must be seconds >= 0")
        need(all(number(ex.get(p + "_s", 0)) for p in PHASES), "phase durations must be seconds >= 0")
    for build in stats.get("builds", ()):
        need(isinstance(build, dict) and isinstance(build.get("reason"), str)
             and bool(_REASON.match(build["reason"])) and number(build.get("seconds")),
             f"build entry {build!r} needs a reason like 'grow' and seconds >= 0")
    for key in ("engines_live", "engine_max_batch_size", "engine_device_bytes", "pool_cap_bytes",
                "pool_grows"):
        need(key not in stats or (isinstance(stats[key], int) and number(stats[key])), f"{key} must be int >= 0")
    pool = stats.get("pool_bytes", {})
    need(isinstance(pool, dict) and set(pool) <= set(MEMORY_KINDS)
         and all(isinstance(n, int) and number(n) for n in pool.values()),
         f"pool_bytes must map {MEMORY_KINDS} to int >= 0")


class WorkerStats:
    """Worker-side builder of the stats dict: record events, then `drain()` one report to send."""

    def __init__(self) -> None:
        self._exec: list[dict[str, Any]] = []
        self._builds: list[dict[str, Any]] = []
        self._grows = 0
        self._gauges: dict[str, Any] = {}
        self._lock = threading.Lock()

    def record_exec(self, rows: int, queue_s: list[float], input_s: float, infer_s: float,
                    output_s: float) -> None:
        with self._lock:
            self._exec.append({"rows": rows, "queue_s": list(queue_s), "input_s": input_s,
                               "infer_s": infer_s, "output_s": output_s})

    def record_build(self, reason: str, seconds: float) -> None:
        with self._lock:
            self._builds.append({"reason": reason, "seconds": seconds})

    def record_pool_grow(self, times: int = 1) -> None:
        with self._lock:
            self._grows += times

    def set_engines(self, live: int, max_batch_size: int, device_bytes: int) -> None:
        with self._lock:
            self._gauges.update(engines_live=live, engine_max_batch_size=max_batch_size,
                                engine_device_bytes=device_bytes)

    def set_pool(self, bytes_by_kind: dict[str, int], cap_bytes: int) -> None:
        with self._lock:
            self._gauges.update(pool_bytes=dict(bytes_by_kind), pool_cap_bytes=cap_bytes)

    def drain(self) -> dict[str, Any]:
        """The deltas since the previous drain plus the current gauges ({} when nothing changed)."""
        with self._lock:
            out: dict[str, Any] = dict(self._gauges)
            if self._exec:
                out["exec"] = self._exec
            if self._builds:
                out["builds"] = self._builds
            if self._grows:
                out["pool_grows"] = self._grows
            self._exec, self._builds, self._grows, self._gauges = [], [], 0, {}
            return out


# -- HTTP exposition -----------------------------------------------------------------------------------
class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsEndpoint(NamedTuple):
    """A running /metrics server: `port` is the bound port, `stop()` shuts it down and joins."""

    port: int
    stop: Callable[[], None]


def start_http_server(port: int, host: str, registry: CollectorRegistry) -> MetricsEndpoint:
    """Serve `registry` in Prometheus text format on a daemon thread; port 0 picks a free port."""
    server_class = type("_BoundServer", (_Server,), {
        "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
    httpd = make_server(host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join()

    return MetricsEndpoint(httpd.server_address[1], stop)

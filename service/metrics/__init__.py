"""Metrics: every trtserve metric defined once (`server.py`), the worker's stats report (`report.py`,
built by `worker_stats.py`), the collector for worker-fed histograms (`histogram.py`), the request path's
counters kept as plain numbers (`requests.py`), ModelStatistics (`statistics.py`) and the HTTP endpoint
(`http.py`). The parent process owns the Prometheus registry."""

from service.metrics.http import MetricsEndpoint, start_http_server
from service.metrics.report import BATCH_BUCKETS, LATENCY_BUCKETS, MEMORY_KINDS, PHASES
from service.metrics.server import BUILD_BUCKETS, PREFIX, SPECS, ServerMetrics, series_names
from service.metrics.worker_stats import WorkerStats

__all__ = [
    "BATCH_BUCKETS",
    "BUILD_BUCKETS",
    "LATENCY_BUCKETS",
    "MEMORY_KINDS",
    "PHASES",
    "PREFIX",
    "SPECS",
    "MetricsEndpoint",
    "ServerMetrics",
    "WorkerStats",
    "series_names",
    "start_http_server",
]

"""The request metrics as plain numbers per model version, exposed as Prometheus families at scrape time.

Every inference request updates three series (requests by status, rows, the duration histogram) and the
ModelStatistics numbers. Through prometheus_client's `Counter` and `Histogram` (three labelled children,
each behind its own lock and checks) that took 15-19 µs of the event loop's ~100 µs per `tiny` request,
against 7-8 µs this way (bench/results/profile.md, session 11). Here a finished request adds to a few
numbers of its model version's `RequestSeries` under its owner's lock, and `RequestFamilies` turns them into
the samples a `Counter` and a `Histogram` with these names, labels and buckets would expose (`_total`,
`_bucket`/`_count`/`_sum`, `_created`; a test compares the two scrapes): dashboards and alerts see no
difference.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterator, Sequence
from itertools import accumulate

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from service.metrics.histogram import add_created, exposes_created
from service.metrics.statistics import ModelStatistics

_LABELS = ("model", "version")


class RequestSeries:
    """One model version's finished requests: counts by status, rows and the duration histogram of the
    successful ones, the version's ModelStatistics (which the workers' reports add to as well), and the
    requests in flight (read by a gauge)."""

    __slots__ = ("_bounds", "buckets", "created", "duration_sum", "failed", "pending", "stats")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.stats = ModelStatistics()
        self.buckets = [0] * (len(bounds) + 1)  # not cumulative, +Inf last
        self.duration_sum = 0.0
        self.failed: dict[str, list[float]] = {}  # status -> [count, created]
        self.pending = 0
        self.created = time.time()

    def ok(self, seconds: float, rows: int, now_ms: int) -> None:
        stats = self.stats
        stats.inference_count += rows
        stats.last_inference_ms = now_ms
        stats.add("success", 1, seconds)
        self.buckets[bisect.bisect_left(self._bounds, seconds)] += 1  # `le` bounds are inclusive
        self.duration_sum += seconds

    def fail(self, status: str, seconds: float) -> None:
        self.stats.add("fail", 1, seconds)
        entry = self.failed.get(status)
        if entry is None:
            entry = self.failed[status] = [0, time.time()]
        entry[0] += 1


class RequestFamilies:
    """The collector of every model version's `RequestSeries`: `<prefix>inference_requests_total`
    (model, version, status), `<prefix>inference_count_total` and `<prefix>request_duration_seconds`
    (model, version). `lock` is the one its owner updates the series under."""

    def __init__(self, prefix: str, docs: dict[str, str], buckets: Sequence[float], lock: threading.Lock,
                 registry: CollectorRegistry) -> None:
        self._prefix = prefix
        self._docs = docs
        self._bounds = tuple(buckets)
        self._le = (*(floatToGoString(b) for b in buckets), "+Inf")
        self._created = exposes_created()
        self._lock = lock
        self.series: dict[tuple[str, str], RequestSeries] = {}
        registry.register(self)

    def add(self, model: str, version: str) -> RequestSeries:
        """The series of a newly registered model version (the caller holds the lock)."""
        series = self.series[(model, version)] = RequestSeries(self._bounds)
        return series

    def describe(self) -> list[Metric]:
        """The families without samples: lets the registry check names and serve `?name[]=` scrapes."""
        return self._families()

    def collect(self) -> Iterator[Metric]:
        requests, rows, duration = families = self._families()
        with self._lock:
            snapshot = [(labels, s.stats.durations["success"][0], [(k, *v) for k, v in s.failed.items()],
                         s.stats.inference_count, list(s.buckets), s.duration_sum, s.created)
                        for labels, s in self.series.items()]
        created = self._created
        for labels, ok, failed, count, buckets, total, since in snapshot:
            requests.add_metric([*labels, "OK"], ok, created=since if created else None)
            for status, n, status_since in failed:
                requests.add_metric([*labels, status], n, created=status_since if created else None)
            rows.add_metric(labels, count, created=since if created else None)
            duration.add_metric(labels, list(zip(self._le, accumulate(buckets))), total)
            if created:
                add_created(duration, dict(zip(_LABELS, labels)), since)
        yield from families

    def _families(self) -> list[Metric]:
        prefix, docs = self._prefix, self._docs
        return [CounterMetricFamily(prefix + "inference_requests", docs["inference_requests"],
                                    labels=(*_LABELS, "status")),
                CounterMetricFamily(prefix + "inference_count", docs["inference_count"], labels=_LABELS),
                HistogramMetricFamily(prefix + "request_duration_seconds", docs["request_duration_seconds"],
                                      labels=_LABELS)]

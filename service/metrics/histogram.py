"""A Prometheus histogram fed with bucket counts instead of single observations.

The workers count their observations into buckets themselves (`service/metrics/worker_stats.py`); the parent adds
each report's counts in one step per series. prometheus_client's `Histogram` only takes one value at a
time, so this custom collector owns those series and exposes them exactly as a `Histogram` with the same
name, help, labels and buckets would: `_bucket` (cumulative) per bound and +Inf, `_count`, `_sum`,
and `_created` (the time the series was created, unless PROMETHEUS_DISABLE_CREATED_SERIES is set).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from itertools import accumulate

from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString


def exposes_created() -> bool:
    """Whether series carry `_created` samples: prometheus_client's own metrics read the same variable."""
    return os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in ("true", "1", "t")


def add_created(family: HistogramMetricFamily, labels: dict[str, str], created: float) -> None:
    """The `_created` sample of one histogram series: HistogramMetricFamily.add_metric takes no creation
    time (CounterMetricFamily's does, and appends this same sample); a Histogram exposes one per series."""
    family.samples.append(Sample(family.name + "_created", labels, created))


class HistogramSeries:
    """One labelled series: bucket counts (not cumulative, +Inf last) and the sum of the values."""

    __slots__ = ("_lock", "counts", "created", "sum")

    def __init__(self, buckets: int, lock: threading.Lock) -> None:
        self._lock = lock
        self.counts = [0] * buckets
        self.sum = 0.0
        self.created = time.time()

    def add(self, counts: Sequence[int], total: float) -> None:
        """Add values already counted into this series' buckets (+Inf last), and their sum."""
        if len(counts) != len(self.counts):
            raise ValueError(f"{len(counts)} bucket counts for a histogram of {len(self.counts)} buckets")
        with self._lock:
            mine = self.counts
            for i, n in enumerate(counts):
                if n:
                    mine[i] += n
            self.sum += total


class AggregatedHistogram:
    """A labelled histogram whose series take bucket counts (`labels(...).add(counts, sum)`); registered
    on `registry`, with the `labels`/`remove` interface of prometheus_client's metrics."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._le = (*(floatToGoString(b) for b in buckets), "+Inf")
        self._created = exposes_created()
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], HistogramSeries] = {}
        registry.register(self)

    def labels(self, *values: str) -> HistogramSeries:
        """The series of these label values, created at zero on first use."""
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = HistogramSeries(len(self._le), self._lock)
            return series

    def remove(self, *values: str) -> None:
        with self._lock:
            self._series.pop(tuple(str(v) for v in values), None)

    def describe(self) -> list[Metric]:
        """The family without samples: lets the registry check names and serve `?name[]=` scrapes."""
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        with self._lock:
            snapshot = [(values, list(s.counts), s.sum, s.created) for values, s in self._series.items()]
        for values, counts, total, created in snapshot:
            family.add_metric(values, list(zip(self._le, accumulate(counts))), total)
            if self._created:
                add_created(family, dict(zip(self._labelnames, values)), created)
        yield family

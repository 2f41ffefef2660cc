"""Worker-side stats: events recorded as they happen, aggregated into one report per drain.

Executed batches are folded into bucket counts, sums and ModelStatistics totals as they are recorded
(schema in `service/metrics/report.py`), so a report's size and the parent's work to apply it stay the same
however many batches ran since the previous one: at batch 1 there is one executed batch per request.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from service.metrics.report import BATCH_BUCKETS, LATENCY_BUCKETS, PHASES


class _Executions:
    """The executed batches since the previous report, as the report's `exec` section needs them.

    The nanosecond totals are rounded per batch, as the parent did when it received one entry per batch,
    so that ModelStatistics gives the same integers as before; histogram sums add the values in order.
    `add` runs once per executed batch (per request at batch 1), so it is written out for the three phases
    and the batch size histogram is only made from `batches` in `report`."""

    __slots__ = (
        "batches",
        "compute_ns",
        "count",
        "phase_counts",
        "phase_sums",
        "queue_counts",
        "queue_ns",
        "queue_sum",
        "requests",
    )

    def __init__(self) -> None:
        self.count = self.requests = self.queue_ns = 0
        self.queue_counts = [0] * (len(LATENCY_BUCKETS) + 1)  # +Inf last
        self.queue_sum = 0.0
        self.phase_counts = tuple([0] * (len(LATENCY_BUCKETS) + 1) for _ in PHASES)
        self.phase_sums = [0.0] * len(PHASES)
        self.compute_ns = [0] * len(PHASES)
        self.batches: dict[int, list[int]] = {}  # rows -> [batches, input_ns, infer_ns, output_ns]

    def add(self, rows: int, queue_s: Sequence[float], input_s: float, infer_s: float, output_s: float) -> None:
        n = len(queue_s)
        self.count += 1
        self.requests += n
        if n:
            self.queue_ns += round(sum(queue_s) * 1e9)
            counts, total = self.queue_counts, self.queue_sum
            for q in queue_s:
                counts[bisect_left(LATENCY_BUCKETS, q)] += 1  # le is inclusive: the first bound >= q
                total += q
            self.queue_sum = total
        input_ns, infer_ns, output_ns = round(input_s * 1e9), round(infer_s * 1e9), round(output_s * 1e9)
        batch = self.batches.get(rows)
        if batch is None:
            batch = self.batches[rows] = [0, 0, 0, 0]
        batch[0] += 1
        batch[1] += input_ns
        batch[2] += infer_ns
        batch[3] += output_ns
        if n != 1:  # Triton charges each request its batch's compute time
            input_ns, infer_ns, output_ns = (
                round(input_s * n * 1e9),
                round(infer_s * n * 1e9),
                round(output_s * n * 1e9),
            )
        compute = self.compute_ns
        compute[0] += input_ns
        compute[1] += infer_ns
        compute[2] += output_ns
        input_counts, infer_counts, output_counts = self.phase_counts
        input_counts[bisect_left(LATENCY_BUCKETS, input_s)] += 1
        infer_counts[bisect_left(LATENCY_BUCKETS, infer_s)] += 1
        output_counts[bisect_left(LATENCY_BUCKETS, output_s)] += 1
        sums = self.phase_sums
        sums[0] += input_s
        sums[1] += infer_s
        sums[2] += output_s

    def report(self) -> dict[str, Any]:
        batch_counts, rows_total = [0] * (len(BATCH_BUCKETS) + 1), 0
        for rows, (batches, *_ns) in self.batches.items():
            batch_counts[bisect_left(BATCH_BUCKETS, rows)] += batches
            rows_total += rows * batches  # exact: what adding each batch's rows to a float gives
        histograms = {"batch_size": [batch_counts, float(rows_total)], "queue": [self.queue_counts, self.queue_sum]}
        for phase, counts, total in zip(PHASES, self.phase_counts, self.phase_sums):
            histograms[phase] = [counts, total]
        return {
            "count": self.count,
            "requests": self.requests,
            "histograms": histograms,
            "queue_ns": self.queue_ns,
            "compute_ns": self.compute_ns,
            "batches": [[rows, *totals] for rows, totals in self.batches.items()],
        }


class WorkerStats:
    """Worker-side builder of the stats report: record events (from any thread), then `drain()` one
    report to send."""

    def __init__(self) -> None:
        self._exec = _Executions()
        self._builds: list[dict[str, Any]] = []
        self._grows = 0
        self._gauges: dict[str, Any] = {}
        self._lock = threading.Lock()

    def record_exec(self, rows: int, queue_s: Sequence[float], input_s: float, infer_s: float, output_s: float) -> None:
        """One executed batch of `rows` rows: the queue time of each of its requests, its compute phases."""
        with self._lock:
            self._exec.add(rows, queue_s, input_s, infer_s, output_s)

    def record_build(self, reason: str, seconds: float) -> None:
        with self._lock:
            self._builds.append({"reason": reason, "seconds": seconds})

    def record_pool_grow(self, times: int = 1) -> None:
        with self._lock:
            self._grows += times

    def set_engines(self, live: int, max_batch_size: int, device_bytes: int) -> None:
        with self._lock:
            self._gauges.update(
                engines_live=live, engine_max_batch_size=max_batch_size, engine_device_bytes=device_bytes
            )

    def set_pool(self, bytes_by_kind: dict[str, int], cap_bytes: int) -> None:
        with self._lock:
            self._gauges.update(pool_bytes=dict(bytes_by_kind), pool_cap_bytes=cap_bytes)

    def drain(self) -> dict[str, Any]:
        """The deltas since the previous drain plus the current gauges ({} when nothing changed)."""
        with self._lock:
            out: dict[str, Any] = dict(self._gauges)
            if self._exec.count:
                out["exec"] = self._exec.report()
                self._exec = _Executions()
            if self._builds:
                out["builds"] = self._builds
            if self._grows:
                out["pool_grows"] = self._grows
            self._builds, self._grows, self._gauges = [], 0, {}
            return out

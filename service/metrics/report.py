"""The worker stats report: what a worker sends the parent every 100 ms, and its validation.

A plain JSON-serializable dict (op `stats`, see `service/workers/protocol.py`). Counters and histograms
travel as DELTAS since the worker's previous report (so a worker restart loses nothing already reported);
gauges travel as current values. Every key is optional:

    {
      "exec": {                       # every batch executed since the previous report, aggregated
        "count": 3,                   # executed batches
        "requests": 4,                # requests in them
        "histograms": {               # per worker-fed histogram: [bucket counts, sum of the values]
          "batch_size": [[...], 12.0],    # counts per bucket of BATCH_BUCKETS, then +Inf (not cumulative)
          "queue": [[...], 0.0065],       # one value per request, LATENCY_BUCKETS
          "input": [[...], 0.0003], "infer": [...], "output": [...]   # one value per batch, LATENCY_BUCKETS
        },
        # ModelStatistics, in integer nanoseconds rounded per executed batch:
        "queue_ns": 6500000,          # sum of the batch's queue times
        "compute_ns": [i, n, o],      # per phase, the batch's time times its requests (Triton's attribution)
        "batches": [[8, 1, i, n, o]]  # per executed batch size: rows, batches, per-phase ns
      },
      "builds": [{"reason": "grow", "seconds": 1.2}],   # reason: first|grow|bucket|warmup|cache_hit|...
      "engines_live": 1,              # gauges: the worker's state right now
      "engine_max_batch_size": 8,     # largest live engine capacity (0 = none)
      "engine_device_bytes": 0,       # device memory held by live engines
      "pool_bytes": {"host": 123, "pinned": 0, "device": 0},
      "pool_cap_bytes": 0,            # max_pool_bytes, compared with the sum of pool_bytes; 0 = no cap
      "pool_grows": 1                 # delta: buffer pool reallocations
    }

`service.metrics.worker_stats.WorkerStats` builds it; `ServerMetrics.apply_worker_stats` applies it. Its size and
the cost of checking it do not grow with the number of executions, only with the distinct batch sizes.
"""

from __future__ import annotations

import re
from typing import Any

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = tuple(float(2**i) for i in range(11))  # 1, 2, 4, ..., 1024
PHASES = ("input", "infer", "output")
MEMORY_KINDS = ("device", "pinned", "host")
# The histograms a report carries, by key, with their upper bounds (+Inf implied, its count last).
HISTOGRAMS: dict[str, tuple[float, ...]] = {
    "batch_size": BATCH_BUCKETS,
    "queue": LATENCY_BUCKETS,
    **{phase: LATENCY_BUCKETS for phase in PHASES},
}

_REASON = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_KEYS = {
    "exec",
    "builds",
    "engines_live",
    "engine_max_batch_size",
    "engine_device_bytes",
    "pool_bytes",
    "pool_cap_bytes",
    "pool_grows",
}
_EXEC_KEYS = {"count", "requests", "histograms", "queue_ns", "compute_ns", "batches"}


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"malformed worker stats: {what}")


def _number(x: Any) -> bool:
    """A real number >= 0 (NaN fails the comparison)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def validate(report: Any) -> None:
    """Raise ValueError naming the first thing wrong with `report`; checks every key and value, so that
    the parent can apply a valid report without further checks."""
    _need(isinstance(report, dict), "not a dict")
    _need(not set(report) - _KEYS, f"unknown keys {sorted(set(report) - _KEYS)}")
    if "exec" in report:
        _validate_exec(report["exec"])
    builds = report.get("builds", [])
    _need(isinstance(builds, list), "builds must be a list")
    for build in builds:
        _need(
            isinstance(build, dict)
            and isinstance(build.get("reason"), str)
            and bool(_REASON.match(build["reason"]))
            and _number(build.get("seconds")),
            f"build entry {build!r} needs a reason like 'grow' and seconds >= 0",
        )
    for key in ("engines_live", "engine_max_batch_size", "engine_device_bytes", "pool_cap_bytes", "pool_grows"):
        _need(key not in report or _count(report[key]), f"{key} must be int >= 0")
    pool = report.get("pool_bytes", {})
    _need(
        isinstance(pool, dict) and set(pool) <= set(MEMORY_KINDS) and all(_count(n) for n in pool.values()),
        f"pool_bytes must map {MEMORY_KINDS} to int >= 0",
    )


def _validate_exec(ex: Any) -> None:
    _need(isinstance(ex, dict) and set(ex) == _EXEC_KEYS, f"exec must be a dict with keys {sorted(_EXEC_KEYS)}")
    count, requests = ex["count"], ex["requests"]
    _need(_count(count) and _count(requests), "exec count and requests must be int >= 0")
    _need(_count(ex["queue_ns"]), "queue_ns must be int >= 0")
    compute = ex["compute_ns"]
    _need(
        isinstance(compute, list) and len(compute) == len(PHASES) and all(_count(n) for n in compute),
        f"compute_ns must be {len(PHASES)} ints >= 0",
    )
    histograms = ex["histograms"]
    _need(
        isinstance(histograms, dict) and set(histograms) == set(HISTOGRAMS),
        f"histograms must have the keys {sorted(HISTOGRAMS)}",
    )
    for key, bounds in HISTOGRAMS.items():
        hist = histograms[key]
        _need(isinstance(hist, list) and len(hist) == 2, f"histogram {key} must be [bucket counts, sum]")
        counts, total = hist
        _need(
            isinstance(counts, list) and len(counts) == len(bounds) + 1 and all(_count(n) for n in counts),
            f"histogram {key} needs {len(bounds) + 1} bucket counts >= 0",
        )
        observed = requests if key == "queue" else count
        _need(sum(counts) == observed, f"histogram {key} holds {sum(counts)} values, not {observed}")
        _need(_number(total) and (observed > 0 or total == 0), f"histogram {key} needs a sum >= 0 (0 when empty)")
    batches = ex["batches"]
    _need(isinstance(batches, list), "batches must be a list")
    sizes: set[int] = set()
    for entry in batches:
        _need(
            isinstance(entry, list) and len(entry) == 2 + len(PHASES) and all(_count(n) for n in entry),
            f"batch entry {entry!r} must be [rows, batches, {', '.join(p + '_ns' for p in PHASES)}], ints >= 0",
        )
        _need(entry[0] not in sizes, f"batch size {entry[0]} listed twice")
        sizes.add(entry[0])
    _need(sum(entry[1] for entry in batches) == count, "batches must add up to count")

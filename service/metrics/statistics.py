"""Cumulative numbers of one model version in Triton's ModelStatistics shape (the ModelStatistics RPC)."""

from __future__ import annotations

from typing import Any

from service.metrics.report import PHASES


class ModelStatistics:
    """Counts and nanosecond totals per duration kind, overall and per executed batch size. Not locked:
    its owner (`ServerMetrics`) is."""

    DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")

    def __init__(self) -> None:
        self.durations = {k: [0, 0] for k in self.DURATIONS}  # [count, ns]
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, dict[str, list[int]]] = {}  # rows -> phase -> [count, ns]

    def add(self, key: str, count: int, seconds: float) -> None:
        self.durations[key][0] += count
        self.durations[key][1] += round(seconds * 1e9)

    def add_executions(self, ex: dict[str, Any]) -> None:
        """Add a worker report's `exec` section (validated; schema in `service/metrics/report.py`)."""
        self.execution_count += ex["count"]
        requests = ex["requests"]
        queue = self.durations["queue"]
        queue[0] += requests
        queue[1] += ex["queue_ns"]
        for phase, ns in zip(PHASES, ex["compute_ns"]):
            compute = self.durations["compute_" + phase]
            compute[0] += requests  # Triton charges each request its batch's compute time
            compute[1] += ns
        for rows, count, *phase_ns in ex["batches"]:
            batch = self.batches.get(rows)
            if batch is None:
                batch = self.batches[rows] = {p: [0, 0] for p in PHASES}
            for phase, ns in zip(PHASES, phase_ns):
                batch[phase][0] += count
                batch[phase][1] += ns

    def to_dict(self, model: str, version: str) -> dict[str, Any]:
        """The ModelStatistics message as a dict in protobuf JSON field names (json_format.ParseDict takes it)."""

        def dur(pair: list[int]) -> dict[str, int]:
            return {"count": pair[0], "ns": pair[1]}

        return {
            "name": model,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {k: dur(v) for k, v in self.durations.items()},
            "batch_stats": [
                {"batch_size": b, **{"compute_" + p: dur(phases[p]) for p in PHASES}}
                for b, phases in sorted(self.batches.items())
            ],
        }

"""A controllable in-memory EngineBuilder for registry tests.

The model: input "x" (FP32, rows of ROW values) -> output "y" = 2x + 1, the same shape; optionally an
unpooled output "tokens" whose second dim varies. Engines report fake device bytes (1000 per unit of
capacity) and log every run. Builds record their capacity, can be held on `gate` (a threading.Event)
so a test decides exactly when a build finishes, can fail on demand, and advance a FakeClock so build
durations are exact; engine runs advance it by `run_cost` (fixed + per-row seconds), so the registry
measures known run times. Nothing here sleeps.
"""

from __future__ import annotations

import threading

import numpy as np

ROW = 1024
BYTES_PER_CAPACITY = 1000


def model(x: np.ndarray) -> np.ndarray:
    return x * np.float32(2) + np.float32(1)


def tokens(x: np.ndarray) -> np.ndarray:
    """The unpooled output: 3 int64 per row, from the row's first value (independent of chunking)."""
    return np.repeat(x[:, :1].astype(np.int64), 3, axis=1)


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class FakeEngine:
    """An engine with only `run` (like the ONNX Runtime engine)."""

    def __init__(self, builder: FakeBuilder, capacity: int) -> None:
        self.builder, self.capacity = builder, capacity
        self.device_memory_bytes = capacity * BYTES_PER_CAPACITY
        self.closed = False

    def _enter(self, rows: int) -> None:
        assert not self.closed, f"engine {self.capacity} used after close"
        assert 1 <= rows <= self.capacity, f"batch {rows} outside 1..{self.capacity}"
        self.builder._note(self.builder.runs, (self.capacity, rows))
        assert self.builder.run_gate.wait(timeout=30), "run gate never opened"
        fixed, per_row = self.builder.run_cost
        if self.builder.clock is not None and (fixed or per_row):
            self.builder.clock.advance(fixed + per_row * rows)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self._enter(len(x))
        out = {"y": model(x)}
        if self.builder.extra_output:
            out["tokens"] = tokens(x)
        return out

    def close(self) -> None:
        self.closed = True


class FakeIntoEngine(FakeEngine):
    """An engine that writes into the pool's views (`run_into`), like an IOBinding engine."""

    def run_into(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self._enter(len(x))
        np.multiply(x, np.float32(2), out=outputs["y"])
        outputs["y"] += np.float32(1)
        return {"tokens": tokens(x)} if self.builder.extra_output else {}


class FakeBuilder:
    """EngineBuilder double. `builds`: capacities asked for, in order (failed ones too); `engines`:
    the engines made; `runs`: (capacity, rows) per engine call; `fail`: capacities whose build raises;
    `gate`: builds wait on it (set = no waiting); `run_gate`: the same for engine runs; `run_cost`:
    (fixed, per-row) seconds a run advances the clock; `max_active`: most builds seen running at once.
    `wait_started(n)` / `wait_runs(n)` return once n builds / runs have begun."""

    backend = "fake"

    def __init__(self, *, run_into: bool = True, clock: FakeClock | None = None,
                 build_seconds: float = 0.0, extra_output: bool = False,
                 run_cost: tuple[float, float] = (0.0, 0.0)) -> None:
        self.engine_class = FakeIntoEngine if run_into else FakeEngine
        self.clock, self.build_seconds, self.extra_output = clock, build_seconds, extra_output
        self.run_cost = run_cost
        self.active = self.max_active = 0
        self.builds: list[int] = []
        self.engines: list[FakeEngine] = []
        self.runs: list[tuple[int, int]] = []
        self.fail: set[int] = set()
        self.fail_with: Exception | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.run_gate = threading.Event()
        self.run_gate.set()
        self._cond = threading.Condition()

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def _note(self, log: list, item: object) -> None:
        with self._cond:
            log.append(item)
            self._cond.notify_all()

    def wait_started(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.builds) >= n, timeout=30), f"{n} builds never began"

    def wait_runs(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.runs) >= n, timeout=30), f"{n} runs never began"

    def build(self, capacity: int) -> FakeEngine:
        with self._cond:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self._note(self.builds, capacity)
            assert self.gate.wait(timeout=30), "build gate never opened"
            if self.clock is not None:
                self.clock.advance(self.build_seconds)
            if capacity in self.fail:
                raise self.fail_with or RuntimeError(f"fake build of capacity {capacity} failed")
            engine = self.engine_class(self, capacity)
            self.engines.append(engine)
            return engine
        finally:
            with self._cond:
                self.active -= 1

    def engine(self, capacity: int) -> FakeEngine:
        """The latest engine built with this capacity."""
        return [e for e in self.engines if e.capacity == capacity][-1]


class FakePlanBuilder(FakeBuilder):
    """A builder with plan support (like TensorRT): plans are bytes naming their capacity."""

    def __init__(self, *, key_parts: dict | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.key_parts = key_parts or {}
        self.plan_builds: list[int] = []
        self.loads: list[int] = []
        self.refuse_load = False

    def plan_key_parts(self, capacity: int) -> dict:
        return {"model_sha256": "f" * 64, "backend": self.backend, "backend_version": "1.0",
                "precision": "FP32", "capacity": capacity, "input_dims": {"x": [ROW]}, **self.key_parts}

    def build_plan(self, capacity: int) -> bytes:
        self.build(capacity).close()  # records the build, honours gate/fail/clock
        self.engines.pop()
        self.plan_builds.append(capacity)
        return b"FAKEPLAN capacity=%d " % capacity + bytes(range(256)) * 4

    def load_plan(self, plan: bytes, capacity: int) -> FakeEngine:
        if self.refuse_load or not plan.startswith(b"FAKEPLAN capacity=%d " % capacity):
            raise RuntimeError("cannot deserialize plan")
        self.loads.append(capacity)
        engine = self.engine_class(self, capacity)
        self.engines.append(engine)
        return engine

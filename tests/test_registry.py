"""Engine registry: which engines get built, which one runs each batch, what is released, and when.

Uses the controllable in-memory builder of fake_engines.py (builds and runs held on events, a fake
clock), a real BufferPool on host memory, and no sleeps.
"""

from __future__ import annotations

import random
import threading
from collections import Counter

import numpy as np
import pytest
from tests.fake_engines import ROW, FakeBuilder, FakeClock, FakePlanBuilder, model, tokens

from service.engines.growth import BuildQueue, BuildTimes, RunTimes, wait_or_chunk
from service.engines.plan_cache import PlanCache
from service.engines.policy import Bucket, EnginePolicy, Mode, Rebuild, bucket_capacity, from_config
from service.engines.registry import EngineRegistry
from service.errors import ConfigError, InternalError, InvalidArgument, Unavailable
from service.memory.pool import BufferPool, PoolTensor

F4 = np.dtype("<f4")
MAX_BATCH = 8
SEQUENCE = [1, 5, 1, 0, 2, 3, 0, 1, 3, 2]

# One row per batch of SEQUENCE (max_batch_size 8; x and y are 1024 FP32 per row = 8192 pool bytes a
# row; fake engines hold 1000 device bytes per unit of capacity). Columns:
#   batch, builds it causes [(capacity, reason)], live capacities after it,
#   engine calls [(capacity, rows)] under BLOCKING, the same under BACKGROUND (a missing engine is
#   built off the request path and the batch runs on what is live, by chunks if nothing is large
#   enough), host pool bytes after it (exact growth: rows = largest batch so far), engine device bytes.
TABLES = {
    (Mode.REUSE, Bucket.POW2): [
        (1, [(1, "first")], [1], [(1, 1)], [(1, 1)], 8192, 1000),
        (5, [(8, "grow")], [8], [(8, 5)], [(1, 1)] * 5, 40960, 8000),
        (1, [], [8], [(8, 1)], [(8, 1)], 40960, 8000),
        (0, [], [8], [], [], 40960, 8000),
        (2, [], [8], [(8, 2)], [(8, 2)], 40960, 8000),
        (3, [], [8], [(8, 3)], [(8, 3)], 40960, 8000),
        (0, [], [8], [], [], 40960, 8000),
        (1, [], [8], [(8, 1)], [(8, 1)], 40960, 8000),
        (3, [], [8], [(8, 3)], [(8, 3)], 40960, 8000),
        (2, [], [8], [(8, 2)], [(8, 2)], 40960, 8000),
    ],
    (Mode.REUSE, Bucket.EXACT): [
        (1, [(1, "first")], [1], [(1, 1)], [(1, 1)], 8192, 1000),
        (5, [(5, "grow")], [5], [(5, 5)], [(1, 1)] * 5, 40960, 5000),
        (1, [], [5], [(5, 1)], [(5, 1)], 40960, 5000),
        (0, [], [5], [], [], 40960, 5000),
        (2, [], [5], [(5, 2)], [(5, 2)], 40960, 5000),
        (3, [], [5], [(5, 3)], [(5, 3)], 40960, 5000),
        (0, [], [5], [], [], 40960, 5000),
        (1, [], [5], [(5, 1)], [(5, 1)], 40960, 5000),
        (3, [], [5], [(5, 3)], [(5, 3)], 40960, 5000),
        (2, [], [5], [(5, 2)], [(5, 2)], 40960, 5000),
    ],
    (Mode.MULTI, Bucket.EXACT): [
        (1, [(1, "first")], [1], [(1, 1)], [(1, 1)], 8192, 1000),
        (5, [(5, "grow")], [1, 5], [(5, 5)], [(1, 1)] * 5, 40960, 6000),
        (1, [], [1, 5], [(1, 1)], [(1, 1)], 40960, 6000),
        (0, [], [1, 5], [], [], 40960, 6000),
        (2, [(2, "bucket")], [1, 2, 5], [(2, 2)], [(5, 2)], 40960, 8000),
        (3, [(3, "bucket")], [1, 2, 3, 5], [(3, 3)], [(5, 3)], 40960, 11000),
        (0, [], [1, 2, 3, 5], [], [], 40960, 11000),
        (1, [], [1, 2, 3, 5], [(1, 1)], [(1, 1)], 40960, 11000),
        (3, [], [1, 2, 3, 5], [(3, 3)], [(3, 3)], 40960, 11000),
        (2, [], [1, 2, 3, 5], [(2, 2)], [(2, 2)], 40960, 11000),
    ],
    (Mode.MULTI, Bucket.POW2): [
        (1, [(1, "first")], [1], [(1, 1)], [(1, 1)], 8192, 1000),
        (5, [(8, "grow")], [1, 8], [(8, 5)], [(1, 1)] * 5, 40960, 9000),
        (1, [], [1, 8], [(1, 1)], [(1, 1)], 40960, 9000),
        (0, [], [1, 8], [], [], 40960, 9000),
        (2, [(2, "bucket")], [1, 2, 8], [(2, 2)], [(8, 2)], 40960, 11000),
        (3, [(4, "bucket")], [1, 2, 4, 8], [(4, 3)], [(8, 3)], 40960, 15000),
        (0, [], [1, 2, 4, 8], [], [], 40960, 15000),
        (1, [], [1, 2, 4, 8], [(1, 1)], [(1, 1)], 40960, 15000),
        (3, [], [1, 2, 4, 8], [(4, 3)], [(4, 3)], 40960, 15000),
        (2, [], [1, 2, 4, 8], [(2, 2)], [(2, 2)], 40960, 15000),
    ],
}


class Events:
    """on_event recorder; `hooks[kind]()` runs when an event of that kind arrives (the test's move)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, dict]] = []
        self.hooks: dict[str, object] = {}
        self._lock = threading.Lock()

    def __call__(self, kind: str, **fields) -> None:
        with self._lock:
            self.log.append((kind, fields))
        if kind in self.hooks:
            self.hooks[kind]()

    def of(self, kind: str) -> list[dict]:
        with self._lock:
            return [f for k, f in self.log if k == kind]


def make_pool(growth: str = "exact", **kwargs) -> BufferPool:
    return BufferPool([PoolTensor("x", F4, (ROW,))], [PoolTensor("y", F4, (ROW,))], growth=growth, **kwargs)


def make(mode=Mode.REUSE, bucket=Bucket.POW2, rebuild=Rebuild.BACKGROUND, builder=None, build_seconds=2.0,
         run_cost=(0.0, 0.0), **policy):
    """A registry on a fake clock; the builder's builds and runs advance it by build_seconds, run_cost."""
    clock = FakeClock()
    builder = builder or FakeBuilder(clock=clock, build_seconds=build_seconds, run_cost=run_cost)
    events = Events()
    registry = EngineRegistry(builder, EnginePolicy(mode=mode, bucket=bucket, rebuild=rebuild, **policy),
                              max_batch_size=MAX_BATCH, on_event=events, clock=clock)
    return registry, builder, events, clock


def run_batch(registry, pool, batch, seed=0):
    """Fill the pool's inputs, execute, check the outputs; returns what execute returned."""
    bufs = pool.views(batch)
    x = np.random.default_rng(seed).standard_normal((batch, ROW), dtype=np.float32)
    bufs.inputs["x"][...] = x
    extra = registry.execute(batch, bufs)
    np.testing.assert_array_equal(bufs.outputs["y"], model(x))
    return extra, x


@pytest.mark.parametrize("rebuild", [Rebuild.BLOCKING, Rebuild.BACKGROUND])
@pytest.mark.parametrize("mode,bucket", list(TABLES))
def test_batch_sequence_tables(mode, bucket, rebuild):
    registry, builder, events, _ = make(mode, bucket, rebuild)
    pool = make_pool("exact")
    for step, (batch, builds, live, runs_blocking, runs_background, pool_bytes, engine_bytes) in enumerate(
        TABLES[mode, bucket]
    ):
        n_builds, n_runs, n_events = len(builder.builds), len(builder.runs), len(events.of("build"))
        if rebuild is Rebuild.BACKGROUND and registry.live_capacities():
            builder.hold()  # a background build lands after the batch, which runs on what was live
        assert run_batch(registry, pool, batch, seed=step)[0] == {}
        builder.release()
        assert registry.wait_for_builds(timeout=30)
        where = f"step {step} (batch {batch})"
        assert builder.builds[n_builds:] == [c for c, _ in builds], where
        assert [(e["capacity"], e["reason"]) for e in events.of("build")[n_events:]] == builds, where
        assert all(e["duration_s"] == 2.0 for e in events.of("build")[n_events:]), where
        assert registry.live_capacities() == live, where
        runs = runs_blocking if rebuild is Rebuild.BLOCKING else runs_background
        assert builder.runs[n_runs:] == runs, where
        assert pool.bytes_by_memory() == {"host": pool_bytes, "pinned": 0, "device": 0}, where
        stats = registry.stats()
        assert stats["engine_device_bytes"] == engine_bytes, where
        assert stats["engines_live"] == len(live) and stats["max_capacity"] == max(live), where
    table = TABLES[mode, bucket]
    assert registry.stats()["builds"] == Counter(r for _, builds, *_ in table for _, r in builds)
    # Exactly the engines no longer live were released, each once.
    released = sorted(e["capacity"] for e in events.of("release"))
    assert released == sorted(e.capacity for e in builder.engines if e.capacity not in table[-1][2])
    assert all(e.closed == (e.capacity not in table[-1][2]) for e in builder.engines)
    splits = events.of("split")
    assert len(splits) == (1 if rebuild is Rebuild.BACKGROUND else 0)
    registry.close()
    assert all(e.closed for e in builder.engines)


def test_background_serves_oversize_batch_by_chunks_while_building():
    registry, builder, events, _ = make(Mode.REUSE, Bucket.POW2, Rebuild.BACKGROUND)
    pool = make_pool()
    run_batch(registry, pool, 1)
    builder.hold()
    run_batch(registry, pool, 5, seed=1)  # returns while the build of 8 is held
    builder.wait_started(2)
    assert builder.builds == [1, 8]
    assert builder.runs[1:] == [(1, 1)] * 5
    assert registry.live_capacities() == [1] and registry.stats()["building"] == [8]
    assert events.of("split") == [{"batch": 5, "capacity": 1, "chunks": 5}]
    run_batch(registry, pool, 3, seed=2)  # still building: chunks again, no second build
    assert builder.builds == [1, 8] and builder.runs[6:] == [(1, 1)] * 3
    builder.release()
    assert registry.wait_for_builds(timeout=30)
    assert registry.live_capacities() == [8]
    assert builder.engine(1).closed and events.of("release") == [
        {"capacity": 1, "why": "reuse", "device_bytes": 1000}]
    run_batch(registry, pool, 5, seed=3)
    assert builder.runs[-1] == (8, 5)
    assert registry.stats()["split_batches"] == 2


def test_chunked_batch_moves_to_the_larger_engine_when_it_lands():
    registry, builder, events, _ = make(Mode.REUSE, Bucket.POW2, Rebuild.BACKGROUND)
    pool = make_pool()
    run_batch(registry, pool, 1)
    builder.hold()
    builder.run_gate.clear()
    errors = []

    def big():
        try:
            run_batch(registry, pool, 6, seed=5)  # checks every output row
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=big)
    thread.start()
    builder.wait_runs(2)  # the first chunk (1 row on the capacity-1 engine) is running
    builder.release()
    assert registry.wait_for_builds(timeout=30) and registry.live_capacities() == [8]
    builder.run_gate.set()
    thread.join(timeout=30)
    assert not thread.is_alive() and not errors
    assert builder.runs[1:] == [(1, 1), (8, 5)]  # one chunk, then the 5 rows left in one run
    assert events.of("handover") == [{"batch": 6, "capacity": 1, "rows_done": 1, "new_capacity": 8}]
    assert events.of("split") == [] and registry.stats()["split_batches"] == 1
    assert builder.engine(1).closed  # drained, then released
    assert not builder.engine(8).closed and registry.stats()["engines_live"] == 1


def test_blocking_builds_on_the_calling_thread_and_other_batches_still_run():
    registry, builder, events, _ = make(Mode.REUSE, Bucket.POW2, Rebuild.BLOCKING)
    pool, big_pool = make_pool(), make_pool()
    run_batch(registry, pool, 1)
    builder.hold()
    done = threading.Event()
    errors = []

    def big():
        try:
            run_batch(registry, big_pool, 6, seed=4)
        except BaseException as exc:  # reported below
            errors.append(exc)
        done.set()

    thread = threading.Thread(target=big)
    thread.start()
    builder.wait_started(2)
    assert not done.is_set()  # the batch of 6 waits for its engine (TVM's stall)
    run_batch(registry, pool, 1, seed=5)  # a batch that fits the live engine is not held up
    assert builder.runs == [(1, 1), (1, 1)]
    builder.release()
    thread.join(timeout=30)
    assert done.is_set() and not errors
    assert builder.runs[-1] == (8, 6) and events.of("split") == []
    assert registry.live_capacities() == [8]


def test_multi_lru_cap_releases_least_recently_used():
    registry, builder, events, _ = make(Mode.MULTI, Bucket.EXACT, Rebuild.BLOCKING, max_engines=2)
    pool = make_pool()
    for batch, live in [(1, [1]), (2, [1, 2]), (1, [1, 2]), (3, [1, 3]), (2, [2, 3]), (3, [2, 3])]:
        run_batch(registry, pool, batch)
        assert registry.live_capacities() == live, batch
    assert builder.builds == [1, 2, 3, 2]
    assert [(e["capacity"], e["why"]) for e in events.of("release")] == [(2, "lru"), (1, "lru")]
    assert registry.stats()["builds"] == {"first": 1, "grow": 2, "bucket": 1}


def test_failed_background_build_keeps_the_old_engine_and_retries_after_backoff():
    registry, builder, events, clock = make(Mode.REUSE, Bucket.POW2, Rebuild.BACKGROUND)
    pool = make_pool()
    run_batch(registry, pool, 1)
    builder.fail.add(8)
    run_batch(registry, pool, 5)  # served by chunks; the build of 8 fails in the background
    assert registry.wait_for_builds(timeout=30)
    failed = events.of("build_failed")
    assert [(f["capacity"], f["trigger"], f["retry_in_s"]) for f in failed] == [(8, "grow", 1.0)]
    assert "fake build of capacity 8 failed" in failed[0]["error"]
    assert registry.live_capacities() == [1] and not builder.engine(1).closed
    run_batch(registry, pool, 5)  # within the backoff: no new attempt, still served
    assert registry.wait_for_builds(timeout=30) and builder.builds == [1, 8]
    clock.advance(1.0)
    run_batch(registry, pool, 6)  # retried (needs 8 again), fails again: backoff doubles
    assert registry.wait_for_builds(timeout=30)
    assert builder.builds == [1, 8, 8] and events.of("build_failed")[-1]["retry_in_s"] == 2.0
    builder.fail.clear()
    clock.advance(2.0)
    run_batch(registry, pool, 5)
    assert registry.wait_for_builds(timeout=30)
    assert builder.builds == [1, 8, 8, 8] and registry.live_capacities() == [8]
    assert registry.stats()["build_failures"] == 2 and registry.stats()["builds"] == {"first": 1, "grow": 1}
    run_batch(registry, pool, 5)
    assert builder.runs[-1] == (8, 5)


def test_new_engines_are_primed_at_capacity_before_they_go_live():
    registry, builder, _, _ = make(Mode.REUSE, Bucket.POW2, Rebuild.BACKGROUND)
    primed = []

    def prime(engine, capacity):
        assert registry.live_capacities() != [capacity]  # not live yet: no batch can reach it first
        primed.append((engine.capacity, capacity))
        engine.run({"x": np.zeros((capacity, ROW), np.float32)})

    registry.prime = prime
    pool = make_pool()
    run_batch(registry, pool, 1)
    run_batch(registry, pool, 5)
    assert registry.wait_for_builds(timeout=30)
    assert primed == [(1, 1), (8, 8)]
    # Each prime is one full-capacity run, ahead of every batch the engine serves.
    assert next(r for r in builder.runs if r[0] == 8) == (8, 8)


def test_engine_that_fails_its_prime_is_a_failed_build_and_is_closed():
    registry, builder, events, _ = make(Mode.REUSE, Bucket.POW2, Rebuild.BACKGROUND)
    pool = make_pool()
    run_batch(registry, pool, 1)

    def prime(engine, capacity):
        raise RuntimeError("no device memory for the first run")

    registry.prime = prime
    run_batch(registry, pool, 5)  # chunks on the capacity-1 engine meanwhile
    assert registry.wait_for_builds(timeout=30)
    assert registry.live_capacities() == [1] and builder.engine(8).closed
    assert registry.stats()["build_failures"] == 1
    assert "no device memory" in events.of("build_failed")[0]["error"]
    run_batch(registry, pool, 1)  # the old engine keeps serving


def test_failed_blocking_build_serves_the_batch_by_chunks():
    registry, builder, events, _ = make(Mode.REUSE, Bucket.POW2, Rebuild.BLOCKING)
    pool = make_pool()
    run_batch(registry, pool, 2)
    builder.fail.add(8)
    run_batch(registry, pool, 5)
    assert builder.builds == [2, 8] and builder.runs[1:] == [(2, 2), (2, 2), (2, 1)]
    assert registry.live_capacities() == [2] and len(events.of("build_failed")) == 1


def test_first_build_failure_raises_then_unavailable_until_the_backoff_passes():
    registry, builder, events, clock = make(Mode.REUSE, Bucket.POW2, Rebuild.BACKGROUND)
    pool = make_pool()
    builder.fail.add(4)
    with pytest.raises(InternalError, match="capacity 4 failed"):
        run_batch(registry, pool, 3)
    with pytest.raises(Unavailable, match=r"retrying in 1\.0s"):
        run_batch(registry, pool, 3)
    assert builder.builds == [4]
    builder.fail.clear()
    clock.advance(1.0)
    run_batch(registry, pool, 3)
    assert builder.builds == [4, 4] and registry.live_capacities() == [4]
    assert events.of("build")[-1]["reason"] == "first"


def test_build_error_that_is_a_serve_error_reaches_the_caller_unchanged():
    registry, builder, _, _ = make()
    builder.fail.add(1)
    builder.fail_with = ConfigError("model 'm': cannot load model.onnx")
    with pytest.raises(ConfigError, match=r"cannot load model\.onnx"):
        run_batch(registry, make_pool(), 1)


def test_batch_zero_builds_and_runs_nothing_and_oversize_batch_is_rejected():
    registry, builder, events, _ = make()
    pool = make_pool()
    assert registry.execute(0, pool.views(0)) == {}
    assert builder.builds == [] and builder.runs == [] and events.log == []
    assert pool.bytes_by_memory()["host"] == 0
    with pytest.raises(InvalidArgument, match=r"outside 1\.\.8"):
        registry.execute(9, make_pool().views(9))


def test_warm_up_builds_listed_capacities():
    registry, builder, events, _ = make(Mode.REUSE, warmup_batch_sizes=(2, 8))
    registry.warm_up()
    assert builder.builds == [8] and registry.live_capacities() == [8]  # REUSE keeps one: the largest
    assert [e["reason"] for e in events.of("build")] == ["warmup"]
    registry, builder, events, _ = make(Mode.MULTI, Bucket.POW2, warmup_batch_sizes=(4, 1))
    registry.warm_up()
    assert builder.builds == [1, 4] and registry.live_capacities() == [1, 4]
    run_batch(registry, make_pool(), 3)
    assert builder.builds == [1, 4] and builder.runs == [(4, 3)]
    builder.fail.add(8)
    registry, builder, _, _ = make(warmup_batch_sizes=(8,), builder=builder)
    with pytest.raises(InternalError):
        registry.warm_up()


def test_engine_with_only_run_works_through_the_adapter():
    registry, builder, _, _ = make(builder=FakeBuilder(run_into=False))
    pool = make_pool()
    for batch in [1, 5, 3]:
        run_batch(registry, pool, batch)
    registry.wait_for_builds(timeout=30)
    assert builder.builds == [1, 8]


@pytest.mark.parametrize("run_into", [True, False])
def test_unpooled_outputs_are_returned_and_joined_over_chunks(run_into):
    builder = FakeBuilder(run_into=run_into, extra_output=True)
    registry, builder, _, _ = make(Mode.REUSE, Bucket.POW2, Rebuild.BACKGROUND, builder=builder)
    pool = make_pool()
    extra, x = run_batch(registry, pool, 2)
    np.testing.assert_array_equal(extra["tokens"], tokens(x))
    builder.hold()
    extra, x = run_batch(registry, pool, 7, seed=9)  # 4 chunks on the engine of 2
    assert len(builder.runs) == 5 and extra["tokens"].shape == (7, 3)
    np.testing.assert_array_equal(extra["tokens"], tokens(x))
    builder.release()
    registry.wait_for_builds(timeout=30)


def test_reuse_releases_the_smaller_engine_only_after_its_work_finishes():
    registry, builder, events, _ = make(Mode.REUSE, warmup_batch_sizes=(8,))
    pool = make_pool()
    run_batch(registry, pool, 1)
    builder.run_gate.clear()
    worker = threading.Thread(target=run_batch, args=(registry, make_pool(), 1))
    worker.start()
    builder.wait_runs(2)  # the worker's batch is in flight on engine 1
    registry.warm_up()  # builds 8 while engine 1 is running a batch
    assert registry.live_capacities() == [8]
    assert registry.stats()["draining_capacities"] == [1] and registry.stats()["engines_live"] == 2
    assert not builder.engine(1).closed and events.of("release") == []
    builder.run_gate.set()
    worker.join(timeout=30)
    assert builder.engine(1).closed
    assert events.of("release") == [{"capacity": 1, "why": "reuse", "device_bytes": 1000}]
    assert registry.stats()["engines_live"] == 1


def test_concurrent_random_batches_are_all_correct_while_engines_grow():
    registry, builder, _, _ = make(Mode.REUSE, Bucket.EXACT, Rebuild.BACKGROUND)
    errors = []

    def client(seed):
        rng, pool = random.Random(seed), make_pool("geometric")
        try:
            for i in range(40):
                run_batch(registry, pool, rng.randint(0, MAX_BATCH), seed=seed * 100 + i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert registry.wait_for_builds(timeout=30)
    assert registry.live_capacities() == [MAX_BATCH]
    assert all(e.closed for e in builder.engines if e.capacity != MAX_BATCH)
    assert registry.stats()["engines_live"] == 1


def test_close_releases_engines_and_refuses_new_batches():
    registry, builder, events, _ = make(Mode.MULTI, Bucket.EXACT, Rebuild.BACKGROUND)
    pool = make_pool()
    run_batch(registry, pool, 2)
    builder.hold()
    run_batch(registry, pool, 1)  # a build of 1 starts and is held
    builder.wait_started(2)
    registry.close()
    assert builder.engine(2).closed
    with pytest.raises(Unavailable):
        run_batch(registry, pool, 1)
    builder.release()
    assert registry.wait_for_builds(timeout=30)
    assert builder.engine(1).closed and registry.stats()["engines_live"] == 0
    assert sorted(e["capacity"] for e in events.of("release")) == [1, 2]


def test_plan_cache_restart_builds_nothing_and_corrupt_plan_is_rebuilt(tmp_path):
    cache_events = Events()
    cache = PlanCache(tmp_path, on_event=cache_events)

    def start():
        builder = FakePlanBuilder()
        events = Events()
        registry = EngineRegistry(builder, EnginePolicy(), max_batch_size=MAX_BATCH, plan_cache=cache,
                                  on_event=events)
        run_batch(registry, make_pool(), 1)
        return registry, builder, events

    _, builder, events = start()
    assert builder.plan_builds == [1] and [e["reason"] for e in events.of("build")] == ["first"]
    _, builder, events = start()  # a restart with a warm cache
    assert builder.builds == [] and builder.loads == [1]
    assert [(e["reason"], e["trigger"]) for e in events.of("build")] == [("cache_hit", "first")]
    plan = next(tmp_path.glob("*.plan"))
    plan.write_bytes(plan.read_bytes()[:-1])  # truncated
    _, builder, events = start()
    assert builder.plan_builds == [1] and events.of("build")[0]["reason"] == "first"
    assert [e["why"] for e in cache_events.of("plan_cache_invalid")] == ["payload is 1043 bytes, header says 1044"]
    _, builder, events = start()
    assert builder.builds == [] and events.of("build")[0]["reason"] == "cache_hit"


def test_plan_the_backend_refuses_is_discarded_and_rebuilt(tmp_path):
    cache = PlanCache(tmp_path)
    builder = FakePlanBuilder()
    registry = EngineRegistry(builder, max_batch_size=MAX_BATCH, plan_cache=cache)
    run_batch(registry, make_pool(), 3)
    builder.refuse_load = True
    events = Events()
    registry = EngineRegistry(builder, max_batch_size=MAX_BATCH, plan_cache=cache, on_event=events)
    with pytest.raises(InternalError, match="cannot deserialize"):  # rebuilt, then the load fails too
        run_batch(registry, make_pool(), 3)
    assert [e["capacity"] for e in events.of("plan_load_failed")] == [4]
    assert builder.plan_builds == [4, 4]
    assert cache.get(cache.key(**builder.plan_key_parts(4))) is not None  # the rebuilt plan was stored


# -- growth: chunk or wait, one build at a time, deterministic reasons -----------------------------

def make_timed(run_cost, build_seconds=0.1, mode=Mode.REUSE, bucket=Bucket.POW2, **policy):
    """A registry whose engine runs and builds advance the fake clock by known amounts, with a first
    engine of capacity 1 that has run one batch (so its run time is known) and one build duration."""
    registry, builder, events, clock = make(mode, bucket, Rebuild.BACKGROUND, build_seconds=build_seconds,
                                            run_cost=run_cost, **policy)
    pool = make_pool()
    run_batch(registry, pool, 1)
    return registry, builder, events, clock, pool


def test_oversize_batch_waits_for_the_build_when_chunks_would_take_longer():
    # A memory-bound engine: 0.02 s a run whatever the rows. Batch 8 on capacity 1: 8 runs, 0.16 s;
    # waiting: the build (0.1 s, just started) then one run, 0.12 s. Wait.
    registry, builder, events, _clock, pool = make_timed(run_cost=(0.02, 0.0))
    builder.hold()
    events.hooks["wait"] = builder.release  # the build finishes while the batch waits
    run_batch(registry, pool, 8, seed=1)
    assert builder.runs == [(1, 1), (8, 8)] and events.of("split") == []
    (wait,) = events.of("wait")
    assert (wait["batch"], wait["capacity"], wait["live_capacity"]) == (8, 8, 1)
    assert wait["chunks_s"] == pytest.approx(0.16) and wait["wait_s"] == pytest.approx(0.12)
    assert registry.stats()["waited_batches"] == 1 and registry.live_capacities() == [8]


def test_oversize_batch_runs_by_chunks_when_that_is_sooner():
    # 0.001 s a run: 8 chunks take 0.008 s, far less than the 0.1 s build. Chunk, no wait.
    registry, builder, events, _clock, pool = make_timed(run_cost=(0.001, 0.0))
    builder.hold()
    run_batch(registry, pool, 8, seed=1)
    assert builder.runs[1:] == [(1, 1)] * 8 and events.of("wait") == []
    assert events.of("split") == [{"batch": 8, "capacity": 1, "chunks": 8}]
    builder.release()
    assert registry.wait_for_builds(timeout=30) and registry.stats()["waited_batches"] == 0


@pytest.mark.parametrize("run_cost,waits", [((0.15, 0.01), True), ((0.01, 0.05), False)])
def test_chunk_or_wait_from_run_time_fitted_by_rows(run_cost, waits):
    # Runs cost a + b * rows; the first engine (capacity 4, EXACT) has seen batches of 1..4, so the fit
    # is exact. Batch 8: chunks 2a + 8b, waiting for the build of 8 (0.1 s, just started) 0.1 + a + 8b.
    # A large fixed cost per run (memory-bound) waits; a cost mostly per row (compute-bound) chunks.
    registry, builder, events, _clock = make(Mode.REUSE, Bucket.EXACT, build_seconds=0.1, run_cost=run_cost)
    pool = make_pool()
    for batch in (4, 1, 2, 3, 4, 1, 3):
        run_batch(registry, pool, batch)
    assert registry.live_capacities() == [4]
    builder.hold()
    events.hooks["wait"] = builder.release
    run_batch(registry, pool, 8, seed=1)
    a, b = run_cost
    if waits:
        (wait,) = events.of("wait")
        assert wait["chunks_s"] == pytest.approx(2 * a + 8 * b) and wait["wait_s"] == pytest.approx(0.1 + a + 8 * b)
        assert builder.runs[-1] == (8, 8)
    else:
        assert events.of("wait") == [] and builder.runs[-2:] == [(4, 4), (4, 4)]
        builder.release()
    assert registry.wait_for_builds(timeout=30) and registry.live_capacities() == [8]


@pytest.mark.parametrize("elapsed,waits", [(0.25, False), (0.9, True), (1.4, False), (1.8, True), (3.0, False)])
def test_remaining_build_time_from_elapsed_time_and_past_durations(elapsed, waits):
    # Builds took 1.0 s (mean 1.0, deviation 0.5 after one sample). Batch 8 on capacity 1 at 0.05 s a
    # run: 0.4 s of chunks against remaining + 0.05 s, where remaining is 1.0 - elapsed up to the mean,
    # then (1.0 + 2 * 0.5) - elapsed, and unknown (chunk) past 2.0 s.
    registry, builder, events, clock = make(build_seconds=1.0, run_cost=(0.05, 0.0))
    pool = make_pool()
    run_batch(registry, pool, 1)
    builder.hold()
    run_batch(registry, pool, 5)  # starts the build of 8 (held); 5 chunks take 0.25 s: chunked
    assert events.of("wait") == [] and registry.stats()["building"] == [8]
    clock.advance(elapsed - 0.25)  # the build has now run for `elapsed`
    events.hooks["wait"] = lambda: clock.advance(10.0)  # then the build is late: the wait ends in chunks
    run_batch(registry, pool, 8, seed=1)
    assert [w["batch"] for w in events.of("wait")] == ([8] if waits else [])
    assert builder.runs[-8:] == [(1, 1)] * 8
    builder.release()
    assert registry.wait_for_builds(timeout=30)


def test_waits_for_a_running_build_that_does_not_cover_the_batch_then_chunks_on_it():
    # REUSE+EXACT, 0.05 s a run, builds 1.0 s. Batch 4 starts the build of 4 (4 chunks, 0.2 s, beat
    # waiting 1.05 s). 0.9 s later batch 8 queues 8 behind it: 8 chunks on engine 1 take 0.4 s, waiting
    # the 0.1 s left of build 4 and then 2 chunks on it 0.2 s. It waits for 4, then runs on 4.
    registry, builder, events, clock, pool = make_timed(run_cost=(0.05, 0.0), build_seconds=1.0,
                                                        bucket=Bucket.EXACT)
    builder.hold()
    run_batch(registry, pool, 4, seed=1)
    assert events.of("wait") == [] and registry.stats()["building"] == [4]
    clock.advance(0.9 - 0.2)  # the 4 chunks took 0.2 s: build 4 has run 0.9 s
    events.hooks["wait"] = builder.release
    events.hooks["build"] = builder.hold  # build 8 (next) stays held: the batch cannot get it
    run_batch(registry, pool, 8, seed=2)
    (wait,) = events.of("wait")
    assert (wait["capacity"], wait["live_capacity"]) == (4, 1)
    assert (wait["chunks_s"], wait["wait_s"]) == (pytest.approx(0.4), pytest.approx(0.2))
    assert builder.runs[-2:] == [(4, 4), (4, 4)] and registry.stats()["building"] == [8]
    builder.release()
    assert registry.wait_for_builds(timeout=30) and registry.live_capacities() == [8]


def test_a_wait_that_outlasts_the_chunk_estimate_falls_back_to_chunks():
    registry, builder, events, clock, pool = make_timed(run_cost=(0.02, 0.0))
    builder.hold()
    events.hooks["wait"] = lambda: clock.advance(1.0)  # the build is late: the deadline passes
    run_batch(registry, pool, 8, seed=1)
    assert len(events.of("wait")) == 1 and builder.runs[1:] == [(1, 1)] * 8
    assert events.of("split") == [{"batch": 8, "capacity": 1, "chunks": 8}]
    assert registry.live_capacities() == [1] and registry.stats()["building"] == [8]
    builder.release()
    assert registry.wait_for_builds(timeout=30) and registry.live_capacities() == [8]


def test_a_queued_build_is_never_waited_for():
    # REUSE+EXACT, 0.05 s a run, builds 1.0 s. Batch 2 starts the build of 2 (held); 0.85 s into it,
    # batch 5 queues 5 behind it. Chunks on engine 1: 0.25 s. Waiting for 2 (0.15 s left, then 3
    # chunks) 0.3 s: chunk. Had 5 been running as long, waiting for it (0.15 + 0.05 s) would win, but
    # it has not started, and when it will is unknown: chunk.
    registry, builder, events, clock, pool = make_timed(run_cost=(0.05, 0.0), build_seconds=1.0,
                                                        bucket=Bucket.EXACT)
    builder.hold()
    events.hooks["wait"] = lambda: clock.advance(10.0)
    run_batch(registry, pool, 2, seed=1)  # 2 chunks, 0.1 s
    clock.advance(0.75)
    run_batch(registry, pool, 5, seed=2)
    assert registry.stats()["building"] == [2] and registry.stats()["queued"] == [5]
    assert builder.runs[1:] == [(1, 1)] * 7 and events.of("wait") == []
    builder.release()
    assert registry.wait_for_builds(timeout=30)


def test_one_build_at_a_time_and_reuse_coalesces_queued_capacities():
    registry, builder, events, _ = make(Mode.REUSE, Bucket.EXACT, Rebuild.BACKGROUND)
    pool = make_pool()
    run_batch(registry, pool, 1)
    builder.hold()
    run_batch(registry, pool, 2)  # builds 2 (held)
    builder.wait_started(2)
    run_batch(registry, pool, 3)  # queued behind 2
    run_batch(registry, pool, 6)  # queued; drops 3 (REUSE keeps one engine: 3 would be retired at once)
    run_batch(registry, pool, 4)  # covered by the queued 6
    assert registry.stats()["building"] == [2] and registry.stats()["queued"] == [6]
    assert builder.builds == [1, 2] and not registry.wait_for_builds(timeout=0)
    builder.release()
    assert registry.wait_for_builds(timeout=30)
    assert builder.builds == [1, 2, 6] and builder.max_active == 1
    assert [(e["capacity"], e["reason"]) for e in events.of("build")] == [(1, "first"), (2, "grow"), (6, "grow")]
    assert registry.live_capacities() == [6] and registry.stats()["engines_live"] == 1


def test_multi_buckets_requested_together_build_one_after_another_largest_first():
    registry, builder, _events, _ = make(Mode.MULTI, Bucket.EXACT, Rebuild.BACKGROUND)
    pool = make_pool()
    run_batch(registry, pool, 8)  # first engine: 8
    builder.hold()
    for batch in (3, 1, 5, 2, 7, 4, 6):  # each runs on 8 at once and asks for its bucket
        run_batch(registry, pool, batch)
    assert builder.runs[1:] == [(8, b) for b in (3, 1, 5, 2, 7, 4, 6)]
    assert registry.stats()["building"] == [3] and registry.stats()["queued"] == [1, 2, 4, 5, 6, 7]
    builder.release()
    assert registry.wait_for_builds(timeout=30)
    assert builder.builds == [8, 3, 7, 6, 5, 4, 2, 1] and builder.max_active == 1
    assert registry.live_capacities() == list(range(1, 9))
    assert registry.stats()["builds"] == {"first": 1, "bucket": 7}


def test_max_concurrent_builds_bounds_the_builds_running_at_once():
    registry, builder, _, _ = make(Mode.MULTI, Bucket.EXACT, Rebuild.BACKGROUND, max_concurrent_builds=2)
    pool = make_pool()
    run_batch(registry, pool, 8)
    builder.hold()
    for batch in (1, 2, 3, 4):
        run_batch(registry, pool, batch)
    builder.wait_started(3)
    assert registry.stats()["building"] == [1, 2] and registry.stats()["queued"] == [3, 4]
    builder.release()
    assert registry.wait_for_builds(timeout=30)
    assert builder.max_active == 2 and sorted(builder.builds) == [1, 2, 3, 4, 8]
    with pytest.raises(ConfigError, match="max_concurrent_builds"):
        EnginePolicy(max_concurrent_builds=0)


@pytest.mark.parametrize("hold", [False, True])
def test_build_reasons_depend_on_the_requests_not_on_when_builds_finish(hold):
    # MULTI+EXACT, batches 1, 5, 3, 8: 3 is requested while 5 builds (hold) or after it finished;
    # either way 5 is known when 3 is requested, so 3 is a "bucket" and 8 a "grow".
    registry, builder, events, _ = make(Mode.MULTI, Bucket.EXACT, Rebuild.BACKGROUND)
    pool = make_pool()
    for batch in (1, 5, 3, 8):
        if hold and batch == 5:
            builder.hold()
        run_batch(registry, pool, batch)
        if not hold:
            assert registry.wait_for_builds(timeout=30)
    builder.release()
    assert registry.wait_for_builds(timeout=30)
    reasons = {e["capacity"]: e["reason"] for e in events.of("build")}
    assert reasons == {1: "first", 5: "grow", 3: "bucket", 8: "grow"}
    assert registry.live_capacities() == [1, 3, 5, 8]


def test_a_batch_arriving_during_the_first_build_waits_for_it_and_then_grows():
    # Batch 3 while the first engine (1) builds: it waits for that engine (no second "first" build
    # beside it), then asks for 4 as a "grow". The same if it arrives after the first build.
    registry, builder, events, _ = make(Mode.REUSE, Bucket.POW2, Rebuild.BACKGROUND)
    builder.hold()
    first = threading.Thread(target=run_batch, args=(registry, make_pool(), 1))
    first.start()
    builder.wait_started(1)
    second = threading.Thread(target=run_batch, args=(registry, make_pool(), 3, 1))
    second.start()
    builder.release()
    first.join(timeout=30)
    second.join(timeout=30)
    assert registry.wait_for_builds(timeout=30)
    assert builder.builds == [1, 4] and [e["reason"] for e in events.of("build")] == ["first", "grow"]
    assert registry.live_capacities() == [4]


def test_run_times_fit_and_build_times():
    times = RunTimes()
    assert times.predict(4) is None and times.chunked(1, 4) is None
    for rows in (1, 4, 2, 8, 3):
        times.add(rows, 0.009 + 0.001 * rows)
    assert times.coefficients() == (pytest.approx(0.009), pytest.approx(0.001))
    assert times.chunked(4, 10) == pytest.approx(3 * 0.009 + 10 * 0.001)
    same = RunTimes()
    for _ in range(3):
        same.add(1, 0.01)
    assert same.coefficients() == (pytest.approx(0.01), 0.0)  # one row size: time per run
    builds = BuildTimes()
    assert builds.remaining(0.0) is None
    builds.add(1.0)
    assert builds.remaining(0.25) == pytest.approx(0.75) and builds.remaining(1.5) == pytest.approx(0.5)
    assert builds.remaining(2.5) is None
    assert wait_or_chunk(same, 1, 64, builds, 64, None) is None  # not started: never wait
    estimate = wait_or_chunk(same, 1, 64, builds, 64, 0.5)
    assert estimate.wait and (estimate.chunks_s, estimate.wait_s) == (pytest.approx(0.64), pytest.approx(0.51))
    estimate = wait_or_chunk(same, 1, 64, builds, 16, 0.5)  # then 4 chunks on the new engine
    assert estimate.wait_s == pytest.approx(0.54)


def test_build_queue_order_and_coalescing():
    from service.engines.growth import Build

    queue = BuildQueue(slots=1, coalesce=True)
    assert queue.add(Build(2, "grow")) == [] and queue.take(0.0).capacity == 2
    assert queue.add(Build(4, "grow")) == [] and queue.take(0.0) is None  # the slot is taken
    assert [b.capacity for b in queue.add(Build(8, "grow"))] == [4]
    queue.finish(queue.running[2])
    assert queue.take(1.0).started_at == 1.0 and queue.capacities() == [8]
    multi = BuildQueue(slots=1)
    for c in (3, 1, 5):
        multi.add(Build(c, "bucket"))
    order = []
    while (b := multi.take(0.0)) is not None:
        order.append(b.capacity)
        multi.finish(b)
    assert order == [5, 3, 1]


# -- policy ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bucket,batch,max_batch,sizes,expected", [
    (Bucket.POW2, 1, 8, (), 1), (Bucket.POW2, 3, 8, (), 4), (Bucket.POW2, 5, 8, (), 8),
    (Bucket.POW2, 8, 8, (), 8), (Bucket.POW2, 33, 48, (), 48), (Bucket.POW2, 17, 48, (), 32),
    (Bucket.EXACT, 7, 8, (), 7), (Bucket.LIST, 3, 64, (4, 16), 4), (Bucket.LIST, 16, 64, (4, 16), 16),
    (Bucket.LIST, 17, 64, (4, 16), 64), (Bucket.LIST, 1, 64, (4, 16), 4),
])
def test_bucket_capacity(bucket, batch, max_batch, sizes, expected):
    assert bucket_capacity(bucket, batch, max_batch, sizes) == expected


def test_policy_validation_and_from_config():
    from service.proto import model_config_pb2

    with pytest.raises(ConfigError, match="bucket_sizes"):
        EnginePolicy(bucket="LIST")
    with pytest.raises(ConfigError, match="mode must be one of"):
        EnginePolicy(mode="SOMETIMES")
    with pytest.raises(ConfigError, match="exceed the model's max_batch_size 8"):
        EngineRegistry(FakeBuilder(), EnginePolicy(warmup_batch_sizes=(16,)), max_batch_size=8)
    defaults = EnginePolicy(mode="MULTI", max_pool_bytes=1 << 20)
    assert from_config(model_config_pb2.EnginePolicy(), defaults) == defaults
    msg = model_config_pb2.EnginePolicy(
        mode=model_config_pb2.REUSE, bucket=model_config_pb2.LIST, bucket_sizes=[16, 4],
        rebuild=model_config_pb2.BLOCKING, max_engines=3, warmup_batch_sizes=[4],
        max_pool_bytes=4096, pool_growth=model_config_pb2.EXACT_FIT,
    )
    assert from_config(msg, defaults) == EnginePolicy(
        mode=Mode.REUSE, bucket=Bucket.LIST, bucket_sizes=(4, 16), rebuild=Rebuild.BLOCKING,
        max_engines=3, warmup_batch_sizes=(4,), max_pool_bytes=4096, pool_growth="exact",
    )


@pytest.mark.gpu
def test_device_engine_runs_on_cuda_pool_buffers_with_chunks():
    rt = pytest.importorskip("cuda.bindings.runtime")
    from service.memory.allocators import CudaAllocator

    alloc = CudaAllocator(0)

    class CopyEngine:
        """y = x on the device, on the allocator's stream (a stand-in for a TensorRT engine)."""

        buffer_memory = "device"

        def __init__(self, capacity):
            self.capacity, self.calls = capacity, []

        def run_into(self, inputs, outputs):
            x, y = inputs["x"], outputs["y"]
            assert x.shape[0] <= self.capacity and x.shape == y.shape
            self.calls.append(x.shape[0])
            err, = rt.cudaMemcpyAsync(y.ptr, x.ptr, x.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                                      alloc.stream)
            assert err == rt.cudaError_t.cudaSuccess

        def close(self):
            pass

    class Builder:
        backend = "copy"

        def __init__(self):
            self.engines, self.fail = [], set()

        def build(self, capacity):
            if capacity in self.fail:
                raise RuntimeError(f"no engine of {capacity} today")
            self.engines.append(CopyEngine(capacity))
            return self.engines[-1]

    builder = Builder()
    registry = EngineRegistry(builder, EnginePolicy(rebuild="BLOCKING", warmup_batch_sizes=(2,)),
                              max_batch_size=8)
    registry.warm_up()
    pool = BufferPool([PoolTensor("x", F4, (ROW,))], [PoolTensor("y", F4, (ROW,))], allocator=alloc)
    builder.fail.add(8)
    for batch in [1, 2, 5]:  # 5: the build of 8 fails, the batch runs in chunks of 2 on the device
        bufs = pool.views(batch)
        x = np.random.default_rng(batch).standard_normal((batch, ROW), dtype=np.float32)
        bufs.inputs["x"][...] = x
        bufs.outputs["y"][...] = 0
        registry.execute(batch, bufs)
        np.testing.assert_array_equal(bufs.outputs["y"], x)
    assert builder.engines[0].calls == [1, 2, 2, 2, 1]
    pool.close()
    alloc.close()


def test_expected_seconds_come_from_the_engines_past_runs():
    """The worker runs short batches on its receiving thread; how long one will take is the fitted run
    time (a + b * rows) of the engine that would take it, None while unknown or while a build is needed."""
    registry, _builder, _events, _clock, pool = make_timed(run_cost=(0.001, 0.0005), build_seconds=0.1)
    assert registry.expected_seconds(1) == pytest.approx(0.0015)  # one run seen: its time
    assert registry.expected_seconds(2) is None  # no live engine can take 2 rows yet
    for batch in (2, 2, 1, 2, 1):  # the capacity-2 engine, then runs of 1 and 2 rows on it
        run_batch(registry, pool, batch)
        assert registry.wait_for_builds(timeout=30)
    assert registry.live_capacities() == [2]
    assert registry.expected_seconds(1) == pytest.approx(0.0015, rel=0.05)
    assert registry.expected_seconds(2) == pytest.approx(0.002, rel=0.05)


def test_hold_gives_the_engine_execute_chose_and_a_held_engine_is_closed_only_after_its_release():
    """The direct lane's side of the registry: `hold` answers only what `execute` already decided for the
    batch (nothing before, nothing after the engines changed), and holding keeps a replaced engine open."""
    registry, builder, events, _ = make(Mode.REUSE, rebuild=Rebuild.BLOCKING)
    pool = make_pool()
    assert registry.hold(1) is None  # nothing decided yet
    run_batch(registry, pool, 1)
    held = registry.hold(1)
    assert held.engine is builder.engine(1)
    generation = registry.generation
    run_batch(registry, pool, 8)  # REUSE: engine 8 replaces engine 1, which is held
    assert registry.generation != generation and registry.hold(1) is None
    assert not builder.engine(1).closed and registry.stats()["draining_capacities"] == [1]
    samples = held.times.samples
    registry.release(held, 1, 0.5)
    assert builder.engine(1).closed and held.times.samples == samples + 1
    assert [e["capacity"] for e in events.of("release")] == [1]


@pytest.mark.parametrize("padding", ["capacity", "off"])
def test_hold_declines_a_padding_engine(padding):
    registry, builder, _, _ = make(Mode.REUSE, padding=padding, warmup_batch_sizes=(8,))
    registry.warm_up()
    run_batch(registry, make_pool(), 3)
    held = registry.hold(3)
    if padding == "capacity":  # its batches run at 8 rows: only `execute` knows to pad them
        assert held is None
    else:
        assert held.engine is builder.engine(8)
        registry.release(held, 3, None)

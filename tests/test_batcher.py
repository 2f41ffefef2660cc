"""The dynamic batcher: settings from config, the pure decision, and the thread-safe queue.

Timing rules are checked on a fake clock (exact boundaries, no sleeps); one test runs real producer and
consumer threads on the real clock to check that nothing is lost, duplicated or over-sized.
"""

from __future__ import annotations

import math
import random
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.batching import DEFAULT_MAX_QUEUE_SIZE, BatcherSettings, DynamicBatcher, QueuedRequest, decide
from service.errors import ConfigError, InvalidArgument, ResourceExhausted, Unavailable
from service.proto import model_config_pb2

T0 = 1000.0


class FakeClock:
    """A clock that moves only when told to, and wakes the batchers listening to it.

    It counts reads so a test can wait until a consumer thread has read the time (and so holds the
    batcher's lock until it waits: the poke after an advance cannot be lost).
    """

    def __init__(self, start: float = T0) -> None:
        self._now = start
        self.reads = 0
        self._cond = threading.Condition()
        self.listeners: list = []

    def __call__(self) -> float:
        with self._cond:
            self.reads += 1
            self._cond.notify_all()
            return self._now

    def wait_reads(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.reads >= n, timeout=10)

    def set(self, now: float) -> None:
        with self._cond:
            self._now = now
        for poke in self.listeners:
            poke()

    def advance(self, dt: float) -> None:
        self.set(self._now + dt)


def make(clock: FakeClock | None = None, **kw) -> tuple[DynamicBatcher, FakeClock]:
    clock = clock or FakeClock()
    kw.setdefault("max_batch_size", 8)
    kw.setdefault("max_queue_delay", 0.5)
    batcher = DynamicBatcher(BatcherSettings(model="m", **kw), clock=clock)
    clock.listeners.append(batcher.poke)
    return batcher, clock


def put(batcher: DynamicBatcher, rows: int, payload: object, deadline: float | None = None) -> QueuedRequest:
    return batcher.submit(QueuedRequest(rows=rows, deadline=deadline, payload=payload))


def payloads(reqs) -> list:
    return [r.payload for r in reqs]


def in_thread(fn) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


# -- settings from config ----------------------------------------------------------------------------

def config(**db) -> model_config_pb2.ModelConfig:
    cfg = model_config_pb2.ModelConfig(name="mlp", max_batch_size=16)
    if db:
        cfg.dynamic_batching.CopyFrom(model_config_pb2.ModelDynamicBatching(**db))
    return cfg


def test_settings_from_config():
    policy = model_config_pb2.ModelQueuePolicy(max_queue_size=32, default_timeout_microseconds=250_000)
    s = BatcherSettings.from_config(config(max_queue_delay_microseconds=5000, preferred_batch_size=[8, 4, 8],
                                           default_queue_policy=policy))
    assert s is not None and s.batching
    assert (s.max_batch_size, s.preferred_batch_sizes, s.max_queue_size, s.model) == (16, (4, 8), 32, "mlp")
    assert s.max_queue_delay == pytest.approx(0.005) and s.default_timeout == pytest.approx(0.25)


def test_settings_defaults_and_absent_batching():
    assert BatcherSettings.from_config(config()) is None
    s = BatcherSettings.from_config(config(preserve_ordering=True))  # `dynamic_batching { }` equivalent
    assert s is not None
    assert (s.max_queue_delay, s.preferred_batch_sizes, s.max_queue_size, s.default_timeout) == (
        0.0, (), DEFAULT_MAX_QUEUE_SIZE, 0.0)
    fallback = BatcherSettings.for_model(config())
    assert not fallback.batching and fallback.max_batch_size == 16 and fallback.model == "mlp"
    no_batch_dim = config(max_queue_delay_microseconds=100)
    no_batch_dim.max_batch_size = 0
    assert BatcherSettings.from_config(no_batch_dim) is None


def test_settings_reject_bad_preferred_size_and_delay_action_drops_timeout():
    with pytest.raises(ConfigError, match="preferred_batch_size 32"):
        BatcherSettings.from_config(config(preferred_batch_size=[32]))
    delay = model_config_pb2.ModelQueuePolicy(timeout_action=model_config_pb2.ModelQueuePolicy.DELAY,
                                              default_timeout_microseconds=1000)
    s = BatcherSettings.from_config(config(default_queue_policy=delay))
    assert s is not None and s.default_timeout == 0.0


# -- window, size, delay -----------------------------------------------------------------------------

def test_window_opens_at_first_request_not_at_next_batch():
    b, clock = make(max_queue_delay=0.5)
    put(b, 1, "a")
    clock.advance(0.25)
    put(b, 1, "b")
    clock.advance(0.25)  # 0.5 s after "a" was queued; the consumer asks only now
    batch = b.next_batch(0)
    assert payloads(batch.requests) == ["a", "b"] and batch.rows == 2


def test_flush_on_size_without_waiting_for_delay():
    b, _ = make(max_batch_size=4, max_queue_delay=60.0)
    for i, rows in enumerate([1, 1, 2, 1]):
        put(b, rows, i)
    batch = b.next_batch(0)
    assert payloads(batch.requests) == [0, 1, 2] and batch.rows == 4
    assert b.queued_requests == 1 and b.queued_rows == 1


def test_flush_on_delay_exact_boundary():
    b, clock = make(max_queue_delay=0.5)
    stored = put(b, 3, "a")
    boundary = stored.enqueued_at + 0.5
    clock.set(math.nextafter(boundary, -math.inf))
    assert b.next_batch(0).requests == ()
    clock.set(boundary)
    assert payloads(b.next_batch(0).requests) == ["a"]


def test_waiting_consumer_wakes_at_delay_on_fake_clock():
    b, clock = make(max_queue_delay=0.5)
    stored = put(b, 2, "a")
    reads = clock.reads
    t, out = in_thread(lambda: b.next_batch(timeout=100.0))
    clock.wait_reads(reads + 1)
    clock.set(stored.enqueued_at + 0.5)
    t.join(10)
    assert not t.is_alive() and payloads(out[0].requests) == ["a"]


def test_idle_next_batch_returns_empty_at_timeout():
    b, clock = make()
    reads = clock.reads
    t, out = in_thread(lambda: b.next_batch(timeout=2.0))
    clock.wait_reads(reads + 1)  # the consumer has taken its start time
    clock.advance(2.0)
    t.join(10)
    assert not t.is_alive() and out[0].requests == () and out[0].expired == ()
    real = DynamicBatcher(BatcherSettings(max_batch_size=4))
    assert real.next_batch(0.01).rows == 0  # real clock: bounded even when idle


# -- preferred sizes, fitting, order -----------------------------------------------------------------

def test_preferred_size_flushes_largest_reachable_at_once():
    b, _ = make(max_batch_size=16, preferred_batch_sizes=(2, 4), max_queue_delay=60.0)
    for i in range(7):
        put(b, 1, i)
    assert payloads(b.next_batch(0).requests) == [0, 1, 2, 3]  # 4 is the largest preferred prefix
    assert payloads(b.next_batch(0).requests) == [4, 5]
    assert b.next_batch(0).requests == ()  # 1 row: no preferred size, delay not over


def test_no_preferred_prefix_waits_for_delay_and_full_batch_beats_preferred():
    b, clock = make(max_batch_size=8, preferred_batch_sizes=(4,), max_queue_delay=0.5)
    put(b, 3, "a")
    put(b, 2, "b")  # prefixes 3, 5: neither is preferred
    assert b.next_batch(0).requests == ()
    clock.advance(0.5)
    assert payloads(b.next_batch(0).requests) == ["a", "b"]  # delay over: largest batch possible
    b2, _ = make(max_batch_size=4, preferred_batch_sizes=(2,), max_queue_delay=60.0)
    for i in range(4):
        put(b2, 1, i)
    assert payloads(b2.next_batch(0).requests) == [0, 1, 2, 3]


def test_request_that_does_not_fit_waits_for_next_batch():
    b, clock = make(max_batch_size=4, max_queue_delay=0.5)
    put(b, 3, "big")
    put(b, 2, "next")
    put(b, 1, "small")  # would fit beside "big", but must not jump ahead of "next"
    first = b.next_batch(0)  # "next" cannot join: waiting cannot grow the batch, so it goes now
    assert payloads(first.requests) == ["big"] and first.rows == 3
    clock.advance(0.5)
    assert payloads(b.next_batch(0).requests) == ["next", "small"]


def test_fifo_order_across_batches():
    b, _ = make(max_batch_size=3, max_queue_delay=0.0)
    for i in range(10):
        put(b, 1, i)
    seen = []
    while b.queued_requests:
        batch = b.next_batch(0)
        assert batch.rows <= 3
        seen += payloads(batch.requests)
    assert seen == list(range(10))


# -- deadlines, limits, cancel, close ----------------------------------------------------------------

def test_deadline_expiry_while_queued():
    b, clock = make(max_queue_delay=0.5)
    put(b, 1, "late", deadline=T0 + 0.25)
    put(b, 1, "ok")
    reads = clock.reads
    t, out = in_thread(lambda: b.next_batch(timeout=100.0))
    clock.wait_reads(reads + 1)
    clock.set(T0 + 0.25)  # the consumer wakes for the expiry, before the window closes
    t.join(10)
    assert not t.is_alive()
    assert payloads(out[0].expired) == ["late"] and out[0].requests == ()
    clock.set(T0 + 0.5)
    assert payloads(b.next_batch(0).requests) == ["ok"]


def test_expired_request_is_never_run_even_when_batch_is_due():
    b, clock = make(max_batch_size=2, max_queue_delay=0.0, default_timeout=0.5)
    assert put(b, 1, "a", deadline=T0 + 0.1).deadline == T0 + 0.1  # the earlier of the two wins
    assert put(b, 1, "b", deadline=T0 + 5.0).deadline == T0 + 0.5  # default queue timeout applied
    clock.advance(0.2)
    batch = b.next_batch(0)
    assert payloads(batch.expired) == ["a"] and payloads(batch.requests) == ["b"]


def test_queue_full_is_resource_exhausted_at_once():
    b, _ = make(max_queue_size=2, max_queue_delay=60.0)
    put(b, 1, 0)
    put(b, 1, 1)
    with pytest.raises(ResourceExhausted, match=r"model 'm' queue is full \(2 requests"):
        put(b, 1, 2)
    assert b.queued_requests == 2
    b.remove(0)
    put(b, 1, 3)  # room again


def test_rows_outside_model_limits_is_invalid_argument():
    b, _ = make(max_batch_size=8)
    for rows in (9, 0):
        with pytest.raises(InvalidArgument, match="max_batch_size"):
            put(b, rows, "x")
    assert b.queued_requests == 0


def test_unbatched_settings_run_one_request_per_batch():
    clock = FakeClock()
    b = DynamicBatcher(BatcherSettings.unbatched(8, model="m"), clock=clock)
    for i, rows in enumerate([1, 1, 8]):
        put(b, rows, i)
    batches = [b.next_batch(0) for _ in range(3)]
    assert [payloads(x.requests) for x in batches] == [[0], [1], [2]]
    assert [x.rows for x in batches] == [1, 1, 8]
    with pytest.raises(InvalidArgument):
        put(b, 9, "too big")


def test_cancel_and_remove_drop_queued_requests():
    b, clock = make(max_queue_delay=0.5)
    put(b, 1, "a")
    clock.advance(0.25)
    put(b, 2, "b")
    put(b, 3, "c")
    assert b.remove("a") and not b.remove("a")
    assert payloads(b.cancel(lambda r: r.rows == 3)) == ["c"]
    assert b.queued_rows == 2
    clock.advance(0.25)  # "a"'s window would have closed; "b" opened its own later
    assert b.next_batch(0).requests == ()
    clock.advance(0.25)
    assert payloads(b.next_batch(0).requests) == ["b"]


def test_draining_close_hands_out_what_was_queued_at_once_and_refuses_more():
    """A worker told to stop runs what it accepted: no window is waited for, batches keep their limit."""
    b, _clock = make(max_queue_delay=60.0, max_batch_size=4)
    for payload, rows in (("a", 1), ("b", 3), ("c", 2)):
        put(b, rows, payload)
    assert b.close(drain=True) == [] and b.closed and b.queued_requests == 3
    with pytest.raises(Unavailable):
        put(b, 1, "d")
    assert b.wait_hint(60.0) == 0.0
    assert payloads(b.next_batch(0).requests) == ["a", "b"]  # 4 rows: the limit, without the 60 s window
    assert payloads(b.next_batch(0).requests) == ["c"]
    assert b.next_batch(0).requests == () and b.queued_requests == 0


def test_close_returns_leftovers_and_wakes_waiters():
    b, clock = make(max_queue_delay=60.0)
    put(b, 1, "a")
    put(b, 2, "b")
    reads = clock.reads
    t, out = in_thread(lambda: b.next_batch(timeout=1000.0))
    clock.wait_reads(reads + 1)  # the consumer is inside next_batch: close must wake it
    left = b.close()
    t.join(10)
    assert not t.is_alive() and out[0].requests == ()
    assert sorted(payloads(left)) == ["a", "b"] and b.closed and b.queued_requests == 0
    with pytest.raises(Unavailable):
        put(b, 1, "c")
    assert b.next_batch(1000.0).requests == ()


# -- properties --------------------------------------------------------------------------------------

@given(rows=st.lists(st.integers(1, 8), min_size=1, max_size=20), now=st.floats(0, 2),
       preferred=st.sets(st.integers(1, 8), max_size=3))
def test_decide_invariants(rows, now, preferred):
    s = BatcherSettings(max_batch_size=8, max_queue_delay=1.0, preferred_batch_sizes=tuple(sorted(preferred)))
    queue = [QueuedRequest(r, None, i, enqueued_at=0.0) for i, r in enumerate(rows)]
    d = decide(queue, now, s)
    taken = sum(rows[:d.flush])
    assert taken <= 8
    if d.flush == 0:
        assert now < 1.0 and d.wake_at == 1.0 and sum(rows) < 8 and not any(
            sum(rows[:k]) in preferred for k in range(1, len(rows) + 1))
    elif now >= 1.0 or sum(rows) >= 8:
        assert d.flush == len(rows) or taken + rows[d.flush] > 8 or taken in preferred


@pytest.mark.timeout(60)
def test_concurrent_producers_one_consumer_exactly_once():
    """Real threads and clock; a small queue so producers also meet RESOURCE_EXHAUSTED and retry."""
    producers, per_producer, max_rows = 4, 1000, 8
    b = DynamicBatcher(BatcherSettings(max_batch_size=max_rows, max_queue_delay=0.002, max_queue_size=32))
    total = producers * per_producer
    batches: list = []
    rejected = [0] * producers

    def produce(p: int) -> None:
        rng = random.Random(p)
        for i in range(per_producer):
            req = QueuedRequest(rows=rng.randint(1, 4), deadline=None, payload=(p, i))
            while True:
                try:
                    b.submit(req)
                    break
                except ResourceExhausted:
                    rejected[p] += 1
                    time.sleep(0)  # yield the GIL to the consumer; correctness does not depend on it

    def consume() -> None:
        got = 0
        while got < total:
            batch = b.next_batch(0.05)
            if batch.requests:
                batches.append(batch)
                got += len(batch.requests)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    threads = [threading.Thread(target=produce, args=(p,), daemon=True) for p in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    consumer.join(30)
    assert not consumer.is_alive()
    out = [r.payload for x in batches for r in x.requests]
    assert sorted(out) == sorted((p, i) for p in range(producers) for i in range(per_producer))
    assert all(1 <= x.rows <= max_rows and x.expired == () for x in batches)
    assert max(len(x.requests) for x in batches) > 1  # requests were actually gathered
    for p in range(producers):  # FIFO: each producer's requests come out in the order it sent them
        assert [i for q, i in out if q == p] == list(range(per_producer))
    assert b.queued_requests == 0 and b.queued_rows == 0

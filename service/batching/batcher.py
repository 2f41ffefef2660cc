"""The per-model dynamic batcher inside a worker: a bounded FIFO queue that hands out executed batches.

The worker's loop calls `submit` for each request it receives and `next_batch(timeout)`, which always
returns within `timeout` (so the loop can answer heartbeats) with a batch to run, requests that expired
while queued (to fail with DEADLINE_EXCEEDED, never run), or nothing; a loop that receives and computes
on one thread polls (`timeout=0`) and waits for input for at most `wait_hint`. The decision itself is
the pure `policy.decide`; this class adds the lock, the queue bound, deadlines and waiting.

All times are on the injected `clock` (seconds, monotonic). Waiting uses `Condition.wait` with the
remaining clock time as the real timeout; a fake clock in tests calls `poke()` after it advances so a
waiting consumer re-evaluates at once.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from service.batching.policy import BatcherSettings, decide
from service.errors import InvalidArgument, ResourceExhausted, Unavailable


@dataclass
class QueuedRequest:
    """One request in the queue: `rows` is its batch dimension, `payload` is the caller's object.

    `deadline` is absolute on the batcher's clock (None = none). `submit` stores a copy with
    `enqueued_at` stamped and `deadline` tightened by the model's default queue timeout.
    """

    rows: int
    deadline: float | None
    payload: object
    enqueued_at: float = 0.0


@dataclass(frozen=True)
class Batch:
    """What `next_batch` returns: `requests` to run together (FIFO), `expired` to fail without running."""

    requests: tuple[QueuedRequest, ...] = ()
    expired: tuple[QueuedRequest, ...] = ()

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.requests)


class DynamicBatcher:
    """Thread-safe queue plus batching policy for one model (see `policy.py` for the rules)."""

    def __init__(self, settings: BatcherSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: deque[QueuedRequest] = deque()
        self._rows = 0
        self._closed = False

    # -- producer side -------------------------------------------------------------------------------

    def submit(self, req: QueuedRequest) -> QueuedRequest:
        """Queue `req`; returns the stored copy. Raises at once, never blocks.

        InvalidArgument when rows < 1 or rows > max_batch_size; ResourceExhausted when the queue holds
        max_queue_size requests; Unavailable after `close`.
        """
        s = self.settings
        if req.rows < 1 or (s.max_batch_size and req.rows > s.max_batch_size):
            raise InvalidArgument(f"model '{s.model}': request batch size {req.rows} must be in "
                                  f"1..{s.max_batch_size} (the model's max_batch_size)")
        with self._cond:
            if self._closed:
                raise Unavailable(f"model '{s.model}' is unloading; its queue is closed")
            if len(self._queue) >= s.max_queue_size:
                raise ResourceExhausted(f"model '{s.model}' queue is full ({s.max_queue_size} requests, "
                                        f"max_queue_size); retry later")
            now = self._clock()
            deadline = req.deadline
            if s.default_timeout > 0:
                timeout_at = now + s.default_timeout
                deadline = timeout_at if deadline is None else min(deadline, timeout_at)
            stored = QueuedRequest(req.rows, deadline, req.payload, now)
            self._queue.append(stored)
            self._rows += stored.rows
            self._cond.notify_all()
            return stored

    def cancel(self, pred: Callable[[QueuedRequest], bool]) -> list[QueuedRequest]:
        """Drop every queued request for which `pred` is true (e.g. the client cancelled); returns them."""
        with self._cond:
            dropped = [r for r in self._queue if pred(r)]
            if dropped:
                self._queue = deque(r for r in self._queue if not pred(r))
                self._rows -= sum(r.rows for r in dropped)
                self._cond.notify_all()  # the head, hence the window, may have changed
            return dropped

    def remove(self, payload: object) -> bool:
        """Drop the queued request whose payload is `payload` (identity); False if it is not queued."""
        return bool(self.cancel(lambda r: r.payload is payload))

    # -- consumer side -------------------------------------------------------------------------------

    def next_batch(self, timeout: float) -> Batch:
        """The next batch to execute, waiting at most `timeout` seconds of clock time.

        Returns as soon as a batch is due or a queued request has expired; an empty Batch when
        `timeout` passes first or the batcher is closed. `timeout=0` polls.
        """
        with self._cond:
            give_up = self._clock() + timeout
            while True:
                now = self._clock()
                expired = self._pop_expired(now)
                if self._closed and not self._queue:
                    return Batch((), expired)
                # Closed but draining: nothing more will come, so no window is worth waiting for.
                decision = decide(self._queue, math.inf if self._closed else now, self.settings)
                if decision.flush:
                    taken = tuple(self._queue.popleft() for _ in range(decision.flush))
                    self._rows -= sum(r.rows for r in taken)
                    return Batch(taken, expired)
                if expired or now >= give_up:
                    return Batch((), expired)
                wake_at = give_up
                if decision.wake_at is not None:
                    wake_at = min(wake_at, decision.wake_at)
                earliest = self._earliest_deadline()
                if earliest is not None:
                    wake_at = min(wake_at, earliest)
                self._cond.wait(max(wake_at - now, 0.0))

    def wait_hint(self, limit: float) -> float:
        """Seconds until `next_batch(0)` may return something (0: now), at most `limit`: how long a
        caller that also receives the requests (one thread) may wait for new ones before asking again."""
        with self._cond:
            if self._closed:
                return 0.0
            if not self._queue:
                return limit
            now = self._clock()
            decision = decide(self._queue, now, self.settings)
            if decision.flush:
                return 0.0
            wake_at = now + limit
            if decision.wake_at is not None:
                wake_at = min(wake_at, decision.wake_at)
            earliest = self._earliest_deadline()
            if earliest is not None:
                wake_at = min(wake_at, earliest)
            return max(0.0, wake_at - now)

    def poke(self) -> None:
        """Make waiting consumers re-evaluate now (a fake clock calls this after advancing)."""
        with self._cond:
            self._cond.notify_all()

    def close(self, drain: bool = False) -> list[QueuedRequest]:
        """Refuse new requests and wake waiters. `drain`: the queued requests stay and `next_batch` hands
        them out at once (the worker stopping gracefully runs what it accepted); otherwise they are
        returned for the caller to fail."""
        with self._cond:
            self._closed = True
            if drain:
                self._cond.notify_all()
                return []
            left = list(self._queue)
            self._queue.clear()
            self._rows = 0
            self._cond.notify_all()
            return left

    # -- introspection (metrics) ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued_requests(self) -> int:
        return len(self._queue)

    @property
    def queued_rows(self) -> int:
        return self._rows

    # -- internals (called with the lock held) -------------------------------------------------------

    def _pop_expired(self, now: float) -> tuple[QueuedRequest, ...]:
        expired = tuple(r for r in self._queue if r.deadline is not None and r.deadline <= now)
        if expired:
            self._queue = deque(r for r in self._queue if r.deadline is None or r.deadline > now)
            self._rows -= sum(r.rows for r in expired)
        return expired

    def _earliest_deadline(self) -> float | None:
        deadlines = [r.deadline for r in self._queue if r.deadline is not None]
        return min(deadlines) if deadlines else None

"""Batcher settings derived from a model's config, and the pure batching decision.

`decide` is a pure function of the queue and the current time: it says how many requests at the head of
the queue to flush now, or until when to wait. The thread-safe wrapper in `batcher.py` only applies it,
so every rule here is testable without threads or a real clock.

Rules (Triton's dynamic batcher, with the differences noted):
- The window opens when the oldest queued request was enqueued, not when the consumer asks.
- Requests are taken in FIFO order and never split; one that does not fit in the remaining rows of
  `max_batch_size` waits for the next batch (and nothing behind it jumps the queue).
- Flush at once when the batch reaches `max_batch_size` rows, or when a prefix of the queue sums to a
  preferred batch size (the largest such prefix), or when the next request does not fit (waiting
  cannot grow the batch). Difference from Triton: a full batch of `max_batch_size` rows wins over a
  smaller preferred size even when `max_batch_size` is not listed as preferred.
- Otherwise flush everything that fits once `max_queue_delay` has elapsed since the window opened
  (the boundary is inclusive: at exactly `opened + delay` the batch goes).
- Unbatched settings (no `dynamic_batching` in the config): one request per batch, no delay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from service.errors import ConfigError
from service.proto import model_config_pb2

# Bound on queued requests when the config leaves max_queue_size at 0 (Triton's 0 means unbounded; an
# unbounded queue lets a burst exhaust the worker's memory, so trtserve refuses past this many).
DEFAULT_MAX_QUEUE_SIZE = 1024

_US = 1e-6


@dataclass(frozen=True)
class BatcherSettings:
    """How one model's worker gathers requests into executed batches (times in seconds).

    `max_batch_size` is the model's (rows per executed batch; 0 = the model has no batch dimension,
    only valid unbatched). `max_queue_size` is the effective bound in requests (never 0).
    `default_timeout` is the queue timeout applied to every request (0 = none). `batching=False` means
    one request per batch with no delay.
    """

    max_batch_size: int
    max_queue_delay: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    default_timeout: float = 0.0
    batching: bool = True
    model: str = ""

    def __post_init__(self) -> None:
        if self.max_batch_size < 0 or (self.batching and self.max_batch_size == 0):
            raise ValueError(f"max_batch_size {self.max_batch_size} is invalid with batching={self.batching}")
        if self.max_queue_delay < 0 or self.default_timeout < 0 or self.max_queue_size < 1:
            raise ValueError("max_queue_delay and default_timeout must be >= 0 and max_queue_size >= 1")
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                raise ValueError(f"preferred batch size {size} is outside 1..{self.max_batch_size}")

    @staticmethod
    def from_config(config: model_config_pb2.ModelConfig) -> BatcherSettings | None:
        """Settings from `config.dynamic_batching`; None when the model does not batch dynamically.

        None also when `max_batch_size` is 0 (no batch dimension: nothing can be gathered). A queue
        policy with `timeout_action: DELAY` keeps requests queued past the default timeout (they are
        not rejected by it); trtserve has no priority levels, so DELAY simply disables the default
        timeout. Request deadlines still apply.
        """
        if not config.HasField("dynamic_batching") or config.max_batch_size <= 0:
            return None
        db = config.dynamic_batching
        where = f"model '{config.name}' config.pbtxt: dynamic_batching"
        preferred = tuple(sorted(set(db.preferred_batch_size)))
        for size in preferred:
            if not 1 <= size <= config.max_batch_size:
                raise ConfigError(f"{where}.preferred_batch_size {size} must be in 1..max_batch_size "
                                  f"({config.max_batch_size})")
        policy = db.default_queue_policy
        timeout = policy.default_timeout_microseconds * _US
        if policy.timeout_action == model_config_pb2.ModelQueuePolicy.DELAY:
            timeout = 0.0
        return BatcherSettings(
            max_batch_size=config.max_batch_size,
            max_queue_delay=db.max_queue_delay_microseconds * _US,
            preferred_batch_sizes=preferred,
            max_queue_size=policy.max_queue_size or DEFAULT_MAX_QUEUE_SIZE,
            default_timeout=timeout,
            model=config.name,
        )

    @staticmethod
    def unbatched(max_batch_size: int, model: str = "",
                  max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE) -> BatcherSettings:
        """One request per batch, no delay: the same queue and code path as dynamic batching."""
        return BatcherSettings(max_batch_size=max(max_batch_size, 0), max_queue_size=max_queue_size,
                               batching=False, model=model)

    @staticmethod
    def for_model(config: model_config_pb2.ModelConfig) -> BatcherSettings:
        """`from_config`, falling back to `unbatched`: what a worker uses."""
        return BatcherSettings.from_config(config) or BatcherSettings.unbatched(
            config.max_batch_size, model=config.name)


class Queued(Protocol):
    """What `decide` reads of a queued request."""

    @property
    def rows(self) -> int: ...

    @property
    def enqueued_at(self) -> float: ...


@dataclass(frozen=True)
class Decision:
    """`flush` requests from the head go now; when 0, nothing changes before `wake_at` (None = idle)."""

    flush: int
    wake_at: float | None


def decide(queue: Sequence[Queued], now: float, settings: BatcherSettings) -> Decision:
    """The batching decision for the (unexpired, FIFO) queue at time `now`; see the module docstring."""
    if not queue:
        return Decision(0, None)
    if not settings.batching:
        return Decision(1, None)
    limit = settings.max_batch_size
    preferred = settings.preferred_batch_sizes
    rows = taken = best_preferred = 0
    for req in queue:
        if rows + req.rows > limit:
            break
        rows += req.rows
        taken += 1
        if rows in preferred:
            best_preferred = taken
    blocked = taken < len(queue)  # the next request does not fit: waiting cannot grow this batch
    if rows == limit:
        return Decision(taken, None)
    if best_preferred:
        return Decision(best_preferred, None)
    window_closes = queue[0].enqueued_at + settings.max_queue_delay
    if blocked or now >= window_closes:
        return Decision(taken, None)
    return Decision(0, window_closes)

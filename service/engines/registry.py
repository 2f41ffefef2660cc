"""The per-model engine registry: which engines exist, which one runs a batch, when to build or release.

An engine built for capacity M serves batches 1..M; a batch runs on the smallest live engine with
M >= b. When none fits, an engine of capacity `policy.capacity_for(b)` is built. REUSE keeps only the
largest engine once it is live (smaller ones are closed when their in-flight work is done); MULTI keeps
one engine per bucket (a batch whose bucket has no engine builds it) with an optional LRU cap.

BACKGROUND rebuild serves the batch at once, by chunks on the largest live engine if none is large
enough, while the new engine builds on a thread; the switch is one step under the registry's lock.
The very first engine is built on the calling thread (reason "first"). BLOCKING builds on the calling
thread (TVM's behaviour). A failed build leaves the live engines serving and is retried for a later
batch after a backoff; only a registry with no engine at all fails requests.

Events, `on_event(kind, **fields)`, called from the compute thread or a build thread:
  "build"        capacity, reason ("first", "grow", "bucket", "warmup" or "cache_hit"), trigger (why it
                 was needed: first/grow/bucket/warmup), duration_s, device_bytes
  "build_failed" capacity, trigger, duration_s, error, retry_in_s
  "release"      capacity, why ("reuse", "lru", "close"), device_bytes
  "split"        batch, capacity, chunks (a batch served by chunks while a larger engine builds)
and, from the plan cache, "plan_load_failed" and "plan_cache_write_failed" (capacity, key, error).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from service.engines.adapters import device_memory_bytes, run_into, uses_device_buffers
from service.engines.plan_cache import PlanCache, emit, load_or_build
from service.engines.policy import EnginePolicy, Mode, Rebuild
from service.errors import InternalError, InvalidArgument, ServeError, Unavailable
from service.memory.pool import BufferSet

log = logging.getLogger(__name__)


class _Slot:
    """A live engine and its bookkeeping (guarded by the registry's lock)."""

    def __init__(self, engine: Any, capacity: int, tick: int) -> None:
        self.engine, self.capacity, self.last_used = engine, capacity, tick
        self.device_bytes = device_memory_bytes(engine)
        self.inflight = 0
        self.retired = ""  # why it was retired ("reuse", "lru", "close"); "" while selectable
        self.closed = False


class _Build:
    def __init__(self, capacity: int, trigger: str) -> None:
        self.capacity, self.trigger = capacity, trigger
        self.error: BaseException | None = None


class EngineRegistry:
    """Engines of one model, by capacity. Thread-safe: `execute` from the compute loop (or several
    threads), builds on background threads."""

    def __init__(self, builder: Any, policy: EnginePolicy | None = None, max_batch_size: int = 1,
                 plan_cache: PlanCache | None = None, on_event: Callable[..., None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_batch_size < 1:
            raise ValueError("the registry serves batching models: max_batch_size must be >= 1")
        self.builder, self.max_batch_size = builder, max_batch_size
        self.policy = policy or EnginePolicy()
        self.policy.validate(max_batch_size)
        self.plan_cache, self.on_event, self.clock = plan_cache, on_event, clock
        self._cond = threading.Condition(threading.Lock())
        self._live: dict[int, _Slot] = {}  # selectable engines by capacity
        self._draining: list[_Slot] = []  # retired, closed when their in-flight work ends
        self._building: dict[int, _Build] = {}
        self._jobs = 0  # build jobs not yet fully finished (events sent, engines released)
        self._failures: dict[int, tuple[int, float, str]] = {}  # capacity -> (count, retry_at, error)
        self._tick = 0
        self._builds: Counter[str] = Counter()
        self._build_failures = 0
        self._splits = 0
        self._closed = False

    # -- public ------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Build (or load) `policy.warmup_batch_sizes` on this thread; raises if one fails. REUSE keeps
        one engine, so it builds only the largest listed capacity."""
        sizes = sorted(set(self.policy.warmup_batch_sizes))
        if self.policy.mode is Mode.REUSE:
            sizes = sizes[-1:]
        for capacity in sizes:
            with self._cond:
                self._cond.wait_for(lambda c=capacity: c not in self._building)
                if capacity in self._live:
                    continue
                build = self._register(capacity, "warmup")
            self._build(build)
            if build.error is not None:
                raise _serve_error(build.error, capacity)

    def execute(self, batch: int, buffers: BufferSet) -> dict[str, np.ndarray]:
        """Run `batch` rows of `buffers` (pool views; outputs written in place). Returns the outputs
        that have no pool view (unpooled), joined over chunks; {} when every output is pooled. A batch
        of 0 builds and runs nothing."""
        if batch == 0:
            return {}
        if not 1 <= batch <= self.max_batch_size:
            raise InvalidArgument(f"batch {batch} is outside 1..{self.max_batch_size} (max_batch_size)")
        if buffers.rows < batch:
            raise ValueError(f"buffer set has {buffers.rows} rows, batch is {batch}")
        if buffers.rows > batch:
            buffers = buffers.slice(0, batch)
        slot = self._acquire(batch)
        try:
            return self._run(slot, batch, buffers)
        finally:
            self._done(slot)

    def live_capacities(self) -> list[int]:
        """Capacities of the engines that serve new batches, ascending."""
        with self._cond:
            return sorted(self._live)

    def wait_for_builds(self, timeout: float | None = None) -> bool:
        """Wait until no build is running (events sent, engines switched); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._jobs == 0, timeout)

    def stats(self) -> dict[str, Any]:
        """builds (by reported reason), build_failures, engines_live (all not yet closed),
        live_capacities, draining_capacities, building, max_capacity, engine_device_bytes, split_batches."""
        with self._cond:
            slots = [*self._live.values(), *self._draining]
            return {
                "builds": dict(self._builds),
                "build_failures": self._build_failures,
                "engines_live": len(slots),
                "live_capacities": sorted(self._live),
                "draining_capacities": sorted(s.capacity for s in self._draining),
                "building": sorted(self._building),
                "max_capacity": max(self._live, default=0),
                "engine_device_bytes": sum(s.device_bytes for s in slots),
                "split_batches": self._splits,
            }

    def close(self) -> None:
        """Release every engine (in-flight ones when they finish; running builds when they end)."""
        with self._cond:
            self._closed = True
            for s in self._live.values():
                s.retired = "close"
            slots = [*self._live.values(), *self._draining]
            self._live.clear()
            self._draining = [s for s in slots if s.inflight]
            idle = [s for s in slots if not s.inflight and not s.closed]
            for s in idle:
                s.closed = True
        for s in idle:
            self._close(s)

    # -- choosing an engine ------------------------------------------------------------------------

    def _acquire(self, batch: int) -> _Slot:
        may_build = True
        while True:
            with self._cond:
                build = self._decide(batch, may_build)
                if build is None:
                    slot = self._fit(batch) or self._live[max(self._live)]
                    slot.inflight += 1
                    self._tick += 1
                    slot.last_used = self._tick
                    return slot
            self._build(build)  # synchronously, on this thread
            if build.error is not None:
                may_build = False  # serve from what is live; a later batch retries after the backoff
                with self._cond:
                    if not self._live:
                        raise _serve_error(build.error, build.capacity)

    def _decide(self, batch: int, may_build: bool) -> _Build | None:
        """Under the lock: None = serve now from the live engines; else a build to run on this thread.
        Waits (releasing the lock) where the policy says to wait for a running build."""
        while True:
            if self._closed:
                raise Unavailable("the model's engines are closed (unloading)")
            fit = self._fit(batch)
            target = self.policy.capacity_for(batch, self.max_batch_size)
            if fit is not None and (self.policy.mode is Mode.REUSE or fit.capacity <= target):
                return None
            if not may_build and self._live:
                return None
            background = self.policy.rebuild is Rebuild.BACKGROUND and bool(self._live)
            if self._covering_build(batch, target):
                if background:
                    return None
                self._cond.wait()
                continue
            failure = self._failures.get(target)
            if failure is not None and self.clock() < failure[1]:
                if self._live:
                    return None
                raise Unavailable(
                    f"no engine: building capacity {target} failed {failure[0]} time(s) ({failure[2]}); "
                    f"retrying in {failure[1] - self.clock():.1f}s"
                )
            build = self._register(target, self._trigger(target))
            if not background:
                return build
            threading.Thread(target=self._build, args=(build,), daemon=True,
                             name=f"engine-build-{target}").start()
            return None

    def _fit(self, batch: int) -> _Slot | None:
        return next((self._live[c] for c in sorted(self._live) if c >= batch), None)

    def _covering_build(self, batch: int, target: int) -> bool:
        if self.policy.mode is Mode.REUSE:
            return any(c >= batch for c in self._building)
        return any(batch <= c <= target for c in self._building)

    def _trigger(self, capacity: int) -> str:
        if not self._live:
            return "first"
        return "grow" if capacity > max(self._live) else "bucket"

    # -- running -----------------------------------------------------------------------------------

    def _run(self, slot: _Slot, batch: int, buffers: BufferSet) -> dict[str, np.ndarray]:
        engine, chunk = slot.engine, min(slot.capacity, batch)
        device = uses_device_buffers(engine)
        if device:
            buffers.upload()
        extras = []
        for start in range(0, batch, chunk):
            part = buffers if chunk == batch else buffers.slice(start, min(start + chunk, batch))
            inputs = {**part.inputs, **part.device_inputs} if device else part.inputs
            outputs = {**part.outputs, **part.device_outputs} if device else part.outputs
            extras.append(run_into(engine, inputs, outputs))
        if device:
            buffers.download()
        if len(extras) == 1:
            return extras[0]
        with self._cond:
            self._splits += 1
        emit(self.on_event, "split", batch=batch, capacity=slot.capacity, chunks=len(extras))
        return {name: np.concatenate([e[name] for e in extras]) for name in extras[0]}

    def _done(self, slot: _Slot) -> None:
        with self._cond:
            slot.inflight -= 1
            release = bool(slot.retired) and slot.inflight == 0 and not slot.closed
            if release:
                slot.closed = True
                self._draining.remove(slot)
        if release:
            self._close(slot)

    # -- building and releasing --------------------------------------------------------------------

    def _register(self, capacity: int, trigger: str) -> _Build:
        build = _Build(capacity, trigger)
        self._building[capacity] = build
        self._jobs += 1
        return build

    def _build(self, build: _Build) -> None:
        """Build and install one engine, or record the failure; never raises."""
        capacity, start = build.capacity, self.clock()
        try:
            try:
                engine, cached = load_or_build(self.builder, capacity, self.plan_cache, self.on_event)
            except Exception as exc:
                self._failed(build, exc, self.clock() - start)
                return
            duration = self.clock() - start
            with self._cond:
                self._tick += 1
                slot = _Slot(engine, capacity, self._tick)
                del self._building[capacity]
                self._failures.pop(capacity, None)
                reason = "cache_hit" if cached else build.trigger
                self._builds[reason] += 1
                if self._closed:
                    slot.retired, slot.closed, released = "close", True, [slot]
                elif capacity in self._live:  # cannot happen (builds are de-duplicated); never leak one
                    slot.retired, slot.closed, released = "reuse", True, [slot]
                else:
                    self._live[capacity] = slot
                    released = self._retire_for(slot)
                self._cond.notify_all()
            emit(self.on_event, "build", capacity=capacity, reason=reason, trigger=build.trigger,
                 duration_s=duration, device_bytes=slot.device_bytes)
            for old in released:
                self._close(old)
        finally:
            with self._cond:
                self._jobs -= 1
                self._cond.notify_all()

    def _failed(self, build: _Build, exc: Exception, duration: float) -> None:
        log.warning("engine build for capacity %d failed: %s", build.capacity, exc)
        with self._cond:
            count = self._failures.get(build.capacity, (0, 0.0, ""))[0] + 1
            delay = min(self.policy.retry_backoff_s * 2 ** (count - 1), self.policy.max_retry_backoff_s)
            self._failures[build.capacity] = (count, self.clock() + delay, str(exc))
            del self._building[build.capacity]
            self._build_failures += 1
            build.error = exc
            self._cond.notify_all()
        emit(self.on_event, "build_failed", capacity=build.capacity, trigger=build.trigger,
             duration_s=duration, error=str(exc), retry_in_s=delay)

    def _retire_for(self, new: _Slot) -> list[_Slot]:
        """Under the lock, after `new` went live: retire what the policy drops; returns the idle ones
        (to close now); busy ones drain."""
        if self.policy.mode is Mode.REUSE:
            keep = max(self._live)  # a build that lost a race to a larger one retires itself
            retire = [(s, "reuse") for c, s in self._live.items() if c != keep]
        else:
            cap, others = self.policy.max_engines, [s for s in self._live.values() if s is not new]
            excess = len(self._live) - cap if cap else 0
            retire = [(s, "lru") for s in sorted(others, key=lambda s: s.last_used)[:max(excess, 0)]]
        idle = []
        for slot, why in retire:
            del self._live[slot.capacity]
            slot.retired = why
            if slot.inflight:
                self._draining.append(slot)
            else:
                slot.closed = True
                idle.append(slot)
        return idle

    def _close(self, slot: _Slot) -> None:
        try:
            slot.engine.close()
        except Exception:
            log.exception("closing engine of capacity %d failed", slot.capacity)
        emit(self.on_event, "release", capacity=slot.capacity, why=slot.retired,
             device_bytes=slot.device_bytes)


def _serve_error(exc: BaseException, capacity: int) -> ServeError:
    if isinstance(exc, ServeError):
        return exc
    return InternalError(f"building the engine for capacity {capacity} failed: {exc}")

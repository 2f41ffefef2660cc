"""The per-model engine registry: which engines exist, which one runs a batch, when to build or release.

An engine built for capacity M serves batches 1..M; a batch runs on the smallest live engine with
M >= b. When none fits, an engine of capacity `policy.capacity_for(b)` is built. REUSE keeps only the
largest engine once it is live (smaller ones are closed when their in-flight work is done); MULTI keeps
one engine per bucket (a batch whose bucket has no engine builds it) with an optional LRU cap.

Builds go through one queue per registry (`growth.BuildQueue`): at most
`policy.max_concurrent_builds` (default 1) run at once, the largest queued capacity starts next, and
REUSE drops a queued capacity when a larger one is queued. BACKGROUND rebuild runs queued builds on
threads and serves meanwhile: a batch that some live engine fits runs on it (MULTI: a larger engine
until its bucket is built); a batch larger than every live engine either runs at once in chunks on
the largest live engine or waits for a running build of a larger engine, whichever is expected to
finish sooner (`growth.wait_or_chunk`; the wait is bounded by the chunked time, then it chunks). The switch to a new
engine is one step under the registry's lock. The very first engine is built on the calling thread,
and batches arriving meanwhile wait for it. BLOCKING builds on the calling thread (TVM's behaviour),
one build at a time too. A failed build leaves the live engines serving and is retried for a later
batch after a backoff; only a registry with no engine at all fails requests.

Build reasons, fixed when the build is requested, so they depend on the order of requests and not on
when builds finish: "first" (no engine live, building or queued), "grow" (a capacity larger than every
engine live, building or queued), "bucket" (MULTI: smaller than one of those), "warmup" (`warm_up`);
the reported reason is "cache_hit" instead when the engine was loaded from the plan cache (the event
keeps the trigger).

Events, `on_event(kind, **fields)`, called from the compute thread or a build thread, never under the lock:
  "build"        capacity, reason ("first", "grow", "bucket", "warmup" or "cache_hit"), trigger (the
                 reason it was requested with), duration_s, device_bytes
  "build_failed" capacity, trigger, duration_s, error, retry_in_s
  "release"      capacity, why ("reuse", "lru", "close"), device_bytes
  "split"        batch, capacity, chunks (a batch served by chunks while a larger engine builds)
  "handover"     batch, capacity, rows_done, new_capacity (a chunked batch whose rows left moved to a
                 larger engine that went live meanwhile)
  "wait"         batch, capacity (of the awaited build), live_capacity, chunks_s, wait_s (expected
                 seconds both ways: the batch waits for the build rather than run by chunks now)
and, from the plan cache, "plan_load_failed" and "plan_cache_write_failed" (capacity, key, error).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from service.engines.adapters import device_memory_bytes, run_into, uses_device_buffers
from service.engines.growth import Build, BuildQueue, BuildTimes, RunTimes, wait_or_chunk
from service.engines.plan_cache import PlanCache, emit, load_or_build
from service.engines.policy import EnginePolicy, Mode, Rebuild
from service.errors import InternalError, InvalidArgument, ServeError, Unavailable
from service.memory.pool import BufferSet

log = logging.getLogger(__name__)


class _Slot:
    """A live engine and its bookkeeping (guarded by the registry's lock)."""

    def __init__(self, engine: Any, capacity: int, tick: int, times: RunTimes, pad: bool) -> None:
        self.engine, self.capacity, self.last_used = engine, capacity, tick
        self.pad = pad  # runs every batch at its capacity
        self.device_bytes = device_memory_bytes(engine)
        self.times = times  # seconds per run by rows, from its executed batches
        self.inflight = 0
        self.retired = ""  # why it was retired ("reuse", "lru", "close"); "" while selectable
        self.closed = False


class EngineRegistry:
    """Engines of one model, by capacity. Thread-safe: `execute` from the compute loop (or several
    threads), builds on background threads. `clock` (seconds, monotonic) times builds and runs."""

    def __init__(self, builder: Any, policy: EnginePolicy | None = None, max_batch_size: int = 1,
                 plan_cache: PlanCache | None = None, on_event: Callable[..., None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 prime: Callable[[Any, int], None] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError("the registry serves batching models: max_batch_size must be >= 1")
        self.builder, self.max_batch_size = builder, max_batch_size
        self.policy = policy or EnginePolicy()
        self.policy.validate(max_batch_size)
        self.plan_cache, self.on_event, self.clock = plan_cache, on_event, clock
        # prime(engine, capacity) runs a new engine once before it goes live: what a backend sets up on
        # its first run (memory arenas, kernel choices, CUDA handles) is then paid by the build, not by
        # the first batch on the engine.
        self.prime = prime
        self._cond = threading.Condition(threading.Lock())
        self._live: dict[int, _Slot] = {}  # selectable engines by capacity
        # batch -> the live engine `_decide` picks for it at once (its first answer depends only on
        # `_live` and the frozen policy): cleared whenever `_live` changes, so a steady stream of
        # batches skips re-deciding.
        self._chosen: dict[int, _Slot] = {}
        self.generation = 0  # counts changes of the live engines (what a caller's bindings depend on)
        self._draining: list[_Slot] = []  # retired, closed when their in-flight work ends
        self._queue = BuildQueue(self.policy.max_concurrent_builds, coalesce=self.policy.mode is Mode.REUSE)
        self._build_times = BuildTimes()
        self._jobs = 0  # builds queued or not yet fully finished (events sent, engines released)
        self._failures: dict[int, tuple[int, float, str]] = {}  # capacity -> (count, retry_at, error)
        self._tick = 0
        self._builds: Counter[str] = Counter()
        self._build_failures = 0
        self._splits = 0
        self._waits = 0
        self._closed = False

    # -- public ------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Build (or load) `policy.warmup_batch_sizes` on this thread; raises if one fails. REUSE keeps
        one engine, so it builds only the largest listed capacity."""
        sizes = sorted(set(self.policy.warmup_batch_sizes))
        if self.policy.mode is Mode.REUSE:
            sizes = sizes[-1:]
        for capacity in sizes:
            build = self._claim(capacity)
            if build is None:
                continue
            self._build(build)
            if build.error is not None:
                raise _serve_error(build.error, capacity)

    def execute(self, batch: int, buffers: BufferSet) -> dict[str, np.ndarray]:
        """Run `batch` rows of `buffers` (pool views; outputs written in place). Returns the outputs
        that have no pool view (unpooled), joined over chunks; {} when every output is pooled. A batch
        of 0 builds and runs nothing. On a padding engine the batch runs at the engine's capacity when
        `buffers` has that many rows (see `rows_for`); only the first `batch` rows of outputs count."""
        if batch == 0:
            return {}
        if not 1 <= batch <= self.max_batch_size:
            raise InvalidArgument(f"batch {batch} is outside 1..{self.max_batch_size} (max_batch_size)")
        if buffers.rows < batch:
            raise ValueError(f"buffer set has {buffers.rows} rows, batch is {batch}")
        slot = self._acquire(batch)
        try:
            rows = slot.capacity if slot.pad and batch < slot.capacity <= buffers.rows else batch
            if buffers.rows > rows:
                buffers = buffers.slice(0, rows)
            extra = self._run(slot, rows, buffers)
            return {name: array[:batch] for name, array in extra.items()} if rows > batch else extra
        finally:
            self._done(slot)

    def hold(self, batch: int) -> Any | None:
        """For a caller that runs `batch` rows on views it bound to an engine itself (the worker's
        direct lane): the engine `execute` would run them on now, as it is (no padding, no chunks),
        held until `release` (a retired engine is not closed while held); None when `execute` has to
        decide (nothing chosen for `batch` since the live engines last changed, or the engine pads).
        The result has `.engine`."""
        with self._cond:
            slot = self._chosen.get(batch)
            if slot is None or slot.pad:
                return None
            return self._use(slot)

    def release(self, held: Any, batch: int, seconds: float | None) -> None:
        """End a `hold`; `seconds` (None: the run failed) counts toward the engine's run times, as
        `execute`'s runs do."""
        if seconds is not None:
            with self._cond:
                held.times.add(batch, seconds)
        self._done(held)

    def rows_for(self, batch: int) -> int:
        """Rows the buffer views for `batch` should have: the capacity of the engine it would run on
        now when that engine pads, else `batch` (a hint: the engine may change before `execute`)."""
        with self._cond:
            slot = self._chosen.get(batch) or self._fit(batch)
            return slot.capacity if slot is not None and slot.pad and slot.capacity > batch else batch

    def expected_seconds(self, batch: int) -> float | None:
        """How long `batch` is expected to run on the engine that would take it now (from that engine's
        past runs); None when unknown or when no live engine can take it (it would wait for a build)."""
        with self._cond:
            slot = self._chosen.get(batch) or self._fit(batch)
            if slot is None:
                return None
            return slot.times.predict(slot.capacity if slot.pad and slot.capacity > batch else batch)

    def _pads(self, engine: Any) -> bool:
        """Whether batches on `engine` run at its capacity (policy `padding`; "auto": the engine's
        `fixed_shape` wish)."""
        if self.policy.padding == "auto":
            return bool(getattr(engine, "fixed_shape", False))
        return self.policy.padding == "capacity"

    def live_capacities(self) -> list[int]:
        """Capacities of the engines that serve new batches, ascending."""
        with self._cond:
            return sorted(self._live)

    def binds_device_buffers(self) -> bool:
        """Whether the live engines bind the pool's device buffers rather than its host views (one
        builder makes all of a model's engines alike; ONNX Runtime's take host views for BYTES models, or
        when CUDA did not start)."""
        with self._cond:
            return any(uses_device_buffers(slot.engine) for slot in self._live.values())

    def wait_for_builds(self, timeout: float | None = None) -> bool:
        """Wait until no build is queued or running (events sent, engines switched); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._jobs == 0, timeout)

    def stats(self) -> dict[str, Any]:
        """builds (by reported reason), build_failures, engines_live (all not yet closed),
        live_capacities, draining_capacities, building, queued, max_capacity, engine_device_bytes,
        split_batches, waited_batches (batches that waited for a build rather than run by chunks)."""
        with self._cond:
            slots = [*self._live.values(), *self._draining]
            return {
                "builds": dict(self._builds),
                "build_failures": self._build_failures,
                "engines_live": len(slots),
                "live_capacities": sorted(self._live),
                "draining_capacities": sorted(s.capacity for s in self._draining),
                "building": sorted(self._queue.running),
                "queued": sorted(self._queue.queued),
                "max_capacity": max(self._live, default=0),
                "engine_device_bytes": sum(s.device_bytes for s in slots),
                "split_batches": self._splits,
                "waited_batches": self._waits,
            }

    def close(self) -> None:
        """Release every engine (in-flight ones when they finish; running builds when they end);
        queued builds are dropped."""
        with self._cond:
            self._closed = True
            self._jobs -= len(self._queue.clear())
            for s in self._live.values():
                s.retired = "close"
            slots = [*self._live.values(), *self._draining]
            self._live.clear()
            self._chosen.clear()
            self.generation += 1
            self._draining = [s for s in slots if s.inflight]
            idle = [s for s in slots if not s.inflight and not s.closed]
            for s in idle:
                s.closed = True
            self._cond.notify_all()
        for s in idle:
            self._close(s)

    # -- choosing an engine ------------------------------------------------------------------------

    def _acquire(self, batch: int) -> _Slot:
        may_build = True
        while True:
            with self._cond:
                choice = self._chosen.get(batch) or self._decide(batch, may_build)
                if isinstance(choice, _Slot):
                    return self._use(choice)
            self._build(choice)  # synchronously, on this thread
            if choice.error is not None:
                may_build = False  # serve from what is live; a later batch retries after the backoff
                with self._cond:
                    if not self._live:
                        raise _serve_error(choice.error, choice.capacity)

    def _decide(self, batch: int, may_build: bool) -> _Slot | Build:
        """Under the lock: the live engine to run on now, or a started build to run on this thread.
        Waits (releasing the lock) for a build where the policy or the estimates say so."""
        awaited: Build | None = None  # the build an oversize batch waits for, until `deadline`
        deadline = math.inf
        while True:
            if self._closed:
                raise Unavailable("the model's engines are closed (unloading)")
            fit = self._fit(batch)
            target = self.policy.capacity_for(batch, self.max_batch_size)
            if fit is not None and (self.policy.mode is Mode.REUSE or fit.capacity <= target):
                self._chosen[batch] = fit  # the same answer until the live engines change
                return fit
            if not may_build and self._live:
                return fit or self._largest()
            build = self._covering(batch, target)
            if build is None:
                failure = self._failures.get(target)
                if failure is not None and self.clock() < failure[1]:
                    if self._live:
                        return fit or self._largest()
                    raise Unavailable(
                        f"no engine: building capacity {target} failed {failure[0]} time(s) ({failure[2]}); "
                        f"retrying in {failure[1] - self.clock():.1f}s"
                    )
                build = self._request(target, self._trigger(target))
            if self.policy.rebuild is Rebuild.BACKGROUND and self._live:
                self._start_queued()
                if fit is not None:  # MULTI: a larger engine serves the batch until its bucket is built
                    return fit
                largest = self._largest()
                if awaited is None or self._queue.running.get(awaited.capacity) is not awaited:
                    awaited, until = self._plan_wait(largest, batch)
                    if awaited is None:
                        return largest  # by chunks
                    deadline = min(deadline, until)
                    continue  # the lock was released to report the wait: look again
                timeout = deadline - self.clock()
                if timeout <= 0:
                    return largest  # by chunks
                self._cond.wait(timeout)
                continue
            # BLOCKING, or no engine yet: build it here, or wait for the thread that does.
            if self._queue.take(self.clock(), build) is build:
                return build
            self._cond.wait()

    def _fit(self, batch: int) -> _Slot | None:
        return next((self._live[c] for c in sorted(self._live) if c >= batch), None)

    def _largest(self) -> _Slot:
        return self._live[max(self._live)]

    def _covering(self, batch: int, target: int) -> Build | None:
        """A build running or queued that will serve `batch` (a running one first); with no engine
        live, whatever is building: the first engine, which every batch waits for."""
        pending = sorted((self._queue.get(c) for c in self._queue.capacities()),
                         key=lambda b: (b.started_at is None, b.capacity))
        if not self._live:
            return pending[0] if pending else None
        if self.policy.mode is Mode.REUSE:
            return next((b for b in pending if b.capacity >= batch), None)
        return next((b for b in pending if batch <= b.capacity <= target), None)

    def _trigger(self, capacity: int) -> str:
        known = [*self._live, *self._queue.capacities()]
        if not known:
            return "first"
        return "grow" if capacity > max(known) else "bucket"

    def _plan_wait(self, slot: _Slot, batch: int) -> tuple[Build | None, float]:
        """Under the lock: the running build `batch` should wait for rather than run by chunks on
        `slot` (the largest live engine), and until when; (None, -inf): chunk now. A wait is reported,
        with the lock released for the call."""
        now, best = self.clock(), None
        for build in self._queue.running.values():
            if build.capacity > slot.capacity:
                estimate = wait_or_chunk(slot.times, slot.capacity, batch, self._build_times, build.capacity,
                                         now - build.started_at)
                if estimate is not None and estimate.wait and (best is None or estimate.wait_s < best[1].wait_s):
                    best = build, estimate
        if best is None:
            return None, -math.inf
        build, estimate = best
        self._waits += 1
        self._cond.release()
        try:
            emit(self.on_event, "wait", batch=batch, capacity=build.capacity, live_capacity=slot.capacity,
                 chunks_s=estimate.chunks_s, wait_s=estimate.wait_s)
        finally:
            self._cond.acquire()
        return build, now + estimate.chunks_s

    # -- running -----------------------------------------------------------------------------------

    def _run(self, slot: _Slot, batch: int, buffers: BufferSet) -> dict[str, np.ndarray]:
        """Run `batch` rows on `slot`, in chunks when it is smaller; when a larger engine goes live
        between two chunks, the rows left move to it (a batch chunked at the start of a build does not
        keep running chunks after the build landed)."""
        engine, chunk = slot.engine, min(slot.capacity, batch)
        device = uses_device_buffers(engine)
        start = self.clock()
        if device:
            buffers.upload()
        extras, done, larger = [], 0, None
        while done < batch and larger is None:
            stop = min(done + chunk, batch)
            part = buffers if chunk == batch else buffers.slice(done, stop)
            inputs = {**part.inputs, **part.device_inputs} if device else part.inputs
            outputs = {**part.outputs, **part.device_outputs} if device else part.outputs
            extras.append(run_into(engine, inputs, outputs))
            done = stop
            if done < batch:
                larger = self._handover(slot, batch - done)
        chunks, seconds = len(extras), self.clock() - start
        with self._cond:
            slot.times.add(done / chunks, seconds / chunks)  # per chunk: exact for time = a + b * rows
            if chunks > 1 or larger is not None:
                self._splits += 1
        if larger is not None:
            emit(self.on_event, "handover", batch=batch, capacity=slot.capacity, rows_done=done,
                 new_capacity=larger.capacity)
            try:
                extras.append(self._run(larger, batch - done, buffers.slice(done, batch)))
            finally:
                self._done(larger)
        if device:
            buffers.download()
        if len(extras) == 1:
            return extras[0]
        if larger is None:
            emit(self.on_event, "split", batch=batch, capacity=slot.capacity, chunks=chunks)
        return {name: np.concatenate([e[name] for e in extras]) for name in extras[0]}

    def _handover(self, slot: _Slot, rows: int) -> _Slot | None:
        """A live engine larger than `slot`, acquired for the `rows` left of a chunked batch (the
        smallest that covers them, else the largest); None while there is none."""
        with self._cond:
            best = self._fit(rows) or (self._largest() if self._live else None)
            if best is None or best.capacity <= slot.capacity:
                return None
            return self._use(best)

    def _use(self, slot: _Slot) -> _Slot:
        """Under the lock: `slot` takes one more run (held until `_done`) and becomes the most recent."""
        slot.inflight += 1
        self._tick += 1
        slot.last_used = self._tick
        return slot

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

    def _request(self, capacity: int, trigger: str) -> Build:
        """Under the lock: queue a build (REUSE: dropping smaller queued ones)."""
        build = Build(capacity, trigger)
        dropped = self._queue.add(build)
        self._jobs += 1 - len(dropped)
        if dropped:
            self._cond.notify_all()
        return build

    def _claim(self, capacity: int) -> Build | None:
        """For warm-up: the build of `capacity`, started for this thread to run; None once it is live."""
        with self._cond:
            while True:
                if self._closed:
                    raise Unavailable("the model's engines are closed (unloading)")
                if capacity in self._live:
                    return None
                build = self._queue.get(capacity) or self._request(capacity, "warmup")
                if self._queue.take(self.clock(), build) is build:
                    return build
                self._cond.wait()

    def _start_queued(self) -> None:
        """Under the lock (BACKGROUND): start queued builds on threads while a build slot is free."""
        while (build := self._queue.take(self.clock())) is not None:
            threading.Thread(target=self._build, args=(build,), daemon=True,
                             name=f"engine-build-{build.capacity}").start()

    def _build(self, build: Build) -> None:
        """Build and install one started build's engine, or record the failure; never raises. Then,
        under BACKGROUND, the next queued build starts."""
        capacity, start = build.capacity, self.clock()
        try:
            try:
                engine, cached = load_or_build(self.builder, capacity, self.plan_cache, self.on_event)
                self._prime(engine, capacity)
            except Exception as exc:
                self._failed(build, exc, self.clock() - start)
                return
            duration = self.clock() - start
            with self._cond:
                self._queue.finish(build)
                self._build_times.add(duration)
                self._tick += 1
                # A new engine starts from the run times of the largest live one (the same network).
                times = self._largest().times.copy() if self._live else RunTimes()
                slot = _Slot(engine, capacity, self._tick, times, self._pads(engine))
                self._failures.pop(capacity, None)
                reason = "cache_hit" if cached else build.trigger
                self._builds[reason] += 1
                if self._closed:
                    slot.retired, slot.closed, released = "close", True, [slot]
                elif capacity in self._live:  # cannot happen (builds are de-duplicated); never leak one
                    slot.retired, slot.closed, released = "reuse", True, [slot]
                else:
                    self._live[capacity] = slot
                    self._chosen.clear()
                    self.generation += 1
                    released = self._retire_for(slot)
                self._cond.notify_all()
            emit(self.on_event, "build", capacity=capacity, reason=reason, trigger=build.trigger,
                 duration_s=duration, device_bytes=slot.device_bytes)
            for old in released:
                self._close(old)
        finally:
            with self._cond:
                self._jobs -= 1
                if self.policy.rebuild is Rebuild.BACKGROUND and self._live and not self._closed:
                    self._start_queued()
                self._cond.notify_all()

    def _prime(self, engine: Any, capacity: int) -> None:
        """Run `prime` on a new engine; one that fails it is closed (the build then counts as failed)."""
        if self.prime is None:
            return
        try:
            self.prime(engine, capacity)
        except Exception:
            with contextlib.suppress(Exception):
                engine.close()
            raise

    def _failed(self, build: Build, exc: Exception, duration: float) -> None:
        log.warning("engine build for capacity %d failed: %s", build.capacity, exc)
        with self._cond:
            count = self._failures.get(build.capacity, (0, 0.0, ""))[0] + 1
            delay = min(self.policy.retry_backoff_s * 2 ** (count - 1), self.policy.max_retry_backoff_s)
            self._failures[build.capacity] = (count, self.clock() + delay, str(exc))
            self._queue.finish(build)
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
            self._chosen.clear()
            self.generation += 1
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

"""Growing a model's engines: the build queue, and whether an oversize batch chunks or waits.

While a larger engine builds, a batch larger than every live engine can be served two ways: at once,
in chunks on the largest live engine, or after waiting for a running build of a larger engine and
then on that engine (in one run if it covers the batch, else in fewer chunks). Chunking costs one
engine run per chunk, and a run has a fixed part that is paid per chunk (a memory-bound model such as
`mlp` reads all its weights for a 1-row run: 64 rows on a capacity-1 engine cost 64 full runs).
Waiting costs what is left of the build. `wait_or_chunk` takes whichever is expected to finish
sooner, from two running estimates:

- `RunTimes`, per live engine: time(rows) ~ a + b * rows, fitted by exponentially weighted least
  squares over the engine's executed batches. A batch of n chunks gives one sample (its rows / n,
  its seconds / n), which is exact under the linear model. Until the rows seen vary enough to fit a
  slope the model is the constant "time per run". A new engine starts from the estimate of the
  largest live one (the same network), which the registry copies into it.
- `BuildTimes`, per model: the exponentially weighted mean and mean deviation of build durations
  (cache loads included), as TCP estimates round-trip times. Remaining time of a running build:
  mean - elapsed; past the mean, (mean + 2 deviations) - elapsed; past that, unknown.

Decision, for a batch of B rows, the largest live engine of capacity L and a running build of
capacity C > L (a queued build is never waited for):
    chunks_s = ceil(B / L) * a + B * b          wait_s = remaining_build + ceil(B / C) * a + B * b
wait iff wait_s < chunks_s, else chunk; nothing known yet (no finished build, no run timed) means
chunk, so a request never waits on a guess. The wait is bounded by chunks_s: a build that is later
than expected costs at most twice the chunked time, after which the batch is served by chunks anyway.
When the awaited build lands without covering the batch, the registry decides again (the deadline
only moves earlier).

`BuildQueue`: at most `slots` builds run at once; the largest queued capacity starts next (a larger
engine also serves the smaller batches meanwhile); with `coalesce` (REUSE, which keeps one engine) a
newly queued capacity drops the smaller queued ones.
"""

from __future__ import annotations

from dataclasses import dataclass


class Build:
    """One requested engine build. `trigger` is fixed when it is requested; `started_at` (the registry's
    clock) is None while it is queued."""

    def __init__(self, capacity: int, trigger: str) -> None:
        self.capacity, self.trigger = capacity, trigger
        self.started_at: float | None = None
        self.error: BaseException | None = None


class BuildQueue:
    """Queued and running builds by capacity; not thread-safe (the registry's lock guards it)."""

    def __init__(self, slots: int = 1, coalesce: bool = False) -> None:
        self.slots, self.coalesce = slots, coalesce
        self.queued: dict[int, Build] = {}
        self.running: dict[int, Build] = {}

    def capacities(self) -> list[int]:
        """Capacities running or queued."""
        return [*self.running, *self.queued]

    def get(self, capacity: int) -> Build | None:
        return self.running.get(capacity) or self.queued.get(capacity)

    def add(self, build: Build) -> list[Build]:
        """Queue `build`; returns the queued builds it replaces (coalescing)."""
        dropped = [b for c, b in self.queued.items() if self.coalesce and c < build.capacity]
        for b in dropped:
            del self.queued[b.capacity]
        self.queued[build.capacity] = build
        return dropped

    def take(self, now: float, build: Build | None = None) -> Build | None:
        """Start `build` (or else the largest queued one) if a slot is free; None if not."""
        if len(self.running) >= self.slots or not self.queued:
            return None
        if build is None:
            build = self.queued[max(self.queued)]
        elif self.queued.get(build.capacity) is not build:
            return None
        del self.queued[build.capacity]
        self.running[build.capacity] = build
        build.started_at = now
        return build

    def finish(self, build: Build) -> None:
        self.running.pop(build.capacity, None)

    def clear(self) -> list[Build]:
        """Drop every queued build (running ones finish); returns them."""
        dropped = list(self.queued.values())
        self.queued.clear()
        return dropped


class RunTimes:
    """Seconds per engine run as a + b * rows, exponentially weighted (recent batches count most)."""

    ALPHA = 0.2
    MIN_ROW_VARIANCE = 0.05  # below this the rows seen are all about the same: no slope

    def __init__(self) -> None:
        self.samples = 0
        self._r = self._t = self._rr = self._rt = 0.0  # weighted means of rows, t, rows^2, rows*t

    def copy(self) -> RunTimes:
        other = RunTimes()
        other.samples, other._r, other._t, other._rr, other._rt = self.samples, self._r, self._t, self._rr, self._rt
        return other

    def add(self, rows: float, seconds: float) -> None:
        w = 1.0 if self.samples == 0 else self.ALPHA
        self._r += w * (rows - self._r)
        self._t += w * (seconds - self._t)
        self._rr += w * (rows * rows - self._rr)
        self._rt += w * (rows * seconds - self._rt)
        self.samples += 1

    def coefficients(self) -> tuple[float, float] | None:
        """(a, b), both >= 0; None before the first sample."""
        if not self.samples:
            return None
        var = self._rr - self._r * self._r
        slope = (self._rt - self._r * self._t) / var if var >= self.MIN_ROW_VARIANCE else 0.0
        if slope <= 0:
            return self._t, 0.0
        a = self._t - slope * self._r
        if a < 0:  # through the origin instead: all of the time is per row
            return 0.0, self._t / self._r
        return a, slope

    def predict(self, rows: int) -> float | None:
        ab = self.coefficients()
        return None if ab is None else ab[0] + ab[1] * rows

    def chunked(self, capacity: int, batch: int) -> float | None:
        """Seconds to run `batch` rows in chunks of `capacity` (the last one smaller)."""
        ab = self.coefficients()
        if ab is None:
            return None
        return -(-batch // capacity) * ab[0] + batch * ab[1]


class BuildTimes:
    """Build durations of one model: exponentially weighted mean and mean absolute deviation."""

    ALPHA, BETA, SPREAD = 0.25, 0.25, 2.0

    def __init__(self) -> None:
        self.samples, self.mean, self.dev = 0, 0.0, 0.0

    def add(self, seconds: float) -> None:
        if self.samples == 0:
            self.mean, self.dev = seconds, seconds / 2
        else:
            self.dev += self.BETA * (abs(seconds - self.mean) - self.dev)
            self.mean += self.ALPHA * (seconds - self.mean)
        self.samples += 1

    def remaining(self, elapsed: float) -> float | None:
        """Expected seconds left of a build running for `elapsed`; None when unknown."""
        if not self.samples:
            return None
        if elapsed < self.mean:
            return self.mean - elapsed
        upper = self.mean + self.SPREAD * self.dev
        return upper - elapsed if elapsed < upper else None


@dataclass(frozen=True)
class Estimate:
    """Expected seconds for an oversize batch: served by chunks now, or after the build in one run."""

    chunks_s: float
    wait_s: float

    @property
    def wait(self) -> bool:
        return self.wait_s < self.chunks_s


def wait_or_chunk(run: RunTimes, capacity: int, batch: int, builds: BuildTimes, new_capacity: int,
                  elapsed: float | None) -> Estimate | None:
    """Estimate for `batch` rows on the live engine of `capacity` against a build of `new_capacity`
    running for `elapsed` seconds (None: not started). None when either side is unknown (chunk)."""
    chunks = run.chunked(capacity, batch)
    after = run.chunked(new_capacity, batch)
    remaining = None if elapsed is None else builds.remaining(elapsed)
    if chunks is None or after is None or remaining is None:
        return None
    return Estimate(chunks, remaining + after)

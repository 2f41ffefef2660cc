"""How a model's engines are reused across batch sizes: the policy and the bucket math.

The registry (`service.engines.registry`) applies this policy; `from_config` reads it from a model's
`config.pbtxt` (`engine_policy`), where every enum value 0 (UNSET) means "use the server default".
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from service.errors import ConfigError


class Mode(enum.StrEnum):
    """REUSE: one engine alive once a larger one is ready. MULTI: one engine per bucket (LRU cap)."""

    REUSE = "REUSE"
    MULTI = "MULTI"


class Bucket(enum.StrEnum):
    """Capacity of a new engine for batch b: next power of two, b itself, or a listed size."""

    POW2 = "POW2"
    EXACT = "EXACT"
    LIST = "LIST"


class Rebuild(enum.StrEnum):
    """BACKGROUND: while the larger engine builds, serve an oversize batch in chunks on a live engine,
    or wait for the build when that is expected to be sooner (`growth.wait_or_chunk`). BLOCKING: wait."""

    BACKGROUND = "BACKGROUND"
    BLOCKING = "BLOCKING"


@dataclass(frozen=True)
class EnginePolicy:
    """Engine registry policy for one model, plus the buffer-pool settings read from the same config.

    `max_engines` (MULTI only) caps live engines, 0 = no cap. `warmup_batch_sizes` are capacities
    built before the model reports ready. A failed build is retried after `retry_backoff_s`, doubling
    per consecutive failure up to `max_retry_backoff_s`. `max_concurrent_builds` bounds the builds
    that run at once (the others queue; builds compete with serving for the same cores and memory).
    `pool_growth` is "geometric" or "exact"; `max_pool_bytes` None = no cap. `padding`: "capacity" runs
    every batch at its engine's capacity (spare rows hold whatever the pool held, their outputs are
    dropped), "off" at its own size, "auto" (default) as the engine asks (`fixed_shape`, see adapters).
    """

    mode: Mode = Mode.REUSE
    bucket: Bucket = Bucket.POW2
    bucket_sizes: tuple[int, ...] = ()
    rebuild: Rebuild = Rebuild.BACKGROUND
    max_engines: int = 0
    warmup_batch_sizes: tuple[int, ...] = ()
    retry_backoff_s: float = 1.0
    max_retry_backoff_s: float = 60.0
    max_concurrent_builds: int = 1
    pool_growth: str = "geometric"
    max_pool_bytes: int | None = None
    padding: str = "auto"

    def __post_init__(self) -> None:
        # Accept plain strings ("MULTI") as well as the enums; store the enums.
        object.__setattr__(self, "mode", _enum(Mode, self.mode, "mode"))
        object.__setattr__(self, "bucket", _enum(Bucket, self.bucket, "bucket"))
        object.__setattr__(self, "rebuild", _enum(Rebuild, self.rebuild, "rebuild"))
        object.__setattr__(self, "bucket_sizes", tuple(sorted({int(s) for s in self.bucket_sizes})))
        object.__setattr__(self, "warmup_batch_sizes", tuple(int(s) for s in self.warmup_batch_sizes))
        if self.bucket is Bucket.LIST and not self.bucket_sizes:
            raise ConfigError("engine_policy: bucket LIST needs bucket_sizes")
        if any(s < 1 for s in self.bucket_sizes + self.warmup_batch_sizes):
            raise ConfigError("engine_policy: bucket_sizes and warmup_batch_sizes must be >= 1")
        if self.max_engines < 0:
            raise ConfigError(f"engine_policy: max_engines must be >= 0, got {self.max_engines}")
        if self.max_concurrent_builds < 1:
            raise ConfigError(f"engine_policy: max_concurrent_builds must be >= 1, got {self.max_concurrent_builds}")
        if self.pool_growth not in ("geometric", "exact"):
            raise ConfigError(f"engine_policy: pool_growth must be geometric or exact, got {self.pool_growth!r}")
        if self.padding not in ("auto", "off", "capacity"):
            raise ConfigError(f"engine_policy: padding must be auto, off or capacity, got {self.padding!r}")
        if self.max_pool_bytes is not None and self.max_pool_bytes < 1:
            raise ConfigError(f"engine_policy: max_pool_bytes must be >= 1, got {self.max_pool_bytes}")

    def validate(self, max_batch_size: int) -> None:
        """ConfigError when a listed size exceeds the model's max_batch_size."""
        for field in ("bucket_sizes", "warmup_batch_sizes"):
            too_big = [s for s in getattr(self, field) if s > max_batch_size]
            if too_big:
                raise ConfigError(
                    f"engine_policy: {field} {too_big} exceed the model's max_batch_size {max_batch_size}"
                )

    def capacity_for(self, batch: int, max_batch_size: int) -> int:
        """The capacity a new engine gets when batch `batch` (1..max_batch_size) needs one."""
        return bucket_capacity(self.bucket, batch, max_batch_size, self.bucket_sizes)


def bucket_capacity(bucket: Bucket, batch: int, max_batch_size: int, sizes: tuple[int, ...] = ()) -> int:
    """POW2: next power of two >= batch, capped at max_batch_size. EXACT: batch. LIST: the smallest
    listed size >= batch, or max_batch_size when none is that large."""
    if not 1 <= batch <= max_batch_size:
        raise ValueError(f"batch {batch} outside 1..{max_batch_size}")
    if bucket is Bucket.EXACT:
        return batch
    if bucket is Bucket.POW2:
        return min(1 << (batch - 1).bit_length(), max_batch_size)
    return next((s for s in sorted(sizes) if batch <= s <= max_batch_size), max_batch_size)


def from_config(msg: Any, defaults: EnginePolicy | None = None) -> EnginePolicy:
    """Policy from a `model_config_pb2.EnginePolicy` message; UNSET enums and zero numbers take `defaults`
    (the server-wide flags; `TRTSERVE_MULTI_ENGINE=1` sets their mode to MULTI)."""
    base = defaults or EnginePolicy()
    changes: dict[str, Any] = {}
    for field in ("mode", "bucket", "rebuild"):
        name = msg.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[getattr(msg, field)].name
        if getattr(msg, field) != 0:
            changes[field] = name
    if msg.bucket_sizes:
        changes["bucket_sizes"] = tuple(msg.bucket_sizes)
    if msg.max_engines:
        changes["max_engines"] = int(msg.max_engines)
    if msg.warmup_batch_sizes:
        changes["warmup_batch_sizes"] = tuple(msg.warmup_batch_sizes)
    if msg.max_pool_bytes:
        changes["max_pool_bytes"] = int(msg.max_pool_bytes)
    if msg.pool_growth != 0:
        changes["pool_growth"] = "geometric" if msg.pool_growth == 1 else "exact"
    if msg.padding != 0:
        changes["padding"] = "off" if msg.padding == 1 else "capacity"
    return dataclasses.replace(base, **changes)


def _enum(cls: type[enum.StrEnum], value: Any, field: str) -> Any:
    try:
        return cls(str(value).upper())
    except ValueError:
        raise ConfigError(
            f"engine_policy: {field} must be one of {', '.join(m.value for m in cls)}, got {value!r}"
        ) from None

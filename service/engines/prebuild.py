"""`trtserve build`: fill the engine plan cache ahead of time (image baking, init containers).

Plans are built, never loaded, so a cache can be filled on a machine that cannot run them. Models
whose backend has no plans (ONNX Runtime) are reported and skipped.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from service.engines.plan_cache import PlanCache, prepare_plan, supports_plans
from service.engines.policy import Bucket, from_config
from service.errors import ServeError
from service.repository import ModelRepository, ModelSpec


def default_capacities(spec: ModelSpec) -> list[int]:
    """What the registry may build: warm-up sizes if configured, else every bucket up to max_batch_size."""
    top = max(spec.max_batch_size, 1)
    policy = from_config(spec.config.engine_policy)
    if policy.warmup_batch_sizes:
        return sorted(set(policy.warmup_batch_sizes))
    if policy.bucket is Bucket.LIST:
        return sorted({s for s in policy.bucket_sizes if s <= top} | {top})
    if policy.bucket is Bucket.POW2:
        return sorted({min(1 << i, top) for i in range(top.bit_length() + 1)})
    return [top]  # EXACT: any size may come; the largest serves them all


def plan_builder(spec: ModelSpec, cache_dir: Path):
    """The backend's builder, or None when the backend has no serialized plans."""
    if spec.backend == "tensorrt":
        from service.engines.tensorrt_backend import TensorRTBuilder

        return TensorRTBuilder.from_spec(spec, cache_dir=cache_dir)
    return None


def build_plans(repository: Path, cache_dir: Path, models: Sequence[str] = (),
                batch_sizes: Sequence[int] = (), out: TextIO = sys.stderr) -> int:
    """Build every missing plan; returns the process exit code (0: all present or built)."""
    repo = ModelRepository(repository)
    names = list(models) or repo.model_names()
    if not names:
        print(f"no models in {repository}: nothing to build", file=out)
        return 0
    cache = PlanCache(cache_dir)
    failures = 0
    for name in names:
        try:
            spec = repo.load_spec(name)
            builder = plan_builder(spec, cache_dir)
            if builder is None or not supports_plans(builder):
                print(f"{name}: backend '{spec.backend}' builds no plans; nothing to do", file=out)
                continue
            sizes = sorted(set(batch_sizes)) or default_capacities(spec)
            for i, capacity in enumerate(sizes, 1):
                if spec.max_batch_size and capacity > spec.max_batch_size:
                    raise ServeError(f"batch size {capacity} exceeds max_batch_size {spec.max_batch_size}")
                started = time.monotonic()
                _, built = prepare_plan(builder, capacity, cache)
                what = f"built in {time.monotonic() - started:.1f}s" if built else "cached"
                print(f"[{i}/{len(sizes)}] {name} capacity {capacity}: {what}", file=out, flush=True)
        except ServeError as exc:
            failures += 1
            print(f"{name}: FAILED: {exc.message}", file=out)
    return 1 if failures else 0

"""The optional parts of the engine contract that let an engine run on the buffer pool, and the adapter
that runs an engine that has only `Engine.run`.

Optional engine attributes (all read with getattr, so `service.engines.base.Engine` stays as it is):

- `run_into(inputs, outputs) -> dict[str, np.ndarray] | None`: run `rows` rows, where every array or
  view in `inputs`/`outputs` has leading dim `rows` (<= capacity); write each output named in `outputs`
  into its view; return the outputs it produced that had no view (unpooled ones), or None.
- `buffer_memory`: "host" (default) or "device". A "device" engine is handed the pool's `DeviceView`s
  (device addresses) for pooled tensors instead of host views; the registry then copies the rows to
  the device before the batch and back after it, on the allocator's stream (the engine must run on
  that stream: the worker passes the allocator's `stream` to its builder).
- `device_memory_bytes`: device memory the engine itself holds (0 or absent on the CPU).
- `bind(inputs, outputs) -> Callable[[], None] | None`: a run on these host views bound once, repeated
  while they live (the worker's direct lane, `service/workers/direct.py`); None when it cannot.
- `fixed_shape`: True when the engine runs much faster at one input shape than at changing ones; under
  the default `engine_policy.padding` (AUTO) the registry then runs every batch at the engine's capacity.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.errors import InternalError


def run_into(engine: Any, inputs: dict[str, Any], outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run `engine` writing into the `outputs` views; returns the outputs that had no view.

    An engine without `run_into` runs `run(inputs)` and its results are copied into the views, so the
    plain ONNX Runtime engine works unchanged (one extra copy per output)."""
    native = getattr(engine, "run_into", None)
    if native is not None:
        return dict(native(inputs, outputs) or {})
    results = engine.run(inputs)
    missing = sorted(outputs.keys() - results.keys())
    if missing:
        raise InternalError(f"engine returned no output(s) {missing} (it returned {sorted(results)})")
    extra: dict[str, np.ndarray] = {}
    for name, result in results.items():
        view = outputs.get(name)
        if view is None:
            extra[name] = result
            continue
        if result.shape != view.shape or result.dtype != view.dtype:
            raise InternalError(
                f"engine output '{name}' is {result.dtype}{list(result.shape)}, "
                f"expected {view.dtype}{list(view.shape)}"
            )
        np.copyto(view, result, casting="no")
    return extra


def uses_device_buffers(engine: Any) -> bool:
    """True when the engine binds device buffers (`buffer_memory == "device"`)."""
    return getattr(engine, "buffer_memory", "host") == "device"


def device_memory_bytes(engine: Any) -> int:
    """Device memory the engine reports holding, 0 when it does not say."""
    return int(getattr(engine, "device_memory_bytes", 0) or 0)

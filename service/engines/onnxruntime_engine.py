"""The ONNX Runtime engine: one InferenceSession serving batches of 1..capacity rows.

Engines run on the buffer pool through IOBinding (`run_into`): ONNX Runtime reads the pool's input rows
and writes its output rows in place, host views on the CPU, device views under CUDA. A binding is kept
per set of views (the pool's views change only when it grows), so the common batch binds nothing anew.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from service.datatypes import numpy_dtype
from service.errors import InternalError, InvalidArgument, Unavailable
from service.repository import ModelSpec

CUDA = "CUDAExecutionProvider"
# IOBindings an engine keeps (one per set of views; the pool's views change only when it grows).
_MAX_BINDINGS = 16


class OnnxRuntimeEngine:
    """An Engine over one InferenceSession, serving batches 1..capacity of one model.

    `buffer_memory` is "device" under CUDA (the registry then hands `run_into` the pool's device views),
    except for models with BYTES tensors, which ONNX Runtime takes as host arrays only. `stream` is the
    CUDA stream the session runs on (None: its own). `device_memory_bytes` is 0: ONNX Runtime does not
    report what its arena holds (weights, activations), so only the pool's bytes are counted.

    `fixed_shape` (CUDA): ONNX Runtime's CUDA convolutions choose their cuDNN algorithm again whenever
    the input shape differs from the previous run's, which on the H200 cost 30-47 ms a run for `convnet`
    (against 1.3 ms at a fixed shape: bench/cuda_shapes.py), so the registry runs every batch at the
    capacity by default.
    """

    device_memory_bytes = 0

    def __init__(self, spec: ModelSpec, capacity: int, session: ort.InferenceSession,
                 stream: int | None = None) -> None:
        self.spec = spec
        self.capacity = capacity
        self.stream = stream
        self._session: ort.InferenceSession | None = session
        self._batched = spec.max_batch_size > 0
        self._inputs = [(t.name, numpy_dtype(t.datatype), t) for t in spec.inputs]
        self._input_names = frozenset(t.name for t in spec.inputs)
        self._input_order = [t.name for t in spec.inputs]
        self._output_names = [t.name for t in spec.outputs]
        self._output_dtypes = {t.name: numpy_dtype(t.datatype) for t in spec.outputs}
        # IOBinding takes fixed-size elements only: BYTES models run through `run` (and copies).
        self._strings = any(t.datatype == "BYTES" for t in (*spec.inputs, *spec.outputs))
        cuda = CUDA in session.get_providers()
        self.buffer_memory = "device" if cuda and not self._strings else "host"
        self.fixed_shape = cuda
        # ids of the bound views (inputs, then outputs, in spec order) -> (weak references to them, IOBinding,
        # device ids): the pool hands the same views batch after batch, so their binding is made once
        # (binding costs more than the run for a small model; so do the address lookups of `ctypes.data`).
        self._bindings: dict[tuple[int, ...], tuple[tuple[weakref.ref, ...], Any, set[int]]] = {}

    @property
    def providers(self) -> list[str]:
        """The providers the session actually runs on (CUDA may be missing if it failed to start)."""
        return self._session.get_providers() if self._session is not None else []

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; every output of the spec, in spec order."""
        session = self._live()
        self._check(inputs)
        feeds = {name: _text(name, inputs[name]) if inputs[name].dtype == object else inputs[name]
                 for name in inputs}
        try:
            outputs = session.run(self._output_names, feeds)
        except Exception as exc:  # onnxruntime raises its own unexported exception types
            raise InternalError(f"model '{self.spec.name}': onnxruntime run failed: {exc}") from exc
        return dict(zip(self._output_names, outputs))

    def run_into(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run one batch with IOBinding: ONNX Runtime reads `inputs` and writes each output named in
        `outputs` into its view, in place. Views are numpy arrays (host memory) or device views (`ptr`,
        `dtype`, `shape`, `device_id`). Rows of the pool's buffers are C-contiguous; a host view that is
        not goes through a copy. Returns the outputs that had no view, as arrays. BYTES models run
        through `run`, then copy into the views."""
        session = self._live()
        if self._strings:
            self._check(inputs)
            return self._run_and_copy(inputs, outputs)
        views = (*map(inputs.get, self._input_order), *map(outputs.get, self._output_names))
        key = tuple(map(id, views))
        # Taken out while it runs, so that a concurrent run with the same views binds its own.
        cached = self._bindings.pop(key, None)
        if cached is not None and not (len(inputs) == len(self._input_order)
                                       and all(ref() is view for ref, view in zip(cached[0], views))):
            cached = None  # an id of a view that is gone, reused by another object
        held: list[np.ndarray] = []  # contiguous input copies, alive until the run ends
        allocated: list[str] = []  # outputs ONNX Runtime allocates (no usable view)
        if cached is None:
            self._check(inputs)  # a cached binding's views passed these checks and cannot have changed
            self._check_views(outputs)
            binding, device_ids = self._bind(session, inputs, outputs, held, allocated)
            refs = self._reusable(views)
        else:
            refs, binding, device_ids = cached
        foreign = bool(device_ids) and self.stream is None  # the pool's views, filled on its own stream
        if foreign:
            _synchronize(device_ids)
        _run_bound(session, binding, self.spec.name)
        if foreign:
            _synchronize(device_ids)  # before the pool copies the outputs back on its stream
        if refs is not None:
            if len(self._bindings) >= _MAX_BINDINGS:
                self._bindings.clear()
            self._bindings[key] = (refs, binding, device_ids)
        if not allocated:
            return {}  # every output was written into its view: no OrtValues to fetch
        results = dict(zip(self._output_names, binding.get_outputs()))
        extra: dict[str, np.ndarray] = {}
        for name in allocated:
            array, view = results[name].numpy(), outputs.get(name)
            if view is None:
                extra[name] = array
            else:
                self._copy_into(name, view, array)
        return extra

    def bind(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> Callable[[], None] | None:
        """A run of this engine on host views bound once, for a caller that runs the same views again
        and again while they live (the worker's direct lane: the same pool rows request after request);
        None when it cannot bind them all (BYTES tensors, device or non-contiguous views, an output
        without a view)."""
        session = self._live()
        views = (*inputs.values(), *outputs.values())
        if self._strings or not all(isinstance(v, np.ndarray) and v.flags.c_contiguous for v in views):
            return None
        self._check(inputs)
        self._check_views(outputs)
        held: list[np.ndarray] = []
        allocated: list[str] = []
        binding, _ = self._bind(session, inputs, outputs, held, allocated)
        if allocated:
            return None
        return functools.partial(_run_bound, session, binding, self.spec.name)

    def _check_views(self, outputs: Mapping[str, Any]) -> None:
        for name in self._output_names:
            view, dtype = outputs.get(name), self._output_dtypes[name]
            if view is not None and view.dtype != dtype:
                raise InternalError(f"model '{self.spec.name}': output '{name}' view is {view.dtype}, "
                                    f"expected {dtype}")
            if isinstance(view, np.ndarray) and not view.flags.writeable:
                raise InternalError(f"model '{self.spec.name}': output '{name}' view is read-only")

    @staticmethod
    def _reusable(views: tuple[Any, ...]) -> tuple[weakref.ref, ...] | None:
        """Weak references to the views of a binding that can serve the same views again (the pool hands
        the same view objects batch after batch, until it grows); None when it cannot: an input needed a
        contiguous copy or an output has no usable view. Weak, so a cached binding keeps no buffer alive."""
        for view in views:
            if view is None or not (hasattr(view, "ptr") or view.flags.c_contiguous):
                return None
        return tuple(map(weakref.ref, views))

    def _bind(self, session: ort.InferenceSession, inputs: Mapping[str, Any], outputs: Mapping[str, Any],
              held: list[np.ndarray], allocated: list[str]) -> tuple[Any, set[int]]:
        """A new IOBinding of the views, and the devices they are on. Appends the input copies it
        made to `held` and the outputs left to ONNX Runtime to allocate to `allocated`."""
        binding = session.io_binding()
        device_ids: set[int] = set()
        for name, dtype, _ in self._inputs:
            value = inputs[name]
            if hasattr(value, "ptr"):
                device_ids.add(int(value.device_id))
                binding.bind_input(name, "cuda", int(value.device_id), dtype.type, list(value.shape),
                                   int(value.ptr))
                continue
            array = value if value.flags.c_contiguous else np.ascontiguousarray(value)
            held.append(array)
            binding.bind_input(name, "cpu", 0, dtype.type, list(array.shape), array.ctypes.data)
        for name in self._output_names:
            view, dtype = outputs.get(name), self._output_dtypes[name]
            if hasattr(view, "ptr"):
                device_ids.add(int(view.device_id))
                binding.bind_output(name, "cuda", int(view.device_id), dtype.type, list(view.shape),
                                    int(view.ptr))
            elif view is not None and view.flags.c_contiguous:
                binding.bind_output(name, "cpu", 0, dtype.type, list(view.shape), view.ctypes.data)
            else:
                binding.bind_output(name, "cpu")
                allocated.append(name)
        return binding, device_ids

    def _run_and_copy(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if any(hasattr(v, "ptr") for v in (*inputs.values(), *outputs.values())):
            raise InternalError(f"model '{self.spec.name}' has BYTES tensors: its engine takes host "
                                f"arrays only (buffer_memory 'host'), not device views")
        extra: dict[str, np.ndarray] = {}
        for name, result in self.run(dict(inputs)).items():
            view = outputs.get(name)
            if view is None:
                extra[name] = result
            else:
                self._copy_into(name, view, result)
        return extra

    def _copy_into(self, name: str, view: np.ndarray, result: np.ndarray) -> None:
        if result.shape != view.shape or result.dtype != view.dtype:
            raise InternalError(f"model '{self.spec.name}': output '{name}' is {result.dtype}"
                                f"{list(result.shape)}, its view is {view.dtype}{list(view.shape)}")
        np.copyto(view, result, casting="no")

    def _live(self) -> ort.InferenceSession:
        session = self._session
        if session is None:
            raise Unavailable(f"model '{self.spec.name}': engine (capacity {self.capacity}) is closed")
        return session

    def _check(self, inputs: Mapping[str, Any]) -> None:
        # The frontend validates requests; this guards the engine's own contract (capacity, dtypes).
        # Inputs are numpy arrays or device views: both have `dtype` and `shape`.
        if inputs.keys() != self._input_names:
            missing = sorted(self._input_names - inputs.keys())
            unknown = sorted(inputs.keys() - self._input_names)
            raise InvalidArgument(
                f"model '{self.spec.name}': expected inputs {sorted(self._input_names)}"
                + (f", missing {missing}" if missing else "") + (f", unknown {unknown}" if unknown else "")
            )
        batch = None
        for name, dtype, tensor in self._inputs:
            array = inputs[name]
            if array.dtype != dtype:
                raise InvalidArgument(
                    f"model '{self.spec.name}': input '{name}' has dtype {array.dtype}, "
                    f"expected {dtype} ({tensor.datatype})"
                )
            shape = array.shape[1:] if self._batched else array.shape
            if len(shape) != len(tensor.dims) or any(
                d != -1 and d != s for d, s in zip(tensor.dims, shape)
            ):
                raise InvalidArgument(
                    f"model '{self.spec.name}': input '{name}' has shape {list(array.shape)}, expected "
                    f"{(['batch'] if self._batched else []) + list(tensor.dims)}"
                )
            if not self._batched:
                continue
            if batch is None:
                batch = array.shape[0]
            elif array.shape[0] != batch:
                raise InvalidArgument(
                    f"model '{self.spec.name}': input '{name}' has batch {array.shape[0]}, "
                    f"expected {batch} like the other inputs"
                )
        if batch is not None and not 1 <= batch <= self.capacity:
            raise InvalidArgument(
                f"model '{self.spec.name}': batch {batch} is outside this engine's capacity "
                f"1..{self.capacity}"
            )

    def close(self) -> None:
        """Drop the session (ONNX Runtime frees it when the last reference goes)."""
        self._session = None
        self._bindings = {}


def _run_bound(session: ort.InferenceSession, binding: Any, model: str) -> None:
    """One run of `session` on its IOBinding; ONNX Runtime's own exception types become InternalError."""
    try:
        session.run_with_iobinding(binding)
    except Exception as exc:
        raise InternalError(f"model '{model}': onnxruntime run failed: {exc}") from exc


def _synchronize(device_ids: set[int]) -> None:
    """Wait for all work on the devices (their views were filled on a stream the session does not use)."""
    from cuda.bindings import runtime as cudart  # only device views get here: cuda-python is there

    def check(result: Any, what: str, device: int) -> None:
        err = result[0] if isinstance(result, tuple) else result
        if err != cudart.cudaError_t.cudaSuccess:
            raise InternalError(f"{what} failed on cuda:{device}: {cudart.cudaGetErrorName(err)[1]!r}")

    for device in sorted(device_ids):
        check(cudart.cudaSetDevice(device), "cudaSetDevice", device)
        check(cudart.cudaDeviceSynchronize(), "cudaDeviceSynchronize", device)


def _text(name: str, array: np.ndarray) -> np.ndarray:
    """BYTES elements as str: ONNX Runtime's Python binding takes strings only (it would str() a bytes)."""
    try:
        return np.array([e.decode("utf-8") if isinstance(e, bytes) else e for e in array.ravel()],
                        dtype=object).reshape(array.shape)
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"input '{name}': ONNX Runtime string tensors must be UTF-8 ({exc})") from None

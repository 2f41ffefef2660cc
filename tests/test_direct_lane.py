"""The worker's direct lane (service/workers/direct.py) on real ONNX Runtime engines and a real pool: it
answers what the general path answers, follows the pool and the engines as they change, lets go of
engines that are gone, and declines what it does not recognise."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import numpy as np
import pytest

from service.engines.policy import EnginePolicy, Mode, Rebuild
from service.metrics import WorkerStats
from service.repository import ModelRepository
from service.workers import protocol
from service.workers.direct import DirectLane
from service.workers.runtime import Item, ModelRuntime
from service.workers.shm import Arena
from service.workers.worker import WorkerOptions
from tests.reference import reference_outputs
from tests.server import EXAMPLES
from tests.test_datatypes_e2e import NON_BYTES, ONNX_TYPES, _write_model

REPO = ModelRepository(EXAMPLES)
TINY = REPO.load_spec("tiny")
MIXED = REPO.load_spec("mixed")


@pytest.fixture
def arena() -> Iterator[Arena]:
    arena = Arena(1 << 16)
    yield arena
    arena.close()


def _runtime(spec, policy: EnginePolicy | None = None) -> ModelRuntime:
    return ModelRuntime(spec, WorkerOptions(intra_op_threads=1, default_policy=policy or EnginePolicy()),
                        WorkerStats())


def _place(arena: Arena, arrays: list[np.ndarray], at: int = 0) -> list[protocol.InputSlot]:
    """The arrays written one after another into the arena, as the INFER frame's input slots name them."""
    slots = []
    for index, array in enumerate(arrays):
        arena.buf[at:at + array.nbytes] = array.tobytes()
        slots.append((index, array.shape, at, array.nbytes))
        at += array.nbytes
    return slots


def _decide(runtime: ModelRuntime, inputs: dict[str, np.ndarray]) -> None:
    """Run a batch through the general path until the registry chose a live engine for its rows (a
    larger batch first waits for its engine's background build)."""
    rows = len(next(iter(inputs.values())))
    runtime.run([Item(rows, inputs)])
    runtime.registry.wait_for_builds(timeout=60)
    runtime.run([Item(rows, inputs)])


def _tiny_x(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 16), dtype=np.float32)


def _expect_tiny(outputs: dict[str, np.ndarray], x: np.ndarray) -> None:
    np.testing.assert_allclose(outputs["y"], reference_outputs("tiny", TINY.model_path, {"x": x})["y"], rtol=1e-6)


def test_the_lane_takes_a_row_count_once_the_registry_chose_its_engine_and_answers_as_the_model_does(arena):
    runtime = _runtime(TINY)
    try:
        lane = runtime.direct
        assert isinstance(lane, DirectLane)
        x3 = _tiny_x(3, 0)
        assert lane.run(arena.buf, _place(arena, [x3]), 3) is None  # the registry has not decided for 3 rows
        _decide(runtime, {"x": x3})  # the general path decides: an engine of capacity 4
        for seed in range(3):  # the binding is made once and reused; each run sees its own rows
            x = _tiny_x(3, seed + 1)
            outputs, input_s, infer_s = lane.run(arena.buf, _place(arena, [x]), 3)
            _expect_tiny(outputs, x)
            assert outputs["y"].shape == (3, 16) and input_s >= 0 and infer_s > 0
        held = runtime.registry.hold(3)
        assert held.times.samples >= 4  # the lane's runs count toward the engine's run times
        runtime.registry.release(held, 3, None)
    finally:
        runtime.close()


def test_the_lane_rebinds_to_the_pool_s_new_buffers_after_it_grows(arena):
    runtime = _runtime(TINY, EnginePolicy(mode=Mode.REUSE, warmup_batch_sizes=(8,)))
    try:
        lane, pool = runtime.direct, runtime.pool
        _decide(runtime, {"x": _tiny_x(1, 0)})
        before = lane.run(arena.buf, _place(arena, [_tiny_x(1, 1)]), 1)[0]["y"]
        grows, generation = pool.grows, runtime.registry.generation
        _decide(runtime, {"x": _tiny_x(6, 2)})  # the pool grows; the engine (capacity 8) stays
        assert pool.grows > grows and runtime.registry.generation == generation
        x = _tiny_x(1, 3)
        outputs = lane.run(arena.buf, _place(arena, [x]), 1)[0]
        _expect_tiny(outputs, x)
        assert np.shares_memory(outputs["y"], pool.views(1).outputs["y"])  # the rows the pool holds now
        assert not np.shares_memory(before, outputs["y"])
    finally:
        runtime.close()


def test_the_lane_lets_go_of_an_engine_that_was_replaced(arena):
    runtime = _runtime(TINY, EnginePolicy(mode=Mode.REUSE, rebuild=Rebuild.BLOCKING))
    try:
        lane, registry, pool = runtime.direct, runtime.registry, runtime.pool
        runtime.run([Item(1, {"x": _tiny_x(1, 0)})])
        x = _tiny_x(1, 1)
        _expect_tiny(lane.run(arena.buf, _place(arena, [x]), 1)[0], x)
        old = registry.hold(1)
        session = weakref.ref(old.engine._session)
        registry.release(old, 1, None)
        grows, generation = pool.grows, registry.generation

        runtime.run([Item(8, {"x": _tiny_x(8, 2)})])  # grows the pool; REUSE replaces engine 1 by engine 8
        assert pool.grows > grows and registry.generation != generation
        assert lane.run(arena.buf, _place(arena, [x]), 1) is None  # engines changed: nothing chosen for 1 yet
        gc.collect()
        assert session() is None  # the lane's binding did not keep the replaced engine's session alive

        runtime.run([Item(1, {"x": _tiny_x(1, 3)})])
        for seed in (4, 5):
            x = _tiny_x(1, seed)
            outputs, _, _ = lane.run(arena.buf, _place(arena, [x]), 1)
            _expect_tiny(outputs, x)
        assert registry.hold(1).engine.capacity == 8
    finally:
        runtime.close()


def test_the_lane_serves_several_inputs_and_declines_inputs_it_does_not_recognise(arena):
    runtime = _runtime(MIXED)
    try:
        lane = runtime.direct
        rng = np.random.default_rng(7)
        ids = rng.integers(-1000, 1000, (2, 8), dtype=np.int64)
        scale = rng.standard_normal((2, 4)).astype(np.float16)
        _decide(runtime, {"ids": ids, "scale": scale})
        outputs, _, _ = lane.run(arena.buf, _place(arena, [ids, scale]), 2)
        want = reference_outputs("mixed", MIXED.model_path, {"ids": ids, "scale": scale})
        np.testing.assert_array_equal(outputs["sum"], want["sum"])
        np.testing.assert_array_equal(outputs["scaled"], want["scaled"])

        slots = _place(arena, [ids, scale])
        assert lane.run(arena.buf, slots[::-1], 2) is None  # inputs out of spec order
        assert lane.run(arena.buf, slots[:1], 2) is None  # an input missing
        short = [(1, (2, 4), slots[1][2], 15) if i == 1 else s for i, s in enumerate(slots)]
        assert lane.run(arena.buf, short, 2) is None  # bytes that do not match the shape
        past = [(0, (2, 8), arena.buf.nbytes - 64, 128), slots[1]]
        assert lane.run(arena.buf, past, 2) is None  # past the end of the arena
        wrong_rows = [(0, (1, 8), slots[0][2], 64), slots[1]]
        assert lane.run(arena.buf, wrong_rows, 2) is None  # rows that differ from the request's
        assert _only_our_hold(runtime, 2)  # every declined run let go of its engine
    finally:
        runtime.close()


def _only_our_hold(runtime: ModelRuntime, rows: int) -> bool:
    """Whether no run holds the engine chosen for `rows` (hold adds one, so one means only ours)."""
    held = runtime.registry.hold(rows)
    try:
        return held.inflight == 1
    finally:
        runtime.registry.release(held, rows, None)


def test_a_model_with_a_bytes_tensor_has_no_lane_and_one_of_fixed_size_tensors_has_one(tmp_path):
    """BYTES tensors are not pooled (their elements vary in size): such a model's requests take the
    general path; every fixed-size datatype is pooled, so the lane serves them."""
    _write_model(tmp_path, "strings", ["BYTES", "FP32"], ONNX_TYPES)
    _write_model(tmp_path, "fixed", NON_BYTES, ONNX_TYPES)
    repo = ModelRepository(tmp_path)
    for name, has_lane in (("strings", False), ("fixed", True)):
        runtime = _runtime(repo.load_spec(name))
        try:
            assert (runtime.direct is not None) is has_lane
        finally:
            runtime.close()

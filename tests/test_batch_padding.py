"""Batch padding: on a padding engine every batch runs at the engine's capacity, and callers still see
exactly their rows. The registry with the in-memory fake builder, then ModelRuntime with real ONNX
Runtime engines (PADDING_CAPACITY forces on the CPU what AUTO does for ONNX Runtime on a GPU)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from tests.fake_engines import ROW, FakeBuilder, FakeIntoEngine, model
from tests.reference import make_inputs, reference_outputs

from service.engines.policy import EnginePolicy
from service.engines.registry import EngineRegistry
from service.memory.pool import BufferPool, PoolTensor
from service.metrics import WorkerStats
from service.repository import ModelRepository
from service.workers.runtime import Item, ModelRuntime
from service.workers.worker import WorkerOptions

F4 = np.dtype("<f4")


class FixedShapeEngine(FakeIntoEngine):
    fixed_shape = True


def registry_with(padding: str, fixed_shape: bool = False) -> tuple[EngineRegistry, FakeBuilder]:
    builder = FakeBuilder()
    if fixed_shape:
        builder.engine_class = FixedShapeEngine
    policy = EnginePolicy(padding=padding, warmup_batch_sizes=(8,))
    registry = EngineRegistry(builder, policy, max_batch_size=8)
    registry.warm_up()
    return registry, builder


def run(registry: EngineRegistry, batch: int, pool_rows: int) -> np.ndarray:
    pool = BufferPool([PoolTensor("x", F4, (ROW,))], [PoolTensor("y", F4, (ROW,))], growth="exact")
    bufs = pool.views(pool_rows)
    x = np.random.default_rng(batch).standard_normal((batch, ROW), dtype=np.float32)
    bufs.inputs["x"][:batch] = x
    assert registry.execute(batch, bufs) == {}
    np.testing.assert_array_equal(bufs.outputs["y"][:batch], model(x))
    return bufs.outputs["y"]


@pytest.mark.parametrize(("padding", "fixed_shape", "padded"), [
    ("capacity", False, True), ("auto", True, True), ("auto", False, False), ("off", True, False)])
def test_padding_policy_decides_the_rows_an_engine_runs(padding, fixed_shape, padded):
    registry, builder = registry_with(padding, fixed_shape)
    assert registry.rows_for(3) == (8 if padded else 3)
    run(registry, 3, pool_rows=8)
    assert builder.runs[-1] == (8, 8 if padded else 3)
    assert registry.rows_for(8) == 8


def test_padding_needs_room_in_the_buffers():
    registry, builder = registry_with("capacity")
    run(registry, 3, pool_rows=3)  # e.g. a pool cap left no room for the spare rows
    assert builder.runs[-1] == (8, 3)


ROW_BYTES = 1024 * 4  # mlp: x and y are FP32 [N, 1024], one page a row


@pytest.fixture
def mlp_repo(example_repo, tmp_path: Path) -> Path:
    """`mlp` with an 8-row engine warmed, padded to capacity, engines grown on the request path, and a
    pool cap of 12 rows of x and y."""
    shutil.copytree(example_repo / "mlp", tmp_path / "mlp")
    config = tmp_path / "mlp" / "config.pbtxt"
    config.write_text(config.read_text() + "\nengine_policy { padding: PADDING_CAPACITY rebuild: BLOCKING "
                      f"warmup_batch_sizes: [ 8 ] pool_growth: EXACT_FIT max_pool_bytes: {12 * 2 * ROW_BYTES} }}\n")
    return tmp_path


def test_runtime_pads_batches_to_the_engine_capacity(mlp_repo: Path):
    runtime = ModelRuntime(ModelRepository(mlp_repo).load_spec("mlp"), WorkerOptions(intra_op_threads=1),
                           WorkerStats())
    path = mlp_repo / "mlp" / "1" / "model.onnx"

    def check(item: Item) -> None:
        assert item.error is None and item.outputs["y"].shape == (item.rows, 1024)
        np.testing.assert_allclose(item.outputs["y"], reference_outputs("mlp", path, item.inputs)["y"],
                                   rtol=1e-4, atol=1e-4)
    try:
        assert runtime.registry.live_capacities() == [8]
        items = [Item(2, make_inputs("mlp", 2, seed=1)), Item(1, make_inputs("mlp", 1, seed=2))]
        (execution,) = runtime.run(items)
        assert execution.rows == 3
        for item in items:
            check(item)
        assert runtime.pool.bytes_by_memory()["host"] == 8 * 2 * ROW_BYTES  # the 8 rows the engine ran
        for seed in (3, 4):  # grows a 16-row engine; then 16 padded rows would pass the cap: 10 rows run
            item = Item(10, make_inputs("mlp", 10, seed=seed))
            runtime.run([item])
            check(item)
        assert runtime.registry.live_capacities() == [16]
        assert runtime.pool.bytes_by_memory()["host"] == 10 * 2 * ROW_BYTES
    finally:
        runtime.close()

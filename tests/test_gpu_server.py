"""On a GPU (marker `gpu`, run with `make test-gpu` on the device machine): the real server with the CUDA
provider, its buffer pool in device memory, and the pool's reported bytes against cudaMemGetInfo."""

from __future__ import annotations

import contextlib
import time
import urllib.request

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.server import start

pytestmark = pytest.mark.gpu
ROW = 1 << 18  # floats per row: 1 MiB per row per tensor, so the pool dominates device memory changes


def _needs_cuda() -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with the CUDA provider")
    pytest.importorskip("cuda.bindings.runtime")


def _device_used() -> int:
    from cuda.bindings import runtime as rt

    _, free, total = rt.cudaMemGetInfo()
    return int(total - free)


def _metric(port: int, needle: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(needle))


def _repo(tmp_path):
    c = np.random.default_rng(0).standard_normal(ROW).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", ROW])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", ROW])],
        [numpy_helper.from_array(c, "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (tmp_path / "big" / "1").mkdir(parents=True)
    onnx.save(model, tmp_path / "big" / "1" / "model.onnx")
    (tmp_path / "big" / "config.pbtxt").write_text(f"""
name: "big"
backend: "onnxruntime"
max_batch_size: 32
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {ROW} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {ROW} ] }} ]
instance_group [ {{ kind: KIND_GPU gpus: [ 0 ] }} ]
engine_policy {{ mode: REUSE warmup_batch_sizes: [ 32 ] pool_growth: EXACT_FIT padding: PADDING_OFF }}
""")  # without padding the pool grows with the batches sent, which is what this test follows
    return tmp_path, c


def _wait_metric(port: int, needle: str, value: float, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while _metric(port, needle) != value:
        assert time.monotonic() < deadline, f"{needle} != {value}: {_metric(port, needle)}"
        time.sleep(0.1)


def test_cuda_pool_bytes_match_device_memory(tmp_path):
    _needs_cuda()
    import tritonclient.grpc as grpcclient

    repo, c = _repo(tmp_path)
    with start(repo, ["--max-request-bytes", str(256 << 20), "--shm-bytes-per-model", str(256 << 20)],
               timeout_s=300) as server:
        client = grpcclient.InferenceServerClient(server.url)

        def infer(batch: int) -> None:
            x = np.random.default_rng(batch).standard_normal((batch, ROW), dtype=np.float32)
            inp = grpcclient.InferInput("x", [batch, ROW], "FP32")
            inp.set_data_from_numpy(x)
            y = client.infer("big", [inp]).as_numpy("y")
            np.testing.assert_allclose(y, x + c, rtol=1e-6)

        device = 'trtserve_buffer_pool_bytes{memory="device",model="big"}'
        per_row = 3 * ROW * 4  # a GPU pool: two input sets (x) and one output set (y)
        infer(1)
        _wait_metric(server.metrics_port, device, per_row)
        used_before = _device_used()
        infer(32)
        _wait_metric(server.metrics_port, device, 32 * per_row)
        grown = _device_used() - used_before
        expected = 31 * per_row  # 93 MiB more device buffers; the one engine stays
        assert abs(grown - expected) <= 4 << 20, (grown, expected)
        assert _metric(server.metrics_port, 'trtserve_buffer_pool_bytes{memory="pinned",model="big"}') >= expected
        infer(3)  # smaller batches are views: nothing grows
        assert _metric(server.metrics_port, device) == 32 * per_row


@contextlib.contextmanager
def _runtime_with_arena(tmp_path, rows: int):
    """`big`'s ModelRuntime as a worker holds it, a shared-memory arena of `rows` rows (not yet pinned) as
    an array, and the model's constant."""
    _needs_cuda()
    from multiprocessing import shared_memory

    from service.metrics import WorkerStats
    from service.repository import ModelRepository
    from service.workers.runtime import ModelRuntime
    from service.workers.worker import WorkerOptions

    repo, c = _repo(tmp_path)
    runtime = ModelRuntime(ModelRepository(repo).load_spec("big"), WorkerOptions(), WorkerStats())
    shm = shared_memory.SharedMemory(create=True, size=rows * ROW * 4)
    try:
        yield runtime, np.ndarray((rows, ROW), np.float32, buffer=shm.buf), c
    finally:
        runtime.close()
        shm.unlink()
        with contextlib.suppress(BufferError):  # a failed test's frame still holds the array; its mapping goes with it
            shm.close()


def test_inputs_in_pinned_shared_memory_go_straight_to_the_device(tmp_path):
    """Rows in a pinned arena (the worker pins the frontends' arenas) skip the pool's host staging."""
    from service.workers.runtime import Item

    with _runtime_with_arena(tmp_path, 4) as (runtime, xs, c):
        xs[:] = np.random.default_rng(4).standard_normal((4, ROW), dtype=np.float32)
        staging = [runtime.pool.views(4, side).inputs["x"] for side in (0, 1)]  # batches alternate sides

        def run(x: np.ndarray) -> np.ndarray:
            items = [Item(1, {"x": x[0:1]}), Item(3, {"x": x[1:4]})]
            runtime.run(items)
            return np.concatenate([items[0].outputs["y"], items[1].outputs["y"]])

        runtime.register_shared(xs.data)
        for side in staging:
            side[:] = np.nan
        for _ in staging:  # one batch on each side
            np.testing.assert_allclose(run(xs), xs + c, rtol=1e-6)
        assert all(np.isnan(side).all() for side in staging)  # never written: rows went straight to the device
        runtime.unregister_shared(xs.data)
        for side in staging:
            np.testing.assert_allclose(run(xs), xs + c, rtol=1e-6)
            np.testing.assert_array_equal(side, xs)  # unpinned: staged through the pool, as before
        del xs, staging


def test_a_batch_prepared_while_another_waits_to_run_leaves_its_inputs_alone(tmp_path):
    """The worker prepares the next batch (rows uploaded to the pool's second input set) before the
    current one has run: both must come out right."""
    _needs_cuda()
    from service.metrics import WorkerStats
    from service.repository import ModelRepository
    from service.workers.runtime import Item, ModelRuntime
    from service.workers.worker import WorkerOptions

    repo, c = _repo(tmp_path)
    runtime = ModelRuntime(ModelRepository(repo).load_spec("big"), WorkerOptions(), WorkerStats())
    try:
        assert not runtime.can_overlap()  # the pool must grow to the largest batch first
        runtime.run([Item(32, {"x": np.zeros((32, ROW), np.float32)})])  # the pool holds the largest batch
        assert runtime.can_overlap()
        rng = np.random.default_rng(6)
        xs = [rng.standard_normal((5, ROW), dtype=np.float32) for _ in range(3)]
        first = runtime.prepare([Item(2, {"x": xs[0][:2]}), Item(3, {"x": xs[0][2:]})])
        second = runtime.prepare([Item(5, {"x": xs[1]})])
        assert {first.side, second.side} == {0, 1}
        for prepared, x in ((first, xs[0]), (second, xs[1])):
            runtime.execute(prepared)
            got = np.concatenate([item.outputs["y"] for item in prepared.items])
            np.testing.assert_allclose(got, x + c, rtol=1e-6)
        third = runtime.prepare([Item(5, {"x": xs[2]})])  # back on the first side
        assert third.side == first.side
        runtime.execute(third)
        np.testing.assert_allclose(third.items[0].outputs["y"], xs[2] + c, rtol=1e-6)
    finally:
        runtime.close()


def test_rows_copied_on_the_copy_stream_are_there_before_the_run_reads_them(tmp_path):
    """Rows from a pinned arena go to the device on the allocator's copy stream, beside the stream the
    engine runs on; the run waits for them through an event. 32 MiB of rows take a millisecond or more to
    copy, far longer than queueing the run takes, so a run that did not wait would read the rows the set
    held before (the previous batch's), not these."""
    from service.workers.runtime import Item

    with _runtime_with_arena(tmp_path, 32) as (runtime, xs, c):
        assert runtime._allocator.copy_stream not in (None, runtime._allocator.stream)
        runtime.register_shared(xs.data)
        rng = np.random.default_rng(8)
        for _ in range(6):  # three batches on each input set, each set holding the batch before's rows
            xs[:] = rng.standard_normal((32, ROW), dtype=np.float32)
            items = [Item(32, {"x": xs})]
            runtime.run(items)
            np.testing.assert_allclose(items[0].outputs["y"], xs + c, rtol=1e-6)
        runtime.unregister_shared(xs.data)
        del xs, items


def test_a_bytes_models_rows_from_a_pinned_arena_reach_its_host_bound_engine(tmp_path):
    """On a GPU a model with BYTES tensors runs on host views of the pool (ONNX Runtime takes strings from
    host arrays only), so its fixed-size rows must land in those views, not go straight to the device."""
    _needs_cuda()
    from dataclasses import replace
    from multiprocessing import shared_memory

    from service.metrics import WorkerStats
    from service.workers.runtime import Item, ModelRuntime
    from service.workers.worker import WorkerOptions
    from tests.test_onnxruntime_plans import strings_model

    spec = replace(strings_model(tmp_path / "strings" / "1" / "model.onnx"), use_gpu=True)
    runtime = ModelRuntime(spec, WorkerOptions(), WorkerStats())
    shm = shared_memory.SharedMemory(create=True, size=1 << 16)
    try:
        x = np.ndarray((3, 2), np.float32, buffer=shm.buf)
        x[:] = np.arange(6, dtype=np.float32).reshape(3, 2)
        runtime.register_shared(shm.buf)
        texts = np.array([[b"a"], [b"bc"], [b"def"]], dtype=object)
        items = [Item(1, {"text": texts[:1], "x": x[:1]}), Item(2, {"text": texts[1:], "x": x[1:]})]
        runtime.run(items)
        np.testing.assert_array_equal(np.concatenate([i.outputs["y"] for i in items]), x + 1)
        assert [str(e) for i in items for e in i.outputs["echo"].ravel()] == ["a", "bc", "def"]
        runtime.unregister_shared(shm.buf)
        del x, items
    finally:
        runtime.close()
        shm.unlink()
        with contextlib.suppress(BufferError):  # a failed test's frame still holds the array
            shm.close()

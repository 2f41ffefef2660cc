"""Closing a model's runtime (unload, worker exit) while an engine build runs in the background: the
build creates its session on the runtime's allocator (a CUDA stream on a GPU), so `close` waits for it.
Before, `close` returned at once and the process aborted at exit (on the CPU too: "terminate called without
an active exception"; on the GPU ONNX Runtime crashed creating a session on the destroyed stream)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.metrics import WorkerStats
from service.repository import ModelRepository
from service.workers.runtime import Item, ModelRuntime
from service.workers.worker import WorkerOptions

WIDTH = 2048  # two 2048x2048 MatMuls: a build plus its priming run takes tens of ms, far longer than `close`


def _repo(root: Path) -> Path:
    w = np.random.default_rng(0).standard_normal((WIDTH, WIDTH)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])], "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (root / "wide" / "1").mkdir(parents=True)
    onnx.save(model, root / "wide" / "1" / "model.onnx")
    (root / "wide" / "config.pbtxt").write_text(
        f'name: "wide"\nbackend: "onnxruntime"\nmax_batch_size: 64\n'
        f'input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]\n'
        f'output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]\n')
    return root


def test_close_waits_for_the_engine_build_a_larger_batch_started(tmp_path, monkeypatch):
    runtime = ModelRuntime(ModelRepository(_repo(tmp_path)).load_spec("wide"), WorkerOptions(intra_op_threads=1),
                           WorkerStats())
    assert runtime.registry.live_capacities() == [1]
    # the build starts only when the test lets it, so it cannot end before the check that it runs
    gate, build = threading.Event(), runtime.registry.builder.build
    monkeypatch.setattr(runtime.registry.builder, "build", lambda capacity: gate.wait(30) and build(capacity))
    item = Item(3, {"x": np.ones((3, WIDTH), np.float32)})
    runtime.run([item])  # runs in chunks on the 1-row engine while a larger one builds
    assert item.error is None and item.outputs["y"].shape == (3, WIDTH)
    assert runtime.registry.stats()["building"]
    gate.set()
    runtime.close()
    assert runtime.registry.wait_for_builds(0)  # nothing builds any more once close returned

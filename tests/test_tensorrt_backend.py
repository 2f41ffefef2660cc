"""TensorRT backend: plans built for real from small ONNX models made here (no GPU needed with
TensorRT for RTX), plan-cache key parts, parser and config errors; execution behind the `gpu` marker."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.engines.plan_cache import PlanCache, load_or_build, supports_plans
from service.engines.tensorrt_backend import PlanLoadError, TensorRTBuilder
from service.engines.tensorrt_build import CPU_BUILD, device_label, import_tensorrt, plan_problem
from service.errors import ConfigError, InvalidArgument
from service.proto import model_config_pb2
from service.repository import ModelSpec, TensorSpec

try:
    TRT = import_tensorrt()
except ConfigError as exc:  # the CI image installs the RTX wheels; elsewhere say why we skip
    TRT = None
    pytestmark = pytest.mark.skip(reason=str(exc))

F32 = TensorProto.FLOAT


def _save(graph: onnx.GraphProto, path: Path, domains: tuple[str, ...] = ()) -> Path:
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def mlp_model(path: Path, seed: int = 0) -> Path:
    """x[batch, 8] -> relu(x @ W1 + b1) @ W2 -> y[batch, 4]; also an extra output 'h' not in the config."""
    rng = np.random.default_rng(seed)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("W1", (8, 16)), ("b1", (16,)), ("W2", (16, 4)))]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m"], name="mm1"),
             helper.make_node("Add", ["m", "b1"], ["h"], name="add1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu1"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", F32, ["batch", 8])],
        [helper.make_tensor_value_info("y", F32, ["batch", 4]),
         helper.make_tensor_value_info("h", F32, ["batch", 16])], weights)
    return _save(graph, path)


def add_model(path: Path, batch: str | int = "batch") -> Path:
    """a[batch, 3, 5] + b[batch, 3, 5] -> s."""
    io = [helper.make_tensor_value_info(n, F32, [batch, 3, 5]) for n in ("a", "b", "s")]
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["s"], name="add")], "add", io[:2], io[2:])
    return _save(graph, path)


def custom_op_model(path: Path) -> Path:
    """Relu then an operator of a custom domain that no TensorRT parser knows."""
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu0"),
             helper.make_node("Frobnicate", ["h"], ["y"], name="frob1", domain="com.example")]
    graph = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("x", F32, ["batch", 4])],
                              [helper.make_tensor_value_info("y", F32, ["batch", 4])])
    return _save(graph, path, domains=("com.example",))


def spec_for(path: Path, inputs: dict[str, tuple[int, ...]], outputs: dict[str, tuple[int, ...]],
             max_batch_size: int = 16, config: model_config_pb2.ModelConfig | None = None) -> ModelSpec:
    return ModelSpec(
        name=path.parent.parent.name, version=1, versions=(1,), model_path=path,
        max_batch_size=max_batch_size,
        inputs=tuple(TensorSpec(n, "FP32", d) for n, d in inputs.items()),
        outputs=tuple(TensorSpec(n, "FP32", d) for n, d in outputs.items()),
        backend="tensorrt", use_gpu=True, config=config or model_config_pb2.ModelConfig())


@pytest.fixture
def mlp(tmp_path: Path) -> ModelSpec:
    return spec_for(mlp_model(tmp_path / "mlp" / "1" / "model.onnx"), {"x": (8,)}, {"y": (4,)})


@pytest.fixture
def add(tmp_path: Path) -> ModelSpec:
    return spec_for(add_model(tmp_path / "add" / "1" / "model.onnx"), {"a": (3, 5), "b": (3, 5)},
                    {"s": (3, 5)})


def test_import_names_what_to_install_when_no_flavour_is_there() -> None:
    with pytest.raises(ConfigError) as err:
        import_tensorrt([("trtserve_no_such_tensorrt", "tensorrt"), ("trtserve_no_such_rtx", "tensorrt-rtx")])
    message = err.value.message
    assert "pip install 'trtserve[tensorrt]'" in message and "`tensorrt`" in message
    assert "trtserve_no_such_tensorrt" in message and "trtserve_no_such_rtx" in message


def test_import_reports_flavour_and_version() -> None:
    assert TRT.flavour in ("tensorrt", "tensorrt-rtx")
    assert TRT.version == TRT.module.__version__ and TRT.version[0].isdigit()


def test_plans_for_several_capacities(mlp: ModelSpec, add: ModelSpec, tmp_path: Path) -> None:
    builder = TensorRTBuilder(mlp, cache_dir=tmp_path / "cache")
    seconds = {}
    for capacity in (1, 4, 16):
        start = time.perf_counter()
        plan = builder.build_plan(capacity)
        seconds[capacity] = time.perf_counter() - start
        assert isinstance(plan, bytes) and len(plan) > 1000
        problem = plan_problem(TRT, plan)
        assert problem is None or "MALFORMED_ENGINE" not in problem, problem
    print(f"\n{TRT.flavour} {TRT.version} mlp build seconds by capacity: "
          + ", ".join(f"{c}: {s:.2f}" for c, s in seconds.items()))
    assert len(TensorRTBuilder(add).build_plan(4)) > 1000  # two inputs, both with a batch profile
    if TRT.flavour == "tensorrt-rtx":
        # The timing cache is a no-op in RTX that would force a GPU query: it must not be written.
        assert not any((tmp_path / "cache").glob("timing-*")) if (tmp_path / "cache").exists() else True
    else:
        assert list((tmp_path / "cache").glob("timing-tensorrt-*.cache"))


def test_fixed_shape_models_build_at_capacity_one(tmp_path: Path) -> None:
    fixed = add_model(tmp_path / "fixed" / "1" / "model.onnx", batch=1)  # batch dim exported as 1
    batched = spec_for(fixed, {"a": (3, 5), "b": (3, 5)}, {"s": (3, 5)})
    assert len(TensorRTBuilder(batched).build_plan(1)) > 1000
    unbatched = spec_for(fixed, {"a": (1, 3, 5), "b": (1, 3, 5)}, {"s": (1, 3, 5)}, max_batch_size=0)
    builder = TensorRTBuilder(unbatched)
    assert len(builder.build_plan(1)) > 1000
    with pytest.raises(InvalidArgument, match=r"outside 1\.\.1"):
        builder.build_plan(2)


def test_concurrent_builds_each_get_their_plan_and_errors(mlp: ModelSpec, tmp_path: Path) -> None:
    # The registry builds off the request path, possibly two at once; errors stay with their build.
    bad = TensorRTBuilder(spec_for(custom_op_model(tmp_path / "bad" / "1" / "model.onnx"),
                                   {"x": (4,)}, {"y": (4,)}))
    good = TensorRTBuilder(mlp)
    with ThreadPoolExecutor(4) as pool:
        plans = [pool.submit(good.build_plan, c) for c in (2, 4, 8)]
        failure = pool.submit(bad.build_plan, 4)
        assert all(len(p.result()) > 1000 for p in plans)
        with pytest.raises(ConfigError, match="frob1"):
            failure.result()


def test_plans_round_trip_through_the_registry_plan_cache(mlp: ModelSpec, tmp_path: Path) -> None:
    cache = PlanCache(tmp_path / "plans")
    builder = TensorRTBuilder(mlp, cache_dir=cache.dir)  # timing/runtime caches live beside the plans
    assert supports_plans(builder)
    key = cache.key(**builder.plan_key_parts(4))
    assert cache.get(key) is None
    plan = builder.build_plan(4)
    cache.put(key, plan)
    assert cache.key(**TensorRTBuilder(mlp).plan_key_parts(4)) == key  # a restart finds it
    assert cache.get(key) == plan
    assert cache.key(**builder.plan_key_parts(8)) != key


def test_a_damaged_plan_header_is_recognised_without_a_gpu() -> None:
    problem = plan_problem(TRT, b"\0" * 4096)
    if problem is None:
        pytest.skip(f"{TRT.flavour} {TRT.version} has no header check (Runtime.get_engine_validity)")
    assert "MALFORMED_ENGINE" in problem


def test_key_parts_change_with_model_precision_capacity_only(mlp: ModelSpec, tmp_path: Path) -> None:
    key = TensorRTBuilder(mlp).plan_key_parts(4)
    assert key == TensorRTBuilder(mlp, cache_dir=tmp_path).plan_key_parts(4)  # same inputs, same key
    assert key["flavour"] == TRT.flavour and key["version"] == TRT.version
    assert key["device"] == device_label() and key["capacity"] == 4 and key["opt_batch_size"] == 4
    assert len(key["model_sha256"]) == 64 and key["inputs"] == [["x", "FP32", [8]]]
    # opt above the capacity is clamped to it, so it builds the same plan under the same key
    assert TensorRTBuilder(mlp, opt_batch_size=64).plan_key_parts(4) == key
    changed = {
        "capacity": TensorRTBuilder(mlp).plan_key_parts(8),
        "precision": TensorRTBuilder(mlp, precision="tf32").plan_key_parts(4),
        "workspace": TensorRTBuilder(mlp, workspace_bytes=1 << 26).plan_key_parts(4),
        "opt": TensorRTBuilder(mlp, opt_batch_size=2).plan_key_parts(4),
    }
    other = mlp_model(tmp_path / "other" / "1" / "model.onnx", seed=1)  # same graph, other weights
    changed["model"] = TensorRTBuilder(spec_for(other, {"x": (8,)}, {"y": (4,)})).plan_key_parts(4)
    for what, parts in changed.items():
        assert parts != key, what
    assert json.loads(json.dumps(key)) == key  # plain JSON: any plan cache can hash it
    # rewriting the model in place is noticed by a builder that already hashed it
    builder = TensorRTBuilder(mlp)
    before = builder.plan_key_parts(4)["model_sha256"]
    mlp_model(mlp.model_path, seed=2)
    assert builder.plan_key_parts(4)["model_sha256"] != before


def test_unsupported_operator_fails_with_the_parsers_message(tmp_path: Path) -> None:
    path = custom_op_model(tmp_path / "bad" / "1" / "model.onnx")
    builder = TensorRTBuilder(spec_for(path, {"x": (4,)}, {"y": (4,)}))
    with pytest.raises(ConfigError) as err:
        builder.build_plan(2)
    message = err.value.message
    assert "ONNX parser rejected" in message and str(path) in message
    assert "node 1" in message and "frob1" in message and "Frobnicate" in message


@pytest.mark.parametrize("inputs, outputs, path_kind, expected", [
    ({"x": (-1,)}, {"y": (4,)}, "dyn", "needs every non-batch dim fixed"),
    ({"z": (8,)}, {"y": (4,)}, "mlp", "'x' of"),  # model input the config does not declare
    ({"x": (9,)}, {"y": (4,)}, "mlp", "dim 0 is 8 in the model, 9 in config.pbtxt"),
    ({"x": (8,)}, {"q": (4,)}, "mlp", "output(s) ['q'] are not outputs"),
    ({"a": (3, 5), "b": (3, 5)}, {"s": (3, 5)}, "fixed", "batch dim is fixed at 1"),
])
def test_config_mismatches_are_config_errors(tmp_path: Path, inputs: dict, outputs: dict, path_kind: str,
                                             expected: str) -> None:
    path = tmp_path / "m" / "1" / "model.onnx"
    if path_kind == "mlp":
        mlp_model(path)
    elif path_kind == "fixed":
        add_model(path, batch=1)
    else:  # non-batch dim dynamic in the model too
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "dyn",
                                  [helper.make_tensor_value_info("x", F32, ["batch", "n"])],
                                  [helper.make_tensor_value_info("y", F32, ["batch", "n"])])
        _save(graph, path)
    with pytest.raises(ConfigError) as err:
        TensorRTBuilder(spec_for(path, inputs, outputs)).build_plan(4)
    assert expected in err.value.message


def test_precision_flags_per_flavour(mlp: ModelSpec) -> None:
    assert len(TensorRTBuilder(mlp, precision="TF32").build_plan(2)) > 1000
    fp16 = TensorRTBuilder(mlp, precision="FP16")
    if hasattr(TRT.module.BuilderFlag, "FP16"):
        assert len(fp16.build_plan(2)) > 1000
    else:  # strongly typed flavour: FP16 is the model's business, not a flag
        with pytest.raises(ConfigError, match="strongly typed"):
            fp16.build_plan(2)
    with pytest.raises(ConfigError, match="int8"):
        TensorRTBuilder(mlp, precision="int8")


def test_capacity_outside_max_batch_size_is_refused(mlp: ModelSpec) -> None:
    builder = TensorRTBuilder(mlp)
    for capacity in (0, 17):
        with pytest.raises(InvalidArgument, match=r"outside 1\.\.16"):
            builder.build_plan(capacity)


def test_from_spec_reads_the_engine_policy(tmp_path: Path) -> None:
    config = model_config_pb2.ModelConfig()
    config.engine_policy.precision = model_config_pb2.TF32
    config.engine_policy.workspace_bytes = 1 << 24
    config.engine_policy.opt_batch_size = 3
    spec = spec_for(mlp_model(tmp_path / "p" / "1" / "model.onnx"), {"x": (8,)}, {"y": (4,)}, config=config)
    builder = TensorRTBuilder.from_spec(spec, cache_dir=tmp_path)
    parts = builder.plan_key_parts(8)
    assert (parts["precision"], parts["workspace_bytes"], parts["opt_batch_size"]) == ("tf32", 1 << 24, 3)
    assert TensorRTBuilder.from_spec(spec_for(spec.model_path, {"x": (8,)}, {"y": (4,)})).precision == "fp32"


@pytest.mark.skipif(device_label() != CPU_BUILD, reason="a CUDA device is visible here")
def test_loading_without_a_gpu_says_a_rebuild_will_not_help(mlp: ModelSpec) -> None:
    builder = TensorRTBuilder(mlp)
    with pytest.raises(PlanLoadError) as err:
        builder.load_plan(builder.build_plan(2), 2)
    assert err.value.rebuild is False and err.value.code == "UNAVAILABLE"


@pytest.mark.gpu
def test_engine_matches_onnxruntime_on_a_supported_gpu(mlp: ModelSpec, tmp_path: Path) -> None:
    import onnxruntime as ort

    from service.memory.allocators import CudaAllocator
    from service.memory.pool import BufferPool, split_poolable

    if device_label() == CPU_BUILD:
        pytest.skip("no CUDA device visible (or cuda-python missing)")
    problem = plan_problem(TRT, TensorRTBuilder(mlp).build_plan(8))
    if problem is not None:
        pytest.skip(f"{problem} ({device_label()})")
    allocator = CudaAllocator(0)
    pool = BufferPool(split_poolable(mlp.inputs)[0], split_poolable(mlp.outputs)[0], allocator=allocator)
    builder = TensorRTBuilder(mlp, cache_dir=tmp_path, device=0, stream=allocator.stream)
    cache = PlanCache(tmp_path)
    first, cached = load_or_build(builder, 8, cache)
    first.close()
    assert cached is False
    engine, cached = load_or_build(builder, 8, cache)  # the second time: loaded, nothing built
    assert cached is True
    session = ort.InferenceSession(str(mlp.model_path), providers=["CPUExecutionProvider"])
    try:
        assert engine.device_memory_bytes >= 0 and engine.output_names == ["y"]
        for batch in (1, 3, 8):
            x = np.random.default_rng(batch).standard_normal((batch, 8), dtype=np.float32)
            expected = session.run(["y"], {"x": x})[0]
            assert engine.output_shapes(batch) == {"y": (batch, 4)}
            np.testing.assert_allclose(engine.run({"x": x})["y"], expected, rtol=1e-4, atol=1e-4)
            views = pool.views(batch)  # the registry's path: pool views, copies on the pool's stream
            views.inputs["x"][:] = x
            views.upload()
            assert engine.run_into(views.device_inputs, views.device_outputs) == {}
            views.download()
            np.testing.assert_allclose(views.outputs["y"], expected, rtol=1e-4, atol=1e-4)
        with pytest.raises(InvalidArgument, match="capacity"):
            engine.run({"x": np.zeros((9, 8), np.float32)})
    finally:
        engine.close()
        pool.close()
        allocator.close()

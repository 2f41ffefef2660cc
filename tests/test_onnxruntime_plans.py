"""ONNX Runtime plans in the registry's plan cache, and IOBinding runs on the buffer pool's buffers.

Plans: keys (what is in them, what is not), build/load round trips, damaged plans refused, and through
`EngineRegistry` + `PlanCache`: a restart over a warm cache builds nothing, a damaged plan file is
rebuilt. IOBinding: ONNX Runtime writes into the pool's views in place (batch 1, 3, a chunk slice),
and BYTES models still run. The CUDA test (marker gpu) binds the pool's device views.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from examples.generate_models import write_model
from service.engines.onnxruntime_backend import PLAN_MAGIC, OnnxRuntimeBuilder, PlanError
from service.engines.plan_cache import PlanCache, hash_file
from service.engines.policy import EnginePolicy
from service.engines.registry import EngineRegistry
from service.errors import ConfigError, InternalError, InvalidArgument, Unavailable
from service.memory.pool import BufferPool, split_poolable
from service.proto import model_config_pb2
from service.repository import ModelSpec, TensorSpec
from tests.reference import make_inputs, reference_outputs
from tests.test_onnxruntime_engine import assert_matches, spec_for

HEAD = struct.Struct("<8sI")  # the plan envelope: magic, header length, JSON header, model


class Events:
    def __init__(self) -> None:
        self.log: list[tuple[str, dict]] = []

    def __call__(self, kind: str, **fields) -> None:
        self.log.append((kind, fields))

    def reasons(self) -> list[str]:
        return [f["reason"] for k, f in self.log if k == "build"]

    def kinds(self) -> list[str]:
        return [k for k, _ in self.log]


class CountingBuilder(OnnxRuntimeBuilder):
    """The real builder, counting the expensive step (optimizing the model into a plan)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.plans_built = 0

    def build_plan(self, capacity: int) -> bytes:
        self.plans_built += 1
        return super().build_plan(capacity)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny, mixed and mlp, each in its own `<name>/1/` directory (the files beside a model are keyed)."""
    root = tmp_path_factory.mktemp("plan-models")
    for name in ("tiny", "mixed", "mlp"):
        write_model(root, name)
    return root


def envelope(plan: bytes) -> tuple[dict, bytes]:
    magic, size = HEAD.unpack_from(plan)
    assert magic == PLAN_MAGIC
    return json.loads(plan[HEAD.size:HEAD.size + size]), plan[HEAD.size + size:]


def reseal(header: dict, model: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return HEAD.pack(PLAN_MAGIC, len(raw)) + raw + model


def fill(bufs, inputs: dict[str, np.ndarray]) -> None:
    for name, value in inputs.items():
        bufs.inputs[name][...] = value


def pool_for(spec: ModelSpec) -> BufferPool:
    (inputs, _), (outputs, _) = split_poolable(spec.inputs), split_poolable(spec.outputs)
    return BufferPool(inputs, outputs, growth="exact")


def registry(builder, cache: PlanCache, events: Events) -> EngineRegistry:
    return EngineRegistry(builder, EnginePolicy(rebuild="BLOCKING"), max_batch_size=builder.spec.max_batch_size,
                          plan_cache=cache, on_event=events)


def serve(reg: EngineRegistry, pool: BufferPool, name: str, batches=(1, 3, 8)) -> None:
    """Run each batch through the registry on pool views and check the results against numpy."""
    for batch in batches:
        inputs = make_inputs(name, batch, seed=batch)
        bufs = pool.views(batch)
        fill(bufs, inputs)
        assert reg.execute(batch, bufs) == {}
        assert_matches(name, dict(bufs.outputs), reference_outputs(name, reg.builder.spec.model_path, inputs))


# --- keys ----------------------------------------------------------------------------------------------


def test_key_names_what_changes_the_plan_and_not_the_capacity(models: Path, tmp_path: Path) -> None:
    spec = spec_for(models, "tiny")
    builder = OnnxRuntimeBuilder(spec)
    parts = builder.plan_key_parts(1)
    assert parts["backend"] == "onnxruntime" and parts["version"] == ort.__version__
    assert parts["model_sha256"] == hash_file(spec.model_path)
    assert parts["providers"] == ["CPUExecutionProvider"] and parts["graph_optimization"] == "ORT_ENABLE_ALL"
    assert parts["device"].startswith("cpu:") and "capacity" not in parts
    key = PlanCache.key(**parts)
    # One optimized model serves every capacity; threads and the model's path do not change it either.
    assert all(PlanCache.key(**builder.plan_key_parts(c)) == key for c in (2, 64, 256))
    assert PlanCache.key(**OnnxRuntimeBuilder(spec, intra_op_threads=1).plan_key_parts(8)) == key
    copy = tmp_path / "copy" / "model.onnx"
    copy.parent.mkdir()
    shutil.copyfile(spec.model_path, copy)
    moved = OnnxRuntimeBuilder(spec_for(models, "tiny", model_path=copy))
    assert PlanCache.key(**moved.plan_key_parts(1)) == key
    # Other model bytes at the same path: the builder notices (size/mtime) and the key changes.
    model = onnx.load(str(copy))
    c = numpy_helper.to_array(model.graph.initializer[0])
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(c + np.float32(1), "c"))
    copy.write_bytes(model.SerializeToString())
    changed = PlanCache.key(**moved.plan_key_parts(1))
    assert changed != key
    # A file beside the model (external weights) is part of the model.
    (copy.parent / "weights.bin").write_bytes(b"\0" * 64)
    assert PlanCache.key(**moved.plan_key_parts(1)) not in (key, changed)
    for capacity in (0, 257):
        with pytest.raises(InvalidArgument, match=rf"capacity {capacity} is outside 1\.\.256"):
            builder.plan_key_parts(capacity)


# --- build_plan / load_plan ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "mixed", "mlp"])
def test_plan_round_trip_gives_the_outputs_of_build(models: Path, name: str) -> None:
    spec = spec_for(models, name)
    builder = OnnxRuntimeBuilder(spec)
    plan = builder.build_plan(4)
    header, model = envelope(plan)
    assert header["optimized"] is True and header["model_sha256"] == hash_file(spec.model_path)
    if name == "mlp":  # really the optimized graph: MatMul + Add (+ Relu) fused into Gemms
        ops = [n.op_type for n in onnx.load_from_string(model).graph.node]
        assert "MatMul" not in ops and "FusedGemm" in ops, ops
    verified = builder.load_plan(plan, 4)  # takes the session build_plan verified the plan with
    loaded = OnnxRuntimeBuilder(spec).load_plan(bytes(bytearray(plan)), 8)  # a real load
    built = builder.build(8)
    assert (verified.capacity, loaded.capacity) == (4, 8)
    inputs = make_inputs(name, 3, seed=11)
    want = built.run(inputs)
    assert_matches(name, want, reference_outputs(name, spec.model_path, inputs))
    for engine in (verified, loaded):
        got = engine.run(inputs)
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{name}.{key}")
    with pytest.raises(InvalidArgument, match=r"batch 5 is outside this engine's capacity 1\.\.4"):
        verified.run(make_inputs(name, 5))


def test_external_weights_stay_beside_the_model(models: Path, tmp_path: Path) -> None:
    source = spec_for(models, "mlp")
    path = tmp_path / "mlp" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(onnx.load(str(source.model_path)), str(path), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=1024)
    spec = spec_for(models, "mlp", model_path=path)
    builder = OnnxRuntimeBuilder(spec)
    parts = builder.plan_key_parts(1)
    assert parts["model_sha256"] not in (hash_file(path), hash_file(source.model_path))  # weights too
    plan = builder.build_plan(8)
    assert envelope(plan)[0]["optimized"] is True and len(plan) < 100_000  # refers to weights.bin
    engine = OnnxRuntimeBuilder(spec).load_plan(plan, 8)
    inputs = make_inputs("mlp", 2, seed=4)
    np.testing.assert_array_equal(engine.run(inputs)["y"], OnnxRuntimeBuilder(source).build(8).run(inputs)["y"])


def test_damaged_or_foreign_plans_raise(models: Path) -> None:
    spec = spec_for(models, "tiny")
    builder = OnnxRuntimeBuilder(spec)
    plan = builder.build_plan(2)
    header, model = envelope(plan)
    flipped = bytearray(plan)
    flipped[-20] ^= 0xFF
    cases = [
        (b"", "truncated plan"),
        (plan[:10], "truncated plan"),
        (plan[:40], "damaged plan header"),
        (plan[:-1], "model bytes, its header says"),
        (bytes(flipped), "checksum mismatch"),
        (b"NOTAPLAN" + plan[8:], "bad magic"),
        (model, "bad magic"),  # the bare model is not a plan
        (reseal({**header, "version": "0.0.1"}, model), "other version"),
        (reseal({**header, "graph_optimization": "ORT_ENABLE_BASIC"}, model), "other graph_optimization"),
        (reseal({k: v for k, v in header.items() if k != "model_crc32"}, model), "damaged plan header"),
    ]
    for bad, message in cases:
        with pytest.raises(PlanError, match=message) as info:
            OnnxRuntimeBuilder(spec).load_plan(bad, 2)
        assert info.value.rebuild is True, message
    # A plan of another model (another key) is refused, not served.
    with pytest.raises(PlanError, match="other model_sha256"):
        OnnxRuntimeBuilder(spec_for(models, "mixed")).load_plan(plan, 2)
    # A config that does not match the model: ConfigError, and the plan is fine (no rebuild).
    mixed = spec_for(models, "mixed")
    scale = mixed.inputs[1]
    good = OnnxRuntimeBuilder(mixed).build_plan(1)
    with pytest.raises(ConfigError, match="input 'tokens' is not in") as info:
        OnnxRuntimeBuilder(spec_for(models, "mixed", inputs=(TensorSpec("tokens", "INT64", (8,)), scale))
                           ).load_plan(good, 1)
    assert info.value.rebuild is False
    assert OnnxRuntimeBuilder(mixed).load_plan(good, 1).run(make_inputs("mixed", 1))["sum"].shape == (1, 1)


def test_an_optimized_model_that_does_not_load_is_not_cached(models: Path) -> None:
    # Fault injection: ONNX Runtime refuses some optimized models it saved itself (CUDA sessions save
    # their Memcpy nodes). That cannot happen on the CPU, so this builder refuses every optimized plan.
    class Refusing(OnnxRuntimeBuilder):
        def _load(self, plan, providers):
            if envelope(plan)[0]["optimized"]:
                raise PlanError("refused (test)")
            return super()._load(plan, providers)

    spec = spec_for(models, "tiny")
    plan = Refusing(spec).build_plan(2)
    header, model = envelope(plan)
    assert header["optimized"] is False and model == b""  # "open the model file", which the key hashes
    engine = OnnxRuntimeBuilder(spec).load_plan(plan, 2)  # optimized when loaded
    inputs = make_inputs("tiny", 2)
    assert_matches("tiny", engine.run(inputs), reference_outputs("tiny", spec.model_path, inputs))


# --- through the registry and the plan cache -----------------------------------------------------------


def test_restart_over_a_warm_cache_builds_nothing(models: Path, tmp_path: Path) -> None:
    spec = spec_for(models, "tiny")
    events, builder = Events(), CountingBuilder(spec)
    first = registry(builder, PlanCache(tmp_path, on_event=events), events)
    serve(first, pool_for(spec), "tiny")  # capacities 1, 4, 8 (POW2)
    # The first capacity optimizes the model; one plan serves every later capacity.
    assert events.reasons() == ["first", "cache_hit", "cache_hit"] and builder.plans_built == 1
    assert len(list(tmp_path.glob("*.plan"))) == 1
    first.close()

    events, builder = Events(), CountingBuilder(spec)
    second = registry(builder, PlanCache(tmp_path, on_event=events), events)
    serve(second, pool_for(spec), "tiny", batches=(1, 3, 8, 200))
    assert events.reasons() == ["cache_hit"] * 4 and builder.plans_built == 0
    assert second.stats()["live_capacities"] == [256]
    second.close()


def test_damaged_plan_file_is_rebuilt_and_served(models: Path, tmp_path: Path) -> None:
    spec = spec_for(models, "mixed")
    events = Events()
    cache = PlanCache(tmp_path, on_event=events)
    first = registry(CountingBuilder(spec), cache, events)
    serve(first, pool_for(spec), "mixed", batches=(2,))
    first.close()
    (path,) = tmp_path.glob("*.plan")

    # Damage on disk: the cache's checksum catches it, the plan is rebuilt and replaced.
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    events, builder = Events(), CountingBuilder(spec)
    second = registry(builder, PlanCache(tmp_path, on_event=events), events)
    serve(second, pool_for(spec), "mixed", batches=(2,))
    assert "plan_cache_invalid" in events.kinds() and events.reasons() == ["first"]
    assert builder.plans_built == 1 and path.read_bytes() != bytes(data)
    second.close()

    # A file the cache accepts but ONNX Runtime refuses: discarded on load, rebuilt, served.
    key = PlanCache.key(**builder.plan_key_parts(1))
    PlanCache(tmp_path).put(key, b"TSORTPLN" + b"\xff" * 40)
    events, builder = Events(), CountingBuilder(spec)
    third = registry(builder, PlanCache(tmp_path, on_event=events), events)
    serve(third, pool_for(spec), "mixed", batches=(3,))
    assert events.kinds()[0] == "plan_load_failed" and events.reasons() == ["first"]
    assert builder.plans_built == 1 and envelope(PlanCache(tmp_path).get(key))[0]["optimized"] is True
    third.close()


# --- IOBinding on the pool's buffers -------------------------------------------------------------------


def test_run_into_writes_into_the_pool_views_in_place(models: Path) -> None:
    spec = spec_for(models, "mixed")
    engine = OnnxRuntimeBuilder(spec).build(8)
    assert engine.buffer_memory == "host" and engine.device_memory_bytes == 0
    pool = pool_for(spec)
    full = pool.views(8)
    sentinel = {"sum": -7, "scaled": np.nan}
    for name, value in sentinel.items():
        full.outputs[name][...] = value
    addresses = {name: view.ctypes.data for name, view in full.outputs.items()}

    for batch in (1, 3):
        inputs = make_inputs("mixed", batch, seed=batch)
        bufs = pool.views(batch)
        fill(bufs, inputs)
        assert {n: v.ctypes.data for n, v in bufs.outputs.items()} == addresses  # rows 0.. of the pool
        assert engine.run_into(bufs.inputs, bufs.outputs) == {}
        want = reference_outputs("mixed", spec.model_path, inputs)
        assert_matches("mixed", dict(bufs.outputs), want)
        assert_matches("mixed", {n: v[:batch] for n, v in pool.views(8).outputs.items()}, want)

    # A chunk: rows 2..5 of the pool, written in place and nothing around them.
    for name, value in sentinel.items():
        full.outputs[name][...] = value
    inputs = make_inputs("mixed", 3, seed=5)
    part = pool.views(8).slice(2, 5)
    fill(part, inputs)
    assert engine.run_into(part.inputs, part.outputs) == {}
    after = pool.views(8).outputs
    assert_matches("mixed", {n: v[2:5] for n, v in after.items()},
                   reference_outputs("mixed", spec.model_path, inputs))
    assert (after["sum"][[0, 1, 5, 6, 7]] == -7).all() and np.isnan(after["scaled"][[0, 1, 5, 6, 7]]).all()

    # Outputs without a view come back as arrays; one view, the other returned.
    extra = engine.run_into(part.inputs, {"sum": part.outputs["sum"]})
    assert list(extra) == ["scaled"] and extra["scaled"].shape == (3, 4)
    assert list(engine.run_into(part.inputs, {})) == ["sum", "scaled"]


def test_run_into_copies_views_it_cannot_bind_and_refuses_bad_ones(models: Path) -> None:
    spec = spec_for(models, "tiny")
    engine = OnnxRuntimeBuilder(spec).build(4)
    inputs = make_inputs("tiny", 3, seed=2)
    want = reference_outputs("tiny", spec.model_path, inputs)["y"]
    x = np.asfortranarray(inputs["x"])
    y = np.full((16, 3), np.nan, np.float32).T  # (3, 16), not C-contiguous
    assert not x.flags.c_contiguous and not y.flags.c_contiguous
    assert engine.run_into({"x": x}, {"y": y}) == {}
    np.testing.assert_allclose(y, want, rtol=1e-6)
    read_only = np.frombuffer(bytes(3 * 16 * 4), np.float32).reshape(3, 16)
    with pytest.raises(InternalError, match="read-only"):
        engine.run_into({"x": x}, {"y": read_only})
    with pytest.raises(InternalError, match="float64"):
        engine.run_into({"x": x}, {"y": np.empty((3, 16))})
    with pytest.raises(InternalError, match="onnxruntime run failed"):
        engine.run_into({"x": x}, {"y": np.empty((2, 16), np.float32)})  # wrong rows
    with pytest.raises(InvalidArgument, match=r"capacity 1\.\.4"):
        engine.run_into(make_inputs("tiny", 5), {})


def test_bind_runs_the_same_views_again_on_whatever_rows_they_hold_and_declines_what_it_cannot_bind(
        models: Path) -> None:
    """`bind` (the worker's direct lane): one binding of the pool's views, each run reading the rows the
    views hold now; None for views it cannot bind in place."""
    spec = spec_for(models, "mixed")
    engine = OnnxRuntimeBuilder(spec).build(4)
    bufs = pool_for(spec).views(2)
    run = engine.bind(bufs.inputs, bufs.outputs)
    for seed in (1, 2):
        inputs = make_inputs("mixed", 2, seed=seed)
        fill(bufs, inputs)
        run()
        assert_matches("mixed", dict(bufs.outputs), reference_outputs("mixed", spec.model_path, inputs))
    assert engine.bind(bufs.inputs, {"sum": bufs.outputs["sum"]}) is None  # an output without a view
    strided = {"ids": np.asfortranarray(bufs.inputs["ids"]), "scale": bufs.inputs["scale"]}
    assert engine.bind(strided, bufs.outputs) is None
    with pytest.raises(InternalError, match="onnxruntime run failed"):
        wrong = np.empty((3, 4), np.float16)
        engine.bind(bufs.inputs, {**bufs.outputs, "scaled": wrong})()  # 3 output rows for 2 input rows
    engine.close()
    with pytest.raises(Unavailable, match="closed"):
        engine.bind(bufs.inputs, bufs.outputs)


def test_a_binding_is_reused_only_for_the_very_views_it_bound(models: Path) -> None:
    """The engine keeps the IOBinding of views it saw (the pool hands the same ones batch after batch) and
    finds it by the views' identity: new data in the same views is read, while other arrays, even ones
    that get the id of a view that is gone, get a binding of their own, and the checks still run."""
    spec = spec_for(models, "tiny")
    engine = OnnxRuntimeBuilder(spec).build(4)
    x, y = np.empty((2, 16), np.float32), np.empty((2, 16), np.float32)
    for seed in range(3):  # same views, new contents: the cached binding reads them
        x[...] = make_inputs("tiny", 2, seed=seed)["x"]
        assert engine.run_into({"x": x}, {"y": y}) == {}
        np.testing.assert_allclose(y, reference_outputs("tiny", spec.model_path, {"x": x})["y"], rtol=1e-6)
    assert len(engine._bindings) == 1
    for seed in range(20):  # fresh arrays each time: CPython often gives them the ids of the last ones
        xs = make_inputs("tiny", 2, seed=100 + seed)["x"].copy()
        ys = np.empty((2, 16), np.float32)
        engine.run_into({"x": xs}, {"y": ys})
        np.testing.assert_allclose(ys, reference_outputs("tiny", spec.model_path, {"x": xs})["y"], rtol=1e-6)
        del xs, ys
    with pytest.raises(InvalidArgument, match="unknown"):  # the bound views plus a stray input
        engine.run_into({"x": x, "stray": x}, {"y": y})


def strings_model(path: Path) -> ModelSpec:
    """text BYTES [N,1] -> echo (Identity); x FP32 [N,2] -> y = x + 1."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"]), helper.make_node("Add", ["x", "one"], ["y"])],
        "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N", 1]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["N", 1]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(np.ones(2, np.float32), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))
    config = model_config_pb2.ModelConfig(name="strings", backend="onnxruntime", max_batch_size=8)
    return ModelSpec("strings", 1, (1,), path, 8,
                     (TensorSpec("text", "BYTES", (1,)), TensorSpec("x", "FP32", (2,))),
                     (TensorSpec("echo", "BYTES", (1,)), TensorSpec("y", "FP32", (2,))),
                     "onnxruntime", False, config)


def test_bytes_model_through_the_registry_and_the_cache(tmp_path: Path) -> None:
    spec = strings_model(tmp_path / "strings" / "1" / "model.onnx")
    texts = [b"h\xc3\xa9llo", b"", b"z" * 300]
    for run in ("cold", "warm"):
        events = Events()
        reg = registry(OnnxRuntimeBuilder(spec), PlanCache(tmp_path / "plans"), events)
        pool = pool_for(spec)  # x and y pooled; text and echo are not (BYTES)
        for batch in (1, 3):
            bufs = pool.views(batch)
            x = np.arange(batch * 2, dtype=np.float32).reshape(batch, 2)
            bufs.inputs["x"][...] = x
            bufs.inputs["text"] = np.array(texts[:batch], dtype=object).reshape(batch, 1)
            extra = reg.execute(batch, bufs)
            assert list(extra) == ["echo"] and extra["echo"].shape == (batch, 1)
            assert [str(e) for e in extra["echo"].ravel()] == [t.decode() for t in texts[:batch]]
            np.testing.assert_array_equal(bufs.outputs["y"], x + 1)
        assert events.reasons() == (["first", "cache_hit"] if run == "cold" else ["cache_hit"] * 2), run
        reg.close()


# --- CUDA ----------------------------------------------------------------------------------------------


def cuda_ready() -> bool:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        return importlib.util.find_spec("cuda.bindings") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_ready(), reason="needs onnxruntime-gpu and cuda-python")
@pytest.mark.parametrize("name", ["mlp", "mixed"])
@pytest.mark.parametrize("own_stream", [False, True], ids=["pool-stream", "own-stream"])
def test_cuda_run_into_device_views_matches_cpu(models: Path, tmp_path: Path, name: str, own_stream: bool) -> None:
    from service.memory.allocators import CudaAllocator

    cpu = OnnxRuntimeBuilder(spec_for(models, name)).build(8)
    spec = spec_for(models, name, use_gpu=True)
    alloc = CudaAllocator(0)
    pool = BufferPool(*(split_poolable(t)[0] for t in (spec.inputs, spec.outputs)), allocator=alloc)
    try:
        stream = None if own_stream else alloc.stream
        parts = OnnxRuntimeBuilder(spec, stream=stream).plan_key_parts(1)
        assert parts["device"] == "cuda:0" and parts["graph_optimization"] == "ORT_ENABLE_EXTENDED"
        for run in ("cold", "warm"):  # the second registry over the same directory: a restart
            events = Events()
            reg = registry(OnnxRuntimeBuilder(spec, stream=stream), PlanCache(tmp_path), events)
            for batch in (1, 3, 7):
                inputs = make_inputs(name, batch, seed=batch)
                bufs = pool.views(batch)
                fill(bufs, inputs)
                assert reg.execute(batch, bufs) == {}
                want = cpu.run(inputs)
                for key, value in want.items():  # TF32 may be on for CUDA matmuls
                    np.testing.assert_allclose(bufs.outputs[key].astype(np.float64), value.astype(np.float64),
                                               rtol=2e-2, atol=2e-2, err_msg=f"{name}.{key} batch {batch}")
            assert events.reasons() == (["first"] if run == "cold" else ["cache_hit"]) + ["cache_hit"] * 2, run
            reg.close()
        engine = OnnxRuntimeBuilder(spec, stream=stream).build(8)
        assert engine.buffer_memory == "device" and engine.providers[0] == "CUDAExecutionProvider"
        inputs = make_inputs(name, 5, seed=9)
        bufs = pool.views(5)
        fill(bufs, inputs)
        bufs.upload()
        assert engine.run_into(bufs.device_inputs, bufs.device_outputs) == {}
        bufs.download()
        for key, value in cpu.run(inputs).items():
            np.testing.assert_allclose(bufs.outputs[key].astype(np.float64), value.astype(np.float64),
                                       rtol=2e-2, atol=2e-2, err_msg=f"{name}.{key} direct")
        engine.close()
    finally:
        pool.close()
        alloc.close()

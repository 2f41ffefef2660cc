"""The example-model generator and the ONNX Runtime engine, checked against numpy references.

Models are generated into a temporary repository once per session; specs are built from the committed
`examples/models/<name>/config.pbtxt`, so these tests also keep the configs and the generator in sync.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from service.datatypes import DATATYPE_OF_CONFIG_TYPE, NUMPY_DTYPES
from service.engines.base import Engine, EngineBuilder
from service.engines.onnxruntime_backend import OnnxRuntimeBuilder, providers_for, session_options
from service.engines.onnxruntime_engine import OnnxRuntimeEngine
from service.errors import ConfigError, InvalidArgument, Unavailable
from service.proto import model_config_pb2
from service.repository import ModelSpec, TensorSpec
from tests.reference import MODEL_NAMES, make_inputs, reference_outputs

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "examples" / "generate_models.py"
CONFIGS = ROOT / "examples" / "models"


def generate(out: Path, *models: str) -> str:
    """Run the generator as a script (as `make models` does); returns its stdout."""
    cmd = [sys.executable, str(GENERATOR), "--out", str(out)]
    if models:
        cmd += ["--models", ",".join(models)]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout


def model_file(repo: Path, name: str) -> Path:
    return repo / name / "1" / "model.onnx"


def load_config(name: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse((CONFIGS / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def spec_for(repo: Path, name: str, **changes: object) -> ModelSpec:
    config = load_config(name)

    def tensors(items) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(t.name, DATATYPE_OF_CONFIG_TYPE[model_config_pb2.DataType.Name(t.data_type)],
                       tuple(t.dims))
            for t in items
        )

    spec = ModelSpec(
        name=config.name, version=1, versions=(1,), model_path=model_file(repo, name),
        max_batch_size=config.max_batch_size, inputs=tensors(config.input), outputs=tensors(config.output),
        backend=config.backend, use_gpu=False, config=config,
    )
    return replace(spec, **changes)


def assert_matches(model: str, got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want), f"{model}: outputs {list(got)}, expected {list(want)}"
    for name, expected in want.items():
        actual = got[name]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, (model, name)
        if expected.dtype == np.float32:
            np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4, err_msg=f"{model}.{name}")
        elif expected.dtype == np.float16:
            np.testing.assert_allclose(actual.astype(np.float32), expected.astype(np.float32),
                                       rtol=1e-3, atol=1e-3, err_msg=f"{model}.{name}")
        else:
            np.testing.assert_array_equal(actual, expected, err_msg=f"{model}.{name}")


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    generate(out)
    return out


@pytest.fixture(scope="module")
def full_engines(repo: Path):
    """One engine per model at capacity max_batch_size, built lazily and closed at the end."""
    engines: dict[str, OnnxRuntimeEngine] = {}

    def get(name: str) -> OnnxRuntimeEngine:
        if name not in engines:
            spec = spec_for(repo, name)
            engines[name] = OnnxRuntimeBuilder(spec).build(spec.max_batch_size)
        return engines[name]

    yield get
    for engine in engines.values():
        engine.close()


# --- generator ---------------------------------------------------------------------------------------


def test_generator_writes_valid_models_with_symbolic_batch(repo: Path) -> None:
    for name in MODEL_NAMES:
        model = onnx.load(str(model_file(repo, name)))
        onnx.checker.check_model(model)
        assert model.ir_version == 8 and [o.version for o in model.opset_import] == [17]
        for value in [*model.graph.input, *model.graph.output]:
            assert value.type.tensor_type.shape.dim[0].dim_param == "N", (name, value.name)
        assert model.graph.initializer, f"{name}: weights must be initializers"


def test_generator_is_deterministic_and_idempotent(repo: Path, tmp_path: Path) -> None:
    generate(tmp_path)
    for name in MODEL_NAMES:
        assert model_file(tmp_path, name).read_bytes() == model_file(repo, name).read_bytes(), name
    mtimes = {name: model_file(tmp_path, name).stat().st_mtime_ns for name in MODEL_NAMES}
    stdout = generate(tmp_path)
    assert stdout.count("unchanged") == len(MODEL_NAMES) and "wrote" not in stdout, stdout
    assert {name: model_file(tmp_path, name).stat().st_mtime_ns for name in MODEL_NAMES} == mtimes


def test_generator_subset_and_repair(tmp_path: Path) -> None:
    stdout = generate(tmp_path, "tiny")
    assert "tiny: wrote" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    path = model_file(tmp_path, "tiny")
    good = path.read_bytes()
    path.write_bytes(good[:-7])  # a damaged file differs in hash and is rewritten
    assert "tiny: wrote" in generate(tmp_path, "tiny")
    assert path.read_bytes() == good
    result = subprocess.run([sys.executable, str(GENERATOR), "--out", str(tmp_path), "--models", "nope"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown model(s) nope" in result.stderr


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_committed_config_matches_generated_model(repo: Path, name: str) -> None:
    config = load_config(name)
    assert config.name == name and config.backend == "onnxruntime" and config.max_batch_size > 0
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    graph = onnx.load(str(model_file(repo, name))).graph
    for configured, actual in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in configured] == [v.name for v in actual]
        for t, v in zip(configured, actual):
            dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
            kserve = DATATYPE_OF_CONFIG_TYPE[model_config_pb2.DataType.Name(t.data_type)]
            assert np.dtype(dtype) == NUMPY_DTYPES[kserve], (name, t.name)
            assert list(t.dims) == [d.dim_value for d in v.type.tensor_type.shape.dim[1:]], (name, t.name)


# --- engine ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2, 7, "max"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_engine_matches_numpy_reference(repo: Path, full_engines, name: str, batch: int | str) -> None:
    engine = full_engines(name)
    size = engine.capacity if batch == "max" else int(batch)
    inputs = make_inputs(name, size, seed=size)
    outputs = engine.run(inputs)
    # The numpy convnet costs ~0.1 s a row: at the full batch check a spread of rows, not all 64.
    rows = np.array([0, 1, size // 2, size - 1]) if name == "convnet" and size > 8 else np.arange(size)
    want = reference_outputs(name, model_file(repo, name), {k: v[rows] for k, v in inputs.items()})
    assert all(v.shape[0] == size for v in outputs.values())
    assert_matches(name, {k: v[rows] for k, v in outputs.items()}, want)


def test_each_capacity_is_its_own_engine_and_enforced(repo: Path) -> None:
    builder = OnnxRuntimeBuilder(spec_for(repo, "tiny"), intra_op_threads=1)
    assert isinstance(builder, EngineBuilder) and builder.backend == "onnxruntime"
    small, large = builder.build(4), builder.build(16)
    assert isinstance(small, Engine) and (small.capacity, large.capacity) == (4, 16) and small is not large
    assert_matches("tiny", small.run(make_inputs("tiny", 4)),
                   reference_outputs("tiny", model_file(repo, "tiny"), make_inputs("tiny", 4)))
    with pytest.raises(InvalidArgument, match=r"batch 5 is outside this engine's capacity 1\.\.4"):
        small.run(make_inputs("tiny", 5))
    with pytest.raises(InvalidArgument, match=r"batch 0"):
        small.run(make_inputs("tiny", 0))
    assert large.run(make_inputs("tiny", 5))["y"].shape == (5, 16)
    for capacity in (0, 257):
        with pytest.raises(InvalidArgument, match=rf"capacity {capacity} is outside 1\.\.256"):
            builder.build(capacity)


def test_run_rejects_inputs_that_break_the_engine_contract(repo: Path, full_engines) -> None:
    engine = full_engines("mixed")
    good = make_inputs("mixed", 3)
    cases = [
        ({"ids": good["ids"]}, r"missing \['scale'\]"),
        ({**good, "extra": good["ids"]}, r"unknown \['extra'\]"),
        ({**good, "ids": good["ids"].astype(np.int32)}, r"input 'ids' has dtype int32, expected int64"),
        ({**good, "scale": good["scale"][:, :3]}, r"input 'scale' has shape \[3, 3\], expected \['batch', 4\]"),
        ({**good, "scale": good["scale"][:2]}, r"input 'scale' has batch 2, expected 3"),
    ]
    for inputs, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            engine.run(inputs)
    assert engine.run(good)["sum"].shape == (3, 1)  # the engine still works afterwards


def test_read_only_zero_copy_inputs(repo: Path, full_engines) -> None:
    # Workers hand the engine np.frombuffer views of shared memory: read-only arrays must work.
    inputs = make_inputs("mixed", 5, seed=3)
    views = {k: np.frombuffer(v.tobytes(), dtype=v.dtype).reshape(v.shape) for k, v in inputs.items()}
    assert not any(v.flags.writeable for v in views.values())
    outputs = full_engines("mixed").run(views)
    assert list(outputs) == ["sum", "scaled"]  # spec order
    assert_matches("mixed", outputs, reference_outputs("mixed", model_file(repo, "mixed"), inputs))


def test_intra_op_threads_sleep_between_runs_unless_spinning_is_on() -> None:
    key = "session.intra_op.allow_spinning"
    assert session_options().get_session_config_entry(key) == "0"
    with pytest.raises(Exception, match=key):  # not set: ONNX Runtime's own default (spin)
        session_options(spinning=True).get_session_config_entry(key)


def test_closed_engine_is_unavailable(repo: Path) -> None:
    engine = OnnxRuntimeBuilder(spec_for(repo, "tiny")).build(2)
    assert engine.providers == ["CPUExecutionProvider"]
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(Unavailable, match="closed"):
        engine.run(make_inputs("tiny", 1))


def test_config_that_does_not_match_the_model_is_a_config_error(repo: Path) -> None:
    spec = spec_for(repo, "mixed")
    ids, scale = spec.inputs
    cases = [
        (replace(spec, inputs=(replace(ids, name="tokens"), scale)), r"input 'tokens' is not in"),
        (replace(spec, inputs=(ids,)), r"needs input\(s\) \['scale'\]"),
        (replace(spec, inputs=(replace(ids, datatype="INT32"), scale)), r"data_type is INT32 but the model has INT64"),
        (replace(spec, outputs=(replace(spec.outputs[0], dims=(2,)), spec.outputs[1])), r"output 'sum' dims \[2\]"),
        (replace(spec, model_path=spec.model_path.with_name("absent.onnx")), r"cannot load .*absent\.onnx"),
    ]
    for bad, message in cases:
        with pytest.raises(ConfigError, match=message):
            OnnxRuntimeBuilder(bad).build(1)


def test_corrupt_model_file_is_a_config_error(repo: Path, tmp_path: Path) -> None:
    broken = tmp_path / "model.onnx"
    broken.write_bytes(model_file(repo, "tiny").read_bytes()[:50])
    with pytest.raises(ConfigError, match="cannot load"):
        OnnxRuntimeBuilder(spec_for(repo, "tiny", model_path=broken)).build(1)


def test_providers(repo: Path) -> None:
    assert providers_for(spec_for(repo, "tiny")) == ["CPUExecutionProvider"]
    gpu_spec = spec_for(repo, "tiny", use_gpu=True)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert providers_for(gpu_spec)[0][0] == "CUDAExecutionProvider"
    else:
        with pytest.raises(ConfigError, match="install onnxruntime-gpu"):
            OnnxRuntimeBuilder(gpu_spec).build(1)


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu")
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cuda_engine_matches_reference(repo: Path, name: str) -> None:
    spec = spec_for(repo, name, use_gpu=True)
    engine = OnnxRuntimeBuilder(spec).build(spec.max_batch_size)
    assert engine.providers[0] == "CUDAExecutionProvider"
    inputs = make_inputs(name, 7, seed=7)
    outputs = engine.run(inputs)
    want = reference_outputs(name, spec.model_path, inputs)
    for key, value in want.items():  # TF32 may be on by default for CUDA convolutions/matmuls
        np.testing.assert_allclose(outputs[key].astype(np.float64), value.astype(np.float64),
                                   rtol=2e-2, atol=2e-2, err_msg=f"{name}.{key}")

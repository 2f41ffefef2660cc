"""ModelRepository: layout, config.pbtxt validation, version policies, ONNX cross-check, path safety."""

from __future__ import annotations

import re
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper

from service.errors import ConfigError, NotFound
from service.proto import model_config_pb2
from service.repository import ModelRepository, TensorSpec

BASE = """
max_batch_size: 8
input { name: "x" data_type: TYPE_FP32 dims: [ 4 ] }
output { name: "y" data_type: TYPE_FP32 dims: [ 4 ] }
"""

FP32_IO = ([("x", TensorProto.FLOAT, ["N", 4])], [("y", TensorProto.FLOAT, ["N", 4])])


def write_onnx(path: Path, inputs=FP32_IO[0], outputs=FP32_IO[1]) -> None:
    """A tiny graph: the first output is inputs[0] + w (seeded w), any further output an Identity."""
    w = np.random.default_rng(0).standard_normal(4).astype(np.float32)
    nodes = [helper.make_node("Add", [inputs[0][0], "w"], [outputs[0][0]])]
    nodes += [helper.make_node("Identity", [inputs[min(i, len(inputs) - 1)][0]], [out[0]])
              for i, out in enumerate(outputs[1:], start=1)]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def make_model(repo: Path, name: str = "m", config: str = BASE, versions=(1,),
               filename: str = "model.onnx", io=FP32_IO) -> Path:
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(config)
    for v in versions:
        write_onnx(model_dir / str(v) / filename, *io)
    return model_dir


def config_error(repo: Path, name: str = "m") -> str:
    with pytest.raises(ConfigError) as info:
        ModelRepository(repo).load_spec(name)
    assert info.value.code == "INVALID_ARGUMENT"
    return info.value.message


# --- round trip -----------------------------------------------------------------------------------

def test_valid_config_round_trip(tmp_path: Path) -> None:
    make_model(tmp_path)
    spec = ModelRepository(tmp_path).load_spec("m")
    assert (spec.name, spec.version, spec.versions, spec.max_batch_size) == ("m", 1, (1,), 8)
    assert spec.model_path == (tmp_path / "m" / "1" / "model.onnx").resolve()
    assert spec.inputs == (TensorSpec("x", "FP32", (4,)),)
    assert spec.outputs == (TensorSpec("y", "FP32", (4,)),)
    assert (spec.backend, spec.use_gpu) == ("onnxruntime", False)
    # The returned config is the parsed file plus the filled-in name, backend and platform.
    expected = text_format.Parse(BASE, model_config_pb2.ModelConfig())
    expected.name, expected.backend, expected.platform = "m", "onnxruntime", "onnxruntime_onnx"
    assert spec.config == expected
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and again.config == expected


def test_model_names_lists_only_model_directories(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    make_model(root, "b")
    make_model(root, "a")
    make_model(root, "broken", config="not a config")  # listed: loading it is what fails
    (root / "no_config" / "1").mkdir(parents=True)
    make_model(root, ".hidden")
    (root / "file.txt").write_text("x")
    make_model(tmp_path / "elsewhere", "out")
    (root / "link_out").symlink_to(tmp_path / "elsewhere" / "out")
    (root / "alias").symlink_to(root / "a")
    assert ModelRepository(root).model_names() == ["a", "alias", "b", "broken"]


def test_multi_datatype_model_without_batching(tmp_path: Path) -> None:
    config = """
    name: "multi"
    max_batch_size: 0
    input { name: "ids" data_type: TYPE_INT64 dims: [ 2, -1 ] }
    input { name: "half" data_type: TYPE_FP16 dims: [ 3 ] }
    output { name: "sum" data_type: TYPE_INT64 dims: [ 2, -1 ] }
    output { name: "text" data_type: TYPE_STRING dims: [ 1 ] }
    """
    io = ([("ids", TensorProto.INT64, [2, "L"]), ("half", TensorProto.FLOAT16, [3])],
          [("sum", TensorProto.INT64, [2, "L"]), ("text", TensorProto.STRING, [1])])
    make_model(tmp_path, "multi", config, io=io)
    spec = ModelRepository(tmp_path).load_spec("multi")
    assert spec.inputs == (TensorSpec("ids", "INT64", (2, -1)), TensorSpec("half", "FP16", (3,)))
    assert spec.outputs == (TensorSpec("sum", "INT64", (2, -1)), TensorSpec("text", "BYTES", (1,)))
    assert spec.max_batch_size == 0


def test_missing_repository_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model repository not found"):
        ModelRepository(tmp_path / "absent")


# --- config validation ----------------------------------------------------------------------------

def test_parse_error_names_file_line_and_field(tmp_path: Path) -> None:
    make_model(tmp_path, config=BASE + "\ninptu { name: \"z\" }\n")
    message = config_error(tmp_path)
    assert str(tmp_path / "m" / "config.pbtxt") in message
    assert "line 6" in message and "inptu" in message


def test_unknown_enum_name_is_a_parse_error(tmp_path: Path) -> None:
    make_model(tmp_path, config=BASE.replace("TYPE_FP32", "TYPE_FP33", 1))
    message = config_error(tmp_path)
    assert "config.pbtxt: line 3" in message and "TYPE_FP33" in message


# Each case: a config text, the field its error must name, and a phrase of the explanation.
INVALID = {
    "name_mismatch": (BASE + 'name: "other"', "name", "differs from the directory name 'm'"),
    "negative_batch": (BASE.replace("max_batch_size: 8", "max_batch_size: -1"), "max_batch_size",
                       "negative"),
    "no_input": ("max_batch_size: 8\noutput { name: \"y\" data_type: TYPE_FP32 dims: [4] }", "input",
                 "at least one input"),
    "no_output": ("max_batch_size: 8\ninput { name: \"x\" data_type: TYPE_FP32 dims: [4] }", "output",
                  "at least one output"),
    "duplicate_input": (BASE + 'input { name: "x" data_type: TYPE_FP32 dims: [4] }', "input[1].name",
                        "configured twice"),
    "empty_output_name": (BASE + 'output { data_type: TYPE_FP32 dims: [4] }', "output[1].name", "empty"),
    "data_type_unset": (BASE.replace(" data_type: TYPE_FP32 dims: [ 4 ] }", " dims: [ 4 ] }", 1),
                        "input[0].data_type", "is not set"),
    "data_type_unknown_number": (BASE.replace("TYPE_FP32", "99", 1), "input[0].data_type",
                                 "99 is not a value of DataType"),
    "dims_empty_without_batching": (BASE.replace("max_batch_size: 8", "max_batch_size: 0")
                                    .replace("dims: [ 4 ] }", "}", 1), "input[0].dims", "at least one dim"),
    "dim_zero": (BASE.replace("dims: [ 4 ]", "dims: [ 4, 0 ]", 1), "input[0].dims[1]", "dim 0"),
    "dim_minus_two": (BASE.replace("dims: [ 4 ]", "dims: [ -2 ]", 1), "input[0].dims[0]", "dim -2"),
    "backend_unknown": (BASE + 'backend: "pytorch"', "backend", "onnxruntime, tensorrt"),
    "platform_unknown": (BASE + 'platform: "tensorflow_savedmodel"', "platform", "onnxruntime, tensorrt"),
    "backend_contradicts_platform": (BASE + 'backend: "onnxruntime" platform: "tensorrt_plan"', "backend",
                                     "contradicts platform"),
    "instance_group_mixed": (BASE + "instance_group { kind: KIND_GPU } instance_group { kind: KIND_CPU }",
                             "instance_group", "mixes KIND_GPU"),
    "instance_group_model": (BASE + "instance_group { kind: KIND_MODEL }", "instance_group[0].kind",
                             "KIND_MODEL is not supported"),
    "bucket_list_without_sizes": (BASE + "engine_policy { bucket: LIST }", "engine_policy.bucket_sizes",
                                  "needs at least one size"),
    "bucket_size_over_max": (BASE + "engine_policy { bucket: LIST bucket_sizes: [2, 16] }",
                             "engine_policy.bucket_sizes[1]", "16 is outside 1..max_batch_size (8)"),
    "bucket_size_zero": (BASE + "engine_policy { bucket: LIST bucket_sizes: [0] }",
                         "engine_policy.bucket_sizes[0]", "0 is outside"),
    "bucket_sizes_without_list": (BASE + "engine_policy { bucket: POW2 bucket_sizes: [2] }",
                                  "engine_policy.bucket_sizes", "only used with bucket: LIST"),
    "warmup_over_max": (BASE + "engine_policy { warmup_batch_sizes: [1, 9] }",
                        "engine_policy.warmup_batch_sizes[1]", "9 is outside 1..max_batch_size (8)"),
    "warmup_zero": (BASE + "engine_policy { warmup_batch_sizes: [0] }",
                    "engine_policy.warmup_batch_sizes[0]", "0 is outside"),
    "engine_mode_unknown_number": (BASE + "engine_policy { mode: 7 }", "engine_policy.mode",
                                   "7 is not a value of EngineMode"),
    "preferred_batch_over_max": (BASE + "dynamic_batching { preferred_batch_size: [4, 32] }",
                                 "dynamic_batching.preferred_batch_size[1]", "32 is outside"),
    "specific_versions_empty": (BASE + "version_policy { specific { } }", "version_policy.specific.versions",
                                "lists no version"),
    "unsafe_default_model_filename": (BASE + 'default_model_filename: "../../x.onnx"',
                                      "default_model_filename", "plain file name"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_config_names_file_and_field(tmp_path: Path, case: str) -> None:
    config, field, phrase = INVALID[case]
    make_model(tmp_path, config=config)
    message = config_error(tmp_path)
    assert message.startswith(f"{tmp_path / 'm' / 'config.pbtxt'}: {field}: "), message
    assert phrase in message


@pytest.mark.parametrize(("extra", "backend", "platform"), [
    ("", "onnxruntime", "onnxruntime_onnx"),
    ('platform: "onnxruntime_onnx"', "onnxruntime", "onnxruntime_onnx"),
    ('backend: "onnxruntime"', "onnxruntime", "onnxruntime_onnx"),
    ('platform: "tensorrt_plan"', "tensorrt", "tensorrt_plan"),
    ('backend: "tensorrt"', "tensorrt", "tensorrt_plan"),
])
def test_backend_normalized(tmp_path: Path, extra: str, backend: str, platform: str) -> None:
    make_model(tmp_path, config=BASE + extra)
    spec = ModelRepository(tmp_path).load_spec("m")
    assert (spec.backend, spec.config.backend, spec.config.platform) == (backend, backend, platform)


@pytest.mark.parametrize(("groups", "use_gpu"), [
    ("", False),
    ("instance_group { kind: KIND_CPU }", False),
    ("instance_group { kind: KIND_AUTO count: 2 }", False),
    ("instance_group { kind: KIND_GPU gpus: [0] }", True),
])
def test_instance_group_kind(tmp_path: Path, groups: str, use_gpu: bool) -> None:
    make_model(tmp_path, config=BASE + groups)
    assert ModelRepository(tmp_path).load_spec("m").use_gpu is use_gpu


def test_valid_engine_policy_and_batching_accepted(tmp_path: Path) -> None:
    policy = """
    engine_policy { mode: REUSE bucket: LIST bucket_sizes: [1, 4, 8] warmup_batch_sizes: [8]
                    max_engines: 2 rebuild: BACKGROUND opt_batch_size: 4 }
    dynamic_batching { preferred_batch_size: [4, 8] max_queue_delay_microseconds: 100 }
    """
    make_model(tmp_path, config=BASE + policy)
    spec = ModelRepository(tmp_path).load_spec("m")
    assert list(spec.config.engine_policy.bucket_sizes) == [1, 4, 8]
    assert spec.config.engine_policy.max_engines == 2  # allowed outside MULTI, ignored there


# --- path safety ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["..", "../m", "m/../m", "/etc", "/etc/passwd", "a/b", "a\\b", ".hidden",
                                  ".", "", "m\0", "nope", "m/1", 3, None])
def test_unsafe_or_unknown_names_are_not_found(tmp_path: Path, name: object) -> None:
    repo_root = tmp_path / "repo"
    make_model(repo_root)
    make_model(repo_root, ".hidden")
    make_model(tmp_path, "escape")  # a valid model one level above the root
    repo = ModelRepository(repo_root)
    with pytest.raises(NotFound, match=r"^model '.*' is not in the repository$"):
        repo.load_spec(name)  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        repo.versions(name)  # type: ignore[arg-type]


def test_parent_model_via_dotdot_is_not_found(tmp_path: Path) -> None:
    make_model(tmp_path, "escape")
    (tmp_path / "repo").mkdir()
    with pytest.raises(NotFound, match=re.escape("model '../escape' is not in the repository")):
        ModelRepository(tmp_path / "repo").load_spec("../escape")


def test_symlink_to_model_outside_is_not_found(tmp_path: Path) -> None:
    make_model(tmp_path / "outside", "secret")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "sneaky").symlink_to(tmp_path / "outside" / "secret")
    (tmp_path / "repo" / "root").symlink_to(tmp_path / "repo")
    repo = ModelRepository(tmp_path / "repo")
    assert repo.model_names() == []
    for name in ("sneaky", "root"):
        with pytest.raises(NotFound, match=f"model '{name}' is not in the repository"):
            repo.load_spec(name)


def test_symlink_inside_repository_is_allowed(tmp_path: Path) -> None:
    make_model(tmp_path, "real")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    spec = ModelRepository(tmp_path).load_spec("alias")
    assert spec.name == "alias" and spec.model_path == (tmp_path / "real" / "1" / "model.onnx").resolve()


@pytest.mark.parametrize("what", ["config", "version_dir", "model_file"])
def test_files_symlinked_outside_are_rejected(tmp_path: Path, what: str) -> None:
    outside = make_model(tmp_path / "outside", "o")
    model_dir = make_model(tmp_path / "repo", versions=() if what == "version_dir" else (1,))
    target = {"config": model_dir / "config.pbtxt", "version_dir": model_dir / "1",
              "model_file": model_dir / "1" / "model.onnx"}[what]
    if target.exists():
        target.unlink()
    target.symlink_to(outside / target.relative_to(model_dir))
    message = config_error(tmp_path / "repo")
    assert str(target) in message and "outside the model repository" in message


# --- versions -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("policy", "served"), [
    ("", (1, 2, 10)[-1:]),
    ("version_policy { latest { } }", (10,)),
    ("version_policy { latest { num_versions: 2 } }", (2, 10)),
    ("version_policy { latest { num_versions: 9 } }", (1, 2, 10)),
    ("version_policy { all { } }", (1, 2, 10)),
    ("version_policy { specific { versions: [1, 10] } }", (1, 10)),
])
def test_version_policy(tmp_path: Path, policy: str, served: tuple[int, ...]) -> None:
    model_dir = make_model(tmp_path, config=BASE + policy, versions=(1, 2, 10))
    (model_dir / "3").mkdir()  # no model file: not a version
    for ignored in ("0", "01", "latest", "4x"):
        write_onnx(model_dir / ignored / "model.onnx")
    repo = ModelRepository(tmp_path)
    assert repo.versions("m") == served
    spec = repo.load_spec("m")
    assert (spec.version, spec.versions) == (served[-1], served)
    for v in served:
        chosen = repo.load_spec("m", v)
        assert chosen.version == v and chosen.model_path.parent.name == str(v)


def test_unserved_version_is_not_found(tmp_path: Path) -> None:
    make_model(tmp_path, versions=(1, 2, 3))
    repo = ModelRepository(tmp_path)
    for version in (1, 4, 0, -1, True, "3"):
        with pytest.raises(NotFound) as info:
            repo.load_spec("m", version)  # type: ignore[arg-type]
        assert "model 'm'" in info.value.message and "available versions: 3" in info.value.message


def test_specific_version_without_directory(tmp_path: Path) -> None:
    make_model(tmp_path, config=BASE + "version_policy { specific { versions: [1, 5] } }", versions=(1, 2))
    message = config_error(tmp_path)
    assert "config.pbtxt: version_policy.specific.versions: 5 not found" in message
    assert "available versions: 1, 2" in message


def test_no_version_directory_is_a_config_error(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path, versions=())
    (model_dir / "1").mkdir()
    message = config_error(tmp_path)
    assert str(model_dir) in message and "no version directory" in message and "model.onnx" in message


def test_default_model_filename(tmp_path: Path) -> None:
    make_model(tmp_path, config=BASE + 'default_model_filename: "net.onnx"', versions=(1, 2),
               filename="net.onnx")
    write_onnx(tmp_path / "m" / "3" / "model.onnx")  # not the configured file: version 3 is absent
    spec = ModelRepository(tmp_path).load_spec("m")
    assert spec.version == 2 and spec.model_path.name == "net.onnx"


# --- ONNX cross-check -----------------------------------------------------------------------------

ONNX_MISMATCH = {
    "input_not_in_graph": (BASE.replace('name: "x"', 'name: "z"'), "input[0].name",
                           "'z' is not an input of the graph"),
    "output_not_in_graph": (BASE.replace('name: "y"', 'name: "q"'), "output[0].name", "graph outputs: y"),
    "input_type": (BASE.replace("TYPE_FP32", "TYPE_INT64", 1), "input[0].data_type",
                   "'x' is TYPE_INT64 in the config but FLOAT (FP32)"),
    "output_type": (BASE.replace('"y" data_type: TYPE_FP32', '"y" data_type: TYPE_FP16'), "output[0].data_type",
                    "'y' is TYPE_FP16 in the config but FLOAT (FP32)"),
    "rank_with_batch": (BASE.replace("dims: [ 4 ]", "dims: [ 1, 4 ]", 1), "input[0].dims",
                        "rank 3 in the config (dims [1, 4] plus the batch dim) but rank 2"),
    "rank_without_batch": (BASE.replace("max_batch_size: 8", "max_batch_size: 0"), "input[0].dims",
                           "rank 1 in the config (dims [4]) but rank 2"),
    "dim_value": (BASE.replace("dims: [ 4 ]", "dims: [ 5 ]", 1), "input[0].dims[0]",
                  "'x' has dim 5 in the config but 4"),
}


@pytest.mark.parametrize("case", sorted(ONNX_MISMATCH))
def test_onnx_mismatch_detected(tmp_path: Path, case: str) -> None:
    config, field, phrase = ONNX_MISMATCH[case]
    make_model(tmp_path, config=config)
    message = config_error(tmp_path)
    assert message.startswith(f"{tmp_path / 'm' / 'config.pbtxt'}: {field}: "), message
    assert phrase in message and str(tmp_path / "m" / "1" / "model.onnx") in message


def test_onnx_fixed_batch_dim_rejected(tmp_path: Path) -> None:
    make_model(tmp_path, io=([("x", TensorProto.FLOAT, [1, 4])], FP32_IO[1]))
    assert "max_batch_size: 8 but the graph" in config_error(tmp_path)


def test_unconfigured_graph_input_rejected(tmp_path: Path) -> None:
    io = ([("x", TensorProto.FLOAT, ["N", 4]), ("extra", TensorProto.FLOAT, ["N", 4])], FP32_IO[1])
    make_model(tmp_path, io=io)
    assert "config.pbtxt: input: graph input 'extra'" in config_error(tmp_path)


def test_tensorrt_backend_also_checks_onnx_file(tmp_path: Path) -> None:
    make_model(tmp_path, config=BASE.replace("TYPE_FP32", "TYPE_INT32", 1) + 'backend: "tensorrt"')
    assert "input[0].data_type" in config_error(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage\xff\xff\xff", b"not onnx at all"])
def test_corrupt_model_file(tmp_path: Path, content: bytes) -> None:
    model_dir = make_model(tmp_path)
    (model_dir / "1" / "model.onnx").write_bytes(content)
    message = config_error(tmp_path)
    assert str(model_dir / "1" / "model.onnx") in message and "ONNX model" in message

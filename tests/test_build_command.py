"""`trtserve build` end to end, and what `serve` does with a TensorRT model where no GPU can run it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from service.engines.tensorrt_build import import_tensorrt
from service.errors import ConfigError
from tests.server import EXAMPLES, ROOT, start

try:
    import_tensorrt()
except ConfigError as exc:  # `make install` installs TensorRT for RTX; elsewhere say why we skip
    pytestmark = pytest.mark.skip(reason=str(exc))


def _repo(tmp_path: Path) -> Path:
    """`tiny` twice: once for ONNX Runtime, once for TensorRT (the same ONNX file)."""
    repo = tmp_path / "repo"
    for name, backend in (("tiny_ort", "onnxruntime"), ("tiny_trt", "tensorrt")):
        (repo / name / "1").mkdir(parents=True)
        shutil.copy(EXAMPLES / "tiny" / "1" / "model.onnx", repo / name / "1" / "model.onnx")
        (repo / name / "config.pbtxt").write_text(f"""
name: "{name}"
backend: "{backend}"
max_batch_size: 8
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 16 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 16 ] }} ]
""")
    return repo


def _build(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", "build", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_build_fills_the_cache_then_finds_it_warm(tmp_path, example_repo):
    repo, cache = _repo(tmp_path), tmp_path / "cache"
    first = _build("--model-repository", str(repo), "--engine-cache-dir", str(cache), "--batch-sizes", "1,4,8")
    assert first.returncode == 0, first.stderr
    assert "tiny_ort: backend 'onnxruntime' builds no plans" in first.stderr
    for i, capacity in enumerate((1, 4, 8), 1):
        assert f"[{i}/3] tiny_trt capacity {capacity}: built in" in first.stderr
    plans = sorted(p.name for p in cache.iterdir() if p.suffix == ".plan")
    assert len(plans) == 3, sorted(p.name for p in cache.iterdir())

    again = _build("--model-repository", str(repo), "--engine-cache-dir", str(cache), "--model", "tiny_trt",
                   "--batch-sizes", "1,4,8")
    assert again.returncode == 0 and again.stderr.count(": cached") == 3, again.stderr
    assert sorted(p.name for p in cache.iterdir() if p.suffix == ".plan") == plans

    # Default capacities: every POW2 bucket up to max_batch_size (1, 2, 4, 8); 2 is new.
    default = _build("--model-repository", str(repo), "--engine-cache-dir", str(cache), "--model", "tiny_trt")
    assert default.returncode == 0 and default.stderr.count(": cached") == 3 and "capacity 2: built" in default.stderr


def test_build_failures_exit_non_zero_with_the_reason(tmp_path, example_repo):
    repo, cache = _repo(tmp_path), tmp_path / "cache"
    too_big = _build("--model-repository", str(repo), "--engine-cache-dir", str(cache), "--model", "tiny_trt",
                     "--batch-sizes", "16")
    assert too_big.returncode == 1 and "exceeds max_batch_size 8" in too_big.stderr
    (repo / "tiny_trt" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    broken = _build("--model-repository", str(repo), "--engine-cache-dir", str(cache), "--model", "tiny_trt")
    assert broken.returncode == 1 and "tiny_trt: FAILED" in broken.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = _build("--model-repository", str(empty), "--engine-cache-dir", str(cache))
    assert nothing.returncode == 0 and "nothing to build" in nothing.stderr


def test_serving_a_tensorrt_model_without_a_usable_gpu_fails_that_model_clearly(tmp_path, example_repo):
    repo = _repo(tmp_path)
    with start(repo) as server:
        client = grpcclient.InferenceServerClient(server.url)
        index = {m.name: m for m in client.get_model_repository_index().models}
        assert index["tiny_ort"].state == "READY"
        assert index["tiny_trt"].state == "UNAVAILABLE" and index["tiny_trt"].reason
        log = "".join(server.lines)
        assert "model tiny_trt failed to load" in log
        with pytest.raises(Exception) as err:
            client.infer("tiny_trt", [])
        assert "tiny_trt" in str(err.value)
        # the other model keeps serving
        import numpy as np

        x = grpcclient.InferInput("x", [1, 16], "FP32")
        x.set_data_from_numpy(np.zeros((1, 16), np.float32))
        assert client.infer("tiny_ort", [x]).as_numpy("y").shape == (1, 16)

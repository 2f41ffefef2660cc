"""Faults inside a model: its files vanish while it is loaded, an engine build fails. It keeps serving."""

from __future__ import annotations

import shutil
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.server import start

CONFIG = """
name: "fragile"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 16 ] } ]
engine_policy { bucket: EXACT rebuild: BACKGROUND }
"""


def _request(batch: int) -> tuple[np.ndarray, list[grpcclient.InferInput]]:
    x = np.random.default_rng(batch).standard_normal((batch, 16), dtype=np.float32)
    inp = grpcclient.InferInput("x", [batch, 16], "FP32")
    inp.set_data_from_numpy(x)
    return x, [inp]


def _metric(port: int, needle: str, timeout_s: float = 10.0) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(needle):
                return float(line.rsplit(" ", 1)[1])
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle} not in /metrics")
        time.sleep(0.1)


def test_model_directory_removed_while_loaded_keeps_serving(tmp_path, example_repo):
    repo = tmp_path / "repo"
    (repo / "fragile" / "1").mkdir(parents=True)
    (repo / "fragile" / "config.pbtxt").write_text(CONFIG)
    shutil.copy(example_repo / "tiny" / "1" / "model.onnx", repo / "fragile" / "1" / "model.onnx")
    with start(repo, ["--model-control-mode", "explicit", "--load-model", "fragile"]) as server:
        client = grpcclient.InferenceServerClient(server.url)
        x, inputs = _request(1)
        offset = client.infer("fragile", inputs).as_numpy("y") - x  # tiny adds a constant vector
        shutil.rmtree(repo / "fragile")

        # Batch 4 needs a new engine (EXACT); its build fails without the model file, so the batch
        # is served in chunks by the capacity-1 engine, now and afterwards.
        for batch in (4, 2, 4):
            x, inputs = _request(batch)
            np.testing.assert_allclose(client.infer("fragile", inputs).as_numpy("y"), x + offset, rtol=1e-5, atol=1e-6)
        assert _metric(server.metrics_port, 'trtserve_engine_builds_total{model="fragile",reason="failed"}') >= 1
        assert client.is_model_ready("fragile")
        assert any("failed" in line and "capacity 4" in line for line in server.lines)

        # Reloading the vanished model fails clearly; the loaded version keeps serving.
        with pytest.raises(InferenceServerException) as err:
            client.load_model("fragile")
        assert err.value.status() == "StatusCode.NOT_FOUND"
        assert client.is_model_ready("fragile")
        state = {m.name: m.state for m in client.get_model_repository_index().models}
        assert state["fragile"] == "READY"
        x, inputs = _request(3)
        np.testing.assert_allclose(client.infer("fragile", inputs).as_numpy("y"), x + offset, rtol=1e-5, atol=1e-6)

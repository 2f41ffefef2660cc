"""The CPUs the server may use (affinity, cgroup v1/v2 limit), and `--intra-op-threads 0` following them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from service.cpus import available_cpus, cgroup_cpu_limit, default_intra_op_threads
from tests.server import start


def _v2(root: Path, text: str) -> Path:
    (root / "cpu.max").write_text(text)
    return root


def _v1(root: Path, quota: str, period: str = "100000") -> Path:
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(period + "\n")
    return root


@pytest.mark.parametrize(("make", "expected"), [
    (lambda r: _v2(r, "max 100000\n"), None),
    (lambda r: _v2(r, "150000 100000\n"), 1.5),
    (lambda r: _v2(r, "50000 100000\n"), 0.5),
    (lambda r: _v1(r, "-1"), None),
    (lambda r: _v1(r, "300000"), 3.0),
    (lambda r: _v1(r, "100000", "50000"), 2.0),
    (lambda r: r, None),  # no cgroup files at all
    (lambda r: _v2(r, "garbage\n"), None),
])
def test_cgroup_cpu_limit(tmp_path, make, expected):
    assert cgroup_cpu_limit(make(tmp_path)) == expected


def test_available_cpus_is_capped_by_the_limit_rounded_up(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == affinity  # unlimited
    assert available_cpus(_v2(tmp_path, "50000 100000")) == 1  # half a CPU still runs one thread
    if affinity >= 2:
        (tmp_path / "cpu.max").write_text("150000 100000")
        assert available_cpus(tmp_path) == 2


def test_default_threads_follow_a_restriction_only(tmp_path):
    assert default_intra_op_threads(tmp_path) == (0 if len(os.sched_getaffinity(0)) == os.cpu_count() else
                                                  len(os.sched_getaffinity(0)))
    assert default_intra_op_threads(_v2(tmp_path, "100000 100000")) == 1


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs to restrict the server to one")
def test_server_on_one_cpu_runs_onnxruntime_with_one_thread(example_repo):
    """A server started with CPU affinity to one CPU (inherited from this process) says it gives ONNX
    Runtime one thread per model, and serves."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        server = start(example_repo, ["--model-control-mode", "explicit", "--load-model", "tiny"])
    finally:
        os.sched_setaffinity(0, before)
    with server:
        assert any("ONNX Runtime CPU threads per model: 1," in line for line in server.lines), server.lines
        x = np.arange(16, dtype=np.float32).reshape(1, 16)
        with grpcclient.InferenceServerClient(server.url) as client:
            inp = grpcclient.InferInput("x", [1, 16], "FP32")
            inp.set_data_from_numpy(x)
            y = client.infer("tiny", [inp]).as_numpy("y")
        assert y.shape == (1, 16) and np.isfinite(y).all()

"""Engine registry and buffer pool through the real server, ONNX Runtime on the CPU, checked at /metrics.

The model is y = x + c with x, y FP32 [N, 1024]: one row is 4096 bytes per tensor, a whole page, so the
host pool's page-rounded bytes are exactly rows * 4096 per tensor (x and y: rows * 8192). The expected
figures below are derived from the registry semantics (DESIGN.md) and agree with the unit-test tables
of tests/test_registry.py (TABLES, last row of each), which use the same sequence and row size.
"""

from __future__ import annotations

import random
import re
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from service.engines.plan_cache import PlanCache
from tests.server import ServerProcess, start

ROW = 1024
ROW_BYTES = ROW * 4
MAX_BATCH = 8
SEQUENCE = [1, 5, 1, 0, 2, 3, 0, 1, 3, 2]
C = (np.arange(ROW, dtype=np.float32) - 512) / 8  # the model's constant: y = x + C
POOL_CAP = 4 * 2 * ROW_BYTES  # 32768: batches up to 4 fit (x and y), batch 8 needs 65536

_BLOCKING = "rebuild: BLOCKING pool_growth: EXACT_FIT"
# model -> engine_policy, then what /metrics shows after SEQUENCE: builds by reason, engines_live,
# engine_max_batch_size, buffer_pool_bytes{memory="host"}, buffer_pool_grows_total.
#   REUSE+POW2:  1 -> build 1 (first); 5 -> build 8 (grow), 1 released; 2, 3 run on 8.
#   REUSE+EXACT: 1 -> build 1 (first); 5 -> build 5 (grow), 1 released; 2, 3 run on 5.
#   MULTI+EXACT: 1 (first), 5 (grow); 2 and 3 build their own buckets (bucket): live 1, 2, 3, 5.
#   MULTI+POW2:  1 (first), 8 (grow); 2 -> 2 (bucket), 3 -> 4 (bucket): live 1, 2, 4, 8.
# Batch 0 builds and runs nothing. The pool grows exactly at batch 1 (1 row) and 5 (5 rows): 5 * 8192.
SEQUENCE_CASES = {
    "reuse_pow2": (f"mode: REUSE bucket: POW2 {_BLOCKING}", {"first": 1, "grow": 1}, 1, 8, 40960, 2),
    "reuse_exact": (f"mode: REUSE bucket: EXACT {_BLOCKING}", {"first": 1, "grow": 1}, 1, 5, 40960, 2),
    "multi_exact": (f"mode: MULTI bucket: EXACT {_BLOCKING}", {"first": 1, "grow": 1, "bucket": 2}, 4, 5, 40960, 2),
    "multi_pow2": (f"mode: MULTI bucket: POW2 {_BLOCKING}", {"first": 1, "grow": 1, "bucket": 2}, 4, 8, 40960, 2),
    # BACKGROUND: 5 is served by chunks on engine 1 while 8 builds; 2 and 3 are covered by that build.
    "reuse_pow2_bg": ("mode: REUSE bucket: POW2 rebuild: BACKGROUND pool_growth: EXACT_FIT",
                      {"first": 1, "grow": 1}, 1, 8, 40960, 2),
}
OTHER_MODELS = {
    "concurrent": "mode: REUSE bucket: POW2 rebuild: BACKGROUND pool_growth: GEOMETRIC",
    "capped": f"mode: REUSE bucket: POW2 {_BLOCKING} max_pool_bytes: {POOL_CAP}",
    "cached": f"mode: REUSE bucket: POW2 {_BLOCKING}",
}


# -- the model repository ----------------------------------------------------------------------------

def write_model(repo: Path, name: str, policy: str, batching: str = "") -> None:
    """<repo>/<name>/config.pbtxt and 1/model.onnx computing y = x + C."""
    (repo / name / "1").mkdir(parents=True)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])], name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", ROW])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", ROW])],
        [numpy_helper.from_array(C, "c")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.save(model, repo / name / "1" / "model.onnx")
    (repo / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {MAX_BATCH}\n'
        f'input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {ROW} ] }} ]\n'
        f'output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {ROW} ] }} ]\n'
        f"instance_group [ {{ kind: KIND_CPU }} ]\n{batching}"
        f"engine_policy {{ {policy} }}\n"
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    """One server over every model of this module except "cached" (which needs restarts)."""
    repo = tmp_path_factory.mktemp("repo")
    for name, (policy, *_) in SEQUENCE_CASES.items():
        write_model(repo, name, policy)
    write_model(repo, "concurrent", OTHER_MODELS["concurrent"],
                "dynamic_batching { max_queue_delay_microseconds: 2000 }\n")
    write_model(repo, "capped", OTHER_MODELS["capped"])
    with start(repo, ["--intra-op-threads", "1"]) as proc:
        yield proc


# -- client and metrics helpers ----------------------------------------------------------------------

def infer(client: grpcclient.InferenceServerClient, model: str, batch: int, seed: int) -> None:
    """Send a batch of `batch` random rows and check y = x + C exactly (one IEEE add per element)."""
    x = np.random.default_rng(seed).standard_normal((batch, ROW), dtype=np.float32)
    inp = grpcclient.InferInput("x", [batch, ROW], "FP32")
    inp.set_data_from_numpy(x)
    y = client.infer(model, [inp], client_timeout=60).as_numpy("y")
    assert y.shape == (batch, ROW) and y.dtype == np.float32, (model, batch, y.shape)
    np.testing.assert_array_equal(y, x + C, err_msg=f"{model} batch {batch}")


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def figures(port: int, model: str) -> dict[str, object]:
    """The engine and pool figures of one model at /metrics (builds: reasons with a nonzero count)."""
    out: dict[str, object] = {"builds": {}}
    for name, labels, value in scrape(port):
        if labels.get("model") != model:
            continue
        if name == "trtserve_engine_builds_total" and value:
            out["builds"][labels["reason"]] = int(value)
        elif name in ("trtserve_engines_live", "trtserve_engine_max_batch_size", "trtserve_buffer_pool_grows_total",
                      "trtserve_worker_restarts_total", "trtserve_buffer_pool_cap_bytes"):
            out[name.removeprefix("trtserve_").removesuffix("_total")] = int(value)
        elif name == "trtserve_buffer_pool_bytes":
            out["pool_" + labels["memory"]] = int(value)
        elif name == "trtserve_inference_requests_total" and value:
            out["requests_" + labels["status"]] = int(value)
    return out


def wait_figures(port: int, model: str, expected: dict[str, object], timeout_s: float = 15.0) -> dict[str, object]:
    """Poll /metrics (workers report every ~0.1 s) until the given keys match; assert on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = figures(port, model)
        subset = {k: got.get(k) for k in expected}
        if subset == expected or time.monotonic() > deadline:
            assert subset == expected, f"{model}: /metrics shows {got}"
            return got
        time.sleep(0.1)


# -- the batch sequence ------------------------------------------------------------------------------

@pytest.mark.parametrize("model", list(SEQUENCE_CASES))
def test_batch_sequence_gives_the_expected_engines_and_pool(server, model):
    _, builds, live, max_batch, host_bytes, grows = SEQUENCE_CASES[model]
    client = grpcclient.InferenceServerClient(server.url)
    for step, batch in enumerate(SEQUENCE):
        infer(client, model, batch, seed=step)
    wait_figures(server.metrics_port, model, {
        "builds": builds, "engines_live": live, "engine_max_batch_size": max_batch,
        "pool_host": host_bytes, "pool_pinned": 0, "pool_device": 0, "buffer_pool_grows": grows,
        "requests_OK": len(SEQUENCE), "worker_restarts": 0,
    })
    client.close()


@pytest.mark.parametrize("model", list(SEQUENCE_CASES))
def test_expected_figures_agree_with_the_unit_test_tables(model):
    """The literals above and tests/test_registry.py's TABLES describe the same semantics."""
    from collections import Counter

    from service.engines.policy import Bucket, Mode
    from tests.test_registry import SEQUENCE as UNIT_SEQUENCE
    from tests.test_registry import TABLES

    policy, builds, live, max_batch, host_bytes, _ = SEQUENCE_CASES[model]
    mode, bucket = re.findall(r"(?:mode|bucket): (\w+)", policy)
    table = TABLES[Mode(mode), Bucket(bucket)]
    assert UNIT_SEQUENCE == SEQUENCE and [row[0] for row in table] == SEQUENCE
    assert Counter(r for row in table for _, r in row[1]) == builds
    assert (len(table[-1][2]), max(table[-1][2]), table[-1][5]) == (live, max_batch, host_bytes)


def test_concurrent_clients_while_engines_grow(server):
    model, clients, per_client = "concurrent", 16, 12
    client = grpcclient.InferenceServerClient(server.url)
    infer(client, model, 1, seed=0)  # the first engine is capacity 1: everything larger grows it under load
    wait_figures(server.metrics_port, model, {"builds": {"first": 1}, "engine_max_batch_size": 1})
    client.close()
    errors: list[BaseException] = []
    done = [0] * clients

    def run(i: int) -> None:
        rng = random.Random(i)
        c = grpcclient.InferenceServerClient(server.url)
        try:
            for k in range(per_client):
                infer(c, model, rng.randint(1, MAX_BATCH), seed=1000 * (i + 1) + k)
                done[i] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    for t in threads:
        t.join(timeout=max(0.1, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"clients still running after 60 s: {done}"
    assert not errors, errors[:3]
    assert sum(done) == clients * per_client
    got = wait_figures(server.metrics_port, model, {
        "engine_max_batch_size": MAX_BATCH, "engines_live": 1, "requests_OK": 1 + clients * per_client,
        "worker_restarts": 0,
    })
    builds = got["builds"]
    # Growth from 1 to 8 by powers of two: 1 to 3 grow builds (2, 4, 8 at most), nothing else.
    assert builds.pop("first") == 1 and set(builds) == {"grow"} and 1 <= builds["grow"] <= 3, got
    assert not [k for k in got if k.startswith("requests_") and k != "requests_OK"], got


def test_pool_cap_refuses_an_oversize_batch_and_keeps_serving(server):
    model = "capped"
    client = grpcclient.InferenceServerClient(server.url)
    worker = server.worker_pid(model)
    with pytest.raises(InferenceServerException) as info:
        infer(client, model, 8, seed=1)
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED", info.value
    assert f"max_pool_bytes cap of {POOL_CAP}" in info.value.message(), info.value.message()
    assert "batch of 8 needs 65536 bytes" in info.value.message()
    infer(client, model, 2, seed=2)
    infer(client, model, 4, seed=3)  # exactly the cap
    with pytest.raises(InferenceServerException, match=f"max_pool_bytes cap of {POOL_CAP}"):
        infer(client, model, 5, seed=4)
    infer(client, model, 1, seed=5)
    assert server.proc.poll() is None and server.worker_pid(model) == worker
    assert worker in [p.pid for p in server.workers()]
    # The refused batches built nothing: 1 (first, at load), then 2 and 4 (grow); the pool holds 4 rows.
    wait_figures(server.metrics_port, model, {
        "builds": {"first": 1, "grow": 2}, "engine_max_batch_size": 4, "engines_live": 1,
        "pool_host": POOL_CAP, "buffer_pool_cap_bytes": POOL_CAP, "requests_OK": 3,
        "requests_RESOURCE_EXHAUSTED": 2, "worker_restarts": 0,
    })
    client.close()


# -- the plan cache across restarts ------------------------------------------------------------------

def serve_cached(repo: Path, cache: Path, builds: dict[str, int]) -> None:
    """Start a server over the "cached" model with `cache`, send batches 1 and 8 and check that /metrics
    shows exactly `builds` (by reason), also a moment later; then stop it."""
    with start(repo, ["--engine-cache-dir", str(cache), "--intra-op-threads", "1"]) as proc:
        client = grpcclient.InferenceServerClient(proc.url)
        infer(client, "cached", 1, seed=1)
        infer(client, "cached", 8, seed=8)
        client.close()
        expected = {"builds": builds, "engine_max_batch_size": 8, "engines_live": 1, "requests_OK": 2}
        wait_figures(proc.metrics_port, "cached", expected)
        time.sleep(0.3)  # a few more worker reports: nothing else is built
        wait_figures(proc.metrics_port, "cached", expected, timeout_s=0)


# An ONNX Runtime plan is the optimized model, the same for every capacity, so its cache key has no
# capacity (service/engines/onnxruntime_backend.py): one plan file per model. Batch 1 builds and stores
# it ("first"); batch 8 needs capacity 8 (REUSE+POW2) and loads that plan ("cache_hit" wins over the
# trigger "grow" as the reported reason).
FIRST_RUN = {"first": 1, "cache_hit": 1}


@pytest.fixture(scope="module")
def cached_repo(tmp_path_factory) -> tuple[Path, Path, dict[str, bytes]]:
    """A repo with the "cached" model and a plan cache filled by one server run (batches 1 and 8)."""
    repo, cache = tmp_path_factory.mktemp("cached_repo"), tmp_path_factory.mktemp("plans")
    write_model(repo, "cached", OTHER_MODELS["cached"])
    serve_cached(repo, cache, FIRST_RUN)
    plans = {p.name: p.read_bytes() for p in cache.glob("*.plan")}
    assert len(plans) == 1, f"expected one plan for the model in {cache}: {sorted(plans)}"
    return repo, cache, plans


def test_restart_with_a_warm_cache_builds_nothing(cached_repo, tmp_path):
    repo, warm, plans = cached_repo
    cache = shutil.copytree(warm, tmp_path / "plans")
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.plan")}
    serve_cached(repo, cache, {"cache_hit": 2})
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.plan")} == mtimes  # nothing rewritten
    assert {p.name: p.read_bytes() for p in cache.glob("*.plan")} == plans


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_corrupt_plan_is_rebuilt_served_and_replaced(cached_repo, tmp_path, damage):
    repo, warm, plans = cached_repo
    cache = shutil.copytree(warm, tmp_path / "plans")
    (plan,) = cache.glob("*.plan")
    data = plan.read_bytes()
    if damage == "truncated":
        plan.write_bytes(data[: len(data) // 2])
    else:  # same size, the payload no longer matches its checksum
        plan.write_bytes(data[:-64] + bytes(b ^ 0xFF for b in data[-64:]))
    serve_cached(repo, cache, FIRST_RUN)  # rebuilt on the first batch ("first"), reloaded for 8
    assert sorted(p.name for p in cache.glob("*.plan")) == sorted(plans)
    assert PlanCache(cache).get(plan.stem) is not None, f"{plan} was not replaced by a valid plan"
    assert not list(cache.glob(".*.tmp"))

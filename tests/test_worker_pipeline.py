"""The worker hands the next batch to the engine thread while the previous one runs (PIPELINE_DEPTH).

The rule is checked on a real DynamicBatcher. The real server then runs `convnet` without a batch
dimension (no pool: every request may be handed over while another runs; a request takes tens of
milliseconds on one ONNX Runtime thread, so it goes to the engine thread) with requests always waiting,
so the engine thread is never idle: requests must come back right, and heartbeats answered (the hang
timeout is 2 s, the load lasts longer), so the worker is not killed as stuck. GPU pools, whose second
input set lets batches overlap, are covered in test_gpu_server.py.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import shutil
import threading
import time
from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from service.batching import BatcherSettings, DynamicBatcher, QueuedRequest
from service.errors import Cancelled, DeadlineExceeded
from service.workers.runtime import Item
from service.workers import batches
from service.workers.batches import INLINE_BELOW_S, Running, launch
from service.workers.worker import PIPELINE_DEPTH, _may_start
from tests.reference import reference_outputs
from tests.server import start

BUSY_CONFIG = """name: "busy"
backend: "onnxruntime"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ 2, 16, 32, 32 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 2, 10 ] } ]
instance_group [ { kind: KIND_CPU } ]
"""
def _runtime(overlaps: bool = True, expected_s: float | None = 0.01) -> SimpleNamespace:
    """What `_may_start` asks of the runtime: whether a batch can be prepared while one runs, and how
    long a batch is expected to run."""
    return SimpleNamespace(can_overlap=lambda: overlaps, expected_seconds=lambda rows: expected_s)


OVERLAPS = _runtime()


def _batcher(max_batch_size: int = 4) -> DynamicBatcher:
    return DynamicBatcher(BatcherSettings(model="m", max_batch_size=max_batch_size))


def _running() -> Running:
    return Running([], [], [], future=Future())


def _queue(batcher: DynamicBatcher, rows: int) -> None:
    for _ in range(rows):
        batcher.submit(QueuedRequest(rows=1, deadline=None, payload=None))


def test_a_full_batch_waiting_goes_to_a_busy_engine_thread_and_a_partial_one_waits():
    batcher = _batcher()
    assert _may_start(deque(), batcher, OVERLAPS), "with nothing running the batcher decides (window, size)"
    busy = deque([_running()])
    _queue(batcher, 3)
    assert not _may_start(busy, batcher, OVERLAPS), "a partial batch waits: it may grow while the engine runs"
    _queue(batcher, 1)
    assert _may_start(busy, batcher, OVERLAPS), "a full batch cannot grow: it is handed over now"
    assert not _may_start(busy, batcher, _runtime(overlaps=False)), \
        "not while the runtime cannot prepare it beside the running one (one input set, or the pool must grow)"
    assert not _may_start(busy, batcher, _runtime(expected_s=INLINE_BELOW_S / 2)), \
        "a short batch waits and then runs inline: cheaper than a hand-off"
    assert not _may_start(busy, batcher, _runtime(expected_s=None)), "nor one of unknown length"
    full = deque(_running() for _ in range(PIPELINE_DEPTH))
    assert not _may_start(full, batcher, OVERLAPS), f"at most {PIPELINE_DEPTH} batches are handed over at once"


def test_a_model_without_dynamic_batching_hands_over_any_waiting_request():
    batcher = DynamicBatcher(BatcherSettings(model="m", max_batch_size=0, batching=False))
    busy = deque([_running()])
    assert not _may_start(busy, batcher, OVERLAPS), "nothing is queued"
    _queue(batcher, 1)
    assert _may_start(busy, batcher, OVERLAPS), "a request runs alone: waiting cannot add to it"


def test_a_handed_over_batch_drops_cancelled_and_expired_requests_until_it_starts():
    jobs = [SimpleNamespace(id=k) for k in range(4)]
    items = [Item(1, {}) for _ in jobs]
    batch = Running(jobs, items, [None, None, time.monotonic() - 1, time.monotonic() + 60])
    batch.cancel(lambda job: job.id == 1)
    assert batch.start()
    assert [item.error is None for item in items] == [True, False, False, True]
    assert isinstance(items[1].error, Cancelled) and isinstance(items[2].error, DeadlineExceeded)
    batch.cancel(lambda job: job.id == 3)
    assert items[3].error is None, "a started batch is not changed: the request is answered with it"
    gone = Running(jobs[:1], [Item(1, {})], [time.monotonic() - 1])
    assert not gone.start(), "nothing left to run: the engine skips the batch"


def test_a_batch_handed_to_the_idle_engine_thread_is_taken_before_the_loop_goes_on(monkeypatch):
    """The loop waits until the idle engine thread took the batch: otherwise the engine thread would wait
    for the GIL while the loop answers the previous batch. The wait is 2 ms in service; a busy machine can
    keep the engine thread off a core for that long, so the test allows it 5 s (launch returns as soon as
    the batch is taken, so the test is no slower)."""
    monkeypatch.setattr(batches, "TAKE_WAIT_S", 5.0)
    release = threading.Event()

    def execute(prepared: SimpleNamespace, detach: bool) -> list:
        release.wait(5)  # a long batch
        return []

    runtime = SimpleNamespace(prepare=lambda items: SimpleNamespace(items=items), execute=execute,
                              expected_seconds=lambda rows: 0.01)
    engine = ThreadPoolExecutor(max_workers=1)
    try:
        for _ in range(5):
            release.clear()
            job = SimpleNamespace(rows=1, inputs={})
            batch = launch(engine, runtime, (QueuedRequest(rows=1, deadline=None, payload=job),),
                           SimpleNamespace(wake=lambda: None), inline_ok=True)
            assert batch.started and not batch.inline, "taken by the engine thread before launch returned"
            release.set()
            assert batch.future.result(5) == []
    finally:
        release.set()
        engine.shutdown()


@pytest.mark.timeout(180)
def test_engine_thread_kept_busy_serves_right_and_still_answers_heartbeats(tmp_path, example_repo):
    model_dir = tmp_path / "busy"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(BUSY_CONFIG)
    shutil.copyfile(example_repo / "convnet" / "1" / "model.onnx", model_dir / "1" / "model.onnx")
    x = np.random.default_rng(5).standard_normal((4, 2, 16, 32, 32), dtype=np.float32)
    expected = [reference_outputs("convnet", model_dir / "1" / "model.onnx", {"x": x[k]})["y"] for k in range(len(x))]
    with start(tmp_path, ["--intra-op-threads", "1", "--worker-hang-timeout-seconds", "2"]) as server:
        client = grpcclient.InferenceServerClient(server.url)
        worker = server.worker_pid("busy")
        # The first batch's time (one client, nothing queued) is the yardstick for the load's length.
        t0 = time.monotonic()
        _infer(client, x[0])
        load_s = max(4.0, 40 * (time.monotonic() - t0))  # far longer than the 2 s hang timeout
        done, errors = [0] * len(x), []

        def run(k: int) -> None:
            own = grpcclient.InferenceServerClient(server.url)
            stop = time.monotonic() + load_s
            while time.monotonic() < stop:
                try:
                    y = _infer(own, x[k])
                    np.testing.assert_allclose(y, expected[k], rtol=1e-3, atol=1e-4)
                    done[k] += 1
                except Exception as exc:  # recorded: every failure is reported, not only the first
                    errors.append(f"client {k}: {exc}")
                    return

        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(x))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(load_s + 60)
        assert not errors, errors
        assert all(n >= 2 for n in done), done  # four clients: a request always waited
        assert server.worker_pid("busy") == worker, "the worker was replaced: " + "".join(server.lines[-20:])
        assert not any("answered no heartbeat" in line for line in server.lines)


def _infer(client: grpcclient.InferenceServerClient, x: np.ndarray) -> np.ndarray:
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("busy", [inp], client_timeout=60).as_numpy("y")

"""A request the client cancels while it waits in the queue is dropped there and never executed."""

from __future__ import annotations

import queue
import time

import numpy as np
import tritonclient.grpc as grpcclient

from tests.server import copy_model, start, wait_for_metric, wait_until


def test_cancelled_request_is_dropped_from_the_queue(tmp_path, example_repo):
    repo = tmp_path / "repo"
    copy_model(example_repo, "convnet", repo, "slow")
    with start(repo, ["--intra-op-threads", "1"]) as server:
        client = grpcclient.InferenceServerClient(server.url)
        x = np.random.default_rng(0).standard_normal((32, 16, 32, 32), dtype=np.float32)
        busy_in = grpcclient.InferInput("x", list(x.shape), "FP32")
        busy_in.set_data_from_numpy(x)
        one = grpcclient.InferInput("x", [1, 16, 32, 32], "FP32")
        one.set_data_from_numpy(x[:1])
        before = client.get_inference_statistics("slow").model_stats[0]

        answers: queue.Queue = queue.Queue()
        client.async_infer("slow", [busy_in], lambda result, error: answers.put(("busy", result, error)))
        wait_for_metric(server, "trtserve_pending_requests", 1, model="slow", version="1")  # the worker has it
        call = client.async_infer("slow", [one], lambda result, error: answers.put(("cancelled", result, error)))
        wait_for_metric(server, "trtserve_pending_requests", 2, model="slow", version="1")
        time.sleep(0.05)  # ...and this one waits behind it in the worker's queue
        call.cancel()
        got = {}
        for _ in range(2):
            name, result, error = answers.get(timeout=60)
            got[name] = (result, error)
        assert got["busy"][1] is None and got["busy"][0].as_numpy("y").shape == (32, 10)
        assert got["cancelled"][1] is not None and "CANCELLED" in str(got["cancelled"][1]).upper()

        # A request after it runs normally; the cancelled one never ran.
        assert client.infer("slow", [one]).as_numpy("y").shape == (1, 10)
        # executions arrive with the worker's next stats report
        wait_until(lambda: client.get_inference_statistics("slow").model_stats[0].execution_count >= 2, 10,
                   "two executions")
        time.sleep(0.5)
        after = client.get_inference_statistics("slow").model_stats[0]
        assert after.inference_count - before.inference_count == 33  # 32 busy rows + the last request
        assert after.execution_count - before.execution_count == 2

"""ModelStreamInfer over the real wire: concurrent requests, each answered with its id (errors in-stream, with
the message a unary call gets), a slow request does not hold back the others, and cancelling the call
cancels the requests in flight."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.reference import make_inputs, reference_outputs
from tests.server import EXAMPLES, copy_model, metric_value, start, wait_for_metric, wait_until

Request = service_pb2.ModelInferRequest
Tensor = service_pb2.ModelInferRequest.InferInputTensor


def _request(rid: str, model: str, x: np.ndarray, shape: list[int] | None = None) -> Request:
    return Request(
        model_name=model,
        id=rid,
        raw_input_contents=[x.tobytes()],
        inputs=[Tensor(name="x", datatype="FP32", shape=list(x.shape) if shape is None else shape)],
    )


def _mixed_requests() -> tuple[dict[str, Request], dict[str, np.ndarray]]:
    """120 requests: a quarter each of bad shapes, unknown models, bad byte counts, and valid ones."""
    requests: dict[str, Request] = {}
    valid: dict[str, np.ndarray] = {}
    for i in range(120):
        rid = f"r{i}"
        x = make_inputs("tiny", 1 + i % 3, seed=i)["x"]
        if i % 4 == 0:
            requests[rid] = _request(rid, "tiny", x[:, :15].copy())
        elif i % 4 == 1:
            requests[rid] = _request(rid, f"no-such-model-{i}", x)
        elif i % 4 == 2:
            requests[rid] = _request(rid, "tiny", x, shape=[x.shape[0] + 1, 16])
        else:
            requests[rid] = _request(rid, "tiny", x)
            valid[rid] = x
    return requests, valid


def test_stream_answers_every_request_with_its_id_and_errors_as_unary_calls_get_them(server):
    requests, valid = _mixed_requests()
    model = EXAMPLES / "tiny" / "1" / "model.onnx"
    with grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(2):  # the second round on a warm server: more requests in flight at once
            responses = list(stub.ModelStreamInfer(iter(requests.values()), timeout=60))
            assert sorted(r.infer_response.id for r in responses) == sorted(requests)
            for response in responses:
                rid = response.infer_response.id
                request = requests[rid]
                assert response.infer_response.model_name == request.model_name
                if rid in valid:
                    assert response.error_message == ""
                    want = reference_outputs("tiny", model, {"x": valid[rid]})["y"]
                    got = np.frombuffer(response.infer_response.raw_output_contents[0], np.float32)
                    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-6, atol=1e-6)
                else:
                    try:
                        stub.ModelInfer(request, timeout=30)
                        raise AssertionError(f"{rid} is valid")
                    except grpc.RpcError as err:
                        assert response.error_message == err.details() != ""


def test_stream_slow_request_does_not_hold_back_later_ones(server):
    slow_x = make_inputs("convnet", 64)["x"]
    tiny_x = make_inputs("tiny", 1)["x"]
    requests = [
        _request("slow", "convnet", slow_x),
        _request("bad", "tiny", tiny_x[:, :15].copy()),
        _request("fast", "tiny", tiny_x),
    ]
    with grpc.insecure_channel(
        server.url, options=[("grpc.max_send_message_length", 2**30), ("grpc.max_receive_message_length", 2**30)]
    ) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        ids = [r.infer_response.id for r in stub.ModelStreamInfer(iter(requests), timeout=60)]
    assert sorted(ids) == ["bad", "fast", "slow"]
    assert ids[-1] == "slow", ids


def test_cancelling_the_stream_cancels_its_requests_in_flight(tmp_path, example_repo):
    repo = tmp_path / "repo"
    copy_model(example_repo, "convnet", repo, "slow")
    with start(repo, ["--intra-op-threads", "1"]) as server, grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        x = make_inputs("convnet", 32)["x"]
        outgoing: queue.Queue = queue.Queue()
        call = stub.ModelStreamInfer(iter(outgoing.get, None), timeout=60)
        answers: list = []
        reader = threading.Thread(target=lambda: answers.extend(_drain(call)), daemon=True)
        reader.start()
        outgoing.put(_request("busy", "slow", x))
        wait_for_metric(server, "trtserve_pending_requests", 1, model="slow", version="1")  # the worker has it
        outgoing.put(_request("queued", "slow", x[:1].copy()))
        wait_for_metric(server, "trtserve_pending_requests", 2, model="slow", version="1")
        time.sleep(0.05)  # ...and this one waits behind it in the worker's queue
        call.cancel()
        outgoing.put(None)
        reader.join(30)
        assert answers == [grpc.StatusCode.CANCELLED]

        deadline = time.monotonic() + 10
        while metric_value(server, "trtserve_inference_requests_total", model="slow", status="CANCELLED") < 2:
            assert time.monotonic() < deadline, "the stream's requests were not cancelled"
            time.sleep(0.1)
        assert metric_value(server, "trtserve_pending_requests", model="slow") == 0
        # The queued request never ran: after one more request, two executions (busy, that one).
        stub.ModelInfer(_request("after", "slow", x[:1].copy()), timeout=60)

        def executions() -> int:  # they arrive with the worker's next stats report
            request = service_pb2.ModelStatisticsRequest(name="slow")
            return stub.ModelStatistics(request, timeout=30).model_stats[0].execution_count

        wait_until(lambda: executions() >= 2, 10, "two executions")
        time.sleep(0.3)  # one more report, in which an execution of the cancelled request would show
        assert executions() == 2


def _drain(call) -> list:
    """The stream's responses, then its final status code (only the code when it ends in error)."""
    try:
        return [r.infer_response.id for r in call]
    except grpc.RpcError as err:
        return [err.code()]


def test_an_answer_another_process_gave_as_a_message_goes_out_unary_and_streamed():
    """An extra frontend forwards a request it has no route for to the parent and gets a message back
    (not the bytes its own encoder writes): both RPCs send that too."""
    import asyncio

    from service.frontend.request_wire import service_handlers
    from service.frontend.servicer import SERVICE, InferRpcs
    from service.proto import inference_pb2 as pb

    class Forwarded(InferRpcs):
        async def _infer(self, parsed, timeout_s, stream=False):  # what ReplicaServicer returns then
            m = parsed.message
            return pb.ModelInferResponse(model_name=m.model_name, model_version="7", id=m.id)

    def call(port: int) -> tuple[list, object]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            streamed = list(stub.ModelStreamInfer(iter([Request(model_name="m", id=k) for k in "ab"]), timeout=10))
            return streamed, stub.ModelInfer(Request(model_name="m", id="c"), timeout=10)

    async def scenario() -> tuple[list, object]:
        rpcs = Forwarded(models=None, metrics=None)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([service_handlers(rpcs, SERVICE, rpcs.handlers())])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await asyncio.to_thread(call, port)
        finally:
            await server.stop(0)

    streamed, unary = asyncio.run(scenario())
    assert sorted((r.error_message, r.infer_response.id, r.infer_response.model_version) for r in streamed) == [
        ("", "a", "7"), ("", "b", "7")]
    assert (unary.id, unary.model_version) == ("c", "7")

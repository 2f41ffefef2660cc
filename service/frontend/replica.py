"""An extra frontend process: serves `ModelInfer` and `ModelStreamInfer` on the shared gRPC port over
its own connections to the workers, and forwards every other RPC to the parent.

Started by the parent (`--frontend-processes`), which feeds it routes over a control socket and
applies the request metrics it reports every 100 ms. It ignores SIGTERM and SIGINT: the parent stops
it (after which in-flight requests finish) before stopping the workers. A dead parent closes the
control socket, and the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
from pathlib import Path

import grpc

from service.errors import ServeError
from service.frontend.errors import ErrorInterceptor
from service.frontend.ports import bind_public_port, grpc_options
from service.frontend.proxy import ForwardingHandler
from service.frontend.request_wire import InferRequest
from service.frontend.routes import RequestRecorder, RouteTable
from service.frontend.servicer import InferRpcs
from service.memory.heap import keep_freed_heap
from service.proto import inference_pb2 as pb
from service.proto import inference_pb2_grpc
from service.settings import ServerSettings
from service.workers import protocol

log = logging.getLogger("trtserve.frontend")
REPORT_INTERVAL_S = 0.1


class ReplicaServicer(InferRpcs):
    """The infer RPCs over this process's routes; a model without a route here is the parent's to answer
    (loading, unknown, another version: its status and message are the parent's)."""

    def __init__(self, routes: RouteTable, recorder: RequestRecorder,
                 parent: inference_pb2_grpc.GRPCInferenceServiceStub) -> None:
        super().__init__(routes, recorder)
        self._routes = routes
        self._parent = parent

    async def _infer(self, request: InferRequest, timeout_s: float | None,
                     stream: bool = False) -> bytes | pb.ModelInferResponse:
        if self._routes.route(request.model_name, request.model_version) is not None:
            return await super()._infer(request, timeout_s, stream)
        try:
            return await self._parent.ModelInfer(request.whole(), timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            raise ServeError.from_wire({"code": err.code().name, "message": err.details() or ""}) from None


def main(settings: ServerSettings, grpc_port: int, internal_address: str, control: socket.socket, index: int,
         shm_wait_s: float) -> None:
    """Entry point of the spawned process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s frontend[{index}] %(message)s")
    keep_freed_heap(settings.heap_keep_bytes)
    asyncio.run(_serve(settings, grpc_port, internal_address, control, shm_wait_s))


async def _serve(settings: ServerSettings, grpc_port: int, internal_address: str, control: socket.socket,
                 shm_wait_s: float) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=control)
    options = grpc_options(settings)
    channel = grpc.aio.insecure_channel(internal_address, options=options)
    routes = RouteTable(settings.shm_bytes_per_model, shm_wait_s, settings.max_inflight_per_model)
    recorder = RequestRecorder()
    servicer = ReplicaServicer(routes, recorder, inference_pb2_grpc.GRPCInferenceServiceStub(channel))
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=options)
    server.add_generic_rpc_handlers([ForwardingHandler(channel, servicer.handlers())])
    bind_public_port(server, settings, grpc_port)
    await server.start()
    writer.write(protocol.framed({"op": "ready", "pid": os.getpid()}))
    reporter = asyncio.get_running_loop().create_task(_report(recorder, writer))
    grace = 0.0
    try:
        while True:
            header, payload = protocol.decode(await protocol.read_framed(reader))
            op = header.get("op")
            if op == "route":
                routes.set(pickle.loads(payload), Path(header["socket"]))
            elif op == "unroute":
                routes.remove(str(header["model"]))
            elif op == "stop":
                grace = float(header["grace_s"])
                break
            if "seq" in header:
                writer.write(protocol.framed({"op": "ack", "seq": header["seq"]}))
    except (asyncio.IncompleteReadError, ConnectionError):
        log.warning("the parent process is gone; stopping")
    await server.stop(grace)  # in-flight requests finish on their routes
    reporter.cancel()
    if report := recorder.drain():
        writer.write(protocol.framed(report))
    routes.close()
    await channel.close()
    try:
        await writer.drain()
    except ConnectionError:
        pass
    writer.close()


async def _report(recorder: RequestRecorder, writer: asyncio.StreamWriter) -> None:
    while True:
        await asyncio.sleep(REPORT_INTERVAL_S)
        if report := recorder.drain():
            writer.write(protocol.framed(report))

"""The floor for Python gRPC on this machine: a bare grpc.aio server that answers ModelInfer with a constant.

    .venv/bin/python -m bench.floor_server [--host 127.0.0.1] [--port 0]

It implements only `inference.GRPCInferenceService/ModelInfer` and `ModelStreamInfer` through generic
handlers with raw bytes in and out: requests are never parsed, and the answer is a ModelInferResponse
serialized once at start, the same bytes trtserve returns for `tiny` at batch 1 with no request id
(model "tiny", version "1", output `y` FP32 [1,16], 64 raw bytes). Whatever a request costs here is the
cost of grpc.aio itself, so trtserve's requests/s divided by this server's is the share of the Python
gRPC ceiling that trtserve keeps. It runs as its own process, like trtserve, and prints
`floor listening: HOST:PORT` once it serves.

Three switches add back, one at a time, costs trtserve has and the floor does not, so the gap can be
taken apart (bench.hotpath's ladder): `--parse` parses every request and serializes the response
with protobuf (the generated servicer's (de)serializers), `--interceptor` installs trtserve's
`ErrorInterceptor`, and `--hop` makes every request wait for one round trip of 72 bytes to an echo
process over a socketpair (the event-loop side like trtserve's supervisor, the echo side a blocking
`multiprocessing.Connection` like its worker): the least a process-per-model design costs.
Its malloc keeps freed heap as trtserve's frontend does (`--heap-keep-bytes`, same default), so large
requests cost both the same page faults.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import signal
import socket
import struct
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection

import grpc
import numpy as np

from service.memory.heap import keep_freed_heap
from service.proto import inference_pb2
from service.settings import ServerSettings

SERVICE = "inference.GRPCInferenceService"
_LEN = struct.Struct("!i")  # multiprocessing.Connection's frame length prefix
_ID = struct.Struct("<Q")


def _echo(conn: Connection) -> None:
    while True:
        try:
            frame = conn.recv_bytes()
        except (EOFError, OSError):
            return
        conn.send_bytes(frame)


class EchoHop:
    """One round trip per call to an echo process: what handing a request to a worker process costs at least."""

    async def start(self) -> None:
        parent, child = socket.socketpair()
        conn = Connection(child.detach())
        self.process = multiprocessing.get_context("spawn").Process(target=_echo, args=(conn,), daemon=True)
        self.process.start()
        conn.close()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=parent)
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._ids = itertools.count()
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def round_trip(self, payload: bytes) -> bytes:
        request_id = next(self._ids)
        future = self._pending[request_id] = asyncio.get_running_loop().create_future()
        body = _ID.pack(request_id) + payload
        self._writer.write(_LEN.pack(len(body)) + body)
        return await future

    async def _read(self) -> None:
        while True:
            (n,) = _LEN.unpack(await self._reader.readexactly(_LEN.size))
            body = await self._reader.readexactly(n)
            self._pending.pop(_ID.unpack_from(body)[0]).set_result(body[_ID.size:])

    def close(self) -> None:
        self._task.cancel()
        self._writer.close()
        self.process.join(5)


def constant_response(model: str = "tiny", version: str = "1", batch: int = 1) -> inference_pb2.ModelInferResponse:
    """What trtserve answers for `tiny` (y = x + c, FP32 [batch,16]) to a request without an id."""
    y = np.zeros((batch, 16), dtype=np.float32)
    out = inference_pb2.ModelInferResponse.InferOutputTensor(name="y", datatype="FP32", shape=list(y.shape))
    return inference_pb2.ModelInferResponse(model_name=model, model_version=version, outputs=[out],
                                            raw_output_contents=[y.tobytes()])


def handler(parse: bool = False, hop: EchoHop | None = None) -> grpc.GenericRpcHandler:
    """Generic handlers. Default: no (de)serializers, requests stay bytes and are never looked at, the
    answer is bytes serialized once. `parse`: protobuf parses each request and serializes each answer;
    `hop`: each request waits for one round trip to the echo process."""
    message = constant_response()
    stream_message = inference_pb2.ModelStreamInferResponse(infer_response=message)
    response, stream_response = message, stream_message
    codec: dict[str, object] = {}
    stream_codec: dict[str, object] = {}
    if parse:
        codec = {"request_deserializer": inference_pb2.ModelInferRequest.FromString,
                 "response_serializer": inference_pb2.ModelInferResponse.SerializeToString}
        stream_codec = {"request_deserializer": inference_pb2.ModelInferRequest.FromString,
                        "response_serializer": inference_pb2.ModelStreamInferResponse.SerializeToString}
    else:
        response, stream_response = message.SerializeToString(), stream_message.SerializeToString()

    data = bytes(64)

    async def model_infer(request: object, context: grpc.aio.ServicerContext) -> object:
        if hop is not None:
            await hop.round_trip(data)
        return response

    async def model_stream_infer(requests: AsyncIterator[object],
                                 context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
        async for _ in requests:
            if hop is not None:
                await hop.round_trip(data)
            yield stream_response

    return grpc.method_handlers_generic_handler(SERVICE, {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer, **codec),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(model_stream_infer, **stream_codec),
    })


async def serve(host: str, port: int, ready: asyncio.Future[int] | None = None, parse: bool = False,
                interceptor: bool = False, hop: bool = False) -> None:
    """Serve until SIGTERM/SIGINT (or cancellation); `ready` gets the bound port."""
    response = constant_response().SerializeToString()
    # The same message size limits as trtserve (64 MiB), so both run with the same channel arguments.
    limits = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    interceptors = []
    if interceptor:
        from service.frontend.errors import ErrorInterceptor

        interceptors.append(ErrorInterceptor())
    echo = None
    if hop:
        echo = EchoHop()
        await echo.start()
    server = grpc.aio.server(interceptors=interceptors, options=limits)
    server.add_generic_rpc_handlers((handler(parse, echo),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    await server.start()
    print(f"floor listening: {host}:{bound} (response {len(response)} bytes)", flush=True)
    if ready is not None:
        ready.set_result(bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop(1)
        if echo is not None:
            echo.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--parse", action="store_true", help="parse requests and serialize answers (protobuf)")
    parser.add_argument("--interceptor", action="store_true", help="install trtserve's ErrorInterceptor")
    parser.add_argument("--hop", action="store_true", help="one round trip to an echo process per request")
    parser.add_argument("--heap-keep-bytes", type=int, default=ServerSettings.heap_keep_bytes,
                        help="freed heap the process keeps, as trtserve's flag of that name (default: trtserve's)")
    args = parser.parse_args()
    keep_freed_heap(args.heap_keep_bytes)
    asyncio.run(serve(args.host, args.port, parse=args.parse, interceptor=args.interceptor, hop=args.hop))


if __name__ == "__main__":
    main()

"""Forwards gRPC calls, as raw bytes, from an extra frontend process to the parent's internal port.

An extra frontend answers `ModelInfer` and `ModelStreamInfer` itself; everything else (health, model
control, metadata, statistics, reflection, unknown methods) is answered by the parent, which owns
that state, so every frontend process gives the same answers. Nothing is parsed on the way through.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

# Methods whose calls stream; everything else is forwarded as unary (an unknown method gets the
# parent's UNIMPLEMENTED).
_UNARY_STREAM = {"/grpc.health.v1.Health/Watch"}
_STREAM_STREAM = {"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                  "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"}
# Connection-level headers gRPC sets itself; forwarding them would be refused.
_HOP_HEADERS = {"user-agent", "grpc-timeout", "grpc-accept-encoding", "grpc-encoding", "te", "content-type"}


def _metadata(context: grpc.aio.ServicerContext) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in (context.invocation_metadata() or ()) if k not in _HOP_HEADERS
                 and not k.startswith(":"))


async def _abort(context: grpc.aio.ServicerContext, err: grpc.aio.AioRpcError) -> None:
    await context.abort(err.code(), err.details() or "")


class ForwardingHandler(grpc.GenericRpcHandler):
    """Serves `local` handlers by method name and forwards every other method to `channel`."""

    def __init__(self, channel: grpc.aio.Channel, local: dict[str, grpc.RpcMethodHandler]) -> None:
        self._channel = channel
        self._local = local

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        if method in self._local:
            return self._local[method]
        if method in _UNARY_STREAM:
            return grpc.unary_stream_rpc_method_handler(self._streaming(self._channel.unary_stream(method)))
        if method in _STREAM_STREAM:
            return grpc.stream_stream_rpc_method_handler(self._streaming(self._channel.stream_stream(method)))
        return grpc.unary_unary_rpc_method_handler(self._unary(method))

    def _unary(self, method: str) -> Any:
        call = self._channel.unary_unary(method)

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                return await call(request, timeout=context.time_remaining(), metadata=_metadata(context))
            except grpc.aio.AioRpcError as err:
                await _abort(context, err)

        return forward

    def _streaming(self, call: Any) -> Any:
        """Forward a call whose answers stream; its first argument is one request or the request stream."""

        async def forward(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            try:
                async for response in call(request, timeout=context.time_remaining(), metadata=_metadata(context)):
                    yield response
            except grpc.aio.AioRpcError as err:
                await _abort(context, err)

        return forward

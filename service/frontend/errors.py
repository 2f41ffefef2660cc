"""One interceptor maps trtserve's typed errors to gRPC statuses, for every unary RPC."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from service.errors import ServeError

log = logging.getLogger("trtserve.frontend")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message a client sees for an exception."""
    if isinstance(exc, ServeError):
        return grpc.StatusCode[exc.code], exc.message
    log.exception("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` (unary-unary) with a ServeError or other exception turned into `context.abort(code, message)`."""
    behaviour = handler.unary_unary

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(request, context)
        except ServeError as exc:
            await context.abort(*status_of(exc))
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as exc:
            await context.abort(*status_of(exc))

    return grpc.unary_unary_rpc_method_handler(
        guarded,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns a ServeError raised by a unary handler into `context.abort(code, message)`.

    Each method's handler is wrapped once: the wrapped one is kept per method name, with the handler it
    wraps, and used while the server resolves the name to that same handler (a generic handler that
    makes a new one per call, like the replicas' forwarding, gets a new wrapper per call). Names come
    from clients, so the cache is emptied when it reaches `_MAX_METHODS` entries."""

    _MAX_METHODS = 256

    def __init__(self) -> None:
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        cached = self._guarded.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = _guard(handler)
        if len(self._guarded) >= self._MAX_METHODS:
            self._guarded.clear()
        self._guarded[details.method] = (handler, guarded)
        return guarded

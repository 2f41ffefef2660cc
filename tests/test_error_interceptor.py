"""ErrorInterceptor on a real in-process grpc.aio server: typed errors become their status on every call,
each method is wrapped once, and the wrappers it keeps stay bounded whatever method names clients send."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from service.errors import InvalidArgument, NotFound
from service.frontend.errors import ErrorInterceptor

SERVICE = "test.Errors"


async def _ok(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"ok:" + request


async def _not_found(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise NotFound(f"no such thing: {request.decode()}")


async def _broken(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise RuntimeError("boom")


class _AnyMethod(grpc.GenericRpcHandler):
    """Resolves every other name, with a new handler per call (as the extra frontends' forwarding does)."""

    def __init__(self) -> None:
        self.resolved = 0

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        self.resolved += 1
        number = self.resolved

        async def invalid(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            raise InvalidArgument(f"bad call {number} of {details.method}")

        return grpc.unary_unary_rpc_method_handler(invalid)


async def _scenario() -> None:
    interceptor = ErrorInterceptor()
    server = grpc.aio.server(interceptors=[interceptor])
    any_method = _AnyMethod()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Ok": grpc.unary_unary_rpc_method_handler(_ok),
                    "NotFound": grpc.unary_unary_rpc_method_handler(_not_found),
                    "Broken": grpc.unary_unary_rpc_method_handler(_broken),
                },
            ),
            any_method,
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:

            def call(method: str):
                return channel.unary_unary(f"/{SERVICE}/{method}")

            for round_ in range(3):
                assert await call("Ok")(b"%d" % round_) == b"ok:%d" % round_
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call("NotFound")(b"x%d" % round_)
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
                assert caught.value.details() == f"no such thing: x{round_}"
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call("Broken")(b"")
                assert caught.value.code() == grpc.StatusCode.INTERNAL
                assert caught.value.details() == "internal error: RuntimeError: boom"
            # one wrapper per method, reused on every later call
            kept = {m: interceptor._guarded[f"/{SERVICE}/{m}"] for m in ("Ok", "NotFound", "Broken")}
            assert await call("Ok")(b"again") == b"ok:again"
            assert interceptor._guarded[f"/{SERVICE}/Ok"] is kept["Ok"]

            # a handler made per call is wrapped per call, and any number of names keeps the cache bounded
            for i in range(ErrorInterceptor._MAX_METHODS + 40):
                name = f"Other{i % 3 if i < 9 else i}"
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(name)(b"")
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert caught.value.details() == f"bad call {any_method.resolved} of /{SERVICE}/{name}"
                assert len(interceptor._guarded) <= ErrorInterceptor._MAX_METHODS
            assert await call("Ok")(b"still") == b"ok:still"
    finally:
        await server.stop(None)


def test_error_interceptor_maps_errors_and_wraps_each_method_once():
    asyncio.run(_scenario())

"""The GRPCInferenceService servicer: each RPC is decode -> call the model manager -> encode."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc
from google.protobuf import json_format

from service import __version__
from service.errors import ServeError
from service.frontend import codec
from service.frontend.errors import status_of
from service.frontend.health import Health
from service.frontend.request_wire import InferRequest, parse_infer_request
from service.frontend.response_wire import serialize
from service.frontend.templates import RequestTemplates
from service.metrics import ServerMetrics
from service.proto import inference_pb2 as pb
from service.proto import inference_pb2_grpc
from service.settings import ServerSettings
from service.workers.manager import ModelManager, require_explicit

Context = grpc.aio.ServicerContext
SERVICE = "inference.GRPCInferenceService"
EXTENSIONS = ["model_repository", "model_repository(unload_dependents)", "statistics", "model_configuration"]


class Models(Protocol):
    """Where inference requests go: `get` returns what serves a model (`.spec`, `async infer(...)`)."""

    def get(self, name: str, version: str = "") -> Any: ...


class RequestMetrics(Protocol):
    """The two per-request events the infer RPCs report (ServerMetrics, or an extra frontend's recorder)."""

    def observe_request(self, model: str, version: int | str, status: str, seconds: float, rows: int) -> Any: ...

    def add_pending(self, model: str, version: int | str, delta: int) -> None: ...


class InferRpcs(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """`ModelInfer` and `ModelStreamInfer`: decode, run on the model's worker, encode. Every frontend
    process serves these itself."""

    def __init__(self, models: Models, metrics: RequestMetrics) -> None:
        self._models = models
        self._metrics = metrics
        self._plans = codec.RequestPlans()
        self._templates = RequestTemplates()

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The two RPCs' handlers by full method name; requests arrive as `InferRequest`s (their tensor
        bytes not copied out of the received message), answers leave as the bytes `ResponseEncoder` wrote."""
        return {
            f"/{SERVICE}/ModelInfer": grpc.unary_unary_rpc_method_handler(
                self.ModelInfer, request_deserializer=parse_infer_request, response_serializer=serialize),
            f"/{SERVICE}/ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self.ModelStreamInfer, request_deserializer=parse_infer_request, response_serializer=serialize),
        }

    async def ModelInfer(self, request: InferRequest, context: Context) -> bytes | pb.ModelInferResponse:
        return await self._infer(request, context.time_remaining())

    async def ModelStreamInfer(self, requests: AsyncIterator[InferRequest], context: Context) -> None:
        """Requests run concurrently, each in its own task, which writes its response when it is done
        (echoing the request id; an error goes back in-stream and the stream stays open). Returns once
        every response is written; cancelling the call cancels the requests in flight."""
        responses = _Responses(context)
        handler = asyncio.current_task()
        tasks: set[asyncio.Task[None]] = set()
        broken: list[Exception] = []

        async def one(request: InferRequest) -> None:
            task = asyncio.current_task()
            try:
                try:
                    response = await self._infer(request, None, stream=True)
                    if not isinstance(response, bytes):  # another process's answer, as a message
                        response = pb.ModelStreamInferResponse(infer_response=response)
                except Exception as exc:
                    _, message = status_of(exc)
                    response = pb.ModelStreamInferResponse(
                        error_message=message, infer_response=pb.ModelInferResponse(
                            model_name=request.model_name, model_version=request.model_version, id=request.id))
                await responses.send(response)
            except Exception as exc:  # the call is broken: it ends with this error, as a write in the handler would
                if not broken and handler is not None:
                    broken.append(exc)
                    handler.cancel()
            finally:
                tasks.discard(task)  # type: ignore[arg-type]

        try:
            async for request in requests:
                task = asyncio.create_task(one(request))
                tasks.add(task)
            if tasks:
                await asyncio.wait(tasks)
        except asyncio.CancelledError:
            if broken:
                raise broken[0] from None
            raise
        finally:
            for task in tasks:
                task.cancel()

    async def _infer(self, parsed: InferRequest, timeout_s: float | None,
                     stream: bool = False) -> bytes | pb.ModelInferResponse:
        """Run one request; its answer serialized (for a stream: a ModelStreamInferResponse), or a message
        another process answered with."""
        started = time.perf_counter()
        handle = self._models.get(parsed.model_name, parsed.model_version)  # before any metric label
        spec = handle.spec
        rows = 0
        status = "OK"
        try:
            plan = self._plans.get(spec)
            inputs, output_names = self._templates.decode(parsed, plan)
            rows = inputs[0].shape[0] if spec.max_batch_size > 0 and inputs else 1
            self._metrics.add_pending(spec.name, spec.version, 1)
            try:
                outputs = await handle.infer(inputs, output_names, timeout_s)
            finally:
                self._metrics.add_pending(spec.name, spec.version, -1)
            return plan.response.encode(parsed.id, outputs, stream)
        except ServeError as exc:
            status = exc.code
            raise
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            self._metrics.observe_request(spec.name, str(spec.version), status,
                                          time.perf_counter() - started, rows)


class InferenceServicer(InferRpcs):
    """KServe v2 / Triton gRPC API over the model manager (the parent process)."""

    def __init__(self, manager: ModelManager, metrics: ServerMetrics, health: Health,
                 settings: ServerSettings) -> None:
        super().__init__(manager, metrics)
        self._health = health
        self._settings = settings

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=not self._health.shutting_down and self._models.all_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._models.is_ready(request.name, request.version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="trtserve", version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: Context) -> pb.ModelMetadataResponse:
        spec = self._models.spec(request.name, request.version)
        inputs, outputs = codec.tensor_metadata(spec)
        return pb.ModelMetadataResponse(name=spec.name, versions=[str(spec.version)],
                                        platform=spec.config.platform,
                                        inputs=inputs, outputs=outputs)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self._models.spec(request.name, request.version).config)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              context: Context) -> pb.ModelStatisticsResponse:
        handles = ([self._models.get(request.name, request.version)] if request.name else self._models.loaded())
        return pb.ModelStatisticsResponse(model_stats=[
            _statistics(self._metrics.statistics(h.spec.name, str(h.spec.version))) for h in handles
        ])

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: Context) -> pb.RepositoryIndexResponse:
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=s.name, version=s.version, state=s.state, reason=s.reason)
            for s in self._models.index(ready_only=request.ready)
        ])

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: Context) -> pb.RepositoryModelLoadResponse:
        require_explicit(self._settings.model_control_mode)
        await self._models.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: Context) -> pb.RepositoryModelUnloadResponse:
        require_explicit(self._settings.model_control_mode)
        await self._models.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


class _Responses:
    """A stream's responses, written one at a time (gRPC takes one write at a time per call) by the
    request task that finished first: responses that finish during a write are written by the task
    that holds it, in order, so no task waits on a lock of its own."""

    __slots__ = ("_context", "_pending", "_writing")

    def __init__(self, context: Context) -> None:
        self._context = context
        self._pending: deque[bytes | pb.ModelStreamInferResponse] = deque()
        self._writing = False

    async def send(self, response: bytes | pb.ModelStreamInferResponse) -> None:
        """Write `response`, or leave it to the write in progress, which writes it next."""
        self._pending.append(response)
        if self._writing:
            return
        self._writing = True
        try:
            while self._pending:
                await self._context.write(self._pending.popleft())
        finally:
            self._writing = False


def _statistics(stats: dict) -> pb.ModelStatistics:
    """ModelStatistics from the metrics accumulator's plain dict."""
    return json_format.ParseDict(stats, pb.ModelStatistics(), ignore_unknown_fields=True)

"""Requests checked once per head: what a request still needs checked when its head was seen before.

A request's head (`request_wire.InferRequest.head`: every field but its id and tensor bytes) decides all
of `codec.decode_request`'s checks but one for a model whose inputs are all of fixed-size datatypes other
than BOOL: names, datatypes, shapes, batch sizes and requested outputs are in the head, and only each raw
input's byte count depends on the request. So once a head passed, a request with the same head for the
same model spec needs only its byte counts compared, and neither protobuf's parse nor the checks run
again (about half of the frontend's own Python per `tiny` request: bench/results/frontend_steps.md).
Anything else (a byte count that differs, another spec after a reload, typed contents, BOOL or BYTES
inputs, inputs out of config order) goes through `decode_request`, which also names what is wrong.
"""

from __future__ import annotations

from service.frontend.codec import RequestPlan, decode_request
from service.frontend.request_wire import InferRequest
from service.repository import ModelSpec
from service.tensors import WireTensor

_MAX_HEAD_BYTES = 4096  # heads carrying large parameters are not kept


class RequestTemplate:
    """A head the model's checks accepted: its inputs' names, datatypes, shapes and byte counts in config
    order, and the outputs it asked for."""

    __slots__ = ("inputs", "output_names", "spec")

    def __init__(self, spec: ModelSpec, inputs: list[tuple[str, str, tuple[int, ...], int]],
                 output_names: list[str]) -> None:
        self.spec = spec
        self.inputs = inputs
        self.output_names = output_names

    def decode(self, raw: list[memoryview]) -> list[WireTensor] | None:
        """The inputs of a request with this head and these raw contents; None when a byte count differs."""
        if len(raw) != len(self.inputs):
            return None
        decoded = []
        for (name, datatype, shape, nbytes), data in zip(self.inputs, raw):
            if len(data) != nbytes:  # views of the received bytes: len counts bytes
                return None
            decoded.append(WireTensor(name, datatype, shape, data))
        return decoded


class RequestTemplates:
    """The templates of the heads seen by one servicer; at most `limit` kept (emptied when full: heads
    come from clients)."""

    def __init__(self, limit: int = 1024) -> None:
        self._templates: dict[bytes, RequestTemplate] = {}
        self._limit = limit

    def decode(self, request: InferRequest, plan: RequestPlan) -> tuple[list[WireTensor], list[str]]:
        """`codec.decode_request`'s answer for `request` to the model of `plan`: from its head's template
        when there is one for this spec, else the long way (whose head is then kept when it may be)."""
        decoded = self.lookup(request, plan.spec)
        if decoded is None:
            decoded = decode_request(request.message, plan.spec, request.raw, plan)
            self._learn(request, plan, *decoded)
        return decoded

    def lookup(self, request: InferRequest, spec: ModelSpec) -> tuple[list[WireTensor], list[str]] | None:
        """(inputs, output names) of a request whose head passed before for this very spec, or None."""
        template = self._templates.get(request.head)
        if template is None or template.spec is not spec or request.raw is None:
            return None
        inputs = template.decode(request.raw)
        return None if inputs is None else (inputs, template.output_names)

    def _learn(self, request: InferRequest, plan: RequestPlan, inputs: list[WireTensor],
               output_names: list[str]) -> None:
        """Keep the head of a request that `decode_request` accepted, when its head decides every check
        but the byte counts: all inputs raw, fixed-size and not BOOL, in config order."""
        head, raw = request.head, request.raw
        if (raw is None or not plan.fixed_only or len(head) > _MAX_HEAD_BYTES or len(raw) != len(inputs)
                or any(t.data is not r for t, r in zip(inputs, raw))):
            return
        if len(self._templates) >= self._limit:
            self._templates.clear()
        self._templates[head] = RequestTemplate(
            plan.spec, [(t.name, t.datatype, t.shape, len(r)) for t, r in zip(inputs, raw)], output_names)

    def __len__(self) -> int:
        return len(self._templates)

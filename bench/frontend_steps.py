"""The frontend's side of a `tiny` request, step by step: event-loop CPU per request, without gRPC.

    .venv/bin/python -m bench.frontend_steps [--requests 2000] [--rounds 21] [--inflight 8] [--out DIR]

A real `tiny` worker process serves every step; what is timed is the CPU time of the event loop's thread
(`time.thread_time`) per request while `--inflight` coroutines each send their next request when the
previous one returned. Each row adds one step to the row above it, so the differences between rows are
what each step costs where it runs, with the caches that the rest of a request leaves behind (a step
timed alone in a `timeit` loop, `bench.hotpath` part 1, costs a third to a half of that). The machine is
shared and a row's time moves by 10-20% from one second to the next, so the rows run in short rounds, in a
shuffled order each round, and a step's cost is the median over the rounds of the difference between its row
and the row it adds to in the same round (with the middle half of those differences, to show the spread).

1. the round trip to the worker (`WorkerHandle.infer` with inputs made once)
2. + reading the request's bytes (`parse_infer_request`) and finding the model (`ModelManager.get`)
3a. + checking the request the long way: protobuf parses its head, `codec.decode_request` checks it (what the
    first request of a head costs, and every request before session 11)
3b. + checking it against its head's template instead (`templates.RequestTemplates`: the requests after it)
4. + writing the answer's bytes (`ResponseEncoder.encode`), on top of 3b
5. all of `ModelInfer`'s handler, which adds the request metrics (and the few steps around them)

Writes bench/results/frontend_steps.md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from service.frontend import codec
from service.frontend.request_wire import InferRequest, parse_infer_request
from service.frontend.servicer import InferRpcs
from service.frontend.templates import RequestTemplates
from service.metrics import ServerMetrics
from service.proto import inference_pb2 as pb
from service.repository import ModelRepository
from service.tensors import WireTensor
from service.workers.manager import ModelManager
from service.workers.supervisor import SupervisorSettings, WorkerHandle
from service.workers.worker import WorkerOptions
from tests.server import EXAMPLES, ROOT

RESULTS = ROOT / "bench" / "results"


class _NoDeadline:
    """The one thing `ModelInfer` asks of its gRPC context: the client's deadline (none here)."""

    def time_remaining(self) -> None:
        return None


def _request() -> bytes:
    x = np.random.default_rng(0).standard_normal((1, 16), dtype=np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 16])
    return pb.ModelInferRequest(model_name="tiny", id="1", inputs=[tensor],
                                raw_input_contents=[x.tobytes()]).SerializeToString()


def _steps(manager: ModelManager, metrics: ServerMetrics) -> list[tuple[str, str, Callable[[], Awaitable[object]]]]:
    """(name, the row it adds to, one request) for each row."""
    data = _request()
    handle = manager.get("tiny")
    plans, templates = codec.RequestPlans(), RequestTemplates()
    made = [WireTensor("x", "FP32", (1, 16), bytes(parse_infer_request(data).raw[0]))]
    rpcs, context = InferRpcs(manager, metrics), _NoDeadline()

    def read() -> tuple[InferRequest, WorkerHandle]:
        parsed = parse_infer_request(data)
        return parsed, manager.get(parsed.model_name, parsed.model_version)

    async def hop() -> object:
        return await handle.infer(made, ["y"])

    async def parse() -> object:
        return await read()[1].infer(made, ["y"])

    async def protobuf() -> object:
        parsed, h = read()
        return await h.infer(*codec.decode_request(parsed.message, h.spec, parsed.raw, plans.get(h.spec)))

    async def template() -> object:
        parsed, h = read()
        return await h.infer(*templates.decode(parsed, plans.get(h.spec)))

    async def encode() -> object:
        parsed, h = read()
        plan = plans.get(h.spec)
        return plan.response.encode(parsed.id, await h.infer(*templates.decode(parsed, plan)))

    async def handler() -> object:
        return await rpcs.ModelInfer(parse_infer_request(data), context)  # type: ignore[arg-type]

    hop_, read_, kept = "1. round trip to the worker", "2. + read the request, find the model", \
        "3b. + check it against the head's template"
    written = "4. + write the answer (encode)"
    return [(hop_, "", hop), (read_, hop_, parse),
            ("3a. + check it: protobuf's parse and decode_request", read_, protobuf),
            (kept, read_, template), (written, kept, encode),
            ("5. ModelInfer's handler (+ request metrics)", written, handler)]


async def _cpu_per_request(step: Callable[[], Awaitable[object]], requests: int, inflight: int) -> float:
    async def client(n: int) -> None:
        for _ in range(n):
            await step()

    await asyncio.gather(*(client(50) for _ in range(inflight)))  # warm
    started = time.thread_time()
    await asyncio.gather(*(client(requests // inflight) for _ in range(inflight)))
    return (time.thread_time() - started) / (requests // inflight * inflight) * 1e6


async def measure(requests: int, rounds: int, inflight: int) -> list[tuple[str, str, list[float]]]:
    """(row, the row it adds to, µs of event-loop CPU per request in each round) for each row."""
    metrics = ServerMetrics()
    manager = ModelManager(ModelRepository(EXAMPLES), WorkerOptions(intra_op_threads=1), SupervisorSettings(),
                           metrics)
    try:
        await manager.load("tiny")
        steps = _steps(manager, metrics)
        results: dict[str, list[float]] = {name: [] for name, _, _ in steps}
        order, shuffle = list(steps), random.Random(0).shuffle
        for _ in range(rounds):
            shuffle(order)
            for name, _, step in order:
                results[name].append(await _cpu_per_request(step, requests, inflight))
        return [(name, base, results[name]) for name, base, _ in steps]
    finally:
        await manager.close()


def markdown(rows: list[tuple[str, str, list[float]]], command: str, inflight: int) -> str:
    lines = ["# The frontend's side of a request, step by step", "",
             f"`{command}`: CPU time of the event loop's thread per `tiny` batch-1 request, {inflight} in flight, "
             "a real worker process, rows in a shuffled order each round. Each row adds one step to the row named "
             "by its number (3a and 3b to row 2, 4 to 3b); `step` is the median over the rounds of the difference "
             "between the two rows in the same round, then the middle half of those differences.", "",
             "| | median µs | step µs | step's middle half µs |", "|---|---|---|---|"]
    values = {name: v for name, _, v in rows}
    for name, base, row in rows:
        steps = sorted(a - b for a, b in zip(row, values.get(base, [0.0] * len(row))))
        q1, _, q3 = statistics.quantiles(steps, n=4) if len(steps) > 1 else (steps[0],) * 3
        lines.append(f"| {name} | {statistics.median(row):.1f} | {statistics.median(steps):+.1f} "
                     f"| {q1:+.1f} .. {q3:+.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per row and round")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for frontend_steps.md")
    args = parser.parse_args()
    rows = asyncio.run(measure(args.requests, args.rounds, args.inflight))
    command = (f".venv/bin/python -m bench.frontend_steps --requests {args.requests} --rounds {args.rounds} "
               f"--inflight {args.inflight}")
    text = markdown(rows, command, args.inflight)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontend_steps.md").write_text(text)


if __name__ == "__main__":
    main()

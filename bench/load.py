"""A closed-loop load generator: N threads, each with its own tritonclient.grpc client and TCP connection
(like N client machines: the kernel spreads connections, not requests, over several frontend
processes), for a fixed time.

The load generator shares the machine with the server it measures, so it keeps freed heap for its next
requests as trtserve's frontends do (`service/memory/heap.py`): with glibc's defaults every large request
is serialized into freshly mapped pages, and the load generator spent 1.5-1.8 ms of CPU per 512 KiB request
instead of 0.9-1.0 ms (bench/results/large_requests.md, 2 cores), CPU the server's processes then lacked:
on the 16-core GPU machine (a) of bench.gpu was 75-80% of the engine alone instead of 93-101%
(bench/results/gpu/runs/44).

Used by the benchmarks; prints and returns requests/s and latency percentiles.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient

from service.memory.heap import keep_freed_heap
from service.settings import ServerSettings
from tests.server import separate_client

CLIENT_HEAP_KEEP_BYTES = ServerSettings.heap_keep_bytes  # as trtserve's frontends keep by default


@dataclass
class LoadResult:
    clients: int
    requests: int
    errors: int
    seconds: float
    latencies_s: np.ndarray

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if len(self.latencies_s) else float("nan")


def run_load(url: str, model: str, inputs: dict[str, np.ndarray], clients: int, seconds: float,
             datatypes: dict[str, str], stream: bool = False, warmup_s: float = 0.5,
             heap_keep_bytes: int = CLIENT_HEAP_KEEP_BYTES) -> LoadResult:
    """Send `inputs` to `model` from `clients` threads for `seconds` (after a warm-up); count what came back.
    This process keeps up to `heap_keep_bytes` of freed heap from then on (0: glibc's defaults stay)."""
    keep_freed_heap(heap_keep_bytes)
    stop_at = time.monotonic() + warmup_s + seconds
    measure_from = time.monotonic() + warmup_s
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients

    def worker(i: int) -> None:
        client = separate_client(url)
        reqs = []
        for name, array in inputs.items():
            inp = grpcclient.InferInput(name, list(array.shape), datatypes[name])
            inp.set_data_from_numpy(array)
            reqs.append(inp)
        done = threading.Event()
        box: list[object] = []
        if stream:
            client.start_stream(callback=lambda result, error: (box.append(error), done.set()))
        try:
            while (now := time.monotonic()) < stop_at:
                try:
                    if stream:
                        done.clear()
                        box.clear()
                        client.async_stream_infer(model, reqs)
                        done.wait(30)
                        if box and box[0] is not None:
                            raise RuntimeError(box[0])
                    else:
                        client.infer(model, reqs)
                    if now >= measure_from:
                        latencies[i].append(time.monotonic() - now)
                except Exception:  # counted, not raised: a benchmark reports errors
                    if now >= measure_from:
                        errors[i] += 1
        finally:
            if stream:
                client.stop_stream()
            client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = np.array([x for per in latencies for x in per])
    return LoadResult(clients, len(lat), sum(errors), seconds, lat)


def _load_process(args: tuple) -> tuple[list[float], int]:
    url, model, inputs, clients, seconds, datatypes, stream, heap_keep_bytes = args
    r = run_load(url, model, inputs, clients, seconds, datatypes, stream, heap_keep_bytes=heap_keep_bytes)
    return list(r.latencies_s), r.errors


def run_load_processes(url: str, model: str, inputs: dict[str, np.ndarray], clients: int, seconds: float,
                       datatypes: dict[str, str], processes: int, stream: bool = False,
                       heap_keep_bytes: int = CLIENT_HEAP_KEEP_BYTES) -> LoadResult:
    """The same closed loop spread over `processes` client processes, so the client's own GIL is not the
    bottleneck when the server has many cores."""
    import multiprocessing

    per = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        parts = pool.map(_load_process, [(url, model, inputs, n, seconds, datatypes, stream, heap_keep_bytes)
                                          for n in per if n])
    lat = np.array([x for latencies, _ in parts for x in latencies])
    return LoadResult(clients, len(lat), sum(e for _, e in parts), seconds, lat)

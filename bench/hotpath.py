"""Where a `tiny` batch-1 request spends CPU in trtserve: per-step timings plus a py-spy profile under load.

    .venv/bin/python -m bench.hotpath [--no-spy] [--seconds 10]

Part 1 times each Python step of the request path in isolation (best of 5 `timeit` repeats, µs per call),
with the real modules and the `tiny` model: the parts a profile under load smears together. Part 2 runs
trtserve with 8 closed-loop unary clients (as bench.overhead does) and samples the frontend and the
worker with `py-spy record` (needs py-spy in .venv and ptrace rights, e.g. root), then sorts the
non-idle samples of each process into categories. Raw collapsed stacks go to bench/results/profile/.
Part 3 (the ladder) measures the floor server with trtserve's costs added one at a time (protobuf
parse/serialize, the error interceptor, a round trip to another process), then trtserve, under the
same load, with unary calls and then with streams. Writes
bench/results/hotpath.md; the reading of it is bench/results/profile.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import subprocess
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

from tests.server import EXAMPLES, ROOT, start

RESULTS = ROOT / "bench" / "results"
PYSPY = Path(sys.executable).parent / "py-spy"
# Leaf frames that mean "waiting", not working (py-spy's own idle detection misses blocking pipe reads).
IDLE_LEAVES = ("select (selectors.py", "poll (", "epoll_wait", "Condition.wait", "Connection._recv (",
               "wait (multiprocessing/connection.py", "serve_forever", "_wait_for_tstate_lock")
# (category, frame substrings): the first category with a substring anywhere in a stack names the stack.
CATEGORIES = {
    "frontend": [
        ("worker stats -> Prometheus (apply_worker_stats)", ("apply_worker_stats",)),
        ("request metrics (add_pending, observe_request)", ("service/metrics.py",)),
        ("codec.decode_request", ("decode_request",)),
        ("response encoding (response_wire)", ("response_wire.py",)),
        ("IPC: frame encode/decode, socket/pipe read and write",
         ("service/workers/protocol.py", "asyncio/streams.py", "selector_events.py", "multiprocessing/connection.py")),
        ("servicer, interceptor, supervisor, arena (rest of trtserve's Python)",
         ("servicer.py", "frontend/errors.py", "supervisor.py", "shm.py", "manager.py")),
        ("grpc.aio + asyncio (C core, protobuf, event loop)", ("",)),
    ],
    "worker": [
        ("stats: record, gauges, JSON report", ("WorkerStats", "refresh_gauges")),
        ("ONNX Runtime via IOBinding (engine.run_into)", ("run_into (service/engines/onnxruntime_backend",)),
        ("engine registry (choose, acquire, release)", ("service/engines/registry.py",)),
        ("buffer pool + gather/scatter (runtime.run)", ("service/workers/runtime.py",)),
        ("reply: outputs to shm + JSON header + pipe write", ("reply (service/workers/batches.py",)),
        ("receive: socket read, JSON decode, to_array, batcher submit", ("_dispatch", "_submit", "connections.py")),
        ("batcher.next_batch", ("batcher.py",)),
        ("compute loop and the rest", ("",)),
    ],
}


REPORT_BATCHES = 70


def _time(fn: Callable[[], object], number: int = 3000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def micro() -> list[tuple[str, str, float]]:
    """(process, step, µs per call) for the steps of one tiny batch-1 request."""
    from service.frontend import codec
    from service.frontend.request_wire import parse_infer_request
    from service.frontend.templates import RequestTemplates
    from service.metrics import ServerMetrics, WorkerStats
    from service.proto import inference_pb2 as pb
    from service.repository import ModelRepository
    from service.tensors import WireTensor, to_array
    from service.workers import protocol
    from service.workers import batches
    from service.workers.runtime import Item, ModelRuntime
    from service.workers.worker import WorkerOptions

    spec = ModelRepository(EXAMPLES).load_spec("tiny")
    x = np.random.default_rng(0).standard_normal((1, 16), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="tiny", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[1, 16])], raw_input_contents=[x.tobytes()])
    wire = request.SerializeToString()
    outputs = [WireTensor("y", "FP32", (1, 16), x.tobytes())]
    metrics = ServerMetrics()
    metrics.register_model("tiny", 1)
    frames = protocol.FrameCodec(spec)

    def infer_frame() -> bytes:
        return frames.encode_infer(1234, [("x", "FP32", (1, 16), 0, 64)], ["y"], 64, 64, None)

    infer_body = infer_frame()[4:]  # as the worker receives it (length prefix split off)
    result_body = frames.encode_result(1234, [(0, (1, 16), 64, 64, False)])[4:]
    # A worker report as it comes under load: the executed batches of 100 ms (70 at 700 batches/s), aggregated.
    stats = WorkerStats()
    stats.set_engines(1, 1, 0)
    stats.set_pool({"host": 128, "pinned": 0, "device": 0}, 0)

    def worker_report() -> bytes:
        for _ in range(REPORT_BATCHES):
            stats.record_exec(1, [1e-4], 1e-5, 2e-5, 1e-5)
        return protocol.encode({"op": "stats", "stats": stats.drain()})

    stats_frame = worker_report()
    buf = memoryview(bytearray(1 << 12))
    runtime = ModelRuntime(spec, WorkerOptions(intra_op_threads=1), WorkerStats())
    runtime.run([Item(1, {"x": x})])  # builds the first engine
    engine = next(iter(runtime.registry._live.values())).engine  # the live engine, to time it alone
    session = engine._session
    views = runtime.pool.views(1)
    binding = session.io_binding()
    binding.bind_input("x", "cpu", 0, np.float32, [1, 16], views.inputs["x"].ctypes.data)
    binding.bind_output("y", "cpu", 0, np.float32, [1, 16], views.outputs["y"].ctypes.data)

    class _NoPipe:
        """A channel that encodes its answers and drops them (the socket write is not timed)."""

        def __init__(self) -> None:
            self.buf = buf

        def send(self, header: dict, payload: bytes | None = None) -> None:
            protocol.framed(header, payload)

        def send_frame(self, frame: bytes) -> None:
            pass

    job = batches.Job(frames.decode_infer(infer_body), 1, {"x": x}, _NoPipe())

    def worker_receive() -> object:
        request = frames.decode_infer(infer_body)
        return {spec.inputs[i].name: to_array(spec.inputs[i].datatype, shape, buf[offset:offset + n],
                                              name=spec.inputs[i].name)
                for i, shape, offset, n in request.inputs}

    def parent_receive() -> object:
        return frames.decode_result(result_body)

    def stats_apply() -> None:
        header, _ = protocol.decode(stats_frame)
        metrics.apply_worker_stats("tiny", 1, header["stats"])

    async def futures() -> float:
        loop = asyncio.get_running_loop()

        async def one() -> None:
            f = loop.create_future()
            loop.call_soon(f.set_result, None)
            await f

        n, t0 = 3000, loop.time()
        for _ in range(n):
            await one()
        return (loop.time() - t0) / n * 1e6

    plan = codec.RequestPlan(spec)
    templates = RequestTemplates()
    parsed = parse_infer_request(wire)
    templates.decode(parsed, plan)  # its head is known from now on
    rows = [
        ("frontend", "parse_infer_request (the scan gRPC's deserializer runs)",
         _time(lambda: parse_infer_request(wire))),
        ("frontend", "  reference: protobuf's parse of the whole message",
         _time(lambda: pb.ModelInferRequest.FromString(wire))),
        ("frontend", "RequestTemplates.lookup (a head seen before)", _time(lambda: templates.lookup(parsed, spec))),
        ("frontend", "codec.decode_request (a head's first request)",
         _time(lambda: codec.decode_request(request, spec, None, plan))),
        ("frontend", "ResponseEncoder.encode (a stream's answer, serialized)",
         _time(lambda: plan.response.encode(request.id, outputs, stream=True))),
        ("frontend", "metrics.add_pending(+1, -1)", _time(lambda: (metrics.add_pending("tiny", 1, 1),
                                                                    metrics.add_pending("tiny", 1, -1)))),
        ("frontend", "metrics.observe_request", _time(lambda: metrics.observe_request("tiny", "1", "OK", 1e-3, 1))),
        ("frontend", "FrameCodec.encode_infer (binary INFER)", _time(infer_frame)),
        ("frontend", "FrameCodec.decode_result (binary RESULT)", _time(parent_receive)),
        ("frontend", "asyncio future round trip (create, set, await)", asyncio.run(futures())),
        ("frontend", "worker stats, per executed batch: its share of decoding, validating, applying a report "
         f"of {REPORT_BATCHES}", _time(stats_apply, 100) / REPORT_BATCHES),
        ("worker", "FrameCodec.decode_infer + to_array", _time(worker_receive)),
        ("worker", "worker stats, per executed batch: record_exec + its share of the JSON report",
         _time(worker_report, 100) / REPORT_BATCHES),
        ("worker", "ModelRuntime.run([1 item]) (pool + registry + IOBinding run)",
         _time(lambda: runtime.run([Item(1, {"x": x})]), 1000)),
        ("worker", "  of which registry.execute(1)", _time(lambda: runtime.registry.execute(1, views), 1000)),
        ("worker", "  of which engine.run_into (IOBinding cached for these views, run)",
         _time(lambda: engine.run_into(views.inputs, views.outputs), 1000)),
        ("worker", "  reference: session.run_with_iobinding, binding reused",
         _time(lambda: session.run_with_iobinding(binding))),
        ("worker", "  reference: plain session.run(['y'], {'x': x})", _time(lambda: session.run(["y"], {"x": x}))),
        ("worker", "the direct lane instead (a request run by itself): ModelRuntime.direct.run",
         _time(lambda: runtime.direct.run(buf, job.request.inputs, 1), 1000)),
        ("worker", "reply: to_raw + copy to shm + binary RESULT (no pipe write)",
         _time(lambda: batches.reply(frames, job.channel, job.request, {"y": x}))),
    ]
    runtime.close()
    return rows


def _load(path: Path) -> list[tuple[list[str], int]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            stack, n = line.rsplit(" ", 1)
            rows.append((stack.split(";"), int(n)))
    return rows


def categorize(path: Path, process: str) -> tuple[int, int, list[tuple[str, int]]]:
    """(all samples, busy samples, [(category, busy samples)]) of one py-spy raw file."""
    counts: collections.Counter[str] = collections.Counter()
    total = busy = 0
    for stack, n in _load(path):
        total += n
        if any(key in stack[-1] for key in IDLE_LEAVES):
            continue
        busy += n
        joined = ";".join(stack)
        for category, keys in CATEGORIES[process]:
            if any(key in joined for key in keys):
                counts[category] += n
                break
    return total, busy, [(c, counts[c]) for c, _ in CATEGORIES[process]]


def spy(seconds: float, out: Path) -> tuple[float, dict[str, tuple[int, int, list[tuple[str, int]]]]]:
    """Profile trtserve's frontend and worker under 8 unary clients; (requests/s, per-process categories)."""
    from bench.overhead import measure

    out.mkdir(parents=True, exist_ok=True)
    with start(EXAMPLES, ["--model-control-mode", "explicit", "--load-model", "tiny"]) as server:
        pids = {"frontend": server.proc.pid, "worker": server.worker_pid("tiny")}
        spies = [subprocess.Popen([str(PYSPY), "record", "--rate", "200", "--format", "raw", "--duration",
                                   str(int(seconds)), "-o", str(out / f"{name}.txt"), "--pid", str(pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for name, pid in pids.items()]
        m = measure("trtserve", server.url, [server.proc.pid], 8, seconds, False, 4)
        for p in spies:
            p.wait(60)
    return m.rps, {name: categorize(out / f"{name}.txt", name) for name in pids}


LADDER = [("floor: raw bytes in, constant bytes out", ()),
          ("+ protobuf parse of each request and serialize of each answer", ("--parse",)),
          ("+ trtserve's ErrorInterceptor", ("--parse", "--interceptor")),
          ("+ one round trip to an echo process per request", ("--parse", "--interceptor", "--hop"))]


DSO_NAMES = {"libpython": "libpython", "kernel": "kernel", "cygrpc": "grpc (cygrpc)",
             "_message": "protobuf", "onnxruntime": "ONNX Runtime", "_multiarray": "numpy", "libc.so": "libc"}


def _perf_start(pid: int, path: Path, seconds: float) -> subprocess.Popen | None:
    if shutil.which("perf") is None:
        return None
    return subprocess.Popen(["perf", "record", "-q", "-F", "499", "-o", str(path), "-p", str(pid), "--", "sleep",
                             str(seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _perf_shares(path: Path) -> dict[str, float]:
    """Share of a process's on-CPU samples by shared object, grouped as DSO_NAMES (rest: other)."""
    out = subprocess.run(["perf", "report", "-i", str(path), "--sort", "dso", "--stdio", "-g", "none"],
                         capture_output=True, text=True).stdout
    shares: dict[str, float] = collections.defaultdict(float)
    for line in out.splitlines():
        if m := re.match(r"^\s+([\d.]+)%\s+(\S.*?)\s*$", line):
            name = next((v for k, v in DSO_NAMES.items() if k in m.group(2)), "other")
            shares[name] += float(m.group(1)) / 100
    return dict(shares)


def ladder(seconds: float, out: Path, clients: int = 8, stream: bool = False
           ) -> tuple[list[tuple[str, float, float, float]], list[tuple[str, float, dict[str, float]]]]:
    """Rows (server, requests/s, server CPU µs/request, context switches/request): the floor with
    trtserve's costs added one by one, then trtserve. With `perf` installed and unary calls, also (process,
    CPU µs/request, share by shared object) for the last floor rung and trtserve's two processes."""
    from bench.overhead import FloorProcess, measure

    rows, split = [], []
    out.mkdir(parents=True, exist_ok=True)
    for i, (label, flags) in enumerate(LADDER):
        last = i == len(LADDER) - 1 and not stream
        with FloorProcess(*flags) as floor:
            procs = {"floor + hop: grpc process": floor.proc.pid}
            echo = [c.pid for c in psutil.Process(floor.proc.pid).children()
                    if "resource_tracker" not in " ".join(c.cmdline())]
            if echo:
                procs["floor + hop: echo process"] = echo[0]
            perfs = {n: _perf_start(pid, out / f"perf-{i}-{k}.data", seconds + 3)
                     for k, (n, pid) in enumerate(procs.items())} if last else {}
            m = measure(label, floor.url, [floor.proc.pid], clients, seconds, stream, 4)
            split += _split(perfs, procs, m.cpu_by_pid, out, i)  # before the processes stop
        rows.append((label, m.rps, m.server_cpu_us, m.switches))
    with start(EXAMPLES, ["--model-control-mode", "explicit", "--load-model", "tiny"]) as server:
        procs = {"trtserve frontend": server.proc.pid, "trtserve worker": server.worker_pid("tiny")}
        perfs = {n: _perf_start(pid, out / f"perf-t-{k}.data", seconds + 3)
                 for k, (n, pid) in enumerate(procs.items())} if not stream else {}
        m = measure("trtserve", server.url, [server.proc.pid], clients, seconds, stream, 4)
        split += _split(perfs, procs, m.cpu_by_pid, out, "t")
    front, work = m.cpu_by_pid.get(procs["trtserve frontend"], 0.0), m.cpu_by_pid.get(procs["trtserve worker"], 0.0)
    rows.append((f"trtserve (frontend {front:.0f} + worker {work:.0f} µs/request)", m.rps, m.server_cpu_us,
                 m.switches))
    for label, rps, cpu, switches in rows:
        print(f"{rps:8.0f} req/s {cpu:6.0f} us/req {switches:5.1f} switches/req  {label}", flush=True)
    return rows, split


def _split(perfs: dict[str, subprocess.Popen | None], procs: dict[str, int], cpu_by_pid: dict[int, float],
           out: Path, tag: object) -> list[tuple[str, float, dict[str, float]]]:
    rows = []
    for k, (name, p) in enumerate(perfs.items()):
        path = out / f"perf-{tag}-{k}.data"
        if p is None or p.wait(60) is None or not path.is_file():
            continue
        rows.append((name, cpu_by_pid.get(procs[name], 0.0), _perf_shares(path)))
        path.unlink(missing_ok=True)
    return rows


def markdown(rows: list[tuple[str, str, float]], spied: tuple[float, dict] | None,
             steps: dict[str, list[tuple[str, float, float, float]]],
             split: list[tuple[str, float, dict[str, float]]], command: str) -> str:
    lines = ["# Hot path of a `tiny` batch-1 request: measurements", "", f"Command: `{command}`", "",
             "## Per-step CPU cost (isolated, best of 5, µs per call)", "",
             "| process | step | µs |", "|---|---|---|"]
    lines += [f"| {p} | {s} | {us:.1f} |" for p, s, us in rows]
    if spied is not None:
        rps, cats = spied
        lines += ["", f"## py-spy under load (8 unary clients, {rps:.0f} requests/s while sampled)", "",
                  "Share of each process's non-idle samples (200 Hz; blocking waits excluded). Raw collapsed "
                  "stacks: `bench/results/profile/{frontend,worker}.txt`.", ""]
        for name, (total, busy, counts) in cats.items():
            lines += [f"### {name} ({busy} busy of {total} samples)", "", "| category | share |", "|---|---|"]
            lines += [f"| {c} | {n / busy:.0%} |" for c, n in counts if busy]
            lines.append("")
    for mode, rungs in steps.items():
        lines += [f"## From the floor to trtserve, one cost at a time (8 {mode} clients)", "",
                  "| server | requests/s | server CPU µs/request | context switches/request |", "|---|---|---|---|"]
        lines += [f"| {label} | {rps:.0f} | {cpu:.0f} | {sw:.1f} |" for label, rps, cpu, sw in rungs]
        lines.append("")
    if split:
        cols = [*DSO_NAMES.values(), "other"]
        lines += ["## CPU per request by shared object (perf, same runs)", "",
                  "µs of CPU per request in each process, split by where `perf record -F 499` found it running. "
                  "libpython = the interpreter running Python code *and* the C API that every extension (grpc's "
                  "Cython layer included) calls to create objects, call functions and look up attributes; "
                  "grpc (cygrpc) = grpc's extension module with grpc core; kernel = syscalls, scheduling, "
                  "socket and pipe work.", "",
                  "| process | CPU µs/request | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
        for name, cpu, shares in split:
            lines.append(f"| {name} | {cpu:.0f} | " + " | ".join(f"{cpu * shares.get(c, 0.0):.0f}" for c in cols)
                         + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-spy", action="store_true", help="only the per-step timings")
    parser.add_argument("--no-ladder", action="store_true", help="skip the floor-to-trtserve ladder")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = micro()
    for p, s, us in rows:
        print(f"{us:8.1f} us  {p:8s} {s}", flush=True)
    spied = None
    if not args.no_spy:
        if PYSPY.exists():
            spied = spy(args.seconds, args.out / "profile")
        else:
            print("py-spy not found (.venv/bin/pip install py-spy): skipping the profile under load", flush=True)
    steps, split = {}, []
    if not args.no_ladder:
        steps["unary"], split = ladder(args.seconds, args.out / "profile")
        steps["streaming"], _ = ladder(args.seconds, args.out / "profile", stream=True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python -m bench.hotpath", *sys.argv[1:]])
    (args.out / "hotpath.md").write_text(markdown(rows, spied, steps, split, command))
    print(f"wrote {args.out / 'hotpath.md'}")


if __name__ == "__main__":
    main()

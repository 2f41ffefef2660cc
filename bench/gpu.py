"""GPU end to end (run on the H200): served throughput against the engine alone, the frontend's ceiling,
and the engine sweep in real device memory. Writes bench/results/gpu/REPORT-gpu.md.

    python3 -m bench.gpu [--seconds 10] [--out bench/results/gpu] [--frontend-processes 1,4] [--rounds 1]

(a) and (b) run once per frontend process count and round, side by side; (a)'s load also runs against as
many bare grpc.aio floor servers (`bench/floor_server.py`), the ceiling that gRPC and the load generator
leave. The engine alone is timed right after each served point, at that point's executed batch, so that
both see the same machine (on these VMs its speed moved +-6% between calls); with several rounds (a)'s
verdict takes the median of the rounds' ratios.

Needs onnxruntime-gpu (CUDAExecutionProvider) and cuda-python; models come from `examples/generate_models.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from bench.engine_sweep import GPU_GROUP
from bench.gpu_alone import engine_alone, engine_on_device, runtime_alone
from bench.load import CLIENT_HEAP_KEEP_BYTES, run_load_processes
from tests.server import ROOT, start


def _repo(out: Path, models: Path) -> Path:
    """A repository of the example models on the GPU, with dynamic batching and the sweep policies."""
    repo = out / "repo"
    shutil.rmtree(repo, ignore_errors=True)

    def add(name: str, source: str, extra: str) -> None:
        (repo / name / "1").mkdir(parents=True)
        shutil.copy(models / source / "1" / "model.onnx", repo / name / "1" / "model.onnx")
        text = (models / source / "config.pbtxt").read_text()
        text = re.sub(r'name: "\w+"', f'name: "{name}"', text, count=1)
        text = re.sub(r"instance_group \[.*\]", "", text) + "\n" + GPU_GROUP + "\n" + extra + "\n"
        (repo / name / "config.pbtxt").write_text(text)

    # Engines warmed to full capacity: (a) and (b) measure serving, not growth.
    add("convnet", "convnet", "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"
        "engine_policy { warmup_batch_sizes: [ 64 ] }")
    add("tiny", "tiny", "dynamic_batching { max_queue_delay_microseconds: 500 }\n"
        "engine_policy { warmup_batch_sizes: [ 256 ] }")
    add("mlp_reuse", "mlp", "engine_policy { mode: REUSE bucket: POW2 pool_growth: EXACT_FIT }")
    add("mlp_multi", "mlp", "engine_policy { mode: MULTI bucket: EXACT pool_growth: EXACT_FIT }")
    return repo


def _metric(port: int, name: str, labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(part in line for part in labels.split(",") if part):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _phases(port: int, model: str) -> dict[str, float]:
    """Seconds the worker spent so far in each phase of its executions (input = gathering the batch,
    infer = upload + run + download, output = splitting it and answering)."""
    return {phase: _metric(port, "trtserve_compute_duration_seconds_sum", f'model="{model}",phase="{phase}"')
            for phase in ("input", "infer", "output")}


def _waits(port: int, model: str) -> dict[str, float]:
    """Sums and counts of the request durations the frontends measured and of the worker's queue times."""
    label = f'model="{model}"'
    names = {"server_s": "request_duration_seconds_sum", "requests": "request_duration_seconds_count",
             "queue_s": "queue_duration_seconds_sum", "queued": "queue_duration_seconds_count"}
    return {key: _metric(port, f"trtserve_{name}", label) for key, name in names.items()}


def _device_used() -> int:
    from cuda.bindings import runtime as rt

    _, free, total = rt.cudaMemGetInfo()
    return int(total - free)


class CpuShare:
    """CPU used by the server's frontend processes and by its workers while a load runs, in cores: a
    frontend process near 1.0 core means its event loop is the bottleneck. Also the whole machine's busy
    cores: near all of them, the load generator (the rest of it, mostly) has no core to spare either."""

    def __init__(self, server=None, pids: Sequence[int] = ()) -> None:
        """The frontend processes and workers of trtserve's `server`, or the processes `pids` (the floor)."""
        import psutil

        self.frontends = [psutil.Process(pid) for pid in pids]
        self.workers = []
        if server is not None:
            self.frontends += [psutil.Process(server.proc.pid),
                               *(psutil.Process(pid) for pid in server.frontend_pids().values())]
            self.workers = server.workers()

    def _times(self) -> tuple[float, float, float]:
        import psutil

        def cpu(p) -> float:
            t = p.cpu_times()
            return t.user + t.system
        m = psutil.cpu_times()
        busy = m.user + m.nice + m.system + getattr(m, "irq", 0.0) + getattr(m, "softirq", 0.0)
        return sum(cpu(f) for f in self.frontends), sum(cpu(w) for w in self.workers), busy

    def __enter__(self) -> CpuShare:
        self.t0, self.start = time.monotonic(), self._times()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self.t0
        end = self._times()
        self.frontend_cores = (end[0] - self.start[0]) / wall
        self.worker_cores = (end[1] - self.start[1]) / wall
        self.machine_cores = (end[2] - self.start[2]) / wall

    def __str__(self) -> str:
        workers = f", model workers {self.worker_cores:.2f} cores" if self.workers else ""
        kind = "frontend" if self.workers else "floor"
        return (f"{len(self.frontends)} {kind} process(es) {self.frontend_cores:.2f} cores{workers}, machine "
                f"{self.machine_cores:.1f} of {os.cpu_count()} busy")


@contextlib.contextmanager
def profiled(py_spy: Path | None, server, model: str, seconds: float, out: Path, tag: str) -> Iterator[None]:
    """With `py_spy`: sample the parent frontend, one extra frontend (if any) and `model`'s worker while the
    block runs (raw collapsed stacks with native frames, idle excluded, to out/profile-<model>-<process>-<tag>.txt)."""
    if py_spy is None:
        yield
        return
    pids = {"frontend": server.proc.pid, "worker": server.worker_pid(model)}
    if extra := server.frontend_pids():
        pids["frontend1"] = extra[min(extra)]
    spies = [subprocess.Popen([str(py_spy), "record", "--native", "--rate", "200", "--format", "raw", "--duration",
                               str(max(1, int(seconds) - 1)), "-o", str(out / f"profile-{model}-{name}-{tag}.txt"),
                               "--pid", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, pid in pids.items()]
    try:
        yield
    finally:
        for p in spies:
            p.wait(60)


def convnet_load(server, model: str, inputs: dict[str, np.ndarray], seconds: float, client_processes: int,
                 profile: contextlib.AbstractContextManager | None = None,
                 client_heap_keep_bytes: int = CLIENT_HEAP_KEEP_BYTES) -> dict:
    """(a)'s load (batch-8 requests from 64 clients) against `model` of a running `server`, and what its
    worker reported meanwhile: executions, mean executed batch, ms per execution in each phase, the
    requests' mean ms inside the server and queued in the worker, and the server's CPU share. `profile`
    (bench.gpu's py-spy) runs around the load; `client_heap_keep_bytes` is the load generator's heap
    setting (bench.load)."""
    port, label = server.metrics_port, f'model="{model}"'

    def totals() -> tuple[float, float, dict[str, float], dict[str, float]]:
        return (_metric(port, "trtserve_batch_size_sum", label), _metric(port, "trtserve_batch_size_count", label),
                _phases(port, model), _waits(port, model))
    before = totals()
    with CpuShare(server) as cpu, profile or contextlib.nullcontext():
        load = run_load_processes(server.url, model, inputs, 64, seconds, {"x": "FP32"}, processes=client_processes,
                                  heap_keep_bytes=client_heap_keep_bytes)
    after = totals()
    rows, execs = after[0] - before[0], after[1] - before[1]
    waits = {k: v - before[3][k] for k, v in after[3].items()}
    return {"load": load, "executions": execs, "mean_batch": rows / max(execs, 1),
            "phases_ms": {k: (v - before[2][k]) * 1e3 / max(execs, 1) for k, v in after[2].items()},
            "server_ms": waits["server_s"] * 1e3 / max(waits["requests"], 1),
            "queue_ms": waits["queue_s"] * 1e3 / max(waits["queued"], 1), "cpu": cpu}


def serve(repo: Path, frontends: int, seconds: float, py_spy: Path | None, out: Path, code: Path = ROOT,
          client_processes: int = 8) -> dict:
    """(a) and (b) against one server with `frontends` frontend processes, running the `service`
    package of the checkout `code`, loaded by 64 clients in `client_processes` processes."""
    rng = np.random.default_rng(0)
    args = ["--model-control-mode", "explicit", "--load-model", "convnet", "--load-model", "tiny",
            *(["--frontend-processes", str(frontends)] if frontends > 1 else [])]  # checkouts without the flag
    with start(repo, args, timeout_s=300, cwd=code) as server:
        # (a) convnet, batch-8 requests from 64 clients, dynamic batching.
        x8 = {"x": rng.standard_normal((8, 16, 32, 32), dtype=np.float32)}
        a = convnet_load(server, "convnet", x8, seconds, client_processes,
                         profiled(py_spy, server, "convnet", seconds, out, f"{frontends}fe"))
        # (b) tiny, batch-1 requests from 64 clients: the frontend's ceiling.
        x1 = {"x": rng.standard_normal((1, 16), dtype=np.float32)}
        with CpuShare(server) as tiny_cpu, profiled(py_spy, server, "tiny", seconds, out, f"{frontends}fe"):
            tiny = run_load_processes(server.url, "tiny", x1, 64, seconds, {"x": "FP32"},
                                      processes=client_processes)
    label = str(frontends) if code == ROOT else f"{frontends} ({code.name})"
    return {"frontends": label, "convnet": a["load"], "mean_batch": a["mean_batch"], "phases_ms": a["phases_ms"],
            "server_ms": a["server_ms"], "queue_ms": a["queue_ms"], "convnet_cpu": a["cpu"], "tiny": tiny,
            "tiny_cpu": tiny_cpu}


def floor(processes: int, seconds: float, client_processes: int) -> dict:
    """(a)'s load against `processes` bare grpc.aio floor servers sharing one port: no parsing, no model,
    the same constant answer to every request. What gRPC and this load generator deliver on this machine
    when the server does nothing: the ceiling (a) is measured under."""
    from bench.overhead import floor_processes

    x8 = {"x": np.random.default_rng(0).standard_normal((8, 16, 32, 32), dtype=np.float32)}
    with floor_processes(processes) as floors:
        with CpuShare(pids=[f.proc.pid for f in floors]) as cpu:
            result = run_load_processes(floors[0].url, "convnet", x8, 64, seconds, {"x": "FP32"},
                                        processes=client_processes)
    return {"processes": processes, "convnet": result, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu")
    parser.add_argument("--py-spy", type=Path, default=None,
                        help="py-spy executable: profile the frontend and the worker during (a) and (b)")
    parser.add_argument("--frontend-processes", default="1,4",
                        help="comma-separated frontend process counts to compare (a server each)")
    parser.add_argument("--compare-with", type=Path, default=None,
                        help="another checkout (its `service` package and generated protos): each (a)/(b) "
                             "point also runs on it, alternately with this one, rows marked with its name")
    parser.add_argument("--client-processes", type=int, default=8,
                        help="load generator processes the 64 clients are spread over")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternating rounds of every point; (a)'s verdict takes the median of their ratios")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    models = ROOT / "examples" / "models"
    subprocess.run([sys.executable, str(ROOT / "examples" / "generate_models.py"), "--out", str(models)], check=True)
    repo = _repo(Path("/tmp/trtserve-gpu-bench"), models)
    counts = [int(n) for n in args.frontend_processes.split(",")]
    lines = ["# GPU end to end", "", f"Machine: {platform.node()}, {os.cpu_count()} CPU cores; "
             f"`nvidia-smi -L`: {subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True).stdout.strip()}",
             f"Command: `python3 -m bench.gpu --seconds {args.seconds} --frontend-processes {args.frontend_processes}"
             f" --client-processes {args.client_processes} --rounds {args.rounds}`",
             "", f"Clients: 64 closed-loop tritonclient threads in {args.client_processes} processes, each with its "
             "own TCP connection.",
             ""]
    codes = [ROOT] if args.compare_with is None else [ROOT, args.compare_with.resolve()]
    runs, floors = [], []
    for round_ in range(1, args.rounds + 1):
        for i, n in enumerate(counts):
            for code in (codes if (i + round_) % 2 else codes[::-1]):
                run = serve(repo, n, args.seconds, args.py_spy, args.out, code, args.client_processes)
                run["round"], run["batch"] = round_, max(1, round(run["mean_batch"]))
                run["alone"] = engine_alone(repo, "convnet", run["batch"], min(args.seconds, 10))
                run["device"] = engine_on_device(repo, "convnet", run["batch"], min(args.seconds, 10))
                runs.append(run)
            floors.append({**floor(n, args.seconds, args.client_processes), "round": round_, "alone": run["alone"]})
    lines += ["## (a) convnet: batch-8 requests, 64 clients, dynamic batching", "",
              "| round | frontend processes | served inferences/s | p50 ms | p99 ms | errors | mean executed batch | "
              "engine alone inferences/s at that batch, right after | served / alone | engine on device | served / "
              "on device | worker ms per execution (gather / run / answer) | CPU |", "|---" * 13 + "|"]
    for run in runs:
        served = run["convnet"]
        lines.append(f"| {run['round']} | {run['frontends']} | {served.rps * 8:.0f} | {served.percentile_ms(50):.1f} | "
                     f"{served.percentile_ms(99):.1f} | {served.errors} | {run['mean_batch']:.1f} | "
                     f"{run['alone']:.0f} | {served.rps * 8 / run['alone']:.0%} | {run['device']:.0f} | "
                     f"{served.rps * 8 / run['device']:.0%} | "
                     f"{' / '.join(f'{v:.2f}' for v in run['phases_ms'].values())} | {run['convnet_cpu']} |")
    for f in floors:
        served = f["convnet"]
        lines.append(f"| {f['round']} | floor, {f['processes']} processes | {served.rps * 8:.0f} | "
                     f"{served.percentile_ms(50):.1f} | {served.percentile_ms(99):.1f} | {served.errors} | - | "
                     f"{f['alone']:.0f} | {served.rps * 8 / f['alone']:.0%} | - | - | - | {f['cpu']} |")
    lines += ["", "engine alone: ONNX Runtime's session run by itself on host arrays (it uploads the input and "
              "downloads the output of every run, from pageable memory); engine on device: the same engine with "
              "its input and output bound in device memory, no copies, the GPU's own rate. The worker uploads "
              "from the frontends' pinned shared memory, faster than the engine alone's pageable copies, so "
              "served / alone can pass 100%; served / on device is what serving costs against the GPU's rate.",
              "", *verdicts(runs), "", "floor rows: the same load against bare grpc.aio servers "
              "(`bench/floor_server.py`) in that many processes on one port, which answer every request with a "
              "constant and run nothing: what gRPC and this load generator deliver on this machine when the "
              "server does no work. Against the engine alone timed before it, the ceiling (a) is measured "
              "under; trtserve / floor of the same round: "
              + ", ".join(f"{r['frontends']} frontend processes {r['convnet'].rps / f['convnet'].rps:.0%}"
                          for r in runs for f in floors if f["round"] == r["round"]
                          and str(f["processes"]) == r["frontends"].split(" ")[0] and f["convnet"].rps > 0) + "."]
    requests = max(1, round(float(np.median([run["mean_batch"] for run in runs])) / 8))
    batch_path = runtime_alone(repo, "convnet", requests, 8, min(args.seconds, 10))
    alone = float(np.median([run["alone"] for run in runs]))
    lines += ["", "Where a request's time went in (a), means in ms: as the client saw it; inside the server "
              "(trtserve_request_duration_seconds, from the decoded request to the encoded answer); of that, "
              "queued in the worker (trtserve_queue_duration_seconds) and its batch's compute (gather + run + "
              "answer); the rest of the server's part (frontend, worker link, the worker's receive path); and "
              "outside the server (client, gRPC, kernel).", "",
              "| round | frontend processes | client | server | worker queue | batch compute | rest of server | "
              "outside |",
              "|---" * 8 + "|"]
    for run in runs:
        client_ms = float(np.mean(run["convnet"].latencies_s)) * 1e3
        compute_ms = sum(run["phases_ms"].values())
        lines.append(f"| {run['round']} | {run['frontends']} | {client_ms:.2f} | {run['server_ms']:.2f} | "
                     f"{run['queue_ms']:.2f} | "
                     f"{compute_ms:.2f} | {run['server_ms'] - run['queue_ms'] - compute_ms:.2f} | "
                     f"{client_ms - run['server_ms']:.2f} |")
    lines += ["", "The worker's batch path alone (`ModelRuntime.run` in one process: batch-8 requests gathered into "
              f"the pool, run, split back; no IPC, no gRPC), {requests} requests of 8 rows a batch: {batch_path:.0f} "
              f"inferences/s, {batch_path / alone:.0%} of the engine alone's median above",
              "", "## (b) tiny: batch-1 requests, 64 clients (frontend ceiling)", "",
              "| round | frontend processes | requests/s | p50 ms | p99 ms | errors | CPU |", "|---" * 7 + "|"]
    for run in runs:
        tiny = run["tiny"]
        lines.append(f"| {run['round']} | {run['frontends']} | {tiny.rps:.0f} | {tiny.percentile_ms(50):.2f} | "
                     f"{tiny.percentile_ms(99):.2f} | {tiny.errors} | {run['tiny_cpu']} |")
    lines.append("")
    lines += sweep(repo, args.seconds)
    (args.out / "REPORT-gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def verdicts(runs: list[dict]) -> list[str]:
    """(a)'s verdict per setting (frontend processes, and checkout): served / engine alone, the median of
    the rounds with the rounds' ratios beside it, against the 80% goal; and the median against the engine
    on device."""
    lines = []
    for label in dict.fromkeys(run["frontends"] for run in runs):
        ratios = [run["convnet"].rps * 8 / run["alone"] for run in runs if run["frontends"] == label]
        median = float(np.median(ratios))
        device = float(np.median([run["convnet"].rps * 8 / run["device"] for run in runs if run["frontends"] == label]))
        lines.append(f"- {label} frontend processes: {'PASS' if median >= 0.8 else 'FAIL'}, served / engine alone "
                     f"{median:.0%} in the median of {len(ratios)} round(s) "
                     f"({', '.join(f'{r:.0%}' for r in ratios)}); goal >= 80%. Served / engine on device "
                     f"{device:.0%}")
    return lines


def sweep(repo: Path, seconds: float) -> list[str]:
    """(c) the engine sweep in real device memory: REUSE+POW2 against MULTI+EXACT on mlp."""
    import tritonclient.grpc as grpcclient

    sizes = np.random.default_rng(7).integers(1, 65, size=60)
    out = ["## (c) engine sweep in device memory (mlp, 60 seeded batch sizes 1..64)", "",
           "| policy | engine builds | engines live at end | device bytes taken (cudaMemGetInfo) | "
           "pool device bytes (metric) | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|"]
    for model in ("mlp_reuse", "mlp_multi"):
        base = _device_used()
        with start(repo, ["--model-control-mode", "explicit", "--load-model", model], timeout_s=300) as server:
            client = grpcclient.InferenceServerClient(server.url)
            lat, peak = [], 0
            for b in sizes:
                inp = grpcclient.InferInput("x", [int(b), 1024], "FP32")
                inp.set_data_from_numpy(np.ones((int(b), 1024), np.float32))
                t0 = time.perf_counter()
                client.infer(model, [inp])
                lat.append(time.perf_counter() - t0)
                peak = max(peak, _device_used() - base)
            time.sleep(1)
            builds = _metric(server.metrics_port, "trtserve_engine_builds_total", f'model="{model}"')
            live = _metric(server.metrics_port, "trtserve_engines_live", f'model="{model}"')
            pool = _metric(server.metrics_port, "trtserve_buffer_pool_bytes", f'model="{model}",memory="device"')
        out.append(f"| {model} | {builds:.0f} | {live:.0f} | {peak / 2**20:.0f} MiB peak | {pool / 2**20:.1f} MiB | "
                   f"{np.percentile(lat, 50) * 1e3:.1f} | {np.percentile(lat, 99) * 1e3:.1f} |")
    return [*out, ""]


if __name__ == "__main__":
    main()

"""Soak: constant mixed load (tiny and mlp, random batch sizes) on the real server for N minutes.

    .venv/bin/python -m bench.soak [--minutes 10] [--quick]

Every few seconds it samples errors, requests/s, the RSS of the server and of each model worker (psutil)
and the bytes of the server's /dev/shm segments, then writes bench/results/soak.md (table over time and
a summary: errors, goal 0; RSS growth after warm-up, goal none, as a slope in MB/min) and soak.png.
`--quick` samples every 2 s after a 30 s warm-up instead of every 5 s after 60 s, for short runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.server import EXAMPLES, ServerProcess, start

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"tiny": (16, 256), "mlp": (1024, 64)}  # name -> (features, max batch)
MIX = ("tiny",) * 4 + ("mlp",)  # four tiny requests to one mlp request
Request = service_pb2.ModelInferRequest


@dataclass
class Counters:
    """What the client threads count; read by the sampler under the lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    errors: int = 0
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)


def _request(model: str, batch: int, rng: np.random.Generator) -> tuple[Request, np.ndarray]:
    features = MODELS[model][0]
    x = rng.standard_normal((batch, features), dtype=np.float32)
    tensor = Request.InferInputTensor(name="x", datatype="FP32", shape=[batch, features])
    return Request(model_name=model, inputs=[tensor], raw_input_contents=[x.tobytes()]), x


def _client(url: str, seed: int, stop: threading.Event, counters: Counters, tiny_c: np.ndarray) -> None:
    """Closed loop: random model from MIX, random batch size; checks every answer's shape (and tiny's values)."""
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    # A connection per client thread (gRPC shares one between a process's channels otherwise), so that
    # with several frontend processes the clients spread over them.
    with grpc.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        while not stop.is_set():
            model = pick.choice(MIX)
            batch = pick.randint(1, MODELS[model][1])
            request, x = _request(model, batch, rng)
            started = time.perf_counter()
            error = ""
            try:
                response = stub.ModelInfer(request, timeout=30)
                y = np.frombuffer(response.raw_output_contents[0], np.float32)
                if y.size != batch * MODELS[model][0]:
                    error = f"{model}: {y.size} output values for batch {batch}"
                elif model == "tiny" and not np.allclose(y.reshape(x.shape), x + tiny_c, rtol=1e-6, atol=1e-6):
                    error = "tiny: wrong values"
            except grpc.RpcError as exc:
                error = f"{model}: {exc.code().name}: {exc.details()}"
            with counters.lock:
                counters.requests += 1
                counters.latencies.append(time.perf_counter() - started)
                if error:
                    counters.errors += 1
                    counters.first_error = counters.first_error or error


def _shm_bytes(pid: int) -> tuple[int, int]:
    """(size, resident) bytes of the server's segments: resident counts the pages actually touched."""
    size = resident = 0
    for path in Path("/dev/shm").glob(f"trtserve-{pid}-*"):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        size += st.st_size
        resident += st.st_blocks * 512
    return size, resident


def _sample(server: ServerProcess, t: float, counters: Counters, last: dict) -> dict:
    with counters.lock:
        requests, errors = counters.requests, counters.errors
        latencies, counters.latencies = counters.latencies, []
    workers = {}
    for model in MODELS:
        try:
            workers[model] = psutil.Process(server.worker_pid(model)).memory_info().rss
        except psutil.NoSuchProcess:
            workers[model] = 0
    frontends = [server.proc.pid, *server.frontend_pids().values()]
    size = resident = 0
    for pid in frontends:
        pid_size, pid_resident = _shm_bytes(pid)
        size, resident = size + pid_size, resident + pid_resident
    row = {"t": t, "requests": requests, "errors": errors,
           "rps": (requests - last.get("requests", 0)) / max(t - last.get("t", 0.0), 1e-9),
           "p99_ms": float(np.percentile(latencies, 99) * 1000) if latencies else float("nan"),
           "server_rss": sum(psutil.Process(pid).memory_info().rss for pid in frontends),
           **{f"{m}_rss": v for m, v in workers.items()}, "shm_size": size, "shm_resident": resident}
    return row


def _slope_mb_per_min(rows: list[dict], key: str) -> float:
    if len(rows) < 2:
        return float("nan")
    minutes = np.array([r["t"] for r in rows]) / 60
    return float(np.polyfit(minutes, np.array([r[key] for r in rows]) / 2**20, 1)[0])


def _report(rows: list[dict], warmup_s: float, args: argparse.Namespace, first_error: str) -> str:
    mb = 2**20
    steady = [r for r in rows if r["t"] >= warmup_s]
    keys = ("server_rss", *(f"{m}_rss" for m in MODELS), "shm_resident")
    total, errors = rows[-1]["requests"], rows[-1]["errors"]
    cmd = ("python -m bench.soak --minutes " + f"{args.minutes:g}" + (" --quick" if args.quick else "")
           + (f" --frontend-processes {args.frontend_processes}" if args.frontend_processes > 1 else ""))
    lines = [
        "# Soak: constant mixed load on the real server",
        "",
        f"`{cmd}` on {os.cpu_count()} CPU cores ({platform.machine()}, Python {platform.python_version()}), "
        f"{args.clients} client threads, requests mixed 4:1 tiny (batch 1-256) : mlp (batch 1-64), "
        f"CPU ONNX Runtime; one sample every {args.interval:g} s, warm-up {warmup_s:.0f} s. Load average "
        f"(1 min) at the end: {os.getloadavg()[0]:.1f} (the clients share the cores with the server, and so does "
        "anything else running on the machine).",
        "",
        "## Summary",
        "",
        "`server RSS` is every frontend process together (the parent and the extra ones), `shm` their arenas.",
        "",
        f"- requests: {total}, errors: {errors} (goal 0){'; first: ' + first_error if first_error else ''}",
        f"- mean throughput after warm-up: {np.mean([r['rps'] for r in steady]):.0f} requests/s" if steady else "",
        "- growth after warm-up (linear fit, goal: none):",
    ]
    if steady and steady[-1]["t"] - steady[0]["t"] < 300:
        lines.append("  (a window under 5 minutes mostly shows first-touch growth of buffer pools and shm blocks as "
                     "new batch sizes arrive; `--minutes 10` gives the verdict)")
    for key in keys:
        if steady:
            lines.append(f"  - {key.replace('_', ' ')}: {steady[0][key] / mb:.1f} -> {steady[-1][key] / mb:.1f} MB, "
                         f"slope {_slope_mb_per_min(steady, key):+.2f} MB/min")
    lines += ["", "## Over time", "",
              "| t (s) | requests/s | p99 ms | errors (total) | server RSS MB | tiny RSS MB | mlp RSS MB | "
              "shm MB (resident / size) |",
              "|---|---|---|---|---|---|---|---|"]
    step = max(1, len(rows) // 30)  # at most about 30 rows; the plot has every sample
    for r in rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else []):
        lines.append(f"| {r['t']:.0f} | {r['rps']:.0f} | {r['p99_ms']:.1f} | {r['errors']} | "
                     f"{r['server_rss'] / mb:.1f} | {r['tiny_rss'] / mb:.1f} | {r['mlp_rss'] / mb:.1f} | "
                     f"{r['shm_resident'] / mb:.1f} / {r['shm_size'] / mb:.0f} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], warmup_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([r["t"] for r in rows]) / 60
    fig, (mem, rate) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for key in ("server_rss", *(f"{m}_rss" for m in MODELS), "shm_resident"):
        mem.plot(t, [r[key] / 2**20 for r in rows], label=key.replace("_", " "))
    mem.set_ylabel("MB")
    mem.legend(loc="upper left")
    mem.set_title("trtserve soak: memory")
    rate.plot(t, [r["rps"] for r in rows], label="requests/s")
    rate.set_ylabel("requests/s")
    errors = rate.twinx()
    errors.plot(t, [r["errors"] for r in rows], color="tab:red", label="errors (total)")
    errors.set_ylabel("errors (total)")
    errors.set_ylim(0, max(1, rows[-1]["errors"]) * 1.1)
    for ax in (mem, rate):
        ax.axvline(warmup_s / 60, color="grey", linestyle="--")
    rate.set_xlabel("minutes (dashed: end of warm-up)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="2 s samples after a 30 s warm-up")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--frontend-processes", type=int, default=1, help="the server's --frontend-processes")
    args = parser.parse_args()
    args.interval, warmup_s = (2.0, 30.0) if args.quick else (5.0, 60.0)
    from tests.reference import initializers  # the model's own constant, for value checks of tiny

    tiny_c = initializers(EXAMPLES / "tiny" / "1" / "model.onnx")["c"].astype(np.float32)
    counters, stop, rows = Counters(), threading.Event(), []
    server_args = ["--model-control-mode", "explicit", *(a for m in MODELS for a in ("--load-model", m)),
                   "--frontend-processes", str(args.frontend_processes)]
    with start(EXAMPLES, server_args) as server:
        threads = [threading.Thread(target=_client, args=(server.url, i, stop, counters, tiny_c), daemon=True)
                   for i in range(args.clients)]
        began = time.monotonic()
        for th in threads:
            th.start()
        try:
            while (t := time.monotonic() - began) < args.minutes * 60:
                time.sleep(min(args.interval, max(0.0, args.minutes * 60 - t)))
                rows.append(_sample(server, time.monotonic() - began, counters, rows[-1] if rows else {}))
                r = rows[-1]
                print(f"t={r['t']:6.0f}s {r['rps']:7.0f} req/s errors={r['errors']} "
                      f"server={r['server_rss'] / 2**20:.0f}MB tiny={r['tiny_rss'] / 2**20:.0f}MB "
                      f"mlp={r['mlp_rss'] / 2**20:.0f}MB shm={r['shm_resident'] / 2**20:.1f}MB", flush=True)
        finally:
            stop.set()
            for th in threads:
                th.join(60)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.md").write_text(_report(rows, warmup_s, args, counters.first_error))
    _plot(rows, warmup_s, args.out / "soak.png")
    print(f"wrote {args.out / 'soak.md'} and {args.out / 'soak.png'}")


if __name__ == "__main__":
    main()

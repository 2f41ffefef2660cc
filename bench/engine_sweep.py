"""Engine policy sweep: a seeded stream of batch sizes 1..64 through the real server, per engine policy.

    .venv/bin/python -m bench.engine_sweep [--quick] [--requests N] [--clients 2] [--seed 0]

For REUSE+POW2, REUSE+EXACT, MULTI+EXACT (all BACKGROUND rebuild) and BLOCKING (REUSE+POW2+BLOCKING) on
the `mlp` example model (max_batch_size 64), and for a uniform and a skewed (mostly small, sometimes
large) stream: engine builds, peak engine + pool bytes, p50/p99 latency, p99 of requests that overlap
an engine build ("growth") against the others ("steady"). Writes bench/results/engine_sweep.md and
engine_sweep.png and prints PASS/FAIL for the goals of issue 3.

Engine bytes: trtserve_engine_device_memory_bytes when it is nonzero (TensorRT on a GPU); on the CPU
ONNX Runtime reports 0, so engines_live x (model weight bytes) is the estimate, and the worker's RSS is
shown as the measured total. Metrics are sampled every 50 ms, so a short overlap of two engines during
a switch can be missed by the sampled peak.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
import psutil
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from tests.server import EXAMPLES, ROOT, start

GPU_GROUP = "instance_group [ { kind: KIND_GPU gpus: [ 0 ] } ]"
MAX_BATCH = 64
ROW_BYTES = 1024 * 4  # x and y are FP32 [N, 1024]
STATS_LAG_S = 0.15  # workers report every 0.1 s, sampled every 0.05 s
CONFIGS = {  # model name in the temporary repository -> engine_policy
    "reuse_pow2": "mode: REUSE bucket: POW2 rebuild: BACKGROUND",
    "reuse_exact": "mode: REUSE bucket: EXACT rebuild: BACKGROUND",
    "multi_exact": "mode: MULTI bucket: EXACT rebuild: BACKGROUND",
    "blocking": "mode: REUSE bucket: POW2 rebuild: BLOCKING",
}
LABELS = {"reuse_pow2": "REUSE+POW2", "reuse_exact": "REUSE+EXACT", "multi_exact": "MULTI+EXACT",
          "blocking": "BLOCKING (REUSE+POW2)"}
OUT = ROOT / "bench" / "results"


def make_stream(kind: str, n: int, seed: int) -> list[int]:
    """Batch 1 (the first request of a cold model, so that every policy grows), then uniform 1..64, or
    skewed: 70% 1..4, 20% 5..16, 8% 17..48, 2% 49..64."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return [1] + [int(b) for b in rng.integers(1, MAX_BATCH + 1, n - 1)]
    ranges = [(1, 4), (5, 16), (17, 48), (49, 64)]
    picks = rng.choice(len(ranges), size=n - 1, p=[0.70, 0.20, 0.08, 0.02])
    return [1] + [int(rng.integers(ranges[p][0], ranges[p][1] + 1)) for p in picks]


def write_repo(root: Path, model: Path, gpu: bool = False) -> None:
    config = (EXAMPLES / "mlp" / "config.pbtxt").read_text()
    if gpu:  # ONNX Runtime's CUDA provider, pool in device memory
        config = re.sub(r"instance_group \[.*?\]", "", config, flags=re.S) + "\n" + GPU_GROUP + "\n"
    for name, policy in CONFIGS.items():
        (root / name / "1").mkdir(parents=True)
        try:  # the server refuses symlinks that leave the repository: hard link, or copy
            os.link(model, root / name / "1" / "model.onnx")
        except OSError:
            shutil.copyfile(model, root / name / "1" / "model.onnx")
        text = config.replace('name: "mlp"', f'name: "{name}"')
        (root / name / "config.pbtxt").write_text(f"{text}\nengine_policy {{ {policy} }}\n")


@dataclass
class Sample:
    t: float
    engines_live: int
    engine_device_bytes: int
    pool_bytes: int
    builds: int
    build_seconds: float
    rss: int


@dataclass
class Run:
    config: str
    stream: str
    batches: list[int]
    sends: list[tuple[float, float, int, bool]] = field(default_factory=list)  # send, done, batch, ok
    samples: list[Sample] = field(default_factory=list)
    builds_by_reason: dict[str, int] = field(default_factory=dict)


def scrape(port: int, model: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") != model:
                continue
            key = s.name + (f":{s.labels['reason']}" if "reason" in s.labels else "")
            key += f":{s.labels['memory']}" if "memory" in s.labels else ""
            out[key] = out.get(key, 0.0) + s.value
    return out


def sample(port: int, model: str, pid: int) -> tuple[Sample, dict[str, int]]:
    m = scrape(port, model)
    try:
        rss = psutil.Process(pid).memory_info().rss
    except psutil.NoSuchProcess:
        rss = 0
    reasons = {k.split(":")[1]: int(v) for k, v in m.items() if k.startswith("trtserve_engine_builds_total:") and v}
    pool = sum(v for k, v in m.items() if k.startswith("trtserve_buffer_pool_bytes:"))
    return Sample(time.monotonic(), int(m.get("trtserve_engines_live", 0)),
                  int(m.get("trtserve_engine_device_memory_bytes", 0)), int(pool), sum(reasons.values()),
                  m.get("trtserve_engine_build_duration_seconds_sum", 0.0),
                  rss), reasons


def drive(url: str, port: int, pid: int, run: Run, clients: int) -> None:
    """Send the stream's first request alone (the cold start), then the rest from `clients` closed-loop
    threads (in stream order), while sampling /metrics."""
    stop = threading.Event()
    rng = np.random.default_rng(1)
    data = rng.standard_normal((MAX_BATCH, 1024), dtype=np.float32)
    lock, cursor = threading.Lock(), [0]

    def sampler() -> None:
        while not stop.is_set():
            s, reasons = sample(port, run.config, pid)
            run.samples.append(s)
            run.builds_by_reason = reasons
            stop.wait(0.05)

    def client(stop_at: int) -> None:
        c = grpcclient.InferenceServerClient(url)
        while True:
            with lock:
                if cursor[0] >= stop_at:
                    break
                batch = run.batches[cursor[0]]
                cursor[0] += 1
            inp = grpcclient.InferInput("x", [batch, 1024], "FP32")
            inp.set_data_from_numpy(data[:batch])
            t0 = time.monotonic()
            try:
                ok = c.infer(run.config, [inp], client_timeout=120).as_numpy("y").shape == (batch, 1024)
            except Exception:  # counted: a benchmark reports errors
                ok = False
            with lock:
                run.sends.append((t0, time.monotonic(), batch, ok))
        c.close()

    threads = [threading.Thread(target=sampler, daemon=True)]
    threads[0].start()
    client(1)
    threads += [threading.Thread(target=client, args=(len(run.batches),)) for _ in range(clients)]
    for t in threads[1:]:
        t.start()
    for t in threads[1:]:
        t.join()
    # Let background builds finish and their reports arrive: settled = unchanged for 0.5 s (bounded).
    deadline, last = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = (run.samples[-1].builds, run.samples[-1].engines_live) if run.samples else None
        if now is not None and now == last:
            break
        last = now
    stop.set()
    threads[0].join()
    run.sends.sort()


def build_windows(samples: list[Sample]) -> list[tuple[float, float]]:
    """Build intervals inferred from the build-duration sum growing between two samples."""
    windows = []
    for a, b in itertools.pairwise(samples):
        if b.builds > a.builds:
            windows.append((a.t - STATS_LAG_S - (b.build_seconds - a.build_seconds), b.t))
    return windows


def analyse(run: Run, weight_bytes: int) -> dict[str, object]:
    sends = run.sends
    first_done = min(d for _, d, _, ok in sends if ok)
    windows = build_windows(run.samples)
    cold = [(s, d) for s, d, _, _ in sends if s < first_done]
    warm = [(s, d) for s, d, _, _ in sends if s >= first_done]
    overlap = [any(s < w1 and d > w0 for w0, w1 in windows) for s, d in warm]
    growth = [d - s for (s, d), o in zip(warm, overlap) if o]
    steady = [d - s for (s, d), o in zip(warm, overlap) if not o]
    lat = [d - s for s, d, _, _ in sends]

    def engine_bytes(s: Sample) -> int:
        return s.engine_device_bytes or s.engines_live * weight_bytes

    total = [engine_bytes(s) + s.pool_bytes for s in run.samples]
    settled = [b for s, b in zip(run.samples, total)
               if not any(w0 <= s.t <= w1 + STATS_LAG_S for w0, w1 in windows)]

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q) * 1000) if xs else float("nan")

    largest = max(run.batches)
    return {
        "config": run.config, "stream": run.stream, "requests": len(sends),
        "errors": sum(not ok for *_, ok in sends), "builds": sum(run.builds_by_reason.values()),
        "reasons": dict(sorted(run.builds_by_reason.items())),
        "engines_end": run.samples[-1].engines_live, "peak_bytes": max(total),
        "held_bytes": max(settled) if settled else total[-1],
        "rss_peak": max(s.rss for s in run.samples), "p50": pct(lat, 50), "p99": pct(lat, 99),
        "growth_n": len(growth), "growth_p99": pct(growth, 99), "steady_p99": pct(steady, 99),
        "cold_ms": max((d - s) * 1000 for s, d in cold),
        "one_engine_plus_buffers": weight_bytes + largest * 2 * ROW_BYTES,
    }


def goals(rows: list[dict[str, object]]) -> list[tuple[str, bool]]:
    out = []
    for r in (r for r in rows if r["config"] == "reuse_pow2"):
        limit = 1.25 * r["one_engine_plus_buffers"]
        out.append((f"{r['stream']}: REUSE+POW2 held bytes {r['held_bytes'] / 2**20:.1f} MiB <= 1.25 x (one engine "
                    f"+ one buffer set) = {limit / 2**20:.1f} MiB (transient peak "
                    f"{r['peak_bytes'] / 2**20:.1f} MiB)", r["held_bytes"] <= limit))
        out.append((f"{r['stream']}: REUSE+POW2 builds {r['builds']} <= log2(64)+1 = 7", r["builds"] <= 7))
        out.append((f"{r['stream']}: REUSE+POW2 (BACKGROUND) p99 during growth {r['growth_p99']:.1f} ms <= 2 x "
                    f"steady p99 {r['steady_p99']:.1f} ms", r["growth_p99"] <= 2 * r["steady_p99"]))
    return out


def table(rows: list[dict[str, object]]) -> str:
    mib = 2 ** 20
    lines = ["| policy | stream | requests | errors | builds (by reason) | engines at end | peak engine+pool MiB "
             "| held MiB | worker RSS peak MiB | p50 ms | p99 ms | growth reqs | p99 growth ms | p99 steady ms "
             "| cold start ms |", "|" + "---|" * 15]
    for r in rows:
        reasons = ", ".join(f"{k} {v}" for k, v in r["reasons"].items())
        lines.append(
            f"| {LABELS[r['config']]} | {r['stream']} | {r['requests']} | {r['errors']} | {r['builds']} ({reasons}) "
            f"| {r['engines_end']} | {r['peak_bytes'] / mib:.1f} | {r['held_bytes'] / mib:.1f} "
            f"| {r['rss_peak'] / mib:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['growth_n']} "
            f"| {r['growth_p99']:.1f} | {r['steady_p99']:.1f} | {r['cold_ms']:.0f} |")
    return "\n".join(lines)


def plot(runs: list[Run], weight_bytes: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = list(dict.fromkeys(r.stream for r in runs))
    fig, axes = plt.subplots(2, len(streams), figsize=(7 * len(streams), 8), squeeze=False, sharex="col")
    for col, stream in enumerate(streams):
        for run in (r for r in runs if r.stream == stream):
            t0 = run.sends[0][0]
            ts = [s.t - t0 for s in run.samples]
            mib = [((s.engine_device_bytes or s.engines_live * weight_bytes) + s.pool_bytes) / 2**20
                   for s in run.samples]
            line, = axes[0][col].step(ts, mib, where="post", label=LABELS[run.config])
            axes[1][col].scatter([s - t0 for s, *_ in run.sends], [(d - s) * 1000 for s, d, *_ in run.sends],
                                 s=6, color=line.get_color(), label=LABELS[run.config])
        axes[0][col].set(title=f"{stream} stream: engine + pool bytes (CPU estimate)", ylabel="MiB (log)",
                         yscale="log")
        axes[1][col].set(title=f"{stream} stream: request latency", ylabel="ms (log)", xlabel="seconds",
                         yscale="log")
        axes[0][col].legend(fontsize=8)
        axes[1][col].legend(fontsize=8, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="80 requests per stream (under ~2 min)")
    parser.add_argument("--requests", type=int, default=0, help="requests per stream (default 400, quick 80)")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--gpu", action="store_true", help="run mlp on GPU 0 (ONNX Runtime's CUDA provider)")
    args = parser.parse_args()
    n = args.requests or (80 if args.quick else 400)
    model = EXAMPLES / "mlp" / "1" / "model.onnx"
    if not model.exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "generate_models.py"), "--out", str(EXAMPLES),
                        "--models", "mlp"], check=True)
    weight_bytes = sum(numpy_helper.to_array(t).nbytes for t in onnx.load(model).graph.initializer)
    started, load = time.monotonic(), os.getloadavg()
    runs: list[Run] = []
    for stream in ("uniform", "skewed"):
        batches = make_stream(stream, n, args.seed)
        with tempfile.TemporaryDirectory() as tmp:  # a fresh server per stream: every policy starts cold
            write_repo(Path(tmp), model.resolve(), args.gpu)
            with start(Path(tmp)) as server:
                for config in CONFIGS:
                    run = Run(config, stream, batches)
                    drive(server.url, server.metrics_port, server.worker_pid(config), run, args.clients)
                    runs.append(run)
                    print(f"{stream:8s} {LABELS[config]:22s} {len(run.sends)} requests, "
                          f"builds {run.builds_by_reason}", flush=True)
    rows = [analyse(r, weight_bytes) for r in runs]
    results = goals(rows)
    cmd = "python -m bench.engine_sweep" + (" --quick" if args.quick else "") + \
          (f" --requests {args.requests}" if args.requests else "") + (" --gpu" if args.gpu else "")
    cpu = platform.processor() or platform.machine()
    where = "GPU 0 (CUDA provider)" if args.gpu else "the CPU"
    report = "\n".join([
        "# Engine policy sweep (mlp, max_batch_size 64)", "",
        f"`{cmd}` ({n} requests per stream, {args.clients} closed-loop clients, seed {args.seed}; "
        f"{os.cpu_count()} CPUs, {cpu}, ONNX Runtime on {where}; {time.monotonic() - started:.0f} s; load "
        f"average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end).", "",
        table(rows), "",
        f"- Engine bytes are an estimate: engines_live x {weight_bytes / 2**20:.1f} MiB (the model's "
        "weights; ONNX Runtime reports no engine memory, trtserve_engine_device_memory_bytes is 0). Pool bytes are "
        "trtserve_buffer_pool_bytes. Both sampled from /metrics every 50 ms. \"held\" is the largest sample "
        "outside build windows; \"peak\" includes the switch, when the old engine is still draining.",
        "- Growth requests: sent after the first engine was live and overlapping a build window (inferred "
        f"from trtserve_engine_build_duration_seconds, widened by {STATS_LAG_S} s); steady: the others. "
        "Cold start: the stream's first request (batch 1), sent alone: it waits for the first engine, "
        "always built on the request path. Worker RSS is measured (psutil): an ONNX Runtime CPU session "
        "holds more than the weights (prepacked copies, arenas), so the engine estimate is a lower bound.", "",
        "## Goals (issue 3)", "",
        *[f"- {'PASS' if ok else 'FAIL'}: {what}" for what, ok in results], "",
    ])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_sweep.md").write_text(report)
    try:
        plot(runs, weight_bytes, args.out / "engine_sweep.png")
    except ImportError:  # matplotlib is a dev dependency; on a machine without it the table is the result
        print("matplotlib is not installed: no plot")
    print(report)
    print(f"wrote {args.out / 'engine_sweep.md'} and {args.out / 'engine_sweep.png'}")


if __name__ == "__main__":
    main()

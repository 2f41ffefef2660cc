"""Dynamic batching benchmark: `mlp` with batch-1 requests, served with batching on and off, against
the engine alone in-process at the same executed batch sizes.

    .venv/bin/python -m bench.batching [--quick] [--seconds 8] [--clients 1,8,32] [--intra-op-threads N]
        [--max-queue-delay-us US] [--preferred-batch-sizes 8,16,32]

A tmp repository holds two copies of the example `mlp`: `mlp_batched` (dynamic batching with Triton's
defaults, no window and no preferred sizes, unless the flags say otherwise) and `mlp_plain` (no dynamic
batching); both warm a 64-row engine so no build lands in a measurement. For each point, N closed-loop
tritonclient.grpc clients (threads of up to 4 processes) send batch-1 requests; the mean executed batch
and the served engine's time per run are read from the server's /metrics over the point (its 0.5 s
warm-up included). The engine alone is an OnnxRuntimeBuilder engine of capacity 64 run in this process
while the server idles, right after each point so that both see the same machine, in alternating rounds
(`EngineAlone`); its throughput at a fractional mean batch interpolates the time per run between the
neighbouring integer batch sizes. Goal: at 32 clients with batching on, served inferences/s >= 80% of
the engine alone at the mean executed batch. Clients, frontend, worker and engine share the same cores.
The table takes the ratio apart: served / alone = (share of the time the served engine was busy) x
(engine alone's time per run / served engine's time per run), and says whether a slower served run
waited for a core (the engine thread's CPU time over its run time, from /proc).
`--server-cpus` and `--client-cpus` (CPU lists such as 0-7,16-23) keep the load generator off the cores
that serve: the server's processes (every thread) and the engine alone on one set, the client processes on
the other. On a machine where clients and server share cores, the served engine runs on a core whose
other hardware thread, cache and memory bandwidth the clients use while the engine alone had them to
itself; in production the clients are elsewhere. The default pins nothing.
`--intra-op-threads N` configures the served engine and the engine alone alike. The default is 1: the
engine alone then has one core, as the served engine has at most while clients and frontend use the
others (0, ONNX Runtime's default of one thread per core, gives the engine alone every core, which the
served engine shares with the clients and the frontend: a comparison of unequal machines). Side-by-side
runs of the alternatives are in `bench/results/batching-settings-ab.md`.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.load import run_load_processes
from service.engines.onnxruntime_backend import OnnxRuntimeBuilder
from service.repository import ModelRepository
from tests.server import EXAMPLES, ServerProcess, start

GOAL = 0.80
CLIENT_PROCESSES = 4  # default; the clients' own GIL caps what one process of client threads sends
RESULTS = Path(__file__).resolve().parent / "results" / "batching.md"
# The batching window (max_queue_delay_microseconds): Triton's default of 0, batches form from what queued
# while the engine ran. With 32 closed-loop clients the window and preferred sizes changed little: 16 cores,
# one thread, 4 alternating rounds, 0 us 3927-5212 against 2000 us + preferred 8/16/32 4382-4481
# inferences/s (gpu/runs/16, 17); 2 cores: level (batching-settings-ab.md).
DELAY_US = 0
INTRA_OP_THREADS = 1
WARMUP = "engine_policy { warmup_batch_sizes: [ 64 ] }\n"
MODELS = {"on": "mlp_batched", "off": "mlp_plain"}


def batching_config(delay_us: int, preferred: tuple[int, ...] = ()) -> str:
    sizes = f" preferred_batch_size: [ {', '.join(map(str, preferred))} ]" if preferred else ""
    return f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us}{sizes} }}\n"


@dataclass
class Point:
    mode: str
    clients: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    mean_batch: float
    busy: float  # share of the measured time the served engine spent running batches
    run_ms: float  # the served engine's mean time per executed batch
    on_cpu: float  # share of the served engine's run time its thread was on a CPU
    engine_rps: float = math.nan
    engine_run_ms: float = math.nan  # the engine alone's time per run at the mean executed batch (median)
    engine_spread_ms: tuple[float, float] = (math.nan, math.nan)  # its fastest and slowest round
    round: int = 1

    @property
    def ratio(self) -> float:
        return self.rps / self.engine_rps


def make_repo(root: Path, delay_us: int = DELAY_US, preferred: tuple[int, ...] = ()) -> Path:
    """Two copies of the example mlp (copied: the server refuses model files outside its repository)."""
    src = EXAMPLES / "mlp"
    base = (src / "config.pbtxt").read_text().replace('name: "mlp"', "name: \"{name}\"")
    for name, extra in ((MODELS["on"], batching_config(delay_us, preferred) + WARMUP), (MODELS["off"], WARMUP)):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(base.replace("{name}", name) + extra)
        try:
            os.link(src / "1" / "model.onnx", root / name / "1" / "model.onnx")
        except OSError:
            shutil.copyfile(src / "1" / "model.onnx", root / name / "1" / "model.onnx")
    return root


@dataclass(frozen=True)
class Counts:
    """What the server's /metrics says about `model` at one moment."""

    rows: float  # trtserve_batch_size_sum: rows executed
    batches: float  # trtserve_batch_size_count: batches executed
    infer_s: float  # trtserve_compute_duration_seconds_sum{phase="infer"}: time the engine ran


def scrape(server: ServerProcess, model: str) -> Counts:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values = {(s.name, s.labels.get("phase")): s.value for fam in text_string_to_metric_families(text)
              for s in fam.samples if s.labels.get("model") == model}
    return Counts(values[("trtserve_batch_size_sum", None)],
                  values[("trtserve_batch_size_count", None)],
                  values[("trtserve_compute_duration_seconds_sum", "infer")])


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process `pid`, by thread id."""
    return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}


def serve_point(server: ServerProcess, mode: str, clients: int, seconds: float,
                client_processes: int = CLIENT_PROCESSES) -> Point:
    model = MODELS[mode]
    x = np.random.default_rng(clients).standard_normal((1, 1024), dtype=np.float32)
    worker = server.worker_pid(model)
    before, threads_before = scrape(server, model), thread_cpu_seconds(worker)
    # Client threads spread over up to 4 processes, as in bench.overhead: one process of tritonclient
    # threads is capped by its own GIL well below what the server can take.
    result = run_load_processes(server.url, model, {"x": x}, clients, seconds, {"x": "FP32"},
                                processes=min(clients, client_processes))
    time.sleep(0.3)  # the worker's last stats report (every 0.1 s)
    after, threads_after = scrape(server, model), thread_cpu_seconds(worker)
    # The worker's busiest thread over the point is its engine thread (it runs every batch of this size).
    engine_cpu_s = max(cpu - threads_before.get(tid, 0.0) for tid, cpu in threads_after.items())
    batches = after.batches - before.batches
    mean = (after.rows - before.rows) / batches if batches else math.nan
    run_s = (after.infer_s - before.infer_s) / batches if batches else math.nan
    busy = result.rps / mean * run_s  # batches per second of the measured load x time per batch
    run_ms = run_s * 1e3
    infer_s = after.infer_s - before.infer_s
    on_cpu = engine_cpu_s / infer_s if infer_s > 0 else math.nan
    return Point(mode, clients, result.rps, result.percentile_ms(50), result.percentile_ms(99), result.errors, mean,
                 busy, run_ms, on_cpu)


def parse_cpus(text: str) -> set[int]:
    """A CPU list as taskset and cgroups write it ("0-3,8") as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def cpu_list(cpus: set[int]) -> str:
    """`parse_cpus` backwards: {0, 1, 2, 3, 8} as "0-3,8"."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def pin(pid: int, cpus: set[int], descendants: bool = True) -> None:
    """Every thread of process `pid` (and of its descendants) onto `cpus`; the threads and processes they
    start later inherit it. (sched_setaffinity on a process id moves only its main thread.)"""
    process = psutil.Process(pid)
    for proc in [process, *(process.children(recursive=True) if descendants else ())]:
        for thread in proc.threads():
            os.sched_setaffinity(thread.id, cpus)


class EngineAlone:
    """The mlp engine in this process, timed at the batch sizes a point needs.

    The time per run of `mlp` is bound by memory bandwidth (32 MB of weights per run), which other work on
    a shared machine takes a varying share of: single 0.75 s measurements of one VM moved by a third. So
    each size is timed in ROUNDS short rounds, the two neighbouring sizes alternating, and the median of the
    rounds' medians is used; the rounds' spread is reported with it."""

    ROUNDS = 5

    def __init__(self, repo: Path, seconds: float, intra_op_threads: int = 0) -> None:
        spec = ModelRepository(repo).load_spec(MODELS["on"])
        self.engine = OnnxRuntimeBuilder(spec, intra_op_threads=intra_op_threads).build(64)
        self.seconds = seconds  # per batch size, over all rounds

    def _round(self, x: dict[str, np.ndarray], seconds: float) -> float:
        """Median seconds per run over `seconds` of runs (at least 5)."""
        times: list[float] = []
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop or len(times) < 5:
            t0 = time.perf_counter()
            self.engine.run(x)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    def seconds_per_run(self, mean_batch: float) -> tuple[float, float, float]:
        """(median, fastest, slowest round) seconds per run at a (fractional) batch size, interpolated
        between the neighbouring integer sizes."""
        lo = max(1, math.floor(mean_batch))
        hi = max(lo, math.ceil(mean_batch))
        sizes = sorted({lo, hi})
        xs = {b: {"x": np.random.default_rng(b).standard_normal((b, 1024), dtype=np.float32)} for b in sizes}
        for x in xs.values():
            for _ in range(3):
                self.engine.run(x)
        per_round: list[float] = []
        for _ in range(self.ROUNDS):
            t = {b: self._round(xs[b], self.seconds / self.ROUNDS) for b in sizes}
            per_round.append(t[lo] + (mean_batch - lo) * (t[hi] - t[lo]))
        return float(np.median(per_round)), min(per_round), max(per_round)


def goal_verdict(points: list[Point]) -> str:
    """PASS or FAIL of the goal point (batching on, 32 clients): its ratio, or with several rounds their
    median, the range beside it (on a shared host the engine's own speed moves between rounds)."""
    goal = [p for p in points if p.mode == "on" and p.clients == 32]
    if not goal:
        return "goal not measured (no 32-client point)"
    if len(goal) == 1:
        (p,) = goal
        return (f"{'PASS' if p.ratio >= GOAL else 'FAIL'}: at 32 clients with batching on, served {p.rps:.0f} "
                f"inferences/s = {p.ratio:.0%} of the engine alone at the mean executed batch {p.mean_batch:.2f} "
                f"({p.engine_rps:.0f} inferences/s); goal >= {GOAL:.0%}")
    ratios = sorted(p.ratio for p in goal)
    median = float(np.median(ratios))
    return (f"{'PASS' if median >= GOAL else 'FAIL'}: at 32 clients with batching on, served / engine alone "
            f"{median:.0%} in the median of {len(ratios)} rounds ({', '.join(f'{r:.0%}' for r in ratios)}); "
            f"goal >= {GOAL:.0%}")


def table(points: list[Point]) -> str:
    rounds = max(p.round for p in points) > 1
    lines = [("| round " if rounds else "") + "| batching | clients | inferences/s | p50 ms | p99 ms | errors "
             "| mean executed batch | engine alone inf/s at that batch | served / engine | served engine busy "
             "| ms per run served / alone | served engine on CPU |",
             ("|---" if rounds else "") + "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append((f"| {p.round} " if rounds else "") +
                     f"| {p.mode} | {p.clients} | {p.rps:.0f} | {p.p50_ms:.2f} | {p.p99_ms:.2f} | {p.errors} "
                     f"| {p.mean_batch:.2f} | {p.engine_rps:.0f} | {p.ratio:.0%} | {p.busy:.0%} "
                     f"| {p.run_ms:.2f} / {p.engine_run_ms:.2f} ({p.engine_spread_ms[0]:.2f}-"
                     f"{p.engine_spread_ms[1]:.2f}) | {p.on_cpu:.0%} |")
    return "\n".join(lines)


EXPLAINED = (
    "`served engine busy`: the share of the measured time the served engine spent running batches (executed "
    "batches per second x the mean infer time per batch, from trtserve_compute_duration_seconds{phase=\"infer\"} "
    "over the point). `ms per run`: the served engine's mean infer time per executed batch against the engine "
    "alone's at the same mean batch (median of 5 rounds; fastest-slowest round in brackets). served / engine "
    "= busy x alone / served: a low busy share means the engine waited for work (the serving path or the "
    "batching window), a served run slower than the engine alone's means the engine shared its core or ran "
    "slower on it. `served engine on CPU`: the CPU time of the worker's engine thread (its busiest thread, "
    "from /proc) over the served engine's run time: below 100%, the engine thread waited for a core during "
    "its runs (the cores were oversubscribed: clients, frontends and worker want more than there are); "
    "near 100% with a served run still slower than the engine alone's, it ran slower on its core (memory "
    "bandwidth and cache shared with the other processes).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s per point (under ~2 minutes in all)")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per point (default 8)")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--frontend-processes", type=int, default=1, help="the server's --frontend-processes")
    parser.add_argument("--intra-op-threads", type=int, default=INTRA_OP_THREADS,
                        help="ONNX Runtime threads of the served engine and of the engine alone "
                             "(0: ONNX Runtime's default, one per core)")
    parser.add_argument("--max-queue-delay-us", type=int, default=DELAY_US,
                        help="the batching window of mlp_batched (max_queue_delay_microseconds)")
    parser.add_argument("--preferred-batch-sizes", default="",
                        help="comma-separated preferred_batch_size of mlp_batched ('' for none)")
    parser.add_argument("--client-processes", type=int, default=CLIENT_PROCESSES,
                        help="load generator processes the clients are spread over (at most one per client)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every point this many times (each with its engine alone right after); "
                             "the verdict takes the median: on a shared host the engine's own speed moves")
    parser.add_argument("--server-cpus", type=parse_cpus, default=None,
                        help="CPUs of the server (all its processes and threads) and of the engine alone, "
                             "e.g. 0-7 (default: not pinned)")
    parser.add_argument("--client-cpus", type=parse_cpus, default=None,
                        help="CPUs of the load generator processes, e.g. 8-15 (default: not pinned)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the report (markdown) to write")
    args = parser.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    load_before = os.getloadavg()[0]  # other work on the machine skews every number; say so
    counts = [int(c) for c in args.clients.split(",")]
    preferred = tuple(int(b) for b in args.preferred_batch_sizes.split(",") if b)
    points: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="trtserve-bench-") as tmp:
        repo = make_repo(Path(tmp), args.max_queue_delay_us, preferred)
        engine = EngineAlone(repo, seconds=1.5 if args.quick else 4.0, intra_op_threads=args.intra_op_threads)
        with start(repo, ["--frontend-processes", str(args.frontend_processes),
                          "--intra-op-threads", str(args.intra_op_threads)]) as server:
            if args.server_cpus:
                pin(server.proc.pid, args.server_cpus)
            home = args.server_cpus or os.sched_getaffinity(0)  # where the engine alone runs
            for round_ in range(1, args.rounds + 1):
                for mode in ("on", "off"):
                    for clients in counts:
                        if args.client_cpus:  # the load generator's processes inherit it
                            pin(os.getpid(), args.client_cpus, descendants=False)
                        points.append(p := serve_point(server, mode, clients, seconds, args.client_processes))
                        if args.client_cpus or args.server_cpus:
                            pin(os.getpid(), home, descendants=False)
                        median, fastest, slowest = engine.seconds_per_run(p.mean_batch)
                        p.engine_run_ms, p.engine_spread_ms = median * 1e3, (fastest * 1e3, slowest * 1e3)
                        p.engine_rps = p.mean_batch / p.engine_run_ms * 1e3
                        p.round = round_
                        print(f"round {round_}, batching {mode}, {clients} clients: {p.rps:.0f} inferences/s, "
                              f"mean executed batch {p.mean_batch:.2f}, engine alone {p.engine_rps:.0f} "
                              "inferences/s", flush=True)
    verdict = goal_verdict(points)
    load_after = os.getloadavg()[0]
    if load_before > (os.cpu_count() or 1) / 2:  # the benchmark's own load shows in load_after only
        verdict += (f"\n\nCaution: the machine was busy with other work before the run (load average "
                    f"{load_before:.1f} on {os.cpu_count()} CPUs); every number above moves with it, the "
                    f"ratios included. Rerun on an idle machine before trusting them.")
    sharing = ("shared by clients, server and engine" if not (args.server_cpus or args.client_cpus) else
               f"server and engine alone on {cpu_list(args.server_cpus) if args.server_cpus else 'any'}, "
               f"clients on {cpu_list(args.client_cpus) if args.client_cpus else 'any'}")
    report = "\n".join([
        "# Dynamic batching: mlp, batch-1 requests", "",
        f"`.venv/bin/python -m bench.batching{' --quick' if args.quick else ''} --frontend-processes "
        f"{args.frontend_processes} --intra-op-threads {args.intra_op_threads} --max-queue-delay-us "
        f"{args.max_queue_delay_us} --preferred-batch-sizes '{args.preferred_batch_sizes}' "
        f"--client-processes {args.client_processes}"
        f"{f' --rounds {args.rounds}' if args.rounds > 1 else ''}"
        f"{f' --server-cpus {cpu_list(args.server_cpus)}' if args.server_cpus else ''}"
        f"{f' --client-cpus {cpu_list(args.client_cpus)}' if args.client_cpus else ''}"
        f"{'' if args.out == RESULTS else f' --out {args.out}'}`: {seconds:g} s per point, "
        f"{os.cpu_count()} CPUs, {sharing} (1-minute load average before/after: "
        f"{load_before:.1f}/{load_after:.1f}); max_queue_delay {args.max_queue_delay_us} µs, preferred "
        f"{'/'.join(map(str, preferred)) or 'none'}.",
        "", table(points), "", EXPLAINED, "", verdict, ""])
    print()
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)


if __name__ == "__main__":
    main()

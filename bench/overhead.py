"""Serving overhead: `tiny` at batch 1 against trtserve and against the bare grpc.aio floor, side by side.

    .venv/bin/python -m bench.overhead [--quick] [--clients 1,8,32] [--seconds S] [--rounds N] [--client-procs auto]
                                       [--frontend-processes 1]

Both servers run as their own processes on 127.0.0.1: trtserve with `--model-control-mode explicit
--load-model tiny` (frontend plus one worker process), and `bench.floor_server`, which answers every
ModelInfer with the same 90-byte response without parsing the request (with `--frontend-processes N`:
trtserve's N frontend processes against N floor processes sharing one port). For each mode (unary, streaming)
and client count, the floor and trtserve are measured alternately (`--rounds` each, so that whatever else
the machine does falls on both alike) with the same load: closed-loop `tritonclient.grpc` clients (each
sends its next request when the previous one returned).

The load generator is Python too and shares the machine's cores with the server. One process of
tritonclient threads is capped by its own GIL, which would cap floor and trtserve alike and hide the
difference, so the clients are spread over `--client-procs` processes (default `auto`: as many as there
are clients, at most 4), threads inside each; every process starts measuring at the same moment (a
barrier) and the results are summed. Four was the best on the 2-core machine: the floor at 8 unary
clients made 357 requests/s with 1 client process, 1011 with 2, 1730 with 4, 1573 with 8. Besides
requests/s, the table gives the server's CPU time per request (all its processes, from psutil), which
depends less on how the cores are shared.

Writes bench/results/overhead.md, overhead.json and overhead.png. Goal: trtserve >= 60% of the floor's
requests/s at 8 clients.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil

from bench.load import CLIENT_HEAP_KEEP_BYTES
from tests.server import EXAMPLES, ROOT, start

RESULTS = ROOT / "bench" / "results"
GOAL_RATIO = 0.6
GOAL_CLIENTS = 8
WARMUP_S = 0.5
_FLOOR_LINE = re.compile(r"floor listening: [^ ]+:(\d+)")


@dataclass
class Measurement:
    """One load run against one server."""

    server: str
    mode: str  # unary | stream
    clients: int
    client_procs: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_cpu_us: float  # server CPU time (user + system, all its processes) per request
    client_cpu_pct: float  # CPU used by the load generator processes, in % of one core
    other_cpu_pct: float  # CPU used by everything else on the machine meanwhile, in % of one core
    rounds: int = 1
    latencies_s: list[float] = field(default_factory=list, repr=False)
    cpu_by_pid: dict[int, float] = field(default_factory=dict, repr=False)  # µs per request of each process
    switches: float = 0.0  # context switches of all server threads per request
    main_cpu_us: float = 0.0  # of server_cpu_us, the processes started as the server (not their children)
    main_faults: float = 0.0  # minor page faults per request of the processes started as the server
    round_rps: list[float] = field(default_factory=list)  # requests/s of each round, in order


@dataclass(frozen=True)
class Request:
    """What every client sends: one FP32 input `x` of `shape` (random, seed 0) to `model`; and the freed heap
    its process keeps (bench.load's default; 0: glibc's defaults)."""

    model: str = "tiny"
    shape: tuple[int, ...] = (1, 16)
    heap_keep_bytes: int = CLIENT_HEAP_KEEP_BYTES


def _client_proc(url: str, threads: int, seconds: float, stream: bool, barrier: object, out: object,
                 request: Request) -> None:
    from bench.load import run_load

    x = np.random.default_rng(0).standard_normal(request.shape, dtype=np.float32)
    barrier.wait()
    r = run_load(url, request.model, {"x": x}, threads, seconds, {"x": "FP32"}, stream=stream, warmup_s=WARMUP_S,
                 heap_keep_bytes=request.heap_keep_bytes)
    out.put((r.latencies_s.tolist(), r.errors))


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _switches(pids: list[int]) -> int:
    """Context switches (voluntary + involuntary) of every thread of these processes so far: each one is
    a thread that went to sleep or was preempted, the price of a hop between threads or processes."""
    total = 0
    for pid in pids:
        for status in Path(f"/proc/{pid}/task").glob("*/status"):
            try:
                for line in status.read_text().splitlines():
                    if "ctxt_switches:" in line:
                        total += int(line.split(":")[1])
            except (OSError, ValueError):
                continue
    return total


def minor_faults(pid: int) -> int:
    """Minor page faults of a process so far (/proc/PID/stat's minflt): pages it touched for the first time,
    each found, zeroed and mapped by the kernel."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return 0


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def measure(server: str, url: str, server_pids: list[int], clients: int, seconds: float, stream: bool,
            client_procs: int, request: Request = Request()) -> Measurement:
    """Closed-loop load from `clients` tritonclient threads spread over `client_procs` processes."""
    ctx = multiprocessing.get_context("spawn")
    nprocs = max(1, min(client_procs, clients))
    split = [clients // nprocs + (1 if i < clients % nprocs else 0) for i in range(nprocs)]
    barrier, out = ctx.Barrier(nprocs + 1), ctx.Queue()
    procs = [ctx.Process(target=_client_proc, args=(url, n, seconds, stream, barrier, out, request),
                         daemon=True)
             for n in split]
    for p in procs:
        p.start()
    watched = [psutil.Process(pid) for pid in server_pids]
    watched += [c for p in list(watched) for c in p.children(recursive=True)]
    clients_ps = [psutil.Process(p.pid) for p in procs]
    try:
        barrier.wait(timeout=120)  # a client that died while starting breaks the barrier instead of hanging
    except threading.BrokenBarrierError:
        for p in procs:
            p.kill()
        codes = [p.exitcode for p in procs]
        raise RuntimeError(f"load generator processes did not start (exit codes {codes})") from None
    time.sleep(WARMUP_S)
    sw0 = _switches([p.pid for p in watched])
    faults0 = sum(minor_faults(pid) for pid in server_pids)
    each0 = {p.pid: _cpu_seconds([p]) for p in watched}  # one reading per process; the totals are their sums
    ccpu0, busy0, t0 = _cpu_seconds(clients_ps), _busy_seconds(), time.monotonic()
    time.sleep(seconds)
    ccpu1, busy1, t1 = _cpu_seconds(clients_ps), _busy_seconds(), time.monotonic()
    each1 = {p.pid: _cpu_seconds([p]) for p in watched}
    sw1 = _switches([p.pid for p in watched])
    faults1 = sum(minor_faults(pid) for pid in server_pids)
    cpu0, cpu1 = sum(each0.values()), sum(each1.values())
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
    lat = np.array([x for lats, _ in results for x in lats])
    errors = sum(e for _, e in results)
    rps = len(lat) / seconds

    def pct(q: float) -> float:
        return float(np.percentile(lat, q) * 1000) if len(lat) else float("nan")

    done_in_window = max(rps * (t1 - t0), 1.0)
    other = max((busy1 - busy0) - (cpu1 - cpu0) - (ccpu1 - ccpu0), 0.0)
    return Measurement(server, "stream" if stream else "unary", clients, nprocs, rps, pct(50), pct(99), errors,
                       (cpu1 - cpu0) / done_in_window * 1e6, (ccpu1 - ccpu0) / (t1 - t0) * 100,
                       other / (t1 - t0) * 100, 1, lat.tolist(),
                       {pid: (each1[pid] - each0[pid]) / done_in_window * 1e6 for pid in each0},
                       (sw1 - sw0) / done_in_window,
                       sum(each1[pid] - each0[pid] for pid in server_pids) / done_in_window * 1e6,
                       (faults1 - faults0) / done_in_window)


def combine(rounds: list[Measurement]) -> Measurement:
    """Rounds of the same case as one measurement: mean requests/s, pooled latencies, CPU per request."""
    first = rounds[0]
    lat = np.array([x for m in rounds for x in m.latencies_s])
    weight = sum(m.rps for m in rounds) or 1.0

    def pct(q: float) -> float:
        return float(np.percentile(lat, q) * 1000) if len(lat) else float("nan")

    return Measurement(first.server, first.mode, first.clients, first.client_procs,
                       float(np.mean([m.rps for m in rounds])), pct(50), pct(99), sum(m.errors for m in rounds),
                       sum(m.server_cpu_us * m.rps for m in rounds) / weight,
                       float(np.mean([m.client_cpu_pct for m in rounds])),
                       float(np.mean([m.other_cpu_pct for m in rounds])), len(rounds), lat.tolist(),
                       switches=sum(m.switches * m.rps for m in rounds) / weight,
                       main_cpu_us=sum(m.main_cpu_us * m.rps for m in rounds) / weight,
                       main_faults=sum(m.main_faults * m.rps for m in rounds) / weight,
                       round_rps=[m.rps for m in rounds])


class FloorProcess:
    """`python -m bench.floor_server --port PORT [flags]` as a child process. Several may share one port
    (gRPC servers bind with SO_REUSEPORT, as trtserve's frontend processes do); 0 picks a free one."""

    def __init__(self, *flags: str, port: int = 0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.floor_server", "--port", str(port), *flags],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        match = _FLOOR_LINE.search(line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"floor server did not start: {line!r}{self.proc.stdout.read()}")
        self.url = f"127.0.0.1:{match.group(1)}"

    def __enter__(self) -> FloorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@contextlib.contextmanager
def floor_processes(count: int) -> Iterator[list[FloorProcess]]:
    """`count` floor servers sharing one port (the first one picks it)."""
    with contextlib.ExitStack() as stack:
        floors = [stack.enter_context(FloorProcess())]
        port = int(floors[0].url.rsplit(":", 1)[1])
        floors += [stack.enter_context(FloorProcess(port=port)) for _ in range(count - 1)]
        yield floors


@contextlib.contextmanager
def servers(frontends: int = 1) -> Iterator[list[tuple[str, str, list[int]]]]:
    """The floor and trtserve as (name, url, pids): trtserve with `frontends` frontend processes, the floor
    as that many processes sharing one port (each a bare grpc.aio server, so the ceiling grows with them as
    trtserve's would)."""
    flags = ["--model-control-mode", "explicit", "--load-model", "tiny", "--frontend-processes", str(frontends)]
    with start(EXAMPLES, flags) as trt, floor_processes(frontends) as floors:
        yield [("floor", floors[0].url, [f.proc.pid for f in floors]), ("trtserve", trt.url, [trt.proc.pid])]


def run(clients: list[int], seconds: float, client_procs: int | None, rounds: int,
        frontends: int = 1) -> list[Measurement]:
    """Every (mode, clients) case: floor and trtserve (`servers`) alternately, `rounds` times each, then
    combined (`alternate`)."""
    results: list[Measurement] = []
    with servers(frontends) as both:
        for stream in (False, True):
            for n in clients:
                procs = client_procs if client_procs is not None else min(n, 4)
                results += alternate(both, rounds, n, seconds, stream, procs)
    return results


def alternate(servers: list[tuple[str, str, list[int]]], rounds: int, clients: int, seconds: float, stream: bool,
              client_procs: int, request: Request = Request(),
              requests: dict[str, Request] | None = None) -> list[Measurement]:
    """Each of `servers` (name, url, pids) under the same load in turn, `rounds` times, then each one's rounds
    combined. Alternating short rounds spreads whatever else the machine is doing over all of them alike.
    `requests` names the servers whose clients send something else than `request`."""
    done: dict[str, list[Measurement]] = {name: [] for name, _, _ in servers}
    for _ in range(rounds):
        for name, url, pids in servers:
            m = measure(name, url, pids, clients, seconds, stream, client_procs, (requests or {}).get(name, request))
            print(f"{name:8s} {m.mode:6s} clients={clients:3d} procs={m.client_procs} rps={m.rps:8.0f} "
                  f"p50={m.p50_ms:6.2f}ms p99={m.p99_ms:6.2f}ms errors={m.errors} "
                  f"server_cpu={m.server_cpu_us:6.0f}us/req (main {m.main_cpu_us:4.0f}) "
                  f"switches={m.switches:4.1f}/req faults={m.main_faults:5.0f}/req "
                  f"client_cpu={m.client_cpu_pct:4.0f}% "
                  f"other_cpu={m.other_cpu_pct:4.0f}%", flush=True)
            done[name].append(m)
    return [combine(ms) for ms in done.values()]


def _pairs(results: list[Measurement]) -> list[tuple[Measurement, Measurement]]:
    by = {(m.server, m.mode, m.clients): m for m in results}
    return [(by[("floor", m.mode, m.clients)], m) for m in results
            if m.server == "trtserve" and ("floor", m.mode, m.clients) in by]


def round_ratios(floor: Measurement, trtserve: Measurement) -> list[float]:
    """trtserve / floor requests/s of each round: the two were measured one right after the other."""
    return [t / f for f, t in zip(floor.round_rps or [floor.rps], trtserve.round_rps or [trtserve.rps]) if f > 0]


def verdict(results: list[Measurement]) -> list[tuple[str, float, list[float], bool]]:
    """(mode, median of the rounds' trtserve/floor requests/s, each round's, passed) at the goal's client
    count. The median of adjacent pairs, not the ratio of the means: a round in which the shared machine was
    slower for both moves the verdict less."""
    found = []
    for f, t in _pairs(results):
        ratios = round_ratios(f, t)
        if t.clients == GOAL_CLIENTS and ratios:
            median = float(np.median(ratios))
            found.append((t.mode, median, ratios, median >= GOAL_RATIO and t.errors == 0))
    return found


def _verdict_line(mode: str, median: float, ratios: list[float], ok: bool) -> str:
    each = ", ".join(f"{r:.0%}" for r in ratios)
    return (f"{'PASS' if ok else 'FAIL'}: {mode} at {GOAL_CLIENTS} clients trtserve / floor {median:.0%} in the "
            f"median of {len(ratios)} round(s) ({each}); goal >= {GOAL_RATIO:.0%}")


def markdown(results: list[Measurement], command: str, seconds: float, rounds: int, frontends: int = 1) -> str:
    other = max((m.other_cpu_pct for m in results), default=0.0)
    lines = [
        "# Serving overhead: trtserve vs the bare grpc.aio floor",
        "",
        f"Command: `{command}` ({rounds} alternating rounds per server and case, {seconds:g} s measured per "
        f"round after {WARMUP_S:g} s warm-up; requests/s is the mean of the rounds, percentiles pool them; the "
        f"goal's verdict takes the median of the rounds' ratios, each round's floor and trtserve measured one "
        f"after the other).",
        "",
        "`tiny` (y = x + c, FP32 [1,16]) at batch 1, closed-loop `tritonclient.grpc` clients on 127.0.0.1. "
        "floor = `bench/floor_server.py`, a grpc.aio server with generic handlers that answers a constant "
        "pre-serialized response of the same size (90 bytes) without parsing the request: the ceiling for "
        "Python gRPC on this machine. trtserve = `python -m service serve --model-control-mode explicit "
        "--load-model tiny` (frontend + one worker process, ONNX Runtime on the CPU). Clients are threads "
        "spread over several processes (column `procs`; 4 gave the floor the most requests/s here) so the load "
        "generator's GIL caps neither server; "
        "the load generator still shares the cores with the server. `server CPU` = user + system CPU time of "
        "all server processes per request (less sensitive to how the cores are shared than requests/s), for "
        "trtserve split into its parent process (the frontend) and the rest (the model's worker, and any extra "
        "frontend processes); "
        "`switches` = context switches of all server threads per request (each is a thread going to sleep "
        "or being preempted: the price of handing work between threads and processes).",
        "",
        *([f"Here trtserve ran {frontends} frontend processes (`--frontend-processes {frontends}`) and the floor "
           f"{frontends} processes sharing one port: the ceiling of {frontends} Python gRPC processes.", ""]
          if frontends > 1 else []),
        f"`other CPU` = what every other process on the machine used meanwhile, in % of one core (up to "
        f"{other:.0f}% in this run): on a shared machine requests/s move with it, the ratio and CPU per request less.",
        "",
        "| mode | clients | procs | floor req/s | trtserve req/s | trtserve/floor | floor p50 / p99 ms "
        "| trtserve p50 / p99 ms | floor CPU µs/req | trtserve CPU µs/req (frontend / rest) "
        "| floor / trtserve switches/req "
        "| other CPU % | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f, t in _pairs(results):
        lines.append(
            f"| {t.mode} | {t.clients} | {t.client_procs} | {f.rps:.0f} | {t.rps:.0f} | {t.rps / f.rps:.0%} | "
            f"{f.p50_ms:.2f} / {f.p99_ms:.2f} | {t.p50_ms:.2f} / {t.p99_ms:.2f} | {f.server_cpu_us:.0f} | "
            f"{t.server_cpu_us:.0f} ({t.main_cpu_us:.0f} / {t.server_cpu_us - t.main_cpu_us:.0f}) | "
            f"{f.switches:.1f} / {t.switches:.1f} | "
            f"{(f.other_cpu_pct + t.other_cpu_pct) / 2:.0f} | {f.errors + t.errors} |")
    lines.append("")
    for found in verdict(results):
        lines.append(f"- Goal: {_verdict_line(*found)}")
    lines += ["", "![requests/s, floor vs trtserve](overhead.png)", ""]
    return "\n".join(lines)


def plot(results: list[Measurement], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = _pairs(results)
    labels = [f"{t.mode}\n{t.clients} cl" for _, t in pairs]
    x = np.arange(len(pairs))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax.bar(x - 0.2, [f.rps for f, _ in pairs], 0.4, label="floor (bare grpc.aio)", color="#999999")
    bars = ax.bar(x + 0.2, [t.rps for _, t in pairs], 0.4, label="trtserve", color="#1f77b4")
    for bar, (f, t) in zip(bars, pairs):
        ax.annotate(f"{t.rps / f.rps:.0%}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, labels)
    ax.set_ylabel("requests/s")
    ax.set_title("tiny, batch 1: requests/s (label: trtserve/floor)")
    ax.legend()
    ax2.bar(x - 0.2, [f.server_cpu_us for f, _ in pairs], 0.4, label="floor", color="#999999")
    ax2.bar(x + 0.2, [t.server_cpu_us for _, t in pairs], 0.4, label="trtserve", color="#1f77b4")
    ax2.set_xticks(x, labels)
    ax2.set_ylabel("server CPU µs / request")
    ax2.set_title("server CPU time per request (all processes)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 3 s per case instead of 5 of 10 s")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per round")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per case and server")
    parser.add_argument("--client-procs", default="auto",
                        help="load generator processes per run; auto = min(clients, 4)")
    parser.add_argument("--frontend-processes", type=int, default=1,
                        help="trtserve's frontend processes, and as many floor processes sharing one port")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.frontend_processes < 1:
        parser.error("--frontend-processes must be at least 1")
    seconds = args.seconds if args.seconds is not None else (3.0 if args.quick else 10.0)
    procs = None if args.client_procs == "auto" else int(args.client_procs)
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 5)
    results = run([int(c) for c in args.clients.split(",")], seconds, procs, rounds, args.frontend_processes)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python -m bench.overhead", *sys.argv[1:]])
    (args.out / "overhead.md").write_text(markdown(results, command, seconds, rounds, args.frontend_processes))
    rows = [{k: v for k, v in asdict(m).items() if k != "latencies_s"} for m in results]
    (args.out / "overhead.json").write_text(json.dumps(rows, indent=1))
    plot(results, args.out / "overhead.png")
    for found in verdict(results):
        print(_verdict_line(*found))
    print(f"wrote {args.out / 'overhead.md'}")


if __name__ == "__main__":
    main()

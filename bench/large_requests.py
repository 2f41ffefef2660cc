"""Large requests: what a 512 KiB request costs a frontend process, with and without `--heap-keep-bytes`.

    .venv/bin/python -m bench.large_requests [--quick] [--clients 8] [--seconds S] [--rounds N]

The GPU benchmark's (a) sends batch-8 `convnet` requests (x FP32 [8,16,32,32], 512 KiB); on 16 cores its
frontend processes are what holds it back (bench/results/gpu/analysis.md). Here the same requests go to
`sum16`, a model with `convnet`'s input and output but almost no compute (ReduceMean over the image,
then a 16x10 MatMul; generated with a fixed seed into a temporary repository, dynamic batching as in
bench.gpu), so that what is measured is the serving path of a large request on this machine's CPU.

Four servers, measured alternately with the same load (closed-loop `tritonclient.grpc` clients):
trtserve with its default heap setting and with `--heap-keep-bytes 0` (glibc's defaults), and the
floor (`bench.floor_server`, a constant answer, no parsing) with the same two settings; and a fifth case,
trtserve with its default again under clients whose processes keep glibc's defaults (bench.load keeps
freed heap in the load generator too, which shares the machine). Besides requests/s and CPU per request
of the server and of the clients, the table gives the minor page faults per request of the process that
receives the requests (the pages glibc handed back to the kernel and took fresh again) and its resident
memory after the rounds (what keeping freed heap costs).

Writes bench/results/large_requests.md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import psutil
from onnx import TensorProto, helper, numpy_helper

from bench.overhead import WARMUP_S, FloorProcess, Measurement, Request, alternate
from tests.server import ROOT, start

RESULTS = ROOT / "bench" / "results"
MODEL = "sum16"
REQUEST = Request(MODEL, (8, 16, 32, 32))
CLIENTS_HEAP_0 = "trtserve, clients heap 0"
CONFIG = f"""name: "{MODEL}"
backend: "onnxruntime"
max_batch_size: 64
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 16, 32, 32 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 10 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
"""


def write_repository(root: Path) -> Path:
    """A repository holding `sum16`: x FP32 [N,16,32,32] -> mean over 32x32 -> MatMul 16x10 -> y FP32 [N,10]."""
    w = np.random.default_rng(16).standard_normal((16, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=0),
         helper.make_node("MatMul", ["mean", "w"], ["y"])],
        MODEL,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes"), numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    (root / MODEL / "1").mkdir(parents=True)
    onnx.save(model, root / MODEL / "1" / "model.onnx")
    (root / MODEL / "config.pbtxt").write_text(CONFIG)
    return root


@contextlib.contextmanager
def servers(repo: Path) -> Iterator[list[tuple[str, str, list[int]]]]:
    """(name, url, pids) of trtserve and the floor, each with the default heap setting and with glibc's."""
    flags = ["--model-control-mode", "explicit", "--load-model", MODEL]
    with start(repo, flags) as kept, start(repo, [*flags, "--heap-keep-bytes", "0"]) as plain, \
            FloorProcess() as floor_kept, FloorProcess("--heap-keep-bytes", "0") as floor_plain:
        yield [("trtserve", kept.url, [kept.proc.pid]), ("trtserve, heap 0", plain.url, [plain.proc.pid]),
               ("floor", floor_kept.url, [floor_kept.proc.pid]),
               ("floor, heap 0", floor_plain.url, [floor_plain.proc.pid])]


def run(clients: int, seconds: float, rounds: int) -> tuple[list[Measurement], dict[str, float]]:
    """The servers' combined measurements, and each receiving process's resident memory (MiB) at the end."""
    with tempfile.TemporaryDirectory(prefix="trtserve-large-") as tmp, servers(write_repository(Path(tmp))) as all_:
        cases = [*all_, (CLIENTS_HEAP_0, *next(entry[1:] for entry in all_ if entry[0] == "trtserve"))]
        results = alternate(cases, rounds, clients, seconds, False, min(clients, 4), REQUEST,
                            {CLIENTS_HEAP_0: replace(REQUEST, heap_keep_bytes=0)})
        rss = {name: psutil.Process(pids[0]).memory_info().rss / 2**20 for name, _, pids in cases}
    return results, rss


def client_us(m: Measurement) -> float:
    """The load generator's CPU per request, µs."""
    return m.client_cpu_pct / 100 / m.rps * 1e6 if m.rps else float("nan")


def markdown(results: list[Measurement], rss: dict[str, float], command: str, clients: int, seconds: float,
             rounds: int) -> str:
    by = {m.server: m for m in results}
    lines = [
        "# Large requests: a frontend's CPU per 512 KiB request, and the heap setting",
        "",
        f"Command: `{command}` ({rounds} alternating rounds per server, {seconds:g} s measured per round after "
        f"{WARMUP_S:g} s warm-up; {clients} closed-loop unary `tritonclient.grpc` clients in "
        f"{min(clients, 4)} processes on 127.0.0.1).",
        "",
        f"Each request: x FP32 [8,16,32,32] (512 KiB) to `{MODEL}`, a model with `convnet`'s input and output and "
        "almost no compute (bench/large_requests.py says why). `heap 0` = `--heap-keep-bytes 0`: glibc malloc's "
        "defaults, under which freed buffers above 128 KiB go back to the kernel. `frontend` = the process that "
        "receives the requests (trtserve's parent process; the floor's only one), `rest` = trtserve's model "
        "worker. `faults/req` = minor page faults of that process per request; `RSS` = its resident memory "
        "after the last round, what keeping freed heap costs. `clients heap 0`: the load generator's processes "
        "with glibc's defaults (the other rows: they keep freed heap); `client CPU` = the load generator's CPU "
        "per request.",
        "",
        "| server | requests/s | p50 / p99 ms | server CPU µs/req (frontend / rest) | faults/req | RSS MiB | "
        "client CPU µs/req | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in results:
        lines.append(f"| {m.server} | {m.rps:.0f} | {m.p50_ms:.2f} / {m.p99_ms:.2f} | {m.server_cpu_us:.0f} "
                     f"({m.main_cpu_us:.0f} / {m.server_cpu_us - m.main_cpu_us:.0f}) | {m.main_faults:.0f} | "
                     f"{rss[m.server]:.0f} | {client_us(m):.0f} | {m.errors} |")
    kept, plain, clients_plain = by["trtserve"], by["trtserve, heap 0"], by[CLIENTS_HEAP_0]
    lines += ["", f"trtserve's frontend with the default heap setting against `--heap-keep-bytes 0`: "
              f"{kept.main_cpu_us / plain.main_cpu_us - 1:+.0%} CPU per request, "
              f"{kept.rps / plain.rps - 1:+.0%} requests/s, {rss['trtserve'] - rss['trtserve, heap 0']:+.0f} MiB "
              f"resident. The load generator keeping freed heap against glibc's defaults: "
              f"{client_us(kept) / client_us(clients_plain) - 1:+.0%} of its CPU per request, trtserve "
              f"{kept.rps / clients_plain.rps - 1:+.0%} requests/s.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 s per server instead of 4 of 5 s")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per round")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per server")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    seconds = args.seconds if args.seconds is not None else (3.0 if args.quick else 5.0)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 4)
    results, rss = run(args.clients, seconds, rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python -m bench.large_requests", *sys.argv[1:]])
    (args.out / "large_requests.md").write_text(markdown(results, rss, command, args.clients, seconds, rounds))
    print(f"wrote {args.out / 'large_requests.md'}")


if __name__ == "__main__":
    main()

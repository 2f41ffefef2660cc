"""(a) of bench.gpu alone, in variants of the batching window, the frontend process count and the
load generator's process count and heap setting, alternating over rounds (run on the H200):

    python3 -m bench.gpu_variants [--seconds 6] [--rounds 2] [--variants 2000:4:16,0:4:16,2000:4:16:0]
                                  [--out FILE.md]

Each variant is `max_queue_delay_microseconds:frontend processes:client processes[:client heap]`, client
heap 1 (the default: the load generator keeps freed heap, bench.load) or 0 (glibc's defaults); each window
gets its own copy of `convnet` (as bench.gpu configures it, with that window). Besides served / engine alone it prints
the engine's busy share (executions/s x the worker's measured run time) and the request's time split
(client, inside the server, queued in the worker), to tell a batching window or a process count that
keeps the engine waiting from a VM's noise. Runs: bench/results/gpu/runs/42, 43 (session 13), 44.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import numpy as np

from bench.gpu import _repo, convnet_load
from bench.gpu_alone import engine_alone
from bench.load import CLIENT_HEAP_KEEP_BYTES
from tests.server import ROOT, start


def _add_windows(repo: Path, delays: list[int]) -> None:
    """`convnet_d<us>`: bench.gpu's convnet with that batching window."""
    config = (repo / "convnet" / "config.pbtxt").read_text()
    for delay in delays:
        name = f"convnet_d{delay}"
        shutil.rmtree(repo / name, ignore_errors=True)
        shutil.copytree(repo / "convnet", repo / name)
        text = re.sub(r'name: "\w+"', f'name: "{name}"', config, count=1)
        text = re.sub(r"max_queue_delay_microseconds: \d+", f"max_queue_delay_microseconds: {delay}", text)
        (repo / name / "config.pbtxt").write_text(text)


def served(repo: Path, model: str, frontends: int, seconds: float, client_processes: int,
           client_heap_keep_bytes: int = CLIENT_HEAP_KEEP_BYTES) -> dict:
    """(a)'s load against one server: batch-8 requests from 64 clients; what the worker reported."""
    x8 = {"x": np.random.default_rng(0).standard_normal((8, 16, 32, 32), dtype=np.float32)}
    args = ["--model-control-mode", "explicit", "--load-model", model, "--frontend-processes", str(frontends)]
    with start(repo, args, timeout_s=300) as server:
        a = convnet_load(server, model, x8, seconds, client_processes, client_heap_keep_bytes=client_heap_keep_bytes)
    load = a["load"]
    if not a["executions"]:
        raise RuntimeError(f"{model}: no batch ran ({load.errors} requests failed)")
    return {"rate": load.rps * 8, "batch": a["mean_batch"],
            "busy": load.rps * 8 / a["mean_batch"] * a["phases_ms"]["infer"] / 1e3,
            "p50": load.percentile_ms(50), "client_ms": float(np.mean(load.latencies_s)) * 1e3,
            "server_ms": a["server_ms"], "queue_ms": a["queue_ms"], "cpu": str(a["cpu"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="2000:4:16,0:4:16,500:4:16,2000:8:16,0:8:16,2000:4:32",
                        help="comma-separated delay_us:frontend_processes:client_processes[:client_heap 1|0]")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    variants = [(*(int(x) for x in v.split(":")), 1)[:4] for v in args.variants.split(",")]
    repo = _repo(Path("/tmp/trtserve-gpu-bench"), ROOT / "examples" / "models")
    _add_windows(repo, sorted({v[0] for v in variants}))
    results = []
    for round_ in range(1, args.rounds + 1):
        for delay, frontends, clients, heap in (variants if round_ % 2 else variants[::-1]):
            keep = CLIENT_HEAP_KEEP_BYTES if heap else 0
            r = served(repo, f"convnet_d{delay}", frontends, args.seconds, clients, keep)
            r.update(round=round_, delay=delay, frontends=frontends, clients=clients, heap=heap)
            results.append(r)
            print(f"round {round_}, window {delay} us, {frontends} frontends, {clients} client processes "
                  f"(heap {heap}): "
                  f"{r['rate']:.0f}/s, batch {r['batch']:.1f}, engine busy {r['busy']:.0%} | {r['cpu']}", flush=True)
    alone = {}
    for r in results:
        batch = max(1, round(r["batch"]))
        if batch not in alone:
            alone[batch] = engine_alone(repo, "convnet", batch, min(args.seconds, 10))
    lines = ["| round | window us | frontend processes | client processes (heap) | served inferences/s | mean batch | "
             "engine alone at that batch | served / alone | engine busy | p50 ms | client / server / queued ms | CPU |",
             "|---" * 12 + "|"]
    for r in results:
        a = alone[max(1, round(r["batch"]))]
        lines.append(f"| {r['round']} | {r['delay']} | {r['frontends']} | {r['clients']} ({r['heap']}) | "
                     f"{r['rate']:.0f} | {r['batch']:.1f} | {a:.0f} | {r['rate'] / a:.1%} | {r['busy']:.0%} | "
                     f"{r['p50']:.1f} | {r['client_ms']:.2f} / {r['server_ms']:.2f} / {r['queue_ms']:.2f} | "
                     f"{r['cpu']} |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Quick serving throughput: `tiny` at batch 1 and `mlp` at batch 8 against the real server on 127.0.0.1.

    .venv/bin/python -m bench.serving [--seconds 5] [--clients 1,8]
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.load import run_load
from tests.server import EXAMPLES, start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", default="1,8")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cases = [("tiny", {"x": rng.standard_normal((1, 16), dtype=np.float32)}),
             ("mlp", {"x": rng.standard_normal((8, 1024), dtype=np.float32)})]
    with start(EXAMPLES) as server:
        print("| model | batch | clients | requests/s | inferences/s | p50 ms | p99 ms | errors |")
        print("|---|---|---|---|---|---|---|---|")
        for model, inputs in cases:
            batch = next(iter(inputs.values())).shape[0]
            for clients in (int(c) for c in args.clients.split(",")):
                r = run_load(server.url, model, inputs, clients, args.seconds, {"x": "FP32"})
                print(f"| {model} | {batch} | {clients} | {r.rps:.0f} | {r.rps * batch:.0f} | "
                      f"{r.percentile_ms(50):.2f} | {r.percentile_ms(99):.2f} | {r.errors} |", flush=True)


if __name__ == "__main__":
    main()

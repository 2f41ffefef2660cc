"""Why trtserve pads batches on the GPU: ONNX Runtime's CUDA convolutions, fixed against changing shapes.

    python3 -m bench.cuda_shapes [--out bench/results/gpu/cuda_shapes.md]

Runs the `convnet` example model in one ONNX Runtime CUDA session (graph optimization EXTENDED, as the
server does) with host inputs, under the two cuDNN algorithm searches, and times runs per batch shape
sequence: one fixed batch size, a cycle through 56..64 (what dynamic batching produces), 64 fixed, and
61/64 alternating. A Conv node searches its algorithm again when its input shape differs from the
previous run's, so a changing batch size pays the search on nearly every run. Needs onnxruntime-gpu.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
SEQUENCES = {"fixed 61": [61] * 30, "cycling 56..64": list(range(56, 65)) * 4, "fixed 64": [64] * 30,
             "61 and 64 alternating": [61, 64] * 15}


def session(path: Path, search: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    cuda = ("CUDAExecutionProvider", {"device_id": "0", "cudnn_conv_algo_search": search})
    return ort.InferenceSession(str(path), opts, providers=[cuda, "CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu" / "cuda_shapes.md")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = {b: rng.standard_normal((b, 16, 32, 32), dtype=np.float32) for b in range(56, 65)}
    lines = ["# ONNX Runtime CUDA: convnet, ms per run by batch-shape sequence", "",
             f"`python3 -m bench.cuda_shapes` (onnxruntime {ort.__version__}; host inputs, so each run "
             "includes its copies)", "", f"| cudnn_conv_algo_search | {' | '.join(SEQUENCES)} |",
             "|---|" + "---|" * len(SEQUENCES)]
    for search in ("EXHAUSTIVE", "HEURISTIC"):
        s = session(ROOT / "examples" / "models" / "convnet" / "1" / "model.onnx", search)
        for b in x:  # every shape once first: what is cached per shape is cached
            s.run(None, {"x": x[b]})
        cells = []
        for sequence in SEQUENCES.values():
            t0 = time.perf_counter()
            for b in sequence:
                s.run(None, {"x": x[b]})
            cells.append(f"{(time.perf_counter() - t0) / len(sequence) * 1e3:.2f}")
        lines.append(f"| {search} | {' | '.join(cells)} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

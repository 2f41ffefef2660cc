"""Generate the example model repository's ONNX files, deterministically.

    python examples/generate_models.py --out examples/models [--models mlp,tiny]

Each model is built with onnx.helper from a fixed numpy seed, so two runs write identical bytes (the plan
cache and the tests rely on that). Only `<out>/<name>/1/model.onnx` is written; the `config.pbtxt` next
to it is committed by hand and never touched here. A model whose file already holds the same bytes is
skipped, so `make models` is idempotent.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# IR 8 is what opset 17 was released with; onnxruntime >= 1.20 loads it (newer onnx defaults to IR 10+).
IR_VERSION = 8
VERSION = 1  # the model version directory every example model is written to
BATCH = "N"  # symbolic batch dimension


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)


def _model(name: str, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="trtserve-examples", producer_version="1")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def build_mlp() -> onnx.ModelProto:
    """x FP32 [N,1024] -> MatMul 1024x4096 + b1 -> Relu -> MatMul 4096x1024 + b2 -> y FP32 [N,1024]."""
    rng = np.random.default_rng(1001)
    w1 = _normal(rng, (1024, 4096), 1.0 / np.sqrt(1024))
    b1 = _normal(rng, (4096,), 0.1)
    w2 = _normal(rng, (4096, 1024), 1.0 / np.sqrt(4096))
    b2 = _normal(rng, (1024,), 0.1)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"], name="fc2"),
        helper.make_node("Add", ["h3", "b2"], ["y"], name="fc2_bias"),
    ]
    return _model(
        "mlp", nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, 1024])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (b1, "b1"), (w2, "W2"), (b2, "b2"))],
    )


def build_tiny() -> onnx.ModelProto:
    """x FP32 [N,16] + constant vector c -> y FP32 [N,16]: the cheapest model, for serving overhead."""
    rng = np.random.default_rng(1002)
    c = _normal(rng, (16,), 1.0)
    return _model(
        "tiny", [helper.make_node("Add", ["x", "c"], ["y"], name="add")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, 16])],
        [numpy_helper.from_array(c, "c")],
    )


def build_mixed() -> onnx.ModelProto:
    """Two inputs, two outputs, two datatypes: sum = ReduceSum(ids INT64 [N,8], axis 1, keepdims) and
    scaled = scale FP16 [N,4] * constant FP16 vector k."""
    rng = np.random.default_rng(1003)
    k = rng.uniform(-2.0, 2.0, size=(4,)).astype(np.float16)
    axes = np.array([1], dtype=np.int64)
    nodes = [
        helper.make_node("ReduceSum", ["ids", "axes"], ["sum"], name="reduce_sum", keepdims=1),
        helper.make_node("Mul", ["scale", "k"], ["scaled"], name="mul"),
    ]
    return _model(
        "mixed", nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [BATCH, 8]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT16, [BATCH, 4])],
        [helper.make_tensor_value_info("sum", TensorProto.INT64, [BATCH, 1]),
         helper.make_tensor_value_info("scaled", TensorProto.FLOAT16, [BATCH, 4])],
        [numpy_helper.from_array(axes, "axes"), numpy_helper.from_array(k, "k")],
    )


def build_convnet() -> onnx.ModelProto:
    """x FP32 [N,16,32,32] -> 3x (Conv 3x3 pad 1 + Relu; 16->256->256->256) -> GlobalAveragePool ->
    Flatten -> MatMul 256x10 -> y FP32 [N,10]. About 2.5 GFLOP per item: compute-bound on a GPU."""
    rng = np.random.default_rng(1004)
    initializers: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    current, channels = "x", 16
    for i in (1, 2, 3):
        fan_in = channels * 9
        # He initialisation keeps activations O(1) through the Relu stack.
        w = _normal(rng, (256, channels, 3, 3), np.sqrt(2.0 / fan_in))
        b = _normal(rng, (256,), 0.1)
        initializers += [numpy_helper.from_array(w, f"conv{i}.W"), numpy_helper.from_array(b, f"conv{i}.B")]
        nodes += [
            helper.make_node("Conv", [current, f"conv{i}.W", f"conv{i}.B"], [f"c{i}"], name=f"conv{i}",
                             kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        current, channels = f"r{i}", 256
    fc = _normal(rng, (256, 10), 1.0 / np.sqrt(256))
    initializers.append(numpy_helper.from_array(fc, "fc.W"))
    nodes += [
        helper.make_node("GlobalAveragePool", [current], ["pooled"], name="gap"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "fc.W"], ["y"], name="fc"),
    ]
    return _model(
        "convnet", nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, 16, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, 10])],
        initializers,
    )


BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    "mlp": build_mlp,
    "tiny": build_tiny,
    "mixed": build_mixed,
    "convnet": build_convnet,
}


def write_model(out: Path, name: str) -> bool:
    """Write `<out>/<name>/1/model.onnx`; False when the file already held the same bytes."""
    data = BUILDERS[name]().SerializeToString(deterministic=True)
    path = out / name / str(VERSION) / "model.onnx"
    if path.is_file() and hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file + rename: a reader (or a crash) never sees a half-written model.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".model-", suffix=".onnx.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp creates 0600; model files are plain readable data
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="model repository root to write into")
    parser.add_argument("--models", default=",".join(BUILDERS),
                        help=f"comma-separated subset of: {', '.join(BUILDERS)} (default: all)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in BUILDERS]
    if unknown or not names:
        parser.error(f"unknown model(s) {', '.join(unknown) or '(none given)'}; "
                     f"expected some of: {', '.join(BUILDERS)}")
    for name in names:
        start = time.perf_counter()
        wrote = write_model(args.out, name)
        state = "wrote" if wrote else "unchanged"
        print(f"{name}: {state} {args.out / name / str(VERSION) / 'model.onnx'} "
              f"({time.perf_counter() - start:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Numpy reference implementations of the example models, computed from each model file's own weights.

Tests compare what the server (or an engine) returns with these; the weights are read back from the
ONNX initializers, so the reference never depends on how the generator drew them. FP32 models are
computed in float64 and rounded at the end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper

MODEL_NAMES = ("mlp", "tiny", "mixed", "convnet")


def initializers(model_path: Path | str) -> dict[str, np.ndarray]:
    """Every initializer of an ONNX model file, by name."""
    model = onnx.load(str(model_path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def make_inputs(model_name: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic random inputs of the right datatypes and shapes for one example model."""
    rng = np.random.default_rng(seed)
    if model_name == "mlp":
        return {"x": rng.standard_normal((batch, 1024), dtype=np.float32)}
    if model_name == "tiny":
        return {"x": rng.standard_normal((batch, 16), dtype=np.float32)}
    if model_name == "mixed":
        return {
            # Large magnitudes so an int32 truncation anywhere would show.
            "ids": rng.integers(-(2**40), 2**40, size=(batch, 8), dtype=np.int64),
            "scale": rng.uniform(-4.0, 4.0, size=(batch, 4)).astype(np.float16),
        }
    if model_name == "convnet":
        return {"x": rng.standard_normal((batch, 16, 32, 32), dtype=np.float32)}
    raise KeyError(f"unknown example model '{model_name}'; expected one of {MODEL_NAMES}")


def reference_outputs(model_name: str, model_path: Path | str,
                      inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The outputs the example model must produce for `inputs`, by output name."""
    w = initializers(model_path)
    if model_name == "mlp":
        x = inputs["x"].astype(np.float64)
        h = np.maximum(x @ w["W1"].astype(np.float64) + w["b1"], 0.0)
        y = h @ w["W2"].astype(np.float64) + w["b2"]
        return {"y": y.astype(np.float32)}
    if model_name == "tiny":
        return {"y": (inputs["x"].astype(np.float64) + w["c"]).astype(np.float32)}
    if model_name == "mixed":
        # fp16 * fp16 is exact in fp32, so rounding once to fp16 matches a correctly rounded kernel.
        scaled = (inputs["scale"].astype(np.float32) * w["k"].astype(np.float32)).astype(np.float16)
        return {"sum": inputs["ids"].sum(axis=1, keepdims=True, dtype=np.int64), "scaled": scaled}
    if model_name == "convnet":
        h = inputs["x"].astype(np.float64)
        for i in (1, 2, 3):
            h = np.maximum(conv3x3(h, w[f"conv{i}.W"].astype(np.float64), w[f"conv{i}.B"]), 0.0)
        pooled = h.mean(axis=(2, 3))
        return {"y": (pooled @ w["fc.W"].astype(np.float64)).astype(np.float32)}
    raise KeyError(f"unknown example model '{model_name}'; expected one of {MODEL_NAMES}")


def conv3x3(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """2-D convolution, 3x3 kernel, stride 1, zero padding 1, NCHW; im2col as one tensordot per call."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = sliding_window_view(padded, (3, 3), axis=(2, 3))  # [N, C, H, W, 3, 3]
    out = np.tensordot(windows, weight, axes=([1, 4, 5], [1, 2, 3]))  # [N, H, W, O]
    return out.transpose(0, 3, 1, 2) + bias.reshape(1, -1, 1, 1)

"""Helpers for the graph-pass tests: run an IR model in ONNX Runtime, make feeds, give norms real weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qexport.calibration.calibrator import Calibrator
from qexport.passes.discovery import sites
from qexport.passes._ir import const_f64, set_const_input
from qexport.passes.quantize.insert_qdq import QuantizePass
from qexport.passes.ort.int8 import LowerOrtPass
from qexport.runtimes.ort_session import session_options

# FP32 equivalence of lossless passes: float64 folding, then one float32 rounding per weight
RTOL, ATOL = 1e-4, 1e-5


def load(folder: Path) -> ir.Model:
    return ir.load(Path(folder) / "model.onnx")


def run(model: ir.Model, feeds: dict[str, np.ndarray], optimize: bool = True) -> dict[str, np.ndarray]:
    """All outputs of ``model`` in ONNX Runtime CPU. ``optimize=False`` runs a QDQ graph as written: ORT's default
    fuses an INT4 DequantizeLinear -> MatMul into MatMulNBits, which also rounds the activation to int8 per block.
    The options are qexport's own (``session_options``: no 8-bit QDQ fusion on a CPU where the U8S8 kernel
    saturates)."""
    options = session_options()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def make_feeds(model: ir.Model, seed: int = 0, batch: int = 2, seq: int = 5, past: int = 3) -> dict[str, np.ndarray]:
    """Random ids, a full mask, positions after ``past`` cached tokens, random past key/values."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.inputs:
        if value.name == "input_ids":
            feeds[value.name] = rng.integers(3, 200, size=(batch, seq), dtype=np.int64)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones((batch, past + seq), dtype=np.int64)
        elif value.name == "position_ids":
            feeds[value.name] = np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1))
        else:
            heads, head_dim = value.shape[1], value.shape[3]
            feeds[value.name] = rng.normal(0, 1, size=(batch, heads, past, head_dim)).astype(np.float32)
    return feeds


def give_norms_weights(model: ir.Model, seed: int = 0) -> None:
    """Random gamma, beta and linear biases, each in its own initializer (the tiny models' are 1, 0, 0 and
    shared, which would make folding trivially exact). Outlier channels make smoothing scales visible."""
    rng = np.random.default_rng(seed)
    graph = model.graph
    for norm in sites.find_norms(graph):
        if norm.gamma is not None:
            width = const_f64(norm.gamma).shape[0]
            gamma = 1 + 0.3 * rng.standard_normal(width)
            gamma[rng.choice(width, 3, replace=False)] *= 8.0
            set_const_input(graph, norm.gamma_node, norm.gamma_index, gamma, f"{norm.gamma_node.name}.test_gamma")
        if norm.beta is not None:
            beta = 0.2 * rng.standard_normal(const_f64(norm.beta).shape[0])
            set_const_input(graph, norm.beta_node, norm.beta_index, beta, f"{norm.beta_node.name}.test_beta")
    for node in graph:
        linear = sites.match_linear(node)
        if linear is not None and linear.bias is not None:
            bias = 0.1 * rng.standard_normal(linear.out_features)
            index = next(i for i, v in enumerate(linear.bias_node.inputs) if v is linear.bias)
            set_const_input(graph, linear.bias_node, index, bias, f"{node.name}.test_bias")


def assert_outputs_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], names=None) -> None:
    for name in names or expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=RTOL, atol=ATOL, err_msg=name)


def max_rel_diff(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], name: str = "logits") -> float:
    return float(np.max(np.abs(actual[name] - expected[name])) / np.max(np.abs(expected[name])))


def prefill_decode(model: ir.Model) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Prefill 5 tokens from an empty cache, then decode one token with the model's own present key/values."""
    feeds = make_feeds(model, seed=1, past=0)
    first = run(model, feeds)
    batch, seq = feeds["input_ids"].shape
    step = {"input_ids": np.array([[7], [9]], dtype=np.int64)[:batch],
            "attention_mask": np.ones((batch, seq + 1), dtype=np.int64)}
    if "position_ids" in feeds:
        step["position_ids"] = np.full((batch, 1), seq, dtype=np.int64)
    for value in model.graph.inputs:
        if value.name.startswith("past_key_values."):
            step[value.name] = first[value.name.replace("past_key_values.", "present.")]
    return first, run(model, step)


def padded_feeds(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """Batch 2 after 3 cached tokens; the second row is left-padded over the 3 cached tokens and its first new
    token, so that token's query attends to nothing at all (the fully masked row)."""
    feeds = make_feeds(model, seed=seed)
    feeds["attention_mask"][1, :4] = 0
    if "position_ids" in feeds:
        positions = np.cumsum(feeds["attention_mask"], axis=-1) - 1
        feeds["position_ids"] = np.where(feeds["attention_mask"] == 0, 1, positions)[:, -5:]
    return feeds


def decode_steps(model: ir.Model, feeds: dict[str, np.ndarray], steps: int = 3) -> list[dict[str, np.ndarray]]:
    """Run ``feeds``, then ``steps`` single-token decode steps on the model's own present key/values."""
    outputs = [run(model, feeds)]
    mask = feeds["attention_mask"]
    for step in range(steps):
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        nxt = {"input_ids": np.full((mask.shape[0], 1), 11 + step, np.int64), "attention_mask": mask}
        if "position_ids" in feeds:
            nxt["position_ids"] = (np.cumsum(mask, axis=-1) - 1)[:, -1:]
        for name in feeds:
            if name.startswith("past_key_values."):
                nxt[name] = outputs[-1][name.replace("past_key_values.", "present.")]
        outputs.append(run(model, nxt))
    return outputs


def assert_same_outputs(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], *,
                        rtol: float, atol: float) -> None:
    """The same output names, each within the test's own tolerances."""
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=rtol, atol=atol, err_msg=name)


def apply_and_check_decode(model: ir.Model, rewrite: ir.passes.PassBase, feeds: dict[str, np.ndarray], *,
                           rtol: float, atol: float, steps: int = 3) -> ir.passes.PassResult:
    """Apply ``rewrite`` to ``model`` in place and assert that the run on ``feeds`` and ``steps`` decode steps on
    the model's own KV cache give the same outputs as before it; returns the pass result (for ``modified``)."""
    expected = decode_steps(model, feeds, steps)
    result = rewrite(model)
    for got, want in zip(decode_steps(model, feeds, steps), expected, strict=True):
        assert_same_outputs(got, want, rtol=rtol, atol=atol)
    return result


def quantize_and_lower(model: ir.Model, activations: str = "per_token") -> ir.Model:
    """Int8 QDQ on every linear and the lm_head (one 64-token calibration window), lowered to ORT's int8 kernels."""
    calibrator = Calibrator((np.arange(3, 67, dtype=np.int64),))
    QuantizePass(activations=activations, calibrator=calibrator, include_lm_head=True)(model)
    LowerOrtPass()(model)
    return model


def weights_of(model: ir.Model) -> dict[str, np.ndarray]:
    """A copy of every constant initializer, to check that a no-op run changed nothing."""
    return {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items() if v.const_value is not None}

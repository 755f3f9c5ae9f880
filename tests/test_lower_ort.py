"""LowerOrtPass: the integer-kernel graph computes what its QDQ form computes, up to integer rounding."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from pass_testing import load, make_feeds, run
from qexport.passes.insert_qdq import QuantizePass
from qexport.passes.linear_select import TAG
from qexport.passes.lower_ort import LOWERED, LowerOrtPass, match_quant_linear

# Lowered vs QDQ logits, relative to max |logit|: float accumulation order and rare rounding ties only.
# The quantization error itself is ~2e-2 here, so a different quantizer (e.g. per-tensor
# DynamicQuantizeLinear in place of per-token) would fail this by two orders of magnitude.
LOWERED_RTOL = 1e-4

CALIB = (np.arange(3, 67, dtype=np.int64),)


def _quantized(tiny_export, family: str, activations: str, include_lm_head: bool = True):
    model = load(tiny_export(family))
    QuantizePass(activations=activations, windows=CALIB, include_lm_head=include_lm_head)(model)
    return model


@pytest.mark.parametrize("activations", ["per_token", "per_tensor"])
def test_lowered_equals_qdq_within_rounding(tiny_export, family, activations):
    model = _quantized(tiny_export, family, activations)
    feeds = make_feeds(model)
    fp32 = run(load(tiny_export(family)), feeds)["logits"]
    qdq = run(model, feeds)
    linears = sum(match_quant_linear(n) is not None for n in model.graph)
    assert LowerOrtPass()(model).modified
    lowered = run(model, feeds)
    for name in qdq:
        scale = np.abs(qdq[name]).max()
        diff = np.abs(lowered[name] - qdq[name]).max() / scale
        assert diff < LOWERED_RTOL, f"{name}: lowered vs QDQ relative difference {diff:.3g}"
    quant_error = np.abs(qdq["logits"] - fp32).max() / np.abs(fp32).max()
    assert quant_error > 100 * LOWERED_RTOL  # the bound is meaningful: far below the quantization error
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["MatMulIntegerToFloat"] == linears > 0
    assert ops["DequantizeLinear"] == 0  # every QDQ linear was lowered; nothing dangling
    assert not any(n.metadata_props.get(TAG) == "weight" for n in model.graph)


def test_lowered_graph_uses_uint8_activations_and_int8_weights(tiny_export):
    model = _quantized(tiny_export, "llama", "per_token")
    LowerOrtPass()(model)
    for node in model.graph:
        if node.op_type == "MatMulIntegerToFloat":
            assert node.domain == "com.microsoft" and LOWERED in node.metadata_props
            a, b, zero_point = node.inputs[0], node.inputs[1], node.inputs[4]
            assert a.dtype.name == "UINT8" and b.const_value.numpy().dtype == np.int8
            assert int(zero_point.const_value.numpy()) == 128
            assert node.inputs[2].producer().metadata_props.get(TAG) == "per_token"  # s_t scales the output rows
    assert model.graph.opset_imports.get("com.microsoft") == 1


def test_second_run_and_float_graph_change_nothing(tiny_export):
    assert not LowerOrtPass()(load(tiny_export("qwen2"))).modified
    model = _quantized(tiny_export, "qwen2", "per_token")
    assert LowerOrtPass()(model).modified
    assert not LowerOrtPass()(model).modified


def test_weight_only_linears_are_left_alone(tiny_export):
    model = load(tiny_export("llama"))
    QuantizePass(activations="none")(model)
    assert not LowerOrtPass()(model).modified

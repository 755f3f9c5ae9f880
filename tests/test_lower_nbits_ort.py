"""LowerNBitsOrtPass and per_group activations: MatMulNBits at accuracy level 4 computes the per-group QDQ graph."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

from pass_testing import give_norms_weights, load, make_feeds, run
from qexport import numerics
from qexport.errors import RecipeError
from qexport.passes.metadata import Meta
from qexport.passes._ir import const_array
from qexport.passes.ort.nbits import LowerNBitsOrtPass, match_group_linear, pack_bytes
from qexport.passes.quantize.insert_qdq import QuantizePass

QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "Abs", "ReduceMax")


def _quantized(family: str, tiny_export, weights: str, group_size: int = 16, include_lm_head: bool = True,
               activations: str = "per_group") -> ir.Model:
    model = load(tiny_export(family))
    give_norms_weights(model)  # biases on OPT's linears, so the Gemm bias path is exercised
    QuantizePass(activations=activations, weights=weights, group_size=group_size,
                 include_lm_head=include_lm_head)(model)
    return model


def _numpy_per_group(x: np.ndarray, block: int) -> np.ndarray:
    """The per-group fake quantization in float64: symmetric int8 per token and block of channels."""
    blocks = x.astype(np.float64).reshape(*x.shape[:-1], -1, block)
    scale = np.maximum(np.abs(blocks).max(-1, keepdims=True).astype(np.float32) / np.float32(127),
                       np.float32(numerics.SCALE_EPS))
    return (np.clip(np.round(blocks / scale), -127, 127) * scale).reshape(x.shape)


def test_eight_bit_bytes_are_code_plus_128_per_output_row():
    codes = np.arange(-64, 64, dtype=np.int8).reshape(32, 4)  # [K 32, N 4]
    packed = pack_bytes(codes, 16)
    assert packed.shape == (4, 2, 16) and packed.dtype == np.uint8
    np.testing.assert_array_equal(packed[1].reshape(-1), codes[:, 1].astype(np.int16) + 128)


def test_per_group_activations_equal_a_numpy_fake_quant(tiny_export):
    """The QDQ graph's per_group quantizer is the numpy definition (scale absmax / 127 per token and block)."""
    model = _quantized("llama", tiny_export, "int8")
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.metadata_props.get(Meta.QUANT) == "per_group")
    x = dq.inputs[0].producer().inputs[0]
    model.graph.outputs.extend([x, dq.outputs[0]])
    got = run(model, make_feeds(model), optimize=False)
    np.testing.assert_allclose(got[dq.outputs[0].name], _numpy_per_group(got[x.name], 16), rtol=1e-6, atol=1e-7)


def _alone(node: ir.Node) -> ir.Model:
    """``node`` (a lowered MatMulNBits) as a one-node model whose activation is the graph input ``x``."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT))
    inits = [None if v is None else ir.Value(name=v.name, const_value=v.const_value) for v in node.inputs[1:]]
    copy = ir.node("MatMulNBits", [x, *inits], domain="com.microsoft",
                   attributes={k: a.value for k, a in node.attributes.items()})
    copy.outputs[0].name, copy.outputs[0].dtype = "y", ir.DataType.FLOAT
    graph = ir.Graph([x], [copy.outputs[0]], nodes=[copy], initializers=[v for v in inits if v is not None],
                     opset_imports={"": 21, "com.microsoft": 1})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("weights", ["int8", "int8_group", "int4"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "opt"])
def test_each_lowered_linear_fed_the_qdq_input_gives_its_integers(tiny_export, family, weights):
    """Teacher-forced, linear by linear: MatMulNBits fed the QDQ graph's own activation equals the float64 product
    of the per-group int8 codes (numpy's definition) and the weight codes times their scales (+ bias), up to float32
    rounding; every quantizer is gone from the lowered graph and the logits keep their name."""
    model = _quantized(family, tiny_export, weights)
    matches = [m for node in model.graph if (m := match_group_linear(node)) is not None]
    weight_dqs = sum(n.op_type == "DequantizeLinear" and n.metadata_props.get(Meta.QUANT) == "weight" for n in model.graph)
    assert len(matches) == weight_dqs > 0
    xs = list(dict.fromkeys(m.x for m in matches))
    model.graph.outputs.extend(x for x in xs if not x.is_graph_output())
    qdq = run(model, make_feeds(model), optimize=False)
    expected = {}
    for m in matches:
        w = m.codes.astype(np.float64) * np.repeat(m.scale.astype(np.float64), m.block, axis=0)
        bias = 0.0 if m.bias is None else const_array(m.bias).astype(np.float64)
        expected[m.weight_dq.name] = (m.x.name, _numpy_per_group(qdq[m.x.name], m.block) @ w + bias)
    assert LowerNBitsOrtPass()(model).modified
    bits = 4 if weights == "int4" else 8
    lowered = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert len(lowered) == len(matches)
    assert all(n.attributes["bits"].value == bits and n.attributes["accuracy_level"].value == 4
               and n.metadata_props[Meta.LOWERED] == f"int{bits}" for n in lowered)
    ops = collections.Counter(n.op_type for n in model.graph)
    assert not any(ops[op] for op in QUANT_OPS)  # every quantizer went into the kernels
    assert next(v for v in model.graph.outputs if v.name == "logits").producer().op_type == "MatMulNBits"
    for node in lowered:
        x_name, exact = expected[node.name.removesuffix(".nbits")]
        got = run(_alone(node), {"x": qdq[x_name]})["y"]
        diff = np.abs(got - exact).max() / np.abs(exact).max()
        assert diff < 1e-5, f"{node.name}: MatMulNBits vs the per-group integers' product {diff:.3g}"
    assert not LowerNBitsOrtPass()(model).modified


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_lowered_graph_stays_with_its_qdq_graph_end_to_end(tiny_export, family):
    """End to end, a rounding tie may flip a code and spread; the logits must still be far closer to the QDQ graph
    (over 40 dB SQNR; about 120 dB where no code flips) than the same weights with per-token activations are (17 to
    30 dB on these models)."""
    model = _quantized(family, tiny_export, "int8")
    per_token = _quantized(family, tiny_export, "int8", activations="per_token")
    feeds = make_feeds(model)
    expected = run(model, feeds, optimize=False)["logits"]
    other = run(per_token, feeds, optimize=False)["logits"]
    LowerNBitsOrtPass()(model)
    got = run(model, feeds, optimize=False)["logits"]
    assert numerics.sqnr_db(expected, got) > max(40.0, numerics.sqnr_db(expected, other) + 10.0)


def test_per_token_and_dint4_linears_are_left_alone(tiny_export):
    """Per-token activations have no per-block form in the kernel; dINT4 weights are a lookup, not a uniform grid."""
    for activations, weights in (("per_token", "int8"), ("per_token", "int4"), ("per_group", "dint4")):
        model = _quantized("llama", tiny_export, weights, activations=activations)
        before = [n.op_type for n in model.graph]
        assert not LowerNBitsOrtPass()(model).modified
        assert [n.op_type for n in model.graph] == before


def test_a_group_size_that_does_not_divide_the_activation_is_an_error(tiny_export):
    model = load(tiny_export("llama"))
    with pytest.raises(RecipeError, match="per_group: group_size 48"):
        QuantizePass(activations="per_group", weights="int8", group_size=48)(model)

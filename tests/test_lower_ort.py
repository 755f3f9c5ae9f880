"""LowerOrtPass: the integer-kernel graph computes what its QDQ form computes, up to integer rounding."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

from pass_testing import load, make_feeds, run
from qexport.calibration.calibrator import Calibrator
from qexport.passes.quantize.insert_qdq import QuantizePass
from qexport.passes._ir import const_array
from qexport.passes.metadata import Meta
from qexport.passes.ort.int8 import LowerOrtPass, match_quant_linear
from qexport.runtimes.ort_session import u8s8_saturates

# Lowered vs QDQ logits, relative to max |logit|: float accumulation order and rare rounding ties only.
# The quantization error itself is ~2e-2 here, so a different quantizer (e.g. per-tensor
# DynamicQuantizeLinear in place of per-token) would fail this by two orders of magnitude.
LOWERED_RTOL = 1e-4

CALIB = (np.arange(3, 67, dtype=np.int64),)


def _quantized(tiny_export, family: str, activations: str, include_lm_head: bool = True):
    model = load(tiny_export(family))
    QuantizePass(activations=activations, calibrator=Calibrator(CALIB), include_lm_head=include_lm_head)(model)
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
    assert not any(n.metadata_props.get(Meta.QUANT) == "weight" for n in model.graph)


def test_lowered_graph_uses_uint8_activations_and_uint8_weights_by_default(tiny_export):
    """The default kernel: uint8 B = int8 weight + 128 with B zero point 128 (MLAS's U8U8, exact on every CPU)."""
    model = _quantized(tiny_export, "llama", "per_token")
    codes = {m.matmul.name: const_array(m.weight_int8) for node in model.graph if (m := match_quant_linear(node))}
    LowerOrtPass()(model)
    seen = 0
    for node in model.graph:
        if node.op_type == "MatMulIntegerToFloat":
            assert node.domain == "com.microsoft" and Meta.LOWERED in node.metadata_props
            a, b, zero_point, b_zero_point = node.inputs[0], node.inputs[1], node.inputs[4], node.inputs[5]
            assert a.dtype.name == "UINT8" and b.const_value.numpy().dtype == np.uint8
            assert int(zero_point.const_value.numpy()) == 128 and int(b_zero_point.const_value.numpy()) == 128
            original = codes[node.name.removesuffix(".int")]
            assert np.array_equal(b.const_value.numpy().astype(np.int16) - 128, original)  # the same integers
            assert node.inputs[2].producer().metadata_props.get(Meta.QUANT) == "per_token"  # s_t scales the output rows
            seen += 1
    assert seen == len(codes) > 0
    assert model.graph.opset_imports.get("com.microsoft") == 1


def test_int8_kernel_keeps_int8_weights_without_a_zero_point(tiny_export):
    model = _quantized(tiny_export, "llama", "per_token")
    LowerOrtPass(weights="int8")(model)
    lowered = [n for n in model.graph if n.op_type == "MatMulIntegerToFloat"]
    assert lowered and all(n.inputs[1].const_value.numpy().dtype == np.int8 for n in lowered)
    assert all(len(n.inputs) < 6 or n.inputs[5] is None for n in lowered)


def test_int8_kernel_equals_qdq_where_the_cpu_has_vnni(tiny_export):
    if u8s8_saturates():
        pytest.skip("this CPU has no VNNI: ONNX Runtime's U8S8 kernel saturates here (the reason uint8 is the default)")
    model = _quantized(tiny_export, "qwen2", "per_token")
    feeds = make_feeds(model)
    qdq = run(model, feeds)["logits"]
    LowerOrtPass(weights="int8")(model)
    diff = np.abs(run(model, feeds)["logits"] - qdq).max() / np.abs(qdq).max()
    assert diff < LOWERED_RTOL


def test_unknown_kernel_weights_are_an_error():
    with pytest.raises(ValueError):
        LowerOrtPass(weights="int4")


def test_second_run_and_float_graph_change_nothing(tiny_export):
    assert not LowerOrtPass()(load(tiny_export("qwen2"))).modified
    model = _quantized(tiny_export, "qwen2", "per_token")
    assert LowerOrtPass()(model).modified
    assert not LowerOrtPass()(model).modified


def test_weight_only_linears_are_left_alone(tiny_export):
    model = load(tiny_export("llama"))
    QuantizePass(activations="none")(model)
    assert not LowerOrtPass()(model).modified


def _with_outputs(model, values, feeds):
    """Run ``model`` with ``values`` as extra graph outputs (taken off again)."""
    model.graph.outputs.extend(values)
    try:
        return run(model, feeds)
    finally:
        for _ in values:
            model.graph.outputs.pop()


def _lowered_nodes_alone(model):
    """The nodes LowerOrtPass inserted, as a model of their own whose float inputs (each linear's activation x and,
    per token, its scale s_t) are graph inputs: to feed them the QDQ graph's own values; the names of those inputs;
    node name -> output name (the lm_head's output is the renamed graph output)."""
    from onnx import TensorProto, helper

    proto = ir.to_proto(model)
    keep = [n for n in proto.graph.node if any(p.key == Meta.LOWERED for p in n.metadata_props)]
    produced = {o for n in keep for o in n.output}
    inits = {i.name: i for i in proto.graph.initializer}
    used = dict.fromkeys(i for n in keep for i in n.input if i)
    outer = [name for name in used if name not in produced and name not in inits]
    dtypes = {v.name: int(v.dtype) for node in model.graph if Meta.LOWERED in node.metadata_props for v in node.outputs}
    outputs = [helper.make_tensor_value_info(o, dtypes[o], None) for n in keep for o in n.output]
    graph = helper.make_graph(keep, "lowered", [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outer],
                              outputs, [inits[name] for name in used if name in inits])
    alone = ir.from_proto(helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version))
    return alone, outer, {n.name: n.output[0] for n in keep}


@pytest.mark.parametrize("activations", ["per_token", "per_tensor"])
def test_lowered_linears_fed_the_qdq_inputs_give_its_integers_exactly(tiny_export, family, activations):
    """Teacher-forced, linear by linear (no drift from earlier layers): the lowered uint8 activation minus 128 equals
    the QDQ graph's int8 activation exactly, saturation at -128 and 127 included (per-tensor scales shrunk 4x so
    both ends clip), and MatMulIntegerToFloat equals sum_k q_k w_kn * s_a * s_w[n] (+ bias) computed in float64
    from those integers up to float32 rounding of the two scale products."""
    model = _quantized(tiny_export, family, activations)
    matches = [m for node in model.graph if (m := match_quant_linear(node)) is not None]
    if activations == "per_tensor":
        for scale in {m.act_q.inputs[1] for m in matches}:  # one initializer read by the Q and its DQ
            scale.const_value = ir.tensor(scale.const_value.numpy() * np.float32(0.25), name=scale.name)
    feeds = make_feeds(model)
    acts = {m.act_q: (m.act_q.name, m.act_q.inputs[1].name, m.act_q.outputs[0].name) for m in matches}
    exposed = [v for q in acts for v in (q.inputs[0], q.inputs[1], q.outputs[0]) if not v.is_initializer()]
    qdq = _with_outputs(model, list(dict.fromkeys(exposed)), feeds)
    scales = {scale: const_array(q.inputs[1]) if q.inputs[1].is_initializer() else qdq[scale] for q, (_, scale, _) in acts.items()}
    expected = [(m.matmul.name, const_array(m.weight_int8), const_array(m.weight_scale), m.transposed,
                 const_array(m.bias) if m.bias is not None else None, acts[m.act_q]) for m in matches]
    LowerOrtPass()(model)
    alone, outer, output_of = _lowered_nodes_alone(model)
    lowered = run(alone, {name: qdq[name] for name in outer})
    for q_name, _, int8 in acts.values():
        got = lowered[f"{q_name}.u8"].astype(np.int16) - 128
        assert np.array_equal(got, qdq[int8]), f"{q_name}: lowered integers differ from the QDQ int8"
    ints = np.concatenate([qdq[int8].ravel() for _, _, int8 in acts.values()])
    if activations == "per_tensor":
        assert ints.min() == -128 and ints.max() == 127  # both saturation ends were exercised
    for name, weight, w_scale, transposed, bias, (_, scale, int8) in expected:
        exact = qdq[int8].astype(np.float64) @ (weight.T if transposed else weight).astype(np.float64)
        exact = exact * scales[scale].astype(np.float64) * w_scale.astype(np.float64) + (0.0 if bias is None else bias)
        result = lowered[output_of.get(f"{name}.bias", output_of[f"{name}.int"])]
        diff = np.abs(result - exact).max() / np.abs(exact).max()
        assert diff < 1e-6, f"{name}: lowered linear vs float64 product of the QDQ integers {diff:.3g}"

"""OrtRotaryPass: RotaryEmbedding nodes compute what the exporter's decomposed rotary embedding computes."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from pass_testing import apply_and_check_decode, load, padded_feeds, quantize_and_lower
from qexport.passes._ir import new_initializer
from qexport.passes.metadata import Meta
from qexport.passes.ort.rotary import ROTARY_OPSET, OrtRotaryPass

# Lossless rewrite: only float rounding changes (logits are O(1) here).
RTOL, ATOL = 1e-5, 1e-5


def test_fused_equals_decomposed_with_left_padding_and_decode(tiny_export, family):
    model = load(tiny_export(family))
    negs = sum(n.op_type == "Neg" for n in model.graph)
    result = apply_and_check_decode(model, OrtRotaryPass(), padded_feeds(model), rtol=RTOL, atol=ATOL)
    if family == "opt":  # learned positions: no rotary to fuse
        assert not result.modified
        return
    assert result.modified
    ops = collections.Counter(n.op_type for n in model.graph)
    layers = sum(n.op_type == "Softmax" for n in load(tiny_export(family)).graph)
    assert ops["RotaryEmbedding"] == 2 * layers > 0  # query and key of every layer
    assert ops["Neg"] == negs - 2 * layers  # each decomposed rotate_half is gone
    assert model.graph.opset_imports[""] == ROTARY_OPSET
    assert all(Meta.ROTARY in n.metadata_props for n in model.graph if n.op_type == "RotaryEmbedding")
    halves = {n.inputs[1] for n in model.graph if n.op_type == "RotaryEmbedding"}
    assert len(halves) <= 2  # one half-width cos table shared by the layers (two with local/global rope)
    assert not OrtRotaryPass()(model).modified


def test_fused_after_lowering_equals_the_lowered_graph(tiny_export):
    model = quantize_and_lower(load(tiny_export("llama")))
    feeds = padded_feeds(model, seed=3)
    assert apply_and_check_decode(model, OrtRotaryPass(), feeds, rtol=RTOL, atol=ATOL, steps=0).modified


def test_a_rotary_whose_tables_halves_may_differ_is_left_alone(tiny_export):
    model = load(tiny_export("llama"))
    for node in model.graph:  # Concat(f, f) -> Concat(f, 2f): the halves differ, RotaryEmbedding would be wrong
        if node.op_type == "Concat" and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]:
            two = new_initializer(model.graph, f"{node.name}.two", np.array(2.0, np.float32))
            double = ir.node("Mul", [node.inputs[0], two], name=f"{node.name}.double")
            model.graph.insert_before(node, double)
            node.replace_input_with(1, double.outputs[0])
    assert not OrtRotaryPass()(model).modified

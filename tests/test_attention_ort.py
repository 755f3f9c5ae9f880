"""OrtAttentionPass: the fused Attention graph computes what the exporter's decomposed attention computes."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from pass_testing import (apply_and_check_decode, assert_same_outputs, decode_steps, load, padded_feeds,
                          quantize_and_lower, run)
from qexport.passes.ort import attention as attention_ort
from qexport.passes.ort.attention import ATTENTION_OPSET, OrtAttentionPass
from qexport.passes.metadata import Meta

# Lossless rewrite: only float summation order changes (logits are O(1) here).
RTOL, ATOL = 1e-5, 1e-5


# test_merge_int8_linears.py imports these three names from here (kept until it imports from pass_testing)
_padded_feeds, _decode_steps = padded_feeds, decode_steps


def _assert_equal(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert_same_outputs(got, expected, rtol=RTOL, atol=ATOL)


def test_fused_equals_decomposed_with_left_padding_and_decode(tiny_export, family):
    model = load(tiny_export(family))
    assert apply_and_check_decode(model, OrtAttentionPass(), padded_feeds(model), rtol=RTOL, atol=ATOL).modified
    ops = collections.Counter(n.op_type for n in model.graph)
    layers = sum(v.name.startswith("past_key_values.") for v in model.graph.inputs) // 2
    assert ops["Attention"] == layers and ops["Softmax"] == ops["IsNaN"] == 0  # the NaN guards are gone too
    assert model.graph.opset_imports[""] == ATTENTION_OPSET
    assert all(Meta.ATTENTION in n.metadata_props for n in model.graph if n.op_type == "Attention")


def test_the_fully_masked_row_is_restored(tiny_export, monkeypatch):
    """Without the dead-row restore the padded query row differs (the kernel gives it 0, the exporter's finite
    mask gives it uniform attention): the equality test above really covers that row."""
    model = load(tiny_export("llama"))
    feeds = padded_feeds(model)
    expected = run(model, feeds)
    monkeypatch.setattr(attention_ort, "_restore_dead_rows", lambda graph, match, y, *rest: y)
    OrtAttentionPass()(model)
    got = run(model, feeds)
    diff = np.abs(got["logits"] - expected["logits"])
    assert diff[1, 0].max() > 1e-2  # the fully masked row
    np.testing.assert_allclose(got["logits"][0], expected["logits"][0], rtol=RTOL, atol=ATOL)  # no padding
    np.testing.assert_allclose(got["logits"][1, 1:], expected["logits"][1, 1:], rtol=RTOL, atol=ATOL)


def test_fused_after_lowering_equals_the_lowered_graph(tiny_export):
    model = quantize_and_lower(load(tiny_export("qwen2")))
    feeds = padded_feeds(model, seed=2)
    assert apply_and_check_decode(model, OrtAttentionPass(), feeds, rtol=RTOL, atol=ATOL, steps=0).modified


def test_second_run_and_graph_without_attention_change_nothing(tiny_export):
    model = load(tiny_export("opt"))
    assert OrtAttentionPass()(model).modified
    count = len(list(model.graph))
    assert not OrtAttentionPass()(model).modified
    assert len(list(model.graph)) == count


@pytest.mark.parametrize("perm", [[0, 1, 3, 2], [0, 2, 1, 3]])
def test_only_a_last_two_axes_transpose_is_a_key_transpose(perm):
    import onnx_ir as ir

    x = ir.Value(name="k", shape=ir.Shape([1, 2, 4, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("Transpose", [x], attributes={"perm": perm})
    found = attention_ort._transposed_last_two(node.outputs[0])
    assert (found is x) == (perm == [0, 1, 3, 2])

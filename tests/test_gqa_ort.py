"""OrtGqaPass: GroupQueryAttention computes what the exporter's attention, cache concat and rotary compute."""

from __future__ import annotations

import collections

import numpy as np

from pass_testing import apply_and_check_decode, load, make_feeds, padded_feeds, quantize_and_lower, run
from qexport.passes.metadata import Meta
from qexport.passes.ort import group_query_attention as gqa_ort
from qexport.passes.ort.attention import OrtAttentionPass
from qexport.passes.ort.group_query_attention import OrtGqaPass
from qexport.passes.ort.merge_linears import MergeInt8LinearsPass
from qexport.passes.ort.rotary import OrtRotaryPass

# Lossless rewrite: only float summation order changes (logits are O(1) here).
RTOL, ATOL = 1e-5, 1e-5


def _prefill_feeds(model, seed: int = 4) -> dict[str, np.ndarray]:
    """A first prompt (empty cache), batch 2, the second row left-padded over its first two tokens."""
    feeds = make_feeds(model, seed=seed, past=0)
    feeds["attention_mask"][1, :2] = 0
    if "position_ids" in feeds:
        feeds["position_ids"] = np.where(feeds["attention_mask"] == 0, 1, np.cumsum(feeds["attention_mask"], -1) - 1)
    return feeds


def _signature(model) -> tuple[list[str], list[str]]:
    return [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]


def test_lowered_equals_decomposed_with_left_padding_and_decode(tiny_export, family):
    model = load(tiny_export(family))
    signature = _signature(model)
    layers = sum(v.name.startswith("past_key_values.") for v in model.graph.inputs) // 2
    transposes = sum(n.op_type == "Transpose" for n in model.graph)
    expected_prefill = run(model, _prefill_feeds(model))
    assert apply_and_check_decode(model, OrtGqaPass(), padded_feeds(model), rtol=RTOL, atol=ATOL).modified
    got_prefill = run(model, _prefill_feeds(model))
    for name in expected_prefill:  # the first prompt: the kernel's other path
        np.testing.assert_allclose(got_prefill[name], expected_prefill[name], rtol=RTOL, atol=ATOL, err_msg=name)
    assert _signature(model) == signature  # past_key_values.i / present.i keep their names
    nodes = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    ops = collections.Counter(n.op_type for n in model.graph)
    assert len(nodes) == layers and ops["Softmax"] == ops["IsNaN"] == 0
    assert all(n.domain == "com.microsoft" and Meta.GQA in n.metadata_props for n in nodes)
    rotary = [n.attributes["do_rotary"].value for n in nodes]
    if family == "opt":  # learned positions: no rotary
        assert rotary == [0] * layers
    else:  # rotary fused into every layer: no rotate_half left
        assert rotary == [1] * layers and ops["Neg"] == 0
    # q / k / v / output read and written in [B, S, H * D], kᵀ gone; Gemma3's per-head norms keep q / k in [B, H, S, D]
    assert transposes - ops["Transpose"] >= (1 if family == "gemma3" else 5) * layers


def test_lowered_after_int8_lowering_equals_the_lowered_graph(tiny_export):
    model = quantize_and_lower(load(tiny_export("qwen2")))
    feeds = padded_feeds(model, seed=2)
    assert apply_and_check_decode(model, OrtGqaPass(), feeds, rtol=RTOL, atol=ATOL, steps=2).modified


def test_merged_qkv_is_read_packed(tiny_export):
    model = quantize_and_lower(load(tiny_export("llama")))
    assert MergeInt8LinearsPass(max_columns=128)(model).modified  # q/k/v (64 + 32 + 32 columns), not gate/up
    assert sum(n.op_type == "Split" for n in model.graph) == 2
    assert apply_and_check_decode(model, OrtGqaPass(), padded_feeds(model, seed=6), rtol=RTOL, atol=ATOL).modified
    assert not any(n.op_type == "Split" for n in model.graph)


def test_rotary_embedding_nodes_are_fused_too(tiny_export):
    model = load(tiny_export("llama"))
    assert OrtRotaryPass()(model).modified
    assert apply_and_check_decode(model, OrtGqaPass(), padded_feeds(model, seed=5), rtol=RTOL, atol=ATOL).modified
    assert not any(n.op_type == "RotaryEmbedding" for n in model.graph)


def test_the_fully_masked_row_is_restored(tiny_export, monkeypatch):
    """Without the dead-row restore the padded query row differs (the kernel's causal softmax sees fewer keys
    than the exporter's uniform row): the equality test above really covers that row."""
    model = load(tiny_export("llama"))
    feeds = padded_feeds(model)
    expected = run(model, feeds)
    monkeypatch.setattr(gqa_ort, "_restore_dead_rows", lambda present_value, v_scale, y, *rest: y)
    OrtGqaPass()(model)
    got = run(model, feeds)
    diff = np.abs(got["logits"] - expected["logits"])
    assert diff[1, 0].max() > 1e-2  # the fully masked row
    np.testing.assert_allclose(got["logits"][0], expected["logits"][0], rtol=RTOL, atol=ATOL)  # no padding
    np.testing.assert_allclose(got["logits"][1, 1:], expected["logits"][1, 1:], rtol=RTOL, atol=ATOL)


def test_second_run_and_graph_without_decomposed_attention_change_nothing(tiny_export):
    model = load(tiny_export("gemma3"))
    assert OrtGqaPass()(model).modified
    count = len(list(model.graph))
    assert not OrtGqaPass()(model).modified
    assert len(list(model.graph)) == count
    fused = load(tiny_export("opt"))
    assert OrtAttentionPass()(fused).modified
    assert not OrtGqaPass()(fused).modified  # ONNX Attention nodes are left to ort-attention's form

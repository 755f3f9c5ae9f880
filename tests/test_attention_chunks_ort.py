"""OrtAttentionChunksPass: query-chunked causal attention computes what the single fused Attention computes."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from pass_testing import apply_and_check_decode, load, padded_feeds, quantize_and_lower, run
from qexport.errors import RecipeError
from qexport.passes.ort.attention_chunks import OrtAttentionChunksPass
from qexport.passes.ort.attention import OrtAttentionPass
from qexport.passes.metadata import Meta

# Lossless rewrite: the dropped keys weigh exactly 0; only float summation order changes (logits are O(1) here).
RTOL, ATOL = 1e-5, 1e-5


def _fused(tiny_export, family: str) -> ir.Model:
    model = load(tiny_export(family))
    assert OrtAttentionPass()(model).modified
    return model


def _executed_attention_nodes(model: ir.Model, feeds: dict[str, np.ndarray], folder) -> collections.Counter:
    """How many times ONNX Runtime ran each Attention node, by node name (subgraph nodes included); the profile
    is written under ``folder``."""
    options = ort.SessionOptions()
    options.log_severity_level, options.enable_profiling = 3, True
    options.profile_file_prefix = str(folder / "ort_profile")
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    return collections.Counter(e["name"][: -len("_kernel_time")] for e in events
                               if e.get("cat") == "Node" and e["args"].get("op_name") == "Attention"
                               and e["name"].endswith("_kernel_time"))


def test_chunked_equals_fused_with_past_left_padding_and_decode(tiny_export, family, tmp_path):
    """5 new tokens after 3 cached ones (S >= min_rows: the chunked branch, rows 1, 1, 1, 2), a fully masked row in
    the first chunk, then 3 decode steps (S = 1: the single node)."""
    model = _fused(tiny_export, family)
    feeds = padded_feeds(model)
    rewrite = OrtAttentionChunksPass(chunks=4, min_rows=4)
    assert apply_and_check_decode(model, rewrite, feeds, rtol=RTOL, atol=ATOL).modified
    layers = sum(v.name.startswith("past_key_values.") for v in model.graph.inputs) // 2
    ifs = [n for n in model.graph if n.op_type == "If" and Meta.ATTENTION_CHUNKS in n.metadata_props]
    assert len(ifs) == layers and not any(n.op_type == "Attention" for n in model.graph)
    ran = _executed_attention_nodes(model, feeds, tmp_path)
    assert sum(".then.y" in name for name in ran) == 4 * layers and not any(".else." in name for name in ran)
    step = {k: v[:, :, :0] if k.startswith("past_key_values.") else v for k, v in feeds.items()}
    step["input_ids"], step["attention_mask"] = feeds["input_ids"][:, :1], feeds["attention_mask"][:, :1]
    if "position_ids" in step:
        step["position_ids"] = np.zeros((2, 1), np.int64)
    ran = _executed_attention_nodes(model, step, tmp_path)  # one row: below min_rows
    assert sum(".else.y" in name for name in ran) == layers and not any(".then." in name for name in ran)


def test_chunked_after_lowering_equals_the_lowered_graph(tiny_export):
    model = quantize_and_lower(load(tiny_export("llama")))
    assert OrtAttentionPass()(model).modified
    feeds = padded_feeds(model, seed=4)
    assert apply_and_check_decode(model, OrtAttentionChunksPass(chunks=2, min_rows=2), feeds,
                                  rtol=RTOL, atol=ATOL, steps=0).modified


def test_a_chunk_cut_one_key_short_differs(tiny_export):
    """The then-branch really attends to key prefixes ending at P + its last row + 1: with the first chunk's keys
    and mask cut one key short (its last visible key dropped) the logits move, so the equality above is not the
    single node running under another name, and the prefixes are not longer than needed."""
    model = _fused(tiny_export, "llama")
    feeds = padded_feeds(model, seed=5)
    expected = run(model, feeds)
    assert OrtAttentionChunksPass(chunks=2, min_rows=2)(model).modified
    np.testing.assert_allclose(run(model, feeds)["logits"], expected["logits"], rtol=RTOL, atol=ATOL)
    key_end = next(n for n in model.graph if n.name.endswith(".key_end0")).outputs[0]
    one = ir.Value(name="one_key", const_value=ir.tensor(np.array([1], np.int64)))
    model.graph.register_initializer(one)
    short = ir.node("Sub", [key_end, one], name="one_key_short")
    short.outputs[0].name = "one_key_short"
    key_end.replace_all_uses_with(short.outputs[0])
    short.replace_input_with(0, key_end)
    model.graph.insert_after(key_end.producer(), short)
    diff = np.abs(run(model, feeds)["logits"] - expected["logits"])
    assert diff.max() > 1e-2


def test_second_run_unfused_graph_and_bad_settings(tiny_export):
    assert not OrtAttentionChunksPass()(load(tiny_export("qwen2"))).modified  # no fused Attention
    model = _fused(tiny_export, "gemma3")
    assert OrtAttentionChunksPass()(model).modified
    count = len(list(model.graph))
    assert not OrtAttentionChunksPass()(model).modified
    assert len(list(model.graph)) == count
    with pytest.raises(RecipeError, match="chunks must be at least 2"):
        OrtAttentionChunksPass(chunks=1)
    with pytest.raises(RecipeError, match="no chunk is empty"):
        OrtAttentionChunksPass(chunks=4, min_rows=3)


def test_a_mask_that_is_not_the_exporters_is_left_alone(tiny_export):
    model = _fused(tiny_export, "llama")
    for node in model.graph:  # Where(cond, 0, min) -> Where(cond, 0, -1): a soft mask, keys past the bound count
        if node.op_type == "Where" and any(n.op_type == "Attention" for n, _ in node.outputs[0].uses()):
            low = ir.Value(name="soft_low", const_value=ir.tensor(np.array(-1.0, np.float32)))
            model.graph.register_initializer(low)
            node.replace_input_with(2, low)
    assert not OrtAttentionChunksPass()(model).modified

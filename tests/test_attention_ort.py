"""OrtAttentionPass: the fused Attention graph computes what the exporter's decomposed attention computes."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from pass_testing import load, make_feeds, run
from qexport.passes import attention_ort
from qexport.passes.attention_ort import ATTENTION_OPSET, FUSED, OrtAttentionPass
from qexport.passes.insert_qdq import QuantizePass
from qexport.passes.lower_ort import LowerOrtPass

# Lossless rewrite: only float summation order changes (logits are O(1) here).
RTOL, ATOL = 1e-5, 1e-5


def _padded_feeds(model, seed: int = 0) -> dict[str, np.ndarray]:
    """Batch 2 after 3 cached tokens; the second row is left-padded over the 3 cached tokens and its first new
    token, so that token's query attends to nothing at all (the fully masked row)."""
    feeds = make_feeds(model, seed=seed)
    feeds["attention_mask"][1, :4] = 0
    if "position_ids" in feeds:
        positions = np.cumsum(feeds["attention_mask"], axis=-1) - 1
        feeds["position_ids"] = np.where(feeds["attention_mask"] == 0, 1, positions)[:, -5:]
    return feeds


def _assert_equal(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=RTOL, atol=ATOL, err_msg=name)


def _decode_steps(model, feeds: dict[str, np.ndarray], steps: int = 3) -> list[dict[str, np.ndarray]]:
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


def test_fused_equals_decomposed_with_left_padding_and_decode(tiny_export, family):
    model = load(tiny_export(family))
    feeds = _padded_feeds(model)
    expected = _decode_steps(model, feeds)
    assert OrtAttentionPass()(model).modified
    for got, want in zip(_decode_steps(model, feeds), expected):
        _assert_equal(got, want)
    ops = collections.Counter(n.op_type for n in model.graph)
    layers = sum(v.name.startswith("past_key_values.") for v in model.graph.inputs) // 2
    assert ops["Attention"] == layers and ops["Softmax"] == ops["IsNaN"] == 0  # the NaN guards are gone too
    assert model.graph.opset_imports[""] == ATTENTION_OPSET
    assert all(FUSED in n.metadata_props for n in model.graph if n.op_type == "Attention")


def test_the_fully_masked_row_is_restored(tiny_export, monkeypatch):
    """Without the dead-row restore the padded query row differs (the kernel gives it 0, the exporter's finite
    mask gives it uniform attention): the equality test above really covers that row."""
    model = load(tiny_export("llama"))
    feeds = _padded_feeds(model)
    expected = run(model, feeds)
    monkeypatch.setattr(attention_ort, "_restore_dead_rows", lambda graph, match, y, *rest: y)
    OrtAttentionPass()(model)
    got = run(model, feeds)
    diff = np.abs(got["logits"] - expected["logits"])
    assert diff[1, 0].max() > 1e-2  # the fully masked row
    np.testing.assert_allclose(got["logits"][0], expected["logits"][0], rtol=RTOL, atol=ATOL)  # no padding
    np.testing.assert_allclose(got["logits"][1, 1:], expected["logits"][1, 1:], rtol=RTOL, atol=ATOL)


def test_fused_after_lowering_equals_the_lowered_graph(tiny_export):
    model = load(tiny_export("qwen2"))
    QuantizePass(activations="per_token", windows=(np.arange(3, 67, dtype=np.int64),), include_lm_head=True)(model)
    LowerOrtPass()(model)
    feeds = _padded_feeds(model, seed=2)
    expected = run(model, feeds)
    assert OrtAttentionPass()(model).modified
    _assert_equal(run(model, feeds), expected)


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

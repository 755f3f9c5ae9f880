"""MergeInt8LinearsPass: one MatMulIntegerToFloat per shared activation computes what the separate ones do."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from pass_testing import give_norms_weights, load
from qexport.calibration.calibrator import Calibrator
from qexport.errors import RecipeError
from qexport.passes.ort.attention import OrtAttentionPass
from qexport.passes.quantize.insert_qdq import QuantizePass
from qexport.passes.ort.int8 import LowerOrtPass
from qexport.passes.ort.merge_linears import MergeInt8LinearsPass
from qexport.passes.ort.nbits import LowerNBitsOrtPass
from qexport.passes.metadata import Meta
from test_attention_ort import _assert_equal, _decode_steps, _padded_feeds

CALIB = (np.arange(3, 67, dtype=np.int64),)


def _lowered(tiny_export, family: str, activations: str):
    model = load(tiny_export(family))
    QuantizePass(activations=activations, calibrator=Calibrator(CALIB), include_lm_head=True)(model)
    LowerOrtPass()(model)
    return model


def test_merged_equals_separate_with_left_padding_and_decode(tiny_export, family):
    _check_merge_is_exact(_lowered(tiny_export, family, "per_token"))


def test_per_tensor_merge_concatenates_fused_biases(tiny_export):
    """Static scales: OPT's Gemm biases are fused into the kernel (its bias input), concatenated on merge."""
    model = _lowered(tiny_export, "opt", "per_tensor")
    assert any(len(n.inputs) > 6 and n.inputs[6] is not None for n in model.graph if n.op_type == "MatMulIntegerToFloat")
    _check_merge_is_exact(model)


@pytest.mark.parametrize("weights", ["int8_group", "int4"])
def test_merged_matmul_nbits_equal_separate_with_left_padding_and_decode(tiny_export, family, weights):
    """ort-nbits' MatMulNBits (accuracy level 4: the kernel quantizes its input per row and block, the same for any
    N) sharing one activation merge into one; on OPT with their Gemm biases concatenated."""
    model = load(tiny_export(family))
    if family == "opt":
        give_norms_weights(model)  # biases on the linears
    QuantizePass(activations="per_group", weights=weights, group_size=16, include_lm_head=True)(model)
    LowerNBitsOrtPass()(model)
    if family == "opt":
        assert any(len(n.inputs) > 5 and n.inputs[5] is not None for n in model.graph if n.op_type == "MatMulNBits")
    _check_merge_is_exact(model, "MatMulNBits")
    assert all(n.attributes["N"].value == n.inputs[1].const_value.shape[0] for n in model.graph
               if n.op_type == "MatMulNBits")


def _check_merge_is_exact(model, op: str = "MatMulIntegerToFloat") -> None:
    feeds = _padded_feeds(model)
    expected = _decode_steps(model, feeds)
    before = collections.Counter(n.op_type for n in model.graph)[op]
    assert MergeInt8LinearsPass()(model).modified
    for got, want in zip(_decode_steps(model, feeds), expected):
        _assert_equal(got, want)
    ops = collections.Counter(n.op_type for n in model.graph)
    merged = [n for n in model.graph if Meta.MERGED_LINEARS in n.metadata_props]
    replaced = sum(len(n.metadata_props[Meta.MERGED_LINEARS].split(",")) for n in merged)
    assert ops[op] == before - replaced + len(merged) < before
    assert ops["Split"] == len(merged)
    assert not MergeInt8LinearsPass()(model).modified  # nothing left to merge


def test_llama_merges_qkv_and_gate_up_per_layer(tiny_export):
    model = _lowered(tiny_export, "llama", "per_token")
    layers = sum(v.name.startswith("past_key_values.") for v in model.graph.inputs) // 2
    MergeInt8LinearsPass()(model)
    widths = sorted(len(n.metadata_props[Meta.MERGED_LINEARS].split(",")) for n in model.graph if Meta.MERGED_LINEARS in n.metadata_props)
    assert widths == [2] * layers + [3] * layers  # gate/up and q/k/v
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["MatMulIntegerToFloat"] == 4 * layers + 1  # merged qkv, o, merged gate/up, down; lm_head


def test_merge_after_attention_fusion_equals_the_fused_graph(tiny_export):
    model = _lowered(tiny_export, "qwen2", "per_token")  # q/k/v biases: the per-token Adds stay after the Split
    OrtAttentionPass()(model)
    feeds = _padded_feeds(model, seed=2)
    expected = _decode_steps(model, feeds)
    assert MergeInt8LinearsPass()(model).modified
    for got, want in zip(_decode_steps(model, feeds), expected):
        _assert_equal(got, want)


def test_float_graph_changes_nothing(tiny_export):
    assert not MergeInt8LinearsPass()(load(tiny_export("llama"))).modified


def test_max_columns_leaves_wider_groups_separate_and_stays_exact(tiny_export):
    full = _lowered(tiny_export, "llama", "per_token")
    MergeInt8LinearsPass()(full)
    width = {len(n.metadata_props[Meta.MERGED_LINEARS].split(",")): int(n.inputs[1].const_value.shape[1])
             for n in full.graph if Meta.MERGED_LINEARS in n.metadata_props}  # members -> merged columns
    assert width[3] < width[2]  # q/k/v narrower than gate/up, as in SmolLM2 (960 < 3072)
    model = _lowered(tiny_export, "llama", "per_token")
    layers = sum(v.name.startswith("past_key_values.") for v in model.graph.inputs) // 2
    before = sum(n.op_type == "MatMulIntegerToFloat" for n in model.graph)
    feeds = _padded_feeds(model, seed=3)
    expected = _decode_steps(model, feeds)
    assert MergeInt8LinearsPass(max_columns=width[3])(model).modified
    merged = [n.metadata_props[Meta.MERGED_LINEARS].split(",") for n in model.graph if Meta.MERGED_LINEARS in n.metadata_props]
    assert [len(names) for names in merged] == [3] * layers  # q/k/v only; gate/up left separate
    assert sum(n.op_type == "MatMulIntegerToFloat" for n in model.graph) == before - 2 * layers
    for got, want in zip(_decode_steps(model, feeds), expected):
        _assert_equal(got, want)


def test_max_columns_below_every_group_changes_nothing(tiny_export):
    assert not MergeInt8LinearsPass(max_columns=2)(_lowered(tiny_export, "llama", "per_token")).modified


def test_bad_max_columns_is_a_recipe_error():
    with pytest.raises(RecipeError, match="max_columns"):
        MergeInt8LinearsPass(max_columns=1)

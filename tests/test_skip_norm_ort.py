"""OrtSkipNormPass: SkipSimplifiedLayerNormalization computes what the residual Add and RMSNormalization compute."""

from __future__ import annotations

import collections

from pass_testing import apply_and_check_decode, give_norms_weights, load, padded_feeds, quantize_and_lower
from qexport.passes.metadata import Meta
from qexport.passes.ort.rms_norm import OrtRmsNormPass
from qexport.passes.ort.skip_norm import OrtSkipNormPass

# Lossless rewrite: only float rounding changes (logits are O(1) here).
RTOL, ATOL = 1e-5, 1e-5


def test_fused_equals_add_and_norm_with_left_padding_and_decode(tiny_export, family):
    model = load(tiny_export(family))
    give_norms_weights(model)
    if family == "opt":  # LayerNorm: no RMSNormalization to fuse into
        assert not OrtRmsNormPass()(model).modified and not OrtSkipNormPass()(model).modified
        return
    assert OrtRmsNormPass()(model).modified
    before = collections.Counter(n.op_type for n in model.graph)
    assert apply_and_check_decode(model, OrtSkipNormPass(), padded_feeds(model), rtol=RTOL, atol=ATOL).modified
    ops = collections.Counter(n.op_type for n in model.graph)
    fused = ops["SkipSimplifiedLayerNormalization"]
    layers = sum(v.name.startswith("past_key_values.") for v in model.graph.inputs) // 2
    assert fused >= 2 * layers  # at least the post-attention and the next layer's (or the final) norm per layer
    assert ops["RMSNormalization"] == before["RMSNormalization"] - fused and ops["Add"] == before["Add"] - fused
    assert all(Meta.SKIP_NORM in n.metadata_props for n in model.graph if n.op_type == "SkipSimplifiedLayerNormalization")
    assert not OrtSkipNormPass()(model).modified


def test_fused_after_lowering_equals_the_lowered_graph(tiny_export):
    model = quantize_and_lower(load(tiny_export("llama")))
    assert OrtRmsNormPass()(model).modified
    assert apply_and_check_decode(model, OrtSkipNormPass(), padded_feeds(model, seed=3), rtol=RTOL, atol=ATOL,
                                  steps=1).modified


def test_graph_without_rms_normalization_changes_nothing(tiny_export):
    assert not OrtSkipNormPass()(load(tiny_export("llama"))).modified  # decomposed norms: ort-rms-norm comes first

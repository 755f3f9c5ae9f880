"""OrtRmsNormPass: RMSNormalization nodes compute what the exporter's decomposed RMSNorm computes."""

from __future__ import annotations

import collections

from pass_testing import apply_and_check_decode, give_norms_weights, load, padded_feeds, quantize_and_lower
from qexport.passes.metadata import Meta
from qexport.passes.ort.rms_norm import RMS_NORM_OPSET, OrtRmsNormPass

# Lossless rewrite: only float summation order changes (logits are O(1) here).
RTOL, ATOL = 1e-5, 1e-5


def _norms(model) -> int:
    return sum(n.op_type == "Pow" for n in model.graph)


def test_fused_equals_decomposed_with_left_padding_and_decode(tiny_export, family):
    model = load(tiny_export(family))
    give_norms_weights(model)  # real gammas: a dropped or misplaced gamma would show
    norms = _norms(model)
    result = apply_and_check_decode(model, OrtRmsNormPass(), padded_feeds(model), rtol=RTOL, atol=ATOL)
    if family == "opt":  # LayerNorm, not RMSNorm: nothing to fuse
        assert not result.modified and norms == 0
        return
    assert result.modified
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["RMSNormalization"] == norms > 0 and ops["Pow"] == ops["Sqrt"] == 0
    assert model.graph.opset_imports[""] == RMS_NORM_OPSET
    assert all(Meta.RMS_NORM in n.metadata_props for n in model.graph if n.op_type == "RMSNormalization")
    assert not OrtRmsNormPass()(model).modified


def test_fused_after_lowering_equals_the_lowered_graph(tiny_export):
    model = quantize_and_lower(load(tiny_export("llama")))
    feeds = padded_feeds(model, seed=3)
    assert apply_and_check_decode(model, OrtRmsNormPass(), feeds, rtol=RTOL, atol=ATOL, steps=0).modified
